"""The reconciler's SQL: state-table writes from connector pulls, cursors, set-based comparison, drift items,
statements, actions and their audit trail. Every value is a bound parameter.

Comparison: one aggregation per key kind (invoice, payment, customer) over a UNION ALL of both systems'
rows, grouped by the business key — no row-by-row work and no big hash joins. A key whose sides match
exactly is dropped inside ClickHouse (HAVING NOT <clean>); the few left are classified by the pure rules
in reconciler/classify.py. Full runs read the state tables with FINAL; incremental runs restrict every source
to the keys in ``reconcile_scope`` for the run (primary-key filters before FINAL), so they touch only the
keys changed since the last run's watermark plus the open drift items.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from tower_core.models import Invoice, LedgerEntry, Payment
from tower_core.store.base import Store

TS_MS = pa.timestamp("ms", tz="UTC")
TS_US = pa.timestamp("us", tz="UTC")
SMAP = pa.map_(pa.string(), pa.string())
IMAP = pa.map_(pa.string(), pa.int64())
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
FINAL_STATUSES = ("open", "paid", "uncollectible")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime:
    if value is None:
        return EPOCH
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _ns(value: dt.datetime) -> int:
    return int(_aware(value).timestamp() * 1_000_000) * 1000


def _compose(template: str, **fragments: str) -> str:
    """Fill ``/*name*/`` markers with constant SQL fragments of this module (never with values)."""
    for name, fragment in fragments.items():
        template = template.replace(f"/*{name}*/", fragment)
    return template


# --- state tables: connector pulls --------------------------------------------------------------------------
INVOICES = pa.schema(
    [
        ("InvoiceId", pa.string()),
        ("CustomerId", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("SubtotalMinor", pa.int64()),
        ("TaxMinor", pa.int64()),
        ("TotalMinor", pa.int64()),
        ("AmountPaidMinor", pa.int64()),
        ("AmountCreditedMinor", pa.int64()),
        ("Status", pa.string()),
        ("IssuedAt", TS_MS),
        ("DueAt", TS_MS),
        ("FinalizedAt", TS_MS),
        ("PaidAt", TS_MS),
        ("UpdatedAt", TS_MS),
        ("SourceSystem", pa.string()),
        ("Attributes", SMAP),
        ("Version", pa.uint64()),
    ]
)
PAYMENTS = pa.schema(
    [
        ("PaymentId", pa.string()),
        ("Kind", pa.string()),
        ("CustomerId", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("AmountMinor", pa.int64()),
        ("Method", pa.string()),
        ("Status", pa.string()),
        ("Allocations", IMAP),
        ("RelatedPaymentId", pa.string()),
        ("OccurredAt", TS_MS),
        ("UpdatedAt", TS_MS),
        ("SourceSystem", pa.string()),
        ("Attributes", SMAP),
        ("Version", pa.uint64()),
    ]
)
LEDGER = pa.schema(
    [
        ("EntryId", pa.string()),
        ("EntryType", pa.string()),
        ("ExternalRef", pa.string()),
        ("PartyRef", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("AmountMinor", pa.int64()),
        ("Status", pa.string()),
        ("AppliedToRef", pa.string()),
        ("PostedAt", TS_MS),
        ("PeriodDate", pa.date32()),
        ("UpdatedAt", TS_MS),
        ("SourceSystem", pa.string()),
        ("Attributes", SMAP),
        ("Version", pa.uint64()),
    ]
)


def _table(schema: pa.Schema, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([dict(r) for r in rows], schema=schema)


def write_invoices(store: Store, items: Sequence[Invoice], token: str | None = None) -> int:
    """One row per changed invoice; Version = its change time in ns (contract: state tables)."""
    rows = [
        {
            "InvoiceId": i.invoice_id,
            "CustomerId": i.customer_id,
            "Region": i.region,
            "Currency": i.currency,
            "SubtotalMinor": i.subtotal_minor,
            "TaxMinor": i.tax_minor,
            "TotalMinor": i.total_minor,
            "AmountPaidMinor": i.amount_paid_minor,
            "AmountCreditedMinor": i.amount_credited_minor,
            "Status": i.status,
            "IssuedAt": _aware(i.issued_at),
            "DueAt": _aware(i.due_at),
            "FinalizedAt": _aware(i.finalized_at),
            "PaidAt": _aware(i.paid_at),
            "UpdatedAt": _aware(i.updated_at),
            "SourceSystem": i.source_system,
            "Attributes": list(i.attributes.items()),
            "Version": _ns(i.updated_at),
        }
        for i in items
    ]
    return store.insert_arrow("billing_invoices", _table(INVOICES, rows), dedup_token=token)


def write_payments(store: Store, items: Sequence[Payment], token: str | None = None) -> int:
    rows = [
        {
            "PaymentId": p.payment_id,
            "Kind": p.kind,
            "CustomerId": p.customer_id,
            "Region": p.region,
            "Currency": p.currency,
            "AmountMinor": p.amount_minor,
            "Method": p.method,
            "Status": p.status,
            "Allocations": list(p.allocations.items()),
            "RelatedPaymentId": p.related_payment_id,
            "OccurredAt": _aware(p.occurred_at),
            "UpdatedAt": _aware(p.updated_at),
            "SourceSystem": p.source_system,
            "Attributes": list(p.attributes.items()),
            "Version": _ns(p.updated_at),
        }
        for p in items
    ]
    return store.insert_arrow("billing_payments", _table(PAYMENTS, rows), dedup_token=token)


def write_ledger(store: Store, items: Sequence[LedgerEntry], token: str | None = None) -> int:
    rows = [
        {
            "EntryId": e.entry_id,
            "EntryType": e.entry_type,
            "ExternalRef": e.external_ref,
            "PartyRef": e.party_ref,
            "Region": e.region,
            "Currency": e.currency,
            "AmountMinor": e.amount_minor,
            "Status": e.status,
            "AppliedToRef": e.applied_to_ref,
            "PostedAt": _aware(e.posted_at),
            "PeriodDate": e.period_date or _aware(e.posted_at).date(),
            "UpdatedAt": _aware(e.updated_at),
            "SourceSystem": e.source_system,
            "Attributes": list(e.attributes.items()),
            "Version": _ns(e.updated_at),
        }
        for e in items
    ]
    return store.insert_arrow("erp_ledger_entries", _table(LEDGER, rows), dedup_token=token)


def write_customers(store: Store, items: Sequence[Any], token: str | None = None) -> int:
    """Billing customers (tower_core.models.Customer) into billing_customers (migration 0003)."""
    from tower_core.store.arrow_schemas import BILLING_CUSTOMERS

    rows = [
        {
            "CustomerId": x.customer_id,
            "CdpUserId": x.cdp_user_id,
            "ParentCustomerId": x.parent_id,
            "Name": x.name,
            "Email": x.email,
            "Region": x.region,
            "Currency": x.currency,
            "Plan": x.plan,
            "TaxRateBp": x.tax_rate_bp,
            "CreatedAt": _aware(x.created_at),
            "UpdatedAt": _aware(x.updated_at),
            "SourceSystem": x.source_system,
            "Attributes": list(x.attributes.items()),
            "Version": _ns(x.updated_at),
        }
        for x in items
    ]
    return store.insert_arrow("billing_customers", _table(BILLING_CUSTOMERS, rows), dedup_token=token)


def write_profiles(store: Store, items: Sequence[Any], token: str | None = None) -> int:
    """CDP profiles (tower_core.models.CdpProfile) into cdp_profiles (migration 0003)."""
    from tower_core.store.arrow_schemas import CDP_PROFILES

    rows = [
        {
            "CdpUserId": x.cdp_user_id,
            "CustomerId": x.customer_id,
            "ParentCustomerId": x.parent_id,
            "Name": x.name,
            "Email": x.email,
            "Region": x.region,
            "UpdatedAt": _aware(x.updated_at),
            "SourceSystem": x.source_system,
            "Traits": list(x.traits.items()),
            "Version": _ns(x.updated_at),
        }
        for x in items
    ]
    return store.insert_arrow("cdp_profiles", _table(CDP_PROFILES, rows), dedup_token=token)


def get_cursor(store: Store, connector: str, stream: str) -> str | None:
    rows = store.query_rows(
        "SELECT argMax(Cursor, Version) AS c, count() AS n FROM $db.connector_cursors "
        "WHERE Connector = {c:String} AND Stream = {s:String}",
        {"c": connector, "s": stream},
    )
    return rows[0]["c"] if rows and rows[0]["n"] else None


def set_cursor(store: Store, connector: str, stream: str, cursor: str) -> None:
    store.command(
        "INSERT INTO $db.connector_cursors (Connector, Stream, Cursor, UpdatedAt, Version) VALUES "
        "({c:String}, {s:String}, {cur:String}, {now:DateTime64(3)}, {v:UInt64})",
        {"c": connector, "s": stream, "cur": cursor, "now": _now(), "v": time.time_ns()},
    )


def cursors(store: Store) -> list[dict[str, Any]]:
    return store.query_rows(
        "SELECT Connector AS connector, Stream AS stream, Cursor AS cursor, UpdatedAt AS updated_at "
        "FROM $db.connector_cursors FINAL ORDER BY Connector, Stream"
    )


def table_exists(store: Store, name: str) -> bool:
    rows = store.query_rows(
        "SELECT count() AS n FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        {"db": store.database, "t": name},
    )
    return bool(rows and rows[0]["n"])


# --- runs ---------------------------------------------------------------------------------------------------
RUN_FIELDS = (
    "RunId",
    "Mode",
    "Region",
    "Trigger",
    "RequestedBy",
    "State",
    "Stage",
    "AsOf",
    "Watermark",
    "StartedAt",
    "FinishedAt",
    "Pulled",
    "KeysCompared",
    "DriftOpen",
    "DriftNew",
    "DriftResolved",
    "ResidualMinor",
    "Error",
)
RUNS = pa.schema(
    [
        ("RunId", pa.string()),
        ("Mode", pa.string()),
        ("Region", pa.string()),
        ("Trigger", pa.string()),
        ("RequestedBy", pa.string()),
        ("State", pa.string()),
        ("Stage", pa.string()),
        ("AsOf", TS_MS),
        ("Watermark", TS_US),
        ("StartedAt", TS_US),
        ("FinishedAt", TS_US),
        ("Pulled", pa.map_(pa.string(), pa.uint64())),
        ("KeysCompared", pa.uint64()),
        ("DriftOpen", pa.uint64()),
        ("DriftNew", pa.uint64()),
        ("DriftResolved", pa.uint64()),
        ("ResidualMinor", pa.int64()),
        ("Error", pa.string()),
        ("Version", pa.uint64()),
    ]
)


def write_run(store: Store, run: Mapping[str, Any]) -> None:
    row = {k: run[k] for k in RUN_FIELDS}
    row["Pulled"] = list(dict(run["Pulled"]).items())
    for k in ("AsOf", "Watermark", "StartedAt", "FinishedAt"):
        row[k] = _aware(row[k])
    row["Version"] = time.time_ns()
    store.insert_arrow("reconcile_runs", _table(RUNS, [row]))


_RUN_COLUMNS = (
    "RunId AS run_id, Mode AS mode, Region AS region, Trigger AS trigger, RequestedBy AS requested_by, "
    "State AS state, Stage AS stage, AsOf AS as_of, Watermark AS watermark, StartedAt AS started_at, "
    "FinishedAt AS finished_at, Pulled AS pulled, KeysCompared AS keys_compared, DriftOpen AS drift_open, "
    "DriftNew AS drift_new, DriftResolved AS drift_resolved, ResidualMinor AS residual_minor, Error AS error"
)


def _run_row(r: dict[str, Any]) -> dict[str, Any]:
    r["pulled"] = {k: int(v) for k, v in dict(r["pulled"]).items()}
    if r["finished_at"] is not None and _aware(r["finished_at"]) <= EPOCH:
        r["finished_at"] = None
    return r


def get_run(store: Store, run_id: str) -> dict[str, Any] | None:
    rows = store.query_rows(
        _compose("SELECT /*cols*/ FROM $db.reconcile_runs FINAL WHERE RunId = {id:String}", cols=_RUN_COLUMNS),
        {"id": run_id},
    )
    return _run_row(rows[0]) if rows else None


def list_runs(store: Store, limit: int = 50, offset: int = 0, state: str = "") -> tuple[list[dict[str, Any]], int]:
    params = {"limit": limit, "offset": offset, "state": state}
    rows = store.query_rows(
        _compose(
            "SELECT /*cols*/ FROM $db.reconcile_runs FINAL WHERE ({state:String} = '' OR State = {state:String}) "
            "ORDER BY StartedAt DESC LIMIT {limit:UInt32} OFFSET {offset:UInt32}",
            cols=_RUN_COLUMNS,
        ),
        params,
    )
    total = store.query_rows(
        "SELECT count() AS n FROM $db.reconcile_runs FINAL WHERE ({state:String} = '' OR State = {state:String})",
        params,
    )[0]["n"]
    return [_run_row(r) for r in rows], int(total)


def last_watermark(store: Store, region: str) -> dt.datetime | None:
    """Where the next incremental run starts: the start of the last succeeded run covering this region.

    A run with a region filter compared only that region, so it moves only that region's watermark.
    """
    rows = store.query_rows(
        "SELECT max(StartedAt) AS w, count() AS n FROM $db.reconcile_runs FINAL "
        "WHERE State = 'succeeded' AND (Region = '' OR Region = {r:String})",
        {"r": region},
    )
    if not rows or not rows[0]["n"]:
        return None
    return _aware(rows[0]["w"])


def interrupted_runs(store: Store) -> list[dict[str, Any]]:
    rows = store.query_rows(
        _compose("SELECT /*cols*/ FROM $db.reconcile_runs FINAL WHERE State = 'running'", cols=_RUN_COLUMNS)
    )
    return [_run_row(r) for r in rows]


# --- scope of an incremental run ----------------------------------------------------------------------------
_SCOPE_INVOICES = """
INSERT INTO $db.reconcile_scope (RunId, KeyType, Key)
SELECT {run:String}, 'invoice', k FROM (
    SELECT InvoiceId AS k FROM $db.billing_invoices WHERE IngestedAt >= {wm:DateTime64(6)}
    UNION ALL SELECT ExternalRef FROM $db.erp_ledger_entries WHERE IngestedAt >= {wm:DateTime64(6)}
    UNION ALL SELECT AppliedToRef FROM $db.erp_ledger_entries
        WHERE IngestedAt >= {wm:DateTime64(6)} AND AppliedToRef != ''
    UNION ALL SELECT arrayJoin(mapKeys(Allocations)) FROM $db.billing_payments WHERE IngestedAt >= {wm:DateTime64(6)}
    UNION ALL SELECT InvoiceId FROM $db.drift_items FINAL
        WHERE KeyType = 'invoice' AND State != 'resolved' AND InvoiceId != ''
)
WHERE k != ''
GROUP BY k
"""
_SCOPE_PAYMENTS = """
INSERT INTO $db.reconcile_scope (RunId, KeyType, Key)
SELECT {run:String}, 'payment', k FROM (
    SELECT PaymentId AS k FROM $db.billing_payments WHERE IngestedAt >= {wm:DateTime64(6)}
    UNION ALL SELECT ExternalRef FROM $db.erp_ledger_entries
        WHERE IngestedAt >= {wm:DateTime64(6)} AND EntryType IN ('payment', 'credit_memo')
    UNION ALL SELECT PaymentId FROM $db.drift_items FINAL
        WHERE KeyType = 'payment' AND State != 'resolved' AND PaymentId != ''
)
WHERE k != ''
GROUP BY k
"""
_SCOPE_CUSTOMERS = """
INSERT INTO $db.reconcile_scope (RunId, KeyType, Key)
SELECT {run:String}, 'customer', k FROM (
    SELECT CustomerId AS k FROM $db.cdp_profiles WHERE IngestedAt >= {wm:DateTime64(6)}
    UNION ALL SELECT CustomerId FROM $db.billing_customers WHERE IngestedAt >= {wm:DateTime64(6)}
    UNION ALL SELECT CustomerId FROM $db.drift_items FINAL
        WHERE KeyType = 'customer' AND State != 'resolved' AND CustomerId != ''
)
WHERE k != ''
GROUP BY k
"""


def build_scope(store: Store, run_id: str, watermark: dt.datetime, customers: bool) -> dict[str, int]:
    """Keys changed since ``watermark`` (both systems' sides) plus the keys of open drift items."""
    params = {"run": run_id, "wm": watermark}
    store.command(_SCOPE_INVOICES, params)
    store.command(_SCOPE_PAYMENTS, params)
    if customers:
        store.command(_SCOPE_CUSTOMERS, params)
    rows = store.query_rows(
        "SELECT KeyType AS t, count() AS n FROM $db.reconcile_scope WHERE RunId = {run:String} GROUP BY KeyType",
        {"run": run_id},
    )
    return {r["t"]: int(r["n"]) for r in rows}


def drop_scope(store: Store, run_id: str) -> None:
    """Scratch rows also expire by TTL; a lightweight delete keeps the table small between merges."""
    store.command("DELETE FROM $db.reconcile_scope WHERE RunId = {run:String}", {"run": run_id})
    store.command("DELETE FROM $db.reconcile_findings WHERE RunId = {run:String}", {"run": run_id})


_IN_SCOPE_INV = "(SELECT Key FROM $db.reconcile_scope WHERE RunId = {run:String} AND KeyType = 'invoice')"
_IN_SCOPE_PAY = "(SELECT Key FROM $db.reconcile_scope WHERE RunId = {run:String} AND KeyType = 'payment')"
_IN_SCOPE_CUS = "(SELECT Key FROM $db.reconcile_scope WHERE RunId = {run:String} AND KeyType = 'customer')"

# --- invoice comparison -------------------------------------------------------------------------------------
# src: 0 billing invoice, 1 ERP invoice posting, 2 ERP payment application (keyed by the invoice it applies
# to), 3 ERP draft = rejected posting, 4 billing payment allocation, 5 billing refund / credit-note
# allocation, 6 ERP credit memo (keyed by the invoice it applies to).
_INVOICE_FACTS = """
SELECT
    k AS key,
    countIf(src = 0) AS b_n,
    anyIf(cust, src = 0) AS b_customer,
    anyIf(region, src = 0) AS b_region,
    anyIf(cur, src = 0) AS b_currency,
    anyIf(amt, src = 0) AS b_total,
    anyIf(amt2, src = 0) AS b_tax,
    anyIf(amt3, src = 0) AS b_subtotal,
    anyIf(status, src = 0) AS b_status,
    anyIf(ts, src = 0) AS b_issued,
    anyIf(ts2, src = 0) AS b_finalized,
    anyIf(day, src = 0) AS b_day,
    countIf(src = 1) AS e_n,
    anyIf(cur, src = 1) AS e_currency,
    anyIf(amt, src = 1) AS e_amount,
    sumIf(amt, src = 1) AS e_sum,
    anyIf(status, src = 1) AS e_status,
    minIf(id, src = 1) AS e_entry,
    anyIf(region, src = 1) AS e_region,
    anyIf(cust, src = 1) AS e_party,
    anyIf(day, src = 1) AS e_day,
    anyIf(note, src = 3) AS rejected,
    sumIf(amt, src = 2) AS e_applied,
    groupArrayIf(id, src = 2) AS e_pay_ids,
    sumIf(amt, src = 4) AS b_alloc,
    groupArrayIf(id, src = 4) AS b_pay_ids,
    groupArrayIf(amt, src = 4) AS b_pay_amts,
    arraySum(arrayMap((p, a) -> if(has(e_pay_ids, p), 0, a), b_pay_ids, b_pay_amts)) AS b_alloc_unposted,
    groupArrayIf(id, src = 6) AS e_memo_ids,
    arraySum(arrayMap(p -> if(has(e_memo_ids, p), 0, 1), groupArrayIf(id, src = 5))) AS b_credit_unposted
FROM (
    SELECT InvoiceId AS k, 0 AS src, CustomerId AS cust, Region AS region, Currency AS cur, TotalMinor AS amt,
        TaxMinor AS amt2, SubtotalMinor AS amt3, Status AS status, IssuedAt AS ts, FinalizedAt AS ts2,
        toDate(IssuedAt) AS day, '' AS id, '' AS note
    FROM $db.billing_invoices FINAL WHERE NOT IsDeleted /*inv_filter*/
    UNION ALL
    SELECT ExternalRef, if(Status = 'draft', 3, 1), PartyRef, Region, Currency, AmountMinor, 0, 0, Status, PostedAt,
        PostedAt, PeriodDate, EntryId, Attributes['rejection']
    FROM $db.erp_ledger_entries FINAL
    WHERE NOT IsDeleted AND EntryType = 'invoice' AND Status != 'cancelled' /*led_inv_filter*/
    UNION ALL
    SELECT AppliedToRef, if(EntryType = 'payment', 2, 6), PartyRef, Region, Currency, AmountMinor, 0, 0, Status,
        PostedAt, PostedAt, PeriodDate, ExternalRef, ''
    FROM $db.erp_ledger_entries FINAL
    WHERE NOT IsDeleted AND EntryType IN ('payment', 'credit_memo') AND AppliedToRef != ''
        AND Status NOT IN ('cancelled', 'draft') /*led_app_filter*/
    UNION ALL
    SELECT inv, if(Kind = 'payment', 4, 5), CustomerId, Region, Currency, a, 0, 0, Status, OccurredAt, OccurredAt,
        toDate(OccurredAt), PaymentId, ''
    FROM $db.billing_payments FINAL ARRAY JOIN mapKeys(Allocations) AS inv, mapValues(Allocations) AS a
    WHERE NOT IsDeleted AND Status = 'succeeded' /*pay_filter*/
)
GROUP BY k
HAVING ({region:String} = '' OR b_region = {region:String} OR (b_n = 0 AND e_region = {region:String}))
    /*key_filter*/
    AND NOT (
        (b_n = 1 AND e_n = 1 AND b_status IN ('open', 'paid', 'uncollectible') AND e_currency = b_currency
            AND e_amount = b_total AND e_region = b_region AND e_day = b_day
            AND b_alloc = e_applied AND b_alloc_unposted = 0 AND b_credit_unposted = 0
            AND NOT (b_status = 'paid' AND e_status = 'open') AND NOT (b_status = 'open' AND e_status = 'paid'))
        OR (b_n = 1 AND e_n = 0 AND b_status NOT IN ('open', 'paid', 'uncollectible') AND b_alloc = e_applied)
        OR (b_n = 0 AND e_n = 0 AND e_applied = 0 AND rejected = '')
    )
"""
_INV_FILTER = "AND InvoiceId IN /*scope_inv*/"
_LED_INV_FILTER = (
    "AND EntryId IN (SELECT EntryId FROM $db.erp_ledger_entries WHERE EntryType = 'invoice' "
    "AND ExternalRef IN /*scope_inv*/)"
)
_LED_APP_FILTER = "AND EntryId IN (SELECT EntryId FROM $db.erp_ledger_entries WHERE AppliedToRef IN /*scope_inv*/)"
_PAY_FILTER = (
    "AND PaymentId IN (SELECT PaymentId FROM $db.billing_payments ARRAY JOIN mapKeys(Allocations) AS inv "
    "WHERE inv IN /*scope_inv*/)"
)
_KEY_FILTER_INV = "AND key IN /*scope_inv*/"


def invoice_candidates(store: Store, run_id: str, *, full: bool, region: str = "") -> pa.Table:
    """Invoice keys whose billing and ERP sides do not match exactly, with both sides' facts."""
    names = ("inv_filter", "led_inv_filter", "led_app_filter", "pay_filter", "key_filter")
    if full:
        sql = _compose(_INVOICE_FACTS, **dict.fromkeys(names, ""))
    else:
        fragments = (_INV_FILTER, _LED_INV_FILTER, _LED_APP_FILTER, _PAY_FILTER, _KEY_FILTER_INV)
        sql = _compose(_compose(_INVOICE_FACTS, **dict(zip(names, fragments, strict=True))), scope_inv=_IN_SCOPE_INV)
    return store.query_arrow(sql, {"run": run_id, "region": region})


# --- payment comparison -------------------------------------------------------------------------------------
# src: 0 billing payment / refund / credit note, 1 ERP payment application or credit memo (keyed by ExternalRef).
_PAYMENT_FACTS = """
SELECT
    k AS key,
    countIf(src = 0) AS p_n,
    anyIf(kind, src = 0) AS p_kind,
    anyIf(status, src = 0) AS p_status,
    anyIf(amt, src = 0) AS p_amount,
    anyIf(cur, src = 0) AS p_currency,
    anyIf(region, src = 0) AS p_region,
    anyIf(cust, src = 0) AS p_customer,
    anyIf(ts, src = 0) AS p_occurred,
    anyIf(n, src = 0) AS p_alloc_n,
    anyIf(refs, src = 0) AS p_alloc_refs,
    countIf(src = 1) AS e_n,
    countIf(src = 1 AND kind = 'credit_memo') AS e_memo_n,
    countIf(src = 1 AND refs != '') AS e_applied_n,
    sumIf(amt, src = 1) AS e_sum,
    anyIf(kind, src = 1) AS e_type,
    anyIf(status, src = 1) AS e_status,
    anyIf(cur, src = 1) AS e_currency,
    anyIf(region, src = 1) AS e_region,
    anyIf(cust, src = 1) AS e_party,
    minIf(id, src = 1) AS e_entry,
    anyIf(day, src = 1) AS e_day,
    arrayStringConcat(arraySort(groupUniqArrayIf(refs, src = 1 AND refs != '')), ',') AS e_applied_refs
FROM (
    SELECT PaymentId AS k, 0 AS src, Kind AS kind, Status AS status, AmountMinor AS amt, Currency AS cur,
        Region AS region, CustomerId AS cust, OccurredAt AS ts, length(Allocations) AS n,
        arrayStringConcat(arraySort(mapKeys(Allocations)), ',') AS refs, '' AS id, toDate(OccurredAt) AS day
    FROM $db.billing_payments FINAL WHERE NOT IsDeleted /*pay_filter*/
    UNION ALL
    SELECT ExternalRef, 1, EntryType, Status, AmountMinor, Currency, Region, PartyRef, PostedAt, 0, AppliedToRef,
        EntryId, PeriodDate
    FROM $db.erp_ledger_entries FINAL
    WHERE NOT IsDeleted AND EntryType IN ('payment', 'credit_memo') AND Status NOT IN ('cancelled', 'draft')
        /*led_filter*/
)
GROUP BY k
HAVING ({region:String} = '' OR p_region = {region:String} OR (p_n = 0 AND e_region = {region:String}))
    /*key_filter*/
    AND NOT (
        p_n = 1 AND (
            (p_status != 'succeeded' AND e_n = 0)
            OR (p_status = 'succeeded' AND p_kind = 'payment' AND p_alloc_n > 0 AND e_n > 0)
            OR (p_status = 'succeeded' AND p_kind IN ('refund', 'credit_note') AND e_memo_n > 0)
        )
    )
"""
_PAY_FILTER_P = "AND PaymentId IN /*scope_pay*/"
_LED_FILTER_P = "AND EntryId IN (SELECT EntryId FROM $db.erp_ledger_entries WHERE ExternalRef IN /*scope_pay*/)"
_KEY_FILTER_PAY = "AND key IN /*scope_pay*/"


def payment_candidates(store: Store, run_id: str, *, full: bool, region: str = "") -> pa.Table:
    """Payment, refund and credit-note keys whose billing and ERP sides do not match."""
    if full:
        sql = _compose(_PAYMENT_FACTS, pay_filter="", led_filter="", key_filter="")
    else:
        sql = _compose(
            _compose(_PAYMENT_FACTS, pay_filter=_PAY_FILTER_P, led_filter=_LED_FILTER_P, key_filter=_KEY_FILTER_PAY),
            scope_pay=_IN_SCOPE_PAY,
        )
    return store.query_arrow(sql, {"run": run_id, "region": region})


_SUM_MATCH = """
SELECT p.pid AS payment_id
FROM (
    SELECT arrayJoin(arrayZip({ids:Array(String)}, {customers:Array(String)}, {amounts:Array(Int64)},
        {times:Array(DateTime64(3))}, {abs_tol:Array(Int64)}, {rel_bp:Array(Int64)})) AS t,
        t.1 AS pid, t.2 AS cust, t.3 AS amount, t.4 AS at, t.5 AS tol_abs, t.6 AS tol_bp
) AS p
INNER JOIN (
    SELECT CustomerId, TotalMinor - AmountPaidMinor - AmountCreditedMinor AS outstanding, FinalizedAt
    FROM $db.billing_invoices FINAL
    WHERE NOT IsDeleted AND Status = 'open' AND CustomerId IN {customers:Array(String)}
) AS i ON i.CustomerId = p.cust
WHERE i.FinalizedAt BETWEEN p.at - toIntervalDay({window:UInt32}) AND p.at + toIntervalDay({window:UInt32})
    AND i.outstanding > 0
GROUP BY p.pid, p.amount, p.tol_abs, p.tol_bp
HAVING abs(sum(i.outstanding) - p.amount) <= greatest(p.tol_abs, intDiv(p.tol_bp * abs(p.amount), 10000))
    OR countIf(abs(i.outstanding - p.amount) <= greatest(p.tol_abs, intDiv(p.tol_bp * abs(p.amount), 10000))) = 1
"""


def sum_matches(
    store: Store, payments: Sequence[Mapping[str, Any]], window_days: int, tolerances: Mapping[str, tuple[int, int]]
) -> set[str]:
    """N:1 / 1:N matching of unallocated payments: the customer's open invoices inside the date window sum to
    the payment amount (or exactly one of them equals it) within the currency's tolerance."""
    if not payments:
        return set()
    tol = [tolerances.get(p["currency"], tolerances.get("*", (0, 0))) for p in payments]
    rows = store.query_rows(
        _SUM_MATCH,
        {
            "ids": [p["payment_id"] for p in payments],
            "customers": [p["customer_id"] for p in payments],
            "amounts": [int(p["amount_minor"]) for p in payments],
            "times": [_aware(p["occurred_at"]) for p in payments],
            "abs_tol": [t[0] for t in tol],
            "rel_bp": [t[1] for t in tol],
            "window": window_days,
        },
    )
    return {r["payment_id"] for r in rows}


# --- customer comparison (CDP profile vs billing customer; tables of migration 0003) -----------------------
_CUSTOMER_FACTS = """
SELECT
    k AS key,
    countIf(src = 0) AS b_n,
    anyIf(uid, src = 0) AS b_cdp_user,
    anyIf(ts, src = 0) AS b_updated,
    countIf(src = 1) AS c_n,
    anyIf(uid, src = 1) AS c_cdp_user,
    maxIf(ts, src = 1) AS c_updated,
    anyIf(region, src = 1) AS region
FROM (
    SELECT CustomerId AS k, 0 AS src, CdpUserId AS uid, UpdatedAt AS ts, Region AS region
    FROM $db.billing_customers FINAL WHERE NOT IsDeleted /*bill_filter*/
    UNION ALL
    SELECT CustomerId, 1, CdpUserId, UpdatedAt, Region
    FROM $db.cdp_profiles FINAL WHERE NOT IsDeleted AND CustomerId != '' /*cdp_filter*/
)
GROUP BY k
HAVING c_n > 0 AND b_n = 0 AND ({region:String} = '' OR region = {region:String}) /*key_filter*/
"""


def customer_candidates(store: Store, run_id: str, *, full: bool, region: str = "") -> pa.Table:
    """CDP profiles whose billing customer does not exist."""
    if full:
        sql = _compose(_CUSTOMER_FACTS, bill_filter="", cdp_filter="", key_filter="")
    else:
        sql = _compose(
            _CUSTOMER_FACTS,
            bill_filter="AND CustomerId IN /*scope_cus*/",
            cdp_filter="AND CustomerId IN /*scope_cus*/",
            key_filter="AND key IN /*scope_cus*/",
        )
        sql = _compose(sql, scope_cus=_IN_SCOPE_CUS)
    return store.query_arrow(sql, {"run": run_id, "region": region})


# --- drift items --------------------------------------------------------------------------------------------
DRIFT = pa.schema(
    [
        ("DriftId", pa.string()),
        ("Class", pa.string()),
        ("ReasonCode", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("CustomerId", pa.string()),
        ("InvoiceId", pa.string()),
        ("PaymentId", pa.string()),
        ("LedgerEntryId", pa.string()),
        ("AmountMinor", pa.int64()),
        ("BillingValues", SMAP),
        ("ErpValues", SMAP),
        ("State", pa.string()),
        ("StateNote", pa.string()),
        ("FirstSeen", TS_MS),
        ("LastSeen", TS_MS),
        ("UpdatedAt", TS_MS),
        ("RunId", pa.string()),
        ("Version", pa.uint64()),
        ("System", pa.string()),
        ("Day", pa.date32()),
        ("PrimaryKey", pa.string()),
        ("KeyType", pa.string()),
        ("DiffFields", pa.list_(pa.string())),
        ("ResolvedAt", TS_MS),
    ]
)
FINDINGS = pa.schema(
    [
        ("RunId", pa.string()),
        ("DriftId", pa.string()),
        ("Class", pa.string()),
        ("ReasonCode", pa.string()),
        ("System", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("CustomerId", pa.string()),
        ("InvoiceId", pa.string()),
        ("PaymentId", pa.string()),
        ("LedgerEntryId", pa.string()),
        ("PrimaryKey", pa.string()),
        ("KeyType", pa.string()),
        ("AmountMinor", pa.int64()),
        ("BillingValues", SMAP),
        ("ErpValues", SMAP),
        ("DiffFields", pa.list_(pa.string())),
        ("Day", pa.date32()),
    ]
)
_DRIFT_COLS = ", ".join(f.name for f in DRIFT)


def _maps(row: dict[str, Any]) -> dict[str, Any]:
    for k in ("BillingValues", "ErpValues"):
        if k in row and not isinstance(row[k], list):
            row[k] = list(dict(row[k]).items())
    return row


def write_findings(store: Store, rows: Sequence[Mapping[str, Any]]) -> int:
    """The run's findings, so the resolution step can tell (in SQL) which open items were not re-detected."""
    if not rows:
        return 0
    return store.insert_arrow("reconcile_findings", _table(FINDINGS, [_maps(dict(r)) for r in rows]))


def existing_items(store: Store, drift_ids: Iterable[str] | None = None, run_id: str = "") -> dict[str, dict[str, Any]]:
    """Current rows of the given items (by id list, or the run's findings)."""
    if drift_ids is not None:
        sql = _compose(
            "SELECT /*cols*/ FROM $db.drift_items FINAL WHERE DriftId IN {ids:Array(String)}", cols=_DRIFT_COLS
        )
        rows = store.query_rows(sql, {"ids": sorted(set(drift_ids))})
    else:
        sql = _compose(
            "SELECT /*cols*/ FROM $db.drift_items FINAL WHERE DriftId IN "
            "(SELECT DriftId FROM $db.reconcile_findings WHERE RunId = {run:String})",
            cols=_DRIFT_COLS,
        )
        rows = store.query_rows(sql, {"run": run_id})
    return {r["DriftId"]: r for r in rows}


_TO_RESOLVE = """
SELECT /*cols*/ FROM $db.drift_items FINAL
WHERE State != 'resolved'
    AND ({region:String} = '' OR Region = {region:String})
    AND DriftId NOT IN (SELECT DriftId FROM $db.reconcile_findings WHERE RunId = {run:String})
    /*scope*/
"""
_RESOLVE_SCOPE = (
    "AND ((KeyType = 'invoice' AND InvoiceId IN /*scope_inv*/) OR (KeyType = 'payment' AND PaymentId IN /*scope_pay*/) "
    "OR (KeyType = 'customer' AND CustomerId IN /*scope_cus*/))"
)
_RESOLVE_FULL_NO_CUSTOMERS = "AND KeyType != 'customer'"


def items_to_resolve(store: Store, run_id: str, *, full: bool, region: str, customers: bool) -> list[dict[str, Any]]:
    """Open items whose key this run compared and did not find drifting any more."""
    if full:
        scope = "" if customers else _RESOLVE_FULL_NO_CUSTOMERS
    else:
        scope = _RESOLVE_SCOPE
    sql = _compose(
        _TO_RESOLVE,
        cols=_DRIFT_COLS,
        scope=scope,
        scope_inv=_IN_SCOPE_INV,
        scope_pay=_IN_SCOPE_PAY,
        scope_cus=_IN_SCOPE_CUS,
    )
    return store.query_rows(sql, {"run": run_id, "region": region})


def write_items(store: Store, rows: Sequence[Mapping[str, Any]]) -> int:
    """Full rows of drift items (a new Version replaces the previous state)."""
    if not rows:
        return 0
    out = []
    base = time.time_ns()
    for i, r in enumerate(rows):
        row = _maps(dict(r))
        row["Version"] = base + i
        row["DiffFields"] = list(row.get("DiffFields") or [])
        for k in ("FirstSeen", "LastSeen", "UpdatedAt", "ResolvedAt"):
            row[k] = _aware(row.get(k))
        out.append(row)
    return store.insert_arrow("drift_items", _table(DRIFT, out))


def open_counts(store: Store) -> dict[str, int]:
    rows = store.query_rows(
        "SELECT State AS s, count() AS n FROM $db.drift_items FINAL WHERE State != 'resolved' GROUP BY State"
    )
    return {r["s"]: int(r["n"]) for r in rows}


# Sorting is whitelisted (column names cannot be bound).
DRIFT_SORT = {
    "first_seen": "FirstSeen",
    "last_seen": "LastSeen",
    "amount": "abs(AmountMinor)",
    "class": "Class",
    "region": "Region",
    "state": "State",
    "age": "FirstSeen",
    "updated_at": "UpdatedAt",
}
_DRIFT_WHERE = """
WHERE ({region:String} = '' OR Region = {region:String})
    AND (empty({classes:Array(String)}) OR Class IN {classes:Array(String)})
    AND (empty({states:Array(String)}) OR State IN {states:Array(String)})
    AND ({system:String} = '' OR System = {system:String})
    AND ({currency:String} = '' OR Currency = {currency:String})
    AND ({reason:String} = '' OR ReasonCode = {reason:String})
    AND ({key:String} = '' OR {key:String} IN (InvoiceId, PaymentId, CustomerId, LedgerEntryId, DriftId))
    AND abs(AmountMinor) >= {min_amount:Int64}
    AND ({max_amount:Int64} < 0 OR abs(AmountMinor) <= {max_amount:Int64})
    AND dateDiff('day', FirstSeen, {now:DateTime64(3)}) >= {min_age:Int32}
    AND ({max_age:Int32} < 0 OR dateDiff('day', FirstSeen, {now:DateTime64(3)}) <= {max_age:Int32})
"""
_DRIFT_LIST = (
    "SELECT DriftId AS drift_id, Class AS class, ReasonCode AS reason_code, State AS state, System AS system, "
    "Region AS region, Currency AS currency, CustomerId AS customer_id, InvoiceId AS invoice_id, "
    "PaymentId AS payment_id, LedgerEntryId AS ledger_entry_id, PrimaryKey AS primary_key, KeyType AS key_type, "
    "AmountMinor AS amount_minor, DiffFields AS diff_fields, FirstSeen AS first_seen, LastSeen AS last_seen, "
    "UpdatedAt AS updated_at, ResolvedAt AS resolved_at, StateNote AS state_note, RunId AS run_id, Day AS day, "
    "dateDiff('day', FirstSeen, {now:DateTime64(3)}) AS age_days "
    "FROM $db.drift_items FINAL /*where*/ ORDER BY /*sort*/ /*dir*/, DriftId "
    "LIMIT {limit:UInt32} OFFSET {offset:UInt64}"
)


def list_drift(
    store: Store,
    *,
    region: str = "",
    classes: Sequence[str] = (),
    states: Sequence[str] = (),
    system: str = "",
    currency: str = "",
    reason: str = "",
    key: str = "",
    min_amount: int = 0,
    max_amount: int = -1,
    min_age_days: int = 0,
    max_age_days: int = -1,
    sort: str = "first_seen",
    descending: bool = True,
    limit: int = 50,
    offset: int = 0,
    now: dt.datetime | None = None,
) -> tuple[list[dict[str, Any]], int]:
    params = {
        "region": region,
        "classes": list(classes),
        "states": list(states),
        "system": system,
        "currency": currency,
        "reason": reason,
        "key": key,
        "min_amount": min_amount,
        "max_amount": max_amount,
        "min_age": min_age_days,
        "max_age": max_age_days,
        "now": now or _now(),
        "limit": limit,
        "offset": offset,
    }
    sql = _compose(_DRIFT_LIST, where=_DRIFT_WHERE, sort=DRIFT_SORT[sort], dir="DESC" if descending else "ASC")
    rows = store.query_rows(sql, params)
    total = store.query_rows(
        _compose("SELECT count() AS n FROM $db.drift_items FINAL /*where*/", where=_DRIFT_WHERE), params
    )[0]["n"]
    return rows, int(total)


def drift_summary(store: Store, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Open items per class, region and state, with their amounts (the dashboard's overview)."""
    return store.query_rows(
        "SELECT Class AS class, Region AS region, State AS state, count() AS items, "
        "sum(abs(AmountMinor)) AS amount_minor, "
        "multiIf(dateDiff('day', FirstSeen, {now:DateTime64(3)}) <= 1, '0-1d', "
        "dateDiff('day', FirstSeen, {now:DateTime64(3)}) <= 7, '2-7d', "
        "dateDiff('day', FirstSeen, {now:DateTime64(3)}) <= 30, '8-30d', '>30d') AS age_bucket "
        "FROM $db.drift_items FINAL WHERE State != 'resolved' "
        "GROUP BY class, region, state, age_bucket ORDER BY class, region, state, age_bucket",
        {"now": now or _now()},
    )


def get_drift(store: Store, drift_id: str) -> dict[str, Any] | None:
    rows = store.query_rows(
        _compose("SELECT /*cols*/ FROM $db.drift_items FINAL WHERE DriftId = {id:String}", cols=_DRIFT_COLS),
        {"id": drift_id},
    )
    return rows[0] if rows else None


def all_open_items(store: Store) -> list[dict[str, Any]]:
    """(class, primary key, state) of every unresolved item: what recall/precision compare with a manifest."""
    return store.query_rows(
        "SELECT Class AS class, PrimaryKey AS primary_key, ReasonCode AS reason_code, State AS state, "
        "DriftId AS drift_id FROM $db.drift_items FINAL WHERE State != 'resolved'"
    )


# --- statement ----------------------------------------------------------------------------------------------
FACTS = pa.schema(
    [
        ("Key", pa.string()),
        ("BillingRegion", pa.string()),
        ("BillingCurrency", pa.string()),
        ("ErpRegion", pa.string()),
        ("ErpCurrency", pa.string()),
        ("BillingDay", pa.date32()),
        ("ErpDay", pa.date32()),
        ("BillingMinor", pa.int64()),
        ("ErpMinor", pa.int64()),
        ("Class", pa.string()),
        ("RunId", pa.string()),
        ("Version", pa.uint64()),
    ]
)


def write_facts(store: Store, rows: Sequence[Mapping[str, Any]]) -> int:
    if not rows:
        return 0
    v = time.time_ns()
    return store.insert_arrow("reconcile_facts", _table(FACTS, [{**r, "Version": v} for r in rows]))


_CLEAR_FACTS = """
INSERT INTO $db.reconcile_facts
SELECT Key, BillingRegion, BillingCurrency, ErpRegion, ErpCurrency, BillingDay, ErpDay, 0, 0, '', {run:String},
    {v:UInt64}
FROM $db.reconcile_facts FINAL
WHERE (BillingMinor != 0 OR ErpMinor != 0 OR Class != '')
    AND ({region:String} = '' OR BillingRegion = {region:String} OR ErpRegion = {region:String})
    AND Key NOT IN (SELECT Key FROM $db.reconcile_facts WHERE RunId = {run:String})
    /*scope*/
"""


def clear_facts(store: Store, run_id: str, *, full: bool, region: str) -> None:
    """Keys this run compared that match again contribute nothing to the explained differences any more."""
    scope = "" if full else "AND Key IN /*scope_inv*/"
    sql = _compose(_compose(_CLEAR_FACTS, scope=scope), scope_inv=_IN_SCOPE_INV)
    store.command(sql, {"run": run_id, "v": time.time_ns(), "region": region})


# Billing side: finalized invoices by their region, currency and issue day. ERP side: invoice postings by the
# ERP's own region, currency and period date (drafts are rejected documents, not postings). Explained: the
# per-key contributions of the keys that differ, by class. Residual = what no class explains.
_STATEMENT = """
INSERT INTO $db.reconciliation_statements
SELECT {run:String}, Region, Currency, Day, billing, erp, billing - erp, explained,
    billing - erp - arraySum(mapValues(explained)), now64(3), {v:UInt64}
FROM (
    SELECT Region, Currency, Day, sum(b) AS billing, sum(e) AS erp,
        mapFilter((k, v) -> v != 0, sumMapIf(map(c, x), c != '')) AS explained
    FROM (
        SELECT Region, Currency, toDate(IssuedAt) AS Day, TotalMinor AS b, toInt64(0) AS e, '' AS c, toInt64(0) AS x
        FROM $db.billing_invoices FINAL
        WHERE NOT IsDeleted AND Status IN ('open', 'paid', 'uncollectible') /*bill_filter*/
        UNION ALL
        SELECT Region, Currency, PeriodDate, 0, AmountMinor, '', 0
        FROM $db.erp_ledger_entries FINAL
        WHERE NOT IsDeleted AND EntryType = 'invoice' AND Status NOT IN ('cancelled', 'draft') /*erp_filter*/
        UNION ALL
        SELECT BillingRegion, BillingCurrency, BillingDay, 0, 0, Class, BillingMinor
        FROM $db.reconcile_facts FINAL WHERE Class != '' AND BillingMinor != 0 /*fact_b_filter*/
        UNION ALL
        SELECT ErpRegion, ErpCurrency, ErpDay, 0, 0, Class, -ErpMinor
        FROM $db.reconcile_facts FINAL WHERE Class != '' AND ErpMinor != 0 /*fact_e_filter*/
    )
    WHERE ({region:String} = '' OR Region = {region:String})
    GROUP BY Region, Currency, Day
)
"""


def write_statement(store: Store, run_id: str, region: str = "") -> int:
    """Per region, currency and day of the whole estate: billing total, ERP total, explained, residual."""
    sql = _compose(_STATEMENT, bill_filter="", erp_filter="", fact_b_filter="", fact_e_filter="")
    store.command(sql, {"run": run_id, "v": time.time_ns(), "region": region})
    rows = store.query_rows(
        "SELECT count() AS n FROM $db.reconciliation_statements WHERE RunId = {run:String}", {"run": run_id}
    )
    return int(rows[0]["n"])


def statement_residual(store: Store, run_id: str) -> int:
    rows = store.query_rows(
        "SELECT sum(abs(ResidualMinor)) AS r FROM $db.reconciliation_statements FINAL WHERE RunId = {run:String}",
        {"run": run_id},
    )
    return int(rows[0]["r"] or 0) if rows else 0


def latest_statement_run(store: Store) -> str | None:
    rows = store.query_rows("SELECT argMax(RunId, CreatedAt) AS r, count() AS n FROM $db.reconciliation_statements")
    return rows[0]["r"] if rows and rows[0]["n"] else None


def list_statements(
    store: Store,
    *,
    run_id: str,
    region: str = "",
    currency: str = "",
    day_from: dt.date | None = None,
    day_to: dt.date | None = None,
    only_residual: bool = False,
    limit: int = 500,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    where = (
        "WHERE RunId = {run:String} AND ({region:String} = '' OR Region = {region:String}) "
        "AND ({currency:String} = '' OR Currency = {currency:String}) "
        "AND Day >= {from:Date} AND Day <= {to:Date} AND (NOT {residual:Bool} OR ResidualMinor != 0)"
    )
    params = {
        "run": run_id,
        "region": region,
        "currency": currency,
        "from": day_from or dt.date(1970, 1, 1),
        "to": day_to or dt.date(2149, 6, 1),
        "residual": only_residual,
        "limit": limit,
        "offset": offset,
    }
    rows = store.query_rows(
        _compose(
            "SELECT RunId AS run_id, Region AS region, Currency AS currency, Day AS day, "
            "BillingTotalMinor AS billing_total_minor, ErpTotalMinor AS erp_total_minor, "
            "DifferenceMinor AS difference_minor, Explained AS explained, ResidualMinor AS residual_minor "
            "FROM $db.reconciliation_statements FINAL /*where*/ ORDER BY Day DESC, Region, Currency "
            "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
            where=where,
        ),
        params,
    )
    total = store.query_rows(
        _compose("SELECT count() AS n FROM $db.reconciliation_statements FINAL /*where*/", where=where), params
    )[0]["n"]
    for r in rows:
        r["explained"] = {k: int(v) for k, v in dict(r["explained"]).items() if v}
    return rows, int(total)


def statement_totals(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Per region and currency over all days of a run's statement."""
    rows = store.query_rows(
        "SELECT Region AS region, Currency AS currency, sum(BillingTotalMinor) AS billing_total_minor, "
        "sum(ErpTotalMinor) AS erp_total_minor, sum(DifferenceMinor) AS difference_minor, "
        "sumMap(Explained) AS explained, sum(ResidualMinor) AS residual_minor, count() AS days "
        "FROM $db.reconciliation_statements FINAL WHERE RunId = {run:String} GROUP BY Region, Currency "
        "ORDER BY Region, Currency",
        {"run": run_id},
    )
    for r in rows:
        r["explained"] = {k: int(v) for k, v in dict(r["explained"]).items() if v}
    return rows


# --- audit --------------------------------------------------------------------------------------------------
AUDIT = pa.schema(
    [
        ("AuditId", pa.string()),
        ("EventTime", pa.timestamp("us", tz="UTC")),
        ("Actor", pa.string()),
        ("Action", pa.string()),
        ("ObjectType", pa.string()),
        ("ObjectId", pa.string()),
        ("Before", pa.string()),
        ("After", pa.string()),
        ("Note", pa.string()),
        ("Outcome", pa.string()),
    ]
)


def audit_record(
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    before: Any = None,
    after: Any = None,
    note: str = "",
    outcome: str = "ok",
    at: dt.datetime | None = None,
) -> dict[str, Any]:
    """One audit row: who, when, what, why (note), before/after as JSON."""
    return {
        "AuditId": "a" + uuid.uuid4().hex,
        "EventTime": at or _now(),
        "Actor": actor,
        "Action": action,
        "ObjectType": object_type,
        "ObjectId": object_id,
        "Before": "" if before is None else json.dumps(before, default=str, sort_keys=True),
        "After": "" if after is None else json.dumps(after, default=str, sort_keys=True),
        "Note": note,
        "Outcome": outcome,
    }


def write_audit(store: Store, records: Sequence[Mapping[str, Any]]) -> int:
    """Batched; the first record's id is the batch's deduplication token (a retried batch lands once)."""
    if not records:
        return 0
    return store.insert_arrow("audit_log", _table(AUDIT, records), dedup_token=f"audit_{records[0]['AuditId']}")


def audit_for(store: Store, object_type: str, object_id: str, limit: int = 200) -> list[dict[str, Any]]:
    rows = store.query_rows(
        "SELECT AuditId AS audit_id, EventTime AS at, Actor AS actor, Action AS action, Before AS before, "
        "After AS after, Note AS note, Outcome AS outcome FROM $db.audit_log "
        "WHERE ObjectType = {t:String} AND ObjectId = {id:String} ORDER BY EventTime, AuditId LIMIT 1 BY AuditId "
        "LIMIT {limit:UInt32}",
        {"t": object_type, "id": object_id, "limit": limit},
    )
    for r in rows:
        for k in ("before", "after"):
            r[k] = json.loads(r[k]) if r[k] else None
    return rows


# --- actions ------------------------------------------------------------------------------------------------
ACTIONS = pa.schema(
    [
        ("ActionId", pa.string()),
        ("IdempotencyKey", pa.string()),
        ("Kind", pa.string()),
        ("DriftId", pa.string()),
        ("Class", pa.string()),
        ("TargetSystem", pa.string()),
        ("TargetRef", pa.string()),
        ("State", pa.string()),
        ("Attempts", pa.uint32()),
        ("LastError", pa.string()),
        ("Result", pa.string()),
        ("OriginalActionId", pa.string()),
        ("RequestedBy", pa.string()),
        ("CreatedAt", TS_MS),
        ("UpdatedAt", TS_MS),
        ("Version", pa.uint64()),
        ("Operation", pa.string()),
        ("Params", pa.string()),
        ("ApprovedBy", pa.string()),
        ("NextAttemptAt", TS_MS),
        ("DeadLetter", pa.uint8()),
    ]
)
_ACTION_COLS = ", ".join(f.name for f in ACTIONS)


def write_action(store: Store, row: Mapping[str, Any]) -> None:
    r = dict(row)
    r["Version"] = time.time_ns()
    for k in ("CreatedAt", "UpdatedAt", "NextAttemptAt"):
        r[k] = _aware(r.get(k))
    store.insert_arrow("actions", _table(ACTIONS, [r]))


def get_action(store: Store, action_id: str) -> dict[str, Any] | None:
    rows = store.query_rows(
        _compose("SELECT /*cols*/ FROM $db.actions FINAL WHERE ActionId = {id:String}", cols=_ACTION_COLS),
        {"id": action_id},
    )
    return rows[0] if rows else None


def actions_by_key(store: Store, idempotency_key: str) -> list[dict[str, Any]]:
    return store.query_rows(
        _compose(
            "SELECT /*cols*/ FROM $db.actions FINAL WHERE IdempotencyKey = {k:String} ORDER BY CreatedAt",
            cols=_ACTION_COLS,
        ),
        {"k": idempotency_key},
    )


def actions_in_states(
    store: Store, states: Sequence[str], due_before: dt.datetime | None = None
) -> list[dict[str, Any]]:
    return store.query_rows(
        _compose(
            "SELECT /*cols*/ FROM $db.actions FINAL WHERE State IN {s:Array(String)} "
            "AND NextAttemptAt <= {due:DateTime64(3)} ORDER BY CreatedAt LIMIT 1000",
            cols=_ACTION_COLS,
        ),
        {"s": list(states), "due": due_before or dt.datetime(2200, 1, 1, tzinfo=dt.UTC)},
    )


ACTION_SORT = {"created_at": "CreatedAt", "updated_at": "UpdatedAt", "state": "State", "class": "Class"}
_ACTION_WHERE = """
WHERE (empty({states:Array(String)}) OR State IN {states:Array(String)})
    AND ({cls:String} = '' OR Class = {cls:String})
    AND ({drift:String} = '' OR DriftId = {drift:String})
    AND ({target:String} = '' OR TargetSystem = {target:String})
    AND ({dead:Int8} < 0 OR DeadLetter = {dead:Int8})
    AND ({original:String} = '' OR OriginalActionId = {original:String})
"""


def list_actions(
    store: Store,
    *,
    states: Sequence[str] = (),
    cls: str = "",
    drift_id: str = "",
    target: str = "",
    dead_letter: bool | None = None,
    original_action_id: str = "",
    sort: str = "created_at",
    descending: bool = True,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    params = {
        "states": list(states),
        "cls": cls,
        "drift": drift_id,
        "target": target,
        "dead": -1 if dead_letter is None else int(dead_letter),
        "original": original_action_id,
        "limit": limit,
        "offset": offset,
    }
    rows = store.query_rows(
        _compose(
            "SELECT /*cols*/ FROM $db.actions FINAL /*where*/ ORDER BY /*sort*/ /*dir*/, ActionId "
            "LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
            cols=_ACTION_COLS,
            where=_ACTION_WHERE,
            sort=ACTION_SORT[sort],
            dir="DESC" if descending else "ASC",
        ),
        params,
    )
    total = store.query_rows(
        _compose("SELECT count() AS n FROM $db.actions FINAL /*where*/", where=_ACTION_WHERE), params
    )[0]["n"]
    return rows, int(total)


# --- records for corrective syncs ---------------------------------------------------------------------------
def load_invoice(store: Store, invoice_id: str) -> Invoice | None:
    rows = store.query_rows(
        "SELECT * FROM $db.billing_invoices FINAL WHERE InvoiceId = {id:String} AND NOT IsDeleted",
        {"id": invoice_id},
    )
    if not rows:
        return None
    r = rows[0]

    def opt(v: dt.datetime) -> dt.datetime | None:
        return None if _aware(v) <= EPOCH else _aware(v)

    return Invoice(
        invoice_id=r["InvoiceId"],
        customer_id=r["CustomerId"],
        region=r["Region"],
        currency=r["Currency"],
        subtotal_minor=int(r["SubtotalMinor"]),
        tax_minor=int(r["TaxMinor"]),
        total_minor=int(r["TotalMinor"]),
        status=r["Status"],
        issued_at=_aware(r["IssuedAt"]),
        updated_at=_aware(r["UpdatedAt"]),
        amount_paid_minor=int(r["AmountPaidMinor"]),
        amount_credited_minor=int(r["AmountCreditedMinor"]),
        due_at=opt(r["DueAt"]),
        finalized_at=opt(r["FinalizedAt"]),
        paid_at=opt(r["PaidAt"]),
        source_system=r["SourceSystem"],
        attributes=dict(r["Attributes"]),
    )


def payments_for_invoice(store: Store, invoice_id: str) -> list[str]:
    """Succeeded payments billing allocated to this invoice."""
    rows = store.query_rows(
        "SELECT PaymentId AS p FROM $db.billing_payments FINAL WHERE NOT IsDeleted AND Kind = 'payment' "
        "AND Status = 'succeeded' AND mapContains(Allocations, {id:String}) ORDER BY PaymentId",
        {"id": invoice_id},
    )
    return [r["p"] for r in rows]


def load_payment(store: Store, payment_id: str) -> Payment | None:
    rows = store.query_rows(
        "SELECT * FROM $db.billing_payments FINAL WHERE PaymentId = {id:String} AND NOT IsDeleted",
        {"id": payment_id},
    )
    if not rows:
        return None
    r = rows[0]
    return Payment(
        payment_id=r["PaymentId"],
        kind=r["Kind"],
        customer_id=r["CustomerId"],
        region=r["Region"],
        currency=r["Currency"],
        amount_minor=int(r["AmountMinor"]),
        status=r["Status"],
        occurred_at=_aware(r["OccurredAt"]),
        updated_at=_aware(r["UpdatedAt"]),
        method=r["Method"],
        allocations={k: int(v) for k, v in dict(r["Allocations"]).items()},
        related_payment_id=r["RelatedPaymentId"],
        source_system=r["SourceSystem"],
        attributes=dict(r["Attributes"]),
    )
