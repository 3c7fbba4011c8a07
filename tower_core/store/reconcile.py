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
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tower_core.models import Invoice, LedgerEntry, Payment
from tower_core.store.arrow_schemas import BILLING_INVOICES, BILLING_PAYMENTS, ERP_LEDGER_ENTRIES
from tower_core.store.base import EARLIEST_AND_LATEST, Store

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
# The pulls write the same columns as the simulator's bulk loader: one definition, in arrow_schemas.
INVOICES = BILLING_INVOICES
PAYMENTS = BILLING_PAYMENTS
LEDGER = ERP_LEDGER_ENTRIES


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
    "Owner",
    "Rules",
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
        ("Owner", pa.string()),
        ("Rules", pa.string()),
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
    "DriftNew AS drift_new, DriftResolved AS drift_resolved, ResidualMinor AS residual_minor, Error AS error, "
    "Owner AS owner, Rules AS rules, StatementDropped = 1 AS statement_dropped"
)


def _run_row(r: dict[str, Any]) -> dict[str, Any]:
    r["pulled"] = {k: int(v) for k, v in dict(r["pulled"]).items()}
    r["statement_dropped"] = bool(r["statement_dropped"])
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


# A marker in connector_cursors: when the state tables were last replaced wholesale (a fresh bulk load).
STATE_REPLACED = ("tower", "state_replaced")
# What the process running the reconciler's jobs compares by (its rules' fingerprint, connectors, auto-correct): a
# run the API starts in another process must compare the same way (ReconcilerService.settings_identity).
JOB_SETTINGS = ("tower", "reconcile_job_settings")
# The circuit breakers of the process executing the actions, for an API beside it (ActionService.publish_breakers).
BREAKERS = ("tower", "action_breakers")


def mark_state_replaced(store: Store) -> None:
    """The state tables were emptied and refilled: the next run compares everything (see last_watermark)."""
    set_cursor(store, *STATE_REPLACED, _now().isoformat())


def store_now(store: Store) -> dt.datetime:
    """The store's clock: what ``IngestedAt`` (``now64(6)`` at insert) is stamped with."""
    return _aware(store.query_rows("SELECT now64(6) AS t")[0]["t"])


def last_watermark(store: Store, region: str, rules: str) -> dt.datetime | None:
    """Where the next incremental run starts: the start of the last succeeded run covering this region under the
    same ``rules`` (see migration 0027), or None (a full run) when there is none since the state tables were last
    replaced: an incremental run compares the keys changed since, and the keys of the replaced estate (or the keys
    the old rules classified) would keep their open items forever.

    A run with a region filter compared only that region, so it moves only that region's watermark.
    """
    rows = store.query_rows(
        "SELECT max(StartedAt) AS w, count() AS n FROM $db.reconcile_runs FINAL "
        "WHERE State = 'succeeded' AND (Region = '' OR Region = {r:String}) AND Rules = {rules:String}",
        {"r": region, "rules": rules},
    )
    if not rows or not rows[0]["n"]:
        return None
    watermark = _aware(rows[0]["w"])
    replaced = get_cursor(store, *STATE_REPLACED)
    if replaced and dt.datetime.fromisoformat(replaced) >= watermark:
        return None
    return watermark


_REGIONS = """
SELECT DISTINCT r FROM (
    SELECT DISTINCT Region AS r FROM $db.billing_invoices
    UNION ALL SELECT DISTINCT Region FROM $db.billing_payments
    UNION ALL SELECT DISTINCT Region FROM $db.erp_ledger_entries
    UNION ALL SELECT DISTINCT Region FROM $db.drift_items /*cdp*/
)
WHERE r != ''
ORDER BY r
"""


def regions_with_data(store: Store) -> list[str]:
    """Every region any state row or drift item names: a run for another one compares nothing, and its empty
    statement would read as a clean reconciliation."""
    cdp = "UNION ALL SELECT DISTINCT Region FROM $db.cdp_profiles" if table_exists(store, "cdp_profiles") else ""
    return [str(r["r"]) for r in store.query_rows(_compose(_REGIONS, cdp=cdp))]


def latest_as_of(store: Store) -> dt.datetime | None:
    """The latest instant a succeeded run reconciled as of (the time the queue reflects)."""
    rows = store.query_rows(
        "SELECT max(AsOf) AS a, count() AS n FROM $db.reconcile_runs FINAL WHERE State = 'succeeded'"
    )
    return _aware(rows[0]["a"]) if rows and rows[0]["n"] else None


def interrupted_runs(store: Store) -> list[dict[str, Any]]:
    rows = store.query_rows(
        _compose("SELECT /*cols*/ FROM $db.reconcile_runs FINAL WHERE State = 'running'", cols=_RUN_COLUMNS)
    )
    return [_run_row(r) for r in rows]


# --- scope of an incremental run ----------------------------------------------------------------------------
# Keys changed since the watermark, on either side, and the keys such a change can leave behind: a row that
# now points elsewhere (an ERP posting whose reference was fixed, a payment allocated to another invoice) stops
# being compared under its old key unless something else names it. Found through every stored version of the
# changed entries and payments, the other side's view of them (the ERP applications of a changed billing
# payment, the billing allocations of a changed ERP application), and open items that name a changed entry.
# What a background merge has already folded away and nothing else names is left to the next full run.
_CHANGED_ENTRIES = "(SELECT EntryId FROM $db.erp_ledger_entries WHERE IngestedAt >= {wm:DateTime64(6)})"
_CHANGED_PAYMENTS = "(SELECT PaymentId FROM $db.billing_payments WHERE IngestedAt >= {wm:DateTime64(6)})"
_SCOPE_INVOICES = """
INSERT INTO $db.reconcile_scope (RunId, KeyType, Key)
SELECT {run:String}, 'invoice', k FROM (
    SELECT InvoiceId AS k, false AS manual FROM $db.billing_invoices WHERE IngestedAt >= {wm:DateTime64(6)}
    -- an ERP invoice posted without a billing reference (a manual one) is compared under the key '', as a full
    -- run compares it: with the others like it
    UNION ALL SELECT arrayJoin([ExternalRef, AppliedToRef]), EntryType = 'invoice' AND ExternalRef = ''
        FROM $db.erp_ledger_entries WHERE EntryId IN /*changed_entries*/
    UNION ALL SELECT arrayJoin(mapKeys(Allocations)), false FROM $db.billing_payments
        WHERE PaymentId IN /*changed_payments*/
    UNION ALL SELECT AppliedToRef, false FROM $db.erp_ledger_entries
        WHERE RefHash IN (SELECT KeyHash FROM $db.billing_payments WHERE IngestedAt >= {wm:DateTime64(6)})
            AND AppliedToRef != ''
    UNION ALL SELECT arrayJoin(mapKeys(Allocations)), false FROM $db.billing_payments
        WHERE KeyHash IN (SELECT RefHash FROM $db.erp_ledger_entries
            WHERE IngestedAt >= {wm:DateTime64(6)} AND EntryType IN ('payment', 'credit_memo'))
    UNION ALL SELECT InvoiceId, false FROM $db.drift_items FINAL
        WHERE KeyType = 'invoice' AND State != 'resolved' AND InvoiceId != ''
            AND (Class = 'stale_sync' OR LedgerEntryId IN /*changed_entries*/)
)
WHERE k != '' OR manual
GROUP BY k
"""
# Payment keys likewise, and the unallocated payments of customers whose invoices or payments changed: the
# matches that decide orphan_payment or payment_unapplied (the customer's open invoices summing to a payment, or
# its payments summing to an invoice) depend on them, whether the payment has an open item or was clean because
# it matched.
_SCOPE_PAYMENTS = """
INSERT INTO $db.reconcile_scope (RunId, KeyType, Key)
SELECT {run:String}, 'payment', k FROM (
    SELECT PaymentId AS k FROM $db.billing_payments WHERE IngestedAt >= {wm:DateTime64(6)}
    UNION ALL SELECT PaymentId FROM $db.billing_payments
        WHERE Kind = 'payment' AND empty(Allocations) AND CustomerId IN /*changed_customers*/
    UNION ALL SELECT ExternalRef FROM $db.erp_ledger_entries
        WHERE EntryId IN /*changed_entries*/ AND EntryType IN ('payment', 'credit_memo')
    UNION ALL SELECT PaymentId FROM $db.drift_items FINAL
        WHERE KeyType = 'payment' AND State != 'resolved' AND PaymentId != ''
            AND (Class = 'stale_sync' OR LedgerEntryId IN /*changed_entries*/
                OR (Class IN ('orphan_payment', 'payment_unapplied') AND CustomerId IN /*changed_customers*/))
)
WHERE k != ''
GROUP BY k
"""
# Every version's customer of a changed invoice or payment (one moved to another customer leaves its former
# one's payments to match again), and of a payment whose ERP application changed.
_CHANGED_CUSTOMERS = """(
    SELECT CustomerId FROM $db.billing_invoices WHERE InvoiceId IN (
        SELECT InvoiceId FROM $db.billing_invoices WHERE IngestedAt >= {wm:DateTime64(6)})
    UNION ALL SELECT CustomerId FROM $db.billing_payments WHERE PaymentId IN /*changed_payments*/
    -- a payment the ERP applied (or stopped applying) leaves or joins the pool its siblings are matched in
    UNION ALL SELECT CustomerId FROM $db.billing_payments WHERE PaymentId IN (
        SELECT ExternalRef FROM $db.erp_ledger_entries
        WHERE EntryId IN /*changed_entries*/ AND EntryType = 'payment')
    -- an unallocated payment re-checked as its grace period ends is matched with its customer's other ones
    UNION ALL SELECT CustomerId FROM $db.drift_items FINAL
        WHERE KeyType = 'payment' AND State != 'resolved' AND Class = 'stale_sync' AND CustomerId != ''
            AND BillingValues['allocated_to'] = '')"""
_SCOPE_CUSTOMERS = """
INSERT INTO $db.reconcile_scope (RunId, KeyType, Key)
SELECT {run:String}, 'customer', k FROM (
    SELECT CustomerId AS k FROM $db.cdp_profiles WHERE IngestedAt >= {wm:DateTime64(6)}
    -- every stored version of a changed profile: one re-pointed to another customer leaves its old one behind
    UNION ALL SELECT CustomerId FROM $db.cdp_profiles
        WHERE CdpUserId IN (SELECT CdpUserId FROM $db.cdp_profiles WHERE IngestedAt >= {wm:DateTime64(6)})
    UNION ALL SELECT CustomerId FROM $db.billing_customers WHERE IngestedAt >= {wm:DateTime64(6)}
    UNION ALL SELECT CustomerId FROM $db.drift_items FINAL
        WHERE KeyType = 'customer' AND State != 'resolved' AND Class = 'stale_sync' AND CustomerId != ''
)
WHERE k != ''
GROUP BY k
"""


def build_scope(store: Store, run_id: str, watermark: dt.datetime, customers: bool) -> dict[str, int]:
    """Keys changed since ``watermark`` (either system's side) and the keys those changes can leave behind (see
    _SCOPE_INVOICES), plus the keys of open stale_sync items (the only class that changes with time alone: its
    grace period ends)."""
    params = {"run": run_id, "wm": watermark}
    changed = {"changed_entries": _CHANGED_ENTRIES, "changed_payments": _CHANGED_PAYMENTS}
    store.command(_compose(_SCOPE_INVOICES, **changed), params)
    store.command(_compose(_compose(_SCOPE_PAYMENTS, changed_customers=_CHANGED_CUSTOMERS), **changed), params)
    if customers:
        store.command(_SCOPE_CUSTOMERS, params)
    rows = store.query_rows(
        "SELECT KeyType AS t, count() AS n FROM $db.reconcile_scope WHERE RunId = {run:String} GROUP BY KeyType",
        {"run": run_id},
    )
    return {r["t"]: int(r["n"]) for r in rows}


_IN_SCOPE_INV = "(SELECT Key FROM $db.reconcile_scope WHERE RunId = {run:String} AND KeyType = 'invoice')"
_IN_SCOPE_PAY = "(SELECT Key FROM $db.reconcile_scope WHERE RunId = {run:String} AND KeyType = 'payment')"
_IN_SCOPE_CUS = "(SELECT Key FROM $db.reconcile_scope WHERE RunId = {run:String} AND KeyType = 'customer')"

# Large INSERT ... SELECTs of a run: two insert streams, and no per-block dedup while inserting (every reader of
# these ReplacingMergeTree tables dedups with FINAL or LIMIT 1 BY); single-threaded otherwise, and 40% slower.
_BULK_INSERT = "\nSETTINGS optimize_on_insert = 0, max_insert_threads = 2"

# --- comparison: stage A (full runs) finds candidate keys narrowly, by hash --------------------------------
# Per business key, grouped by cityHash64(key) (integer keys aggregate several times faster than strings; the
# key and row hashes are columns computed at insert, migrations 0010 and 0013, so this pass hashes no strings),
# two sums: the row counts per kind packed into one UInt64 (12 bits each: billing invoices, ERP invoice
# postings, rejected (draft) postings, ERP payment applications; bit 48 up: billing invoices not final), and a
# signed signature: the sum of row hashes, billing's added and the ERP's subtracted (wrapping UInt64
# arithmetic), so 0 means equal multisets. Each row hash includes the key itself, so keys whose cityHash64
# collide never look clean together. Hashed: the invoice's (amount, currency, region, day, status, customer)
# against the posting's (party for customer), each payment allocation (payment, amount) against the ERP
# application, each credit note against its credit memo.
# Exact matches are dropped; the hashes of the rest go to reconcile_hashes. A collision can only make a key
# look different, never hide a difference; the wide pass (stage B) decides on exact keys and values.
_STAGE_A_INVOICES = """
INSERT INTO $db.reconcile_hashes (RunId, KeyType, Hash)
SELECT {run:String}, 'invoice', hk FROM (
    SELECT hk, sum(cnt) AS packed, sum(sig) AS d /*region_aggs*/
    FROM (
        SELECT KeyHash AS hk,
            if(Status IN ('open', 'paid', 'uncollectible'), toUInt64(1), toUInt64(0x1000000000001)) AS cnt,
            if(Status IN ('open', 'paid', 'uncollectible'), MatchSig, 0) AS sig,
            toUInt8(1) AS side, cityHash64(Region) AS rh
        FROM $db.billing_invoices FINAL WHERE NOT IsDeleted
        UNION ALL
        SELECT LinkHash,
            multiIf(EntryType = 'invoice', if(Status = 'draft', toUInt64(0x1000000), toUInt64(0x1000)),
                EntryType = 'payment', toUInt64(0x1000000000), toUInt64(0)),
            if(EntryType = 'invoice' AND Status = 'draft', toUInt64(1), bitNot(MatchSig) + 1),
            if(EntryType = 'invoice' AND Status != 'draft', 2, 0), cityHash64(Region)
        FROM $db.erp_ledger_entries FINAL
        WHERE NOT IsDeleted AND Status != 'cancelled' AND (EntryType = 'invoice'
            OR (EntryType IN ('payment', 'credit_memo') AND AppliedToRef != '' AND Status != 'draft'))
        UNION ALL
        SELECT hs.1, 0, hs.2, 0, 0
        FROM $db.billing_payments FINAL ARRAY JOIN arrayZip(AllocHashes, AllocSigs) AS hs
        WHERE NOT IsDeleted AND Status = 'succeeded'
    )
    GROUP BY hk
    HAVING /*region_having*/ NOT (
        (bitAnd(packed, 0xFFFFFF) = 0x1001 AND bitShiftRight(packed, 48) = 0 AND d = 0)
        OR (bitAnd(packed, 0xFFFFFF) = 0x1 AND bitShiftRight(packed, 48) = 1 AND d = 0)
        OR bitAnd(packed, 0xFFFFFFFFFFFF) = 0
    )
)
"""
# Region runs only: the key's region (the billing invoice's, else the ERP postings': any of them, as stage B
# decides by the first posting's, which this pass cannot tell).
_STAGE_A_REGION = {
    "region_aggs": ", anyIf(rh, side = 1) AS b_rh, groupUniqArrayIf(rh, side = 2) AS e_rhs",
    "region_having": "if(b_rh != 0, b_rh = cityHash64({region:String}), has(e_rhs, cityHash64({region:String}))) AND",
}
# Payment keys, the same way: per key one packed sum of 0/1 flags (16 bits: billing payments; 4 bits each:
# not succeeded, succeeded payment with allocations, succeeded refund or credit note; 18 bits each: ERP
# applications and credit memos, of them credit memos) and the sums of a second hash of each side's rows
# (PaySig, migration 0019: the key and currency, and a refund's or credit memo's unsigned amount), so rows of two
# keys whose cityHash64 collide never look clean together, and neither does a credit memo of another amount or
# an application in another currency (the ERP side must sum to e_n times the billing side's).
_STAGE_A_PAYMENTS = """
INSERT INTO $db.reconcile_hashes (RunId, KeyType, Hash)
SELECT {run:String}, 'payment', hk FROM (
    SELECT hk, sum(cnt) AS packed, sumIf(k2, side = 1) AS sb, sumIf(k2, side = 2) AS se /*region_aggs*/,
        bitAnd(bitShiftRight(packed, 28), 0x3FFFF) AS e_n
    FROM (
        SELECT KeyHash AS hk, toUInt8(1) AS side, PaySig AS k2, cityHash64(Region) AS rh,
            1 + multiIf(Status != 'succeeded', 0x10000,
                Kind = 'payment', if(empty(Allocations), 0, 0x100000),
                Kind IN ('refund', 'credit_note'), 0x1000000, 0) AS cnt
        FROM $db.billing_payments FINAL WHERE NOT IsDeleted
        UNION ALL
        -- a payment the ERP booked and applied to no invoice: its row's signature is off by one, so a payment
        -- allocated in billing with only such rows never looks clean
        SELECT RefHash, toUInt8(2), PaySig + (EntryType = 'payment' AND AppliedToRef = ''), cityHash64(Region),
            if(EntryType = 'credit_memo', toUInt64(0x400010000000), toUInt64(0x10000000))
        FROM $db.erp_ledger_entries FINAL
        WHERE NOT IsDeleted AND EntryType IN ('payment', 'credit_memo') AND Status NOT IN ('cancelled', 'draft')
    )
    GROUP BY hk
    HAVING /*region_having*/ NOT (
        bitAnd(packed, 0xFFFF) = 1 AND se = e_n * sb AND (
            (bitAnd(packed, 0xF0000) != 0 AND e_n = 0)
            OR (bitAnd(packed, 0xF00000) != 0 AND e_n > 0)
            OR (bitAnd(packed, 0xF000000) != 0 AND bitShiftRight(packed, 46) = 1 AND e_n = 1)
        )
    )
)
"""


# Region runs, payments: also every region's unallocated succeeded payments (one billing payment, no flag: bits
# 0-27 of packed = 1). Instalments of one invoice can come from several regions; the sum match needs them all
# (see _PAY_IN_REGION: only the region's own are classified).
_STAGE_A_PAYMENT_REGION = {
    **_STAGE_A_REGION,
    "region_having": "("
    + _STAGE_A_REGION["region_having"].removesuffix(" AND")
    + " OR bitAnd(packed, 0xFFFFFFF) = 1) AND",
}


def find_candidates(store: Store, run_id: str, region: str = "") -> dict[str, int]:
    """Full runs: hashes of the invoice and payment keys whose sides do not match exactly."""
    params = {"run": run_id, "region": region}
    region_sql = _STAGE_A_REGION if region else dict.fromkeys(_STAGE_A_REGION, "")
    payment_region_sql = _STAGE_A_PAYMENT_REGION if region else region_sql
    store.command(_compose(_STAGE_A_INVOICES, **region_sql), params)
    store.command(_compose(_STAGE_A_PAYMENTS, **payment_region_sql), params)
    rows = store.query_rows(
        "SELECT KeyType AS t, count() AS n FROM $db.reconcile_hashes WHERE RunId = {run:String} GROUP BY KeyType",
        {"run": run_id},
    )
    return {r["t"]: int(r["n"]) for r in rows}


# --- comparison: stage B, both sides' facts of the candidate keys (exact string keys) ----------------------
# Invoice keys. src: 0 billing invoice, 1 ERP invoice posting, 2 ERP payment application (keyed by the invoice
# it applies to), 3 ERP draft = rejected posting, 4 billing payment allocation, 5 billing refund / credit-note
# allocation, 6 ERP credit memo (keyed by the invoice it applies to), 7 ERP application of a payment billing
# allocated nowhere.
_INVOICE_FACTS = """
INSERT INTO $db.reconcile_invoice_facts (RunId, key, b_n, b_customer, b_region, b_currency, b_total, b_tax,
    b_subtotal, b_status, b_issued, b_finalized, b_day, e_n, e_currency, e_amount, e_sum, e_status, e_entry,
    e_region, e_party, e_day, rejected, e_applied, b_alloc, b_alloc_unposted, b_credit_unposted)
SELECT
    {run:String},
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
    -- of several postings, the values of the first by entry id (e_entry's): the same ones every run
    argMinIf(cur, id, src = 1) AS e_currency,
    argMinIf(amt, id, src = 1) AS e_amount,
    -- postings in several currencies: those in the item's currency (billing's, else the first posting's), since
    -- minor units of two currencies never add up; the statement counts each in its own currency's cell
    if(uniqExactIf(cur, src = 1) > 1,
        arraySum(arrayMap((c, a) -> if(c = if(b_n > 0, b_currency, e_currency), a, 0),
            groupArrayIf(cur, src = 1), groupArrayIf(amt, src = 1))),
        sumIf(amt, src = 1)) AS e_sum,
    argMinIf(status, id, src = 1) AS e_status,
    minIf(id, src = 1) AS e_entry,
    argMinIf(region, id, src = 1) AS e_region,
    minIf(cust, src = 1) AS e_party,  -- of several postings, one and always the same ('' first)
    argMinIf(day, id, src = 1) AS e_day,
    argMinIf(note, id, src = 3) AS rejected,
    -- applications in the invoice's currency: one in another currency is its payment's currency_mismatch, and
    -- minor units of two currencies never add up
    sumMapIf(map(cur, amt), src = 2)[if(b_n > 0, b_currency, e_currency)] AS e_applied,
    sumIf(amt, src = 4) AS b_alloc,
    -- allocations of payments the ERP applied to no invoice at all, or to this one only in another currency: the
    -- payment's own comparison reports them (payment_unapplied, currency_mismatch); one the ERP applied elsewhere
    -- but not here is this invoice's (under_applied)
    arraySum(arrayMap((p, a, w) -> if((w AND NOT has(groupArrayIf(id, src = 2), p)) OR has(arrayFilter(
            (q, c) -> c = if(b_n > 0, b_currency, e_currency), groupArrayIf(id, src = 2), groupArrayIf(cur, src = 2)),
            p), 0, a),
        groupArrayIf(id, src = 4), groupArrayIf(amt, src = 4), groupArrayIf(applied, src = 4))) AS b_alloc_unposted,
    arraySum(arrayMap(p -> if(has(groupArrayIf(id, src = 6), p), 0, 1), groupArrayIf(id, src = 5))) AS b_credit_unposted
FROM (
    SELECT InvoiceId AS k, 0 AS src, CustomerId AS cust, Region AS region, Currency AS cur, TotalMinor AS amt,
        TaxMinor AS amt2, SubtotalMinor AS amt3, Status AS status, IssuedAt AS ts, FinalizedAt AS ts2,
        toDate(IssuedAt) AS day, '' AS id, '' AS note, false AS applied
    FROM $db.billing_invoices FINAL /*inv_filter*/ WHERE NOT IsDeleted
    UNION ALL
    SELECT if(EntryType = 'invoice', ExternalRef, AppliedToRef) AS lk,
        multiIf(EntryType = 'invoice', if(Status = 'draft', 3, 1),
            -- the ERP's application of a payment billing allocated nowhere: cash applied in the ERP, which the
            -- payment's comparison accepts; not an application beyond what billing allocated (src 7, not summed)
            -- (narrowly first: the applications of payments with an unallocated version, then their latest one)
            EntryType = 'payment', if(ExternalRef IN (
                SELECT PaymentId FROM $db.billing_payments
                PREWHERE PaymentId IN (SELECT ExternalRef FROM $db.reconcile_ledger_rows
                    WHERE RunId = {run:String} AND EntryType = 'payment' AND AppliedToRef != ''
                        AND RefHash IN (SELECT KeyHash FROM $db.billing_payments
                            WHERE empty(AllocHashes) AND Kind = 'payment'))
                GROUP BY PaymentId
                HAVING argMax(NOT IsDeleted AND Kind = 'payment' AND Status = 'succeeded' AND empty(Allocations),
                    Version)), 7, 2),
            6), PartyRef, Region,
        Currency, AmountMinor, 0, 0, Status, PostedAt, PostedAt, PeriodDate,
        if(EntryType = 'invoice', EntryId, ExternalRef), Rejection, false
    FROM $db.reconcile_ledger_rows
    WHERE RunId = {run:String} AND LinkHash IN /*hash_inv*/ AND (EntryType = 'invoice'
        OR (EntryType IN ('payment', 'credit_memo') AND AppliedToRef != '' AND Status != 'draft'))
    UNION ALL
    SELECT inv, if(Kind = 'payment', 4, 5), CustomerId, Region, Currency, a, 0, 0, Status, OccurredAt, OccurredAt,
        toDate(OccurredAt), PaymentId, '',
        PaymentId IN (SELECT ExternalRef FROM $db.reconcile_ledger_rows
            WHERE RunId = {run:String} AND EntryType = 'payment' AND AppliedToRef != '' AND Status != 'draft')
    FROM $db.billing_payments FINAL
        ARRAY JOIN mapKeys(Allocations) AS inv, mapValues(Allocations) AS a, AllocHashes AS inv_hash
    /*pay_prewhere*/
    WHERE NOT IsDeleted AND Status = 'succeeded' /*pay_filter*/
)
GROUP BY k
HAVING ({region:String} = '' OR b_region = {region:String} OR (b_n = 0 AND e_region = {region:String}))
    AND NOT (
        (b_n = 1 AND e_n = 1 AND b_status IN ('open', 'paid', 'uncollectible') AND e_currency = b_currency
            AND e_amount = b_total AND e_region = b_region AND e_day = b_day AND e_party = b_customer
            AND b_alloc = e_applied AND b_alloc_unposted = 0 AND b_credit_unposted = 0
            AND NOT (b_status = 'paid' AND e_status = 'open') AND NOT (b_status = 'open' AND e_status = 'paid'))
        OR (b_n = 1 AND e_n = 0 AND b_status NOT IN ('open', 'paid', 'uncollectible') AND b_alloc = e_applied)
        OR (b_n = 0 AND e_n = 0 AND e_applied = 0 AND rejected = '')
    )
"""
# Both modes read the rows of the keys whose hashes are in reconcile_hashes (stage A's candidates, or the
# incremental scope's keys): a filter on a function of the sorting key (KeyHash) goes before FINAL (PREWHERE:
# every version of a key passes or fails it together); others after it, so an old version never stands in for
# the latest.
_INV_HASH_FILTERS = {
    "inv_filter": "PREWHERE KeyHash IN /*hash_inv*/",
    # payments any version of which allocates to a key (a narrow pass without FINAL), then their latest versions
    "pay_prewhere": "PREWHERE KeyHash IN (SELECT KeyHash FROM $db.billing_payments ARRAY JOIN AllocHashes AS h "
    "WHERE h IN /*hash_inv*/)",
    "pay_filter": "AND inv_hash IN /*hash_inv*/",
}
_SCOPE_HASHES = """
INSERT INTO $db.reconcile_hashes (RunId, KeyType, Hash)
SELECT RunId, KeyType, cityHash64(Key) FROM $db.reconcile_scope
WHERE RunId = {run:String} AND KeyType IN ('invoice', 'payment')
"""
# The live ledger rows either comparison needs, in one pass over the ledger (see migration 0011).
_LEDGER_ROWS = """
INSERT INTO $db.reconcile_ledger_rows (RunId, LinkHash, RefHash, EntryId, EntryType, ExternalRef, PartyRef, Region,
    Currency, AmountMinor, Status, AppliedToRef, PostedAt, PeriodDate, Rejection)
SELECT {run:String}, LinkHash, RefHash, EntryId, EntryType, ExternalRef, PartyRef, Region, Currency, AmountMinor,
    Status, AppliedToRef, PostedAt, PeriodDate, if(EntryType = 'invoice', Attributes['rejection'], '')
FROM $db.erp_ledger_entries FINAL
WHERE NOT IsDeleted AND Status != 'cancelled' AND (LinkHash IN /*hash_inv*/ OR RefHash IN /*hash_pay*/
    -- the applications, wherever, of payments billing allocated to a compared invoice (see b_alloc_unposted)
    OR RefHash IN (SELECT KeyHash FROM $db.billing_payments ARRAY JOIN AllocHashes AS h WHERE h IN /*hash_inv*/))
"""
_HASH_INV = "(SELECT Hash FROM $db.reconcile_hashes WHERE RunId = {run:String} AND KeyType = 'invoice')"
_HASH_PAY = "(SELECT Hash FROM $db.reconcile_hashes WHERE RunId = {run:String} AND KeyType = 'payment')"

# Payment keys. src: 0 billing payment / refund / credit note, 1 ERP payment application or credit memo.
_PAYMENT_FACTS = """
INSERT INTO $db.reconcile_payment_facts (RunId, key, p_n, p_kind, p_status, p_amount, p_currency, p_region,
    p_customer, p_occurred, p_alloc_n, p_alloc_refs, e_n, e_memo_n, e_applied_n, e_sum, e_memo_sum, e_type,
    e_status, e_currency, e_currencies, e_region, e_party, e_entry, e_day, e_applied_refs)
SELECT
    {run:String},
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
    abs(sumIf(amt, src = 1 AND kind = 'credit_memo')) AS e_memo_sum,
    argMinIf(kind, id, src = 1) AS e_type,
    argMinIf(status, id, src = 1) AS e_status,
    argMinIf(cur, id, src = 1) AS e_currency,
    arrayStringConcat(arraySort(groupUniqArrayIf(cur, src = 1)), ',') AS e_currencies,
    argMinIf(region, id, src = 1) AS e_region,
    minIf(cust, src = 1) AS e_party,  -- of several postings, one and always the same ('' first)
    minIf(id, src = 1) AS e_entry,
    argMinIf(day, id, src = 1) AS e_day,
    arrayStringConcat(arraySort(groupUniqArrayIf(refs, src = 1 AND refs != '')), ',') AS e_applied_refs
FROM (
    SELECT PaymentId AS k, 0 AS src, Kind AS kind, Status AS status, AmountMinor AS amt, Currency AS cur,
        Region AS region, CustomerId AS cust, OccurredAt AS ts, length(Allocations) AS n,
        arrayStringConcat(arraySort(mapKeys(Allocations)), ',') AS refs, '' AS id, toDate(OccurredAt) AS day
    FROM $db.billing_payments FINAL /*pay_filter*/ WHERE NOT IsDeleted
    UNION ALL
    SELECT ExternalRef, 1, EntryType, Status, AmountMinor, Currency, Region, PartyRef, PostedAt, 0, AppliedToRef,
        EntryId, PeriodDate
    FROM $db.reconcile_ledger_rows
    WHERE RunId = {run:String} AND RefHash IN /*hash_pay*/ AND EntryType IN ('payment', 'credit_memo')
        AND Status != 'draft'
)
GROUP BY k
HAVING ({region:String} = '' OR /*pay_in_region*/ OR (p_n > 0 AND p_kind = 'payment' AND p_status = 'succeeded'
        AND p_alloc_n = 0))  -- a region run's match pool: every region's unallocated payments
    AND NOT (
        p_n = 1 AND (
            (p_status != 'succeeded' AND e_n = 0)
            OR (p_status = 'succeeded' AND e_currencies = p_currency AND (
                (p_kind = 'payment' AND p_alloc_n > 0 AND e_applied_n > 0)
                OR (p_kind IN ('refund', 'credit_note') AND e_memo_n > 0 AND e_memo_sum = abs(p_amount))))
        )
    )
"""
_PAY_HASH_FILTERS = {
    "pay_filter": "PREWHERE KeyHash IN /*hash_pay*/",
}
# A payment key a region run compares and classifies: billed in the region, or (billing lacks it) posted there.
_PAY_IN_REGION = "(p_region = {region:String} OR (p_n = 0 AND e_region = {region:String}))"

# Customers (tables of migration 0003; small): CDP profiles whose billing customer does not exist.
_CUSTOMER_FACTS = """
INSERT INTO $db.reconcile_customer_facts (RunId, key, b_n, b_cdp_user, b_updated, c_n, c_cdp_user, c_updated, region)
SELECT
    {run:String},
    k AS key,
    countIf(src = 0) AS b_n,
    anyIf(uid, src = 0) AS b_cdp_user,
    anyIf(ts, src = 0) AS b_updated,
    countIf(src = 1) AS c_n,
    minIf(uid, src = 1) AS c_cdp_user,  -- of several profiles, one and always the same
    maxIf(ts, src = 1) AS c_updated,
    argMinIf(region, uid, src = 1) AS region
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
_CUS_SCOPE_FILTERS = {
    "bill_filter": "AND CustomerId IN /*scope_cus*/",
    "cdp_filter": "AND CustomerId IN /*scope_cus*/",
    "key_filter": "AND key IN /*scope_cus*/",
}


def collect_facts(store: Store, run_id: str, *, full: bool, region: str = "", customers: bool = True) -> dict[str, int]:
    """Both sides' facts of the keys to classify into the run's scratch tables: stage A's candidates (full
    runs) or the scope's keys (incremental runs). Returns rows per kind."""
    params = {"run": run_id, "region": region}
    scopes = {"scope_inv": _IN_SCOPE_INV, "scope_pay": _IN_SCOPE_PAY, "scope_cus": _IN_SCOPE_CUS}
    hashes = {"hash_inv": _HASH_INV, "hash_pay": _HASH_PAY}
    if not full:
        store.command(_SCOPE_HASHES, params)
    store.command(_compose(_LEDGER_ROWS, **hashes), params)
    inv = _compose(_INVOICE_FACTS, **_INV_HASH_FILTERS)
    pay = _compose(_PAYMENT_FACTS, **_PAY_HASH_FILTERS, pay_in_region=_PAY_IN_REGION)
    store.command(_compose(inv, **scopes, **hashes), params)
    store.command(_compose(pay, **scopes, **hashes), params)
    if customers:
        cus = _compose(_CUSTOMER_FACTS, **(dict.fromkeys(_CUS_SCOPE_FILTERS, "") if full else _CUS_SCOPE_FILTERS))
        store.command(_compose(cus, **scopes), params)
    counts = {}
    for kind in ("invoice", "payment", "customer"):
        only = f"AND ({{region:String}} = '' OR {_PAY_IN_REGION})" if kind == "payment" else ""  # not the pool
        sql = _compose("SELECT count() AS n FROM $db.reconcile_/*t*/_facts WHERE RunId = {run:String} /*only*/", t=kind)
        counts[kind] = int(store.query_rows(_compose(sql, only=only), params)[0]["n"])
    return counts


# --- classification: the SQL mirror of reconciler/classify.py (tests check both agree) ---------------------
_TOL = """
    if(mapContains({tol_abs:Map(String, Int64)}, cur), {tol_abs:Map(String, Int64)}[cur],
        {tol_abs_default:Int64}) AS t_abs,
    if(mapContains({tol_rel:Map(String, Int64)}, cur), {tol_rel:Map(String, Int64)}[cur],
        {tol_rel_default:Int64}) AS t_rel,
"""
_GRACE = (
    "if(mapContains({grace:Map(String, Int64)}, '/*cls*/'), {grace:Map(String, Int64)}['/*cls*/'], "
    "{grace_default:Int64})"
)
_DIFF = (
    "arrayFilter(k -> (mapContains(bv, k) != mapContains(ev, k)) OR bv[k] != ev[k], "
    "arraySort(arrayDistinct(arrayConcat(mapKeys(bv), mapKeys(ev)))))"
)
_DRIFT_ID = "substring(lower(hex(SHA256(concat(cls, ':', pk)))), 1, 32)"


def _layers(source: str, *columns: str) -> str:
    """``SELECT *, <columns> FROM (...)`` nested once per layer over ``source``, innermost first. ClickHouse's
    analyzer copies an alias's whole expression wherever another alias names it, so one flat SELECT of the
    classification planned a tree that grew with every alias built on ``cls`` (~170 ms per run for 12 rows); a
    layer makes each alias a column of the next."""
    sql = source
    for cols in columns:
        sql = f"SELECT *,\n{cols}\nFROM ({sql})"
    return sql


_INVOICE_CLASSIFIED = _layers(
    "SELECT * FROM $db.reconcile_invoice_facts WHERE RunId = {run:String}",
    """    b_n > 0 AS in_billing,
    b_status IN ('open', 'paid', 'uncollectible') AS final,
    if(b_currency != '', b_currency, e_currency) AS cur,
    if(b_region != '', b_region, e_region) AS reg,
    if(toYear(b_finalized) > 1971, b_finalized, b_issued) AS since,
    abs(b_total - e_amount) AS d_amt,
    b_alloc - b_alloc_unposted AS alloc""",
    """    /*tol*/
    (toYear(since) > 1971
        AND dateDiff('millisecond', since, {as_of:DateTime64(3)}) <= /*grace_missing*/ * 1000) AS in_grace,
    abs(alloc - e_applied) AS d_app,
    (b_alloc_unposted = 0 AND b_credit_unposted = 0) AS payments_posted""",
    """    (d_amt <= t_abs OR toInt128(d_amt) * 10000 <= toInt128(t_rel) * abs(toInt128(b_total))) AS amt_ok,
    (d_app <= t_abs OR toInt128(d_app) * 10000 <= toInt128(t_rel) * abs(toInt128(alloc))) AS app_ok""",
    """    multiIf(
        NOT in_billing, if(e_n = 0, '', 'missing_in_billing'),
        NOT final, if(e_n > 0, 'status_mismatch', ''),
        e_n = 0, if(rejected = '' AND in_grace, 'stale_sync', 'missing_in_erp'),
        e_n > 1, 'duplicate_posting',
        e_currency != b_currency, 'currency_mismatch',
        b_total != e_amount AND NOT amt_ok, 'amount_mismatch',
        b_region != '' AND e_region != '' AND b_region != e_region, 'region_mismatch',
        alloc != e_applied AND NOT app_ok, if(e_applied < alloc, 'under_applied', 'over_applied'),
        payments_posted AND b_status = 'paid' AND e_status = 'open', 'status_mismatch',
        payments_posted AND b_status = 'open' AND e_status = 'paid', 'status_mismatch',
        '') AS cls""",
    """    multiIf(
        cls = 'missing_in_billing', 'not_in_billing',
        cls = 'status_mismatch',
            multiIf(NOT final, if(b_status = 'void', 'voided_but_posted', 'draft_but_posted'),
                b_status = 'paid', 'paid_but_open', 'open_but_paid'),
        cls = 'stale_sync', 'posting_pending',
        cls = 'missing_in_erp', if(rejected != '', 'erp_rejected', 'not_posted'),
        cls = 'duplicate_posting', 'posted_twice',
        cls = 'currency_mismatch', 'currency_differs',
        cls = 'region_mismatch', 'posted_in_other_region',
        cls = 'amount_mismatch', multiIf(
            b_tax != 0 AND (d_amt = abs(b_tax) OR e_amount = b_subtotal), 'amount_tax',
            d_amt < intExp10(if(mapContains({exp:Map(String, Int64)}, cur), {exp:Map(String, Int64)}[cur], 2))
                OR d_amt <= 1,
            'amount_rounding',
            'amount_differs'),
        cls = 'under_applied', 'applied_less',
        cls = 'over_applied', 'applied_more',
        '') AS reason,
    multiIf(
        cls = 'missing_in_billing' OR (cls = 'status_mismatch' AND NOT final), -e_sum,
        -- a currency mismatch is billing's whole amount at stake: minor units of two currencies never subtract
        cls IN ('stale_sync', 'missing_in_erp', 'region_mismatch', 'currency_mismatch'), b_total,
        cls = 'duplicate_posting', b_total - e_sum,
        cls = 'amount_mismatch', b_total - e_amount,
        cls IN ('under_applied', 'over_applied'), alloc - e_applied,
        0) AS amount,
    map('status', b_status, 'currency', b_currency, 'total_minor', toString(b_total), 'customer_id', b_customer) AS bm,
    map('status', e_status, 'currency', e_currency, 'total_minor', toString(e_amount), 'customer_id', e_party) AS em,
    map('status', '', 'currency', '', 'total_minor', '', 'customer_id', '') AS blank,
    if(cls = 'missing_in_billing', e_entry, key) AS pk,
    if(cls = 'missing_in_billing', 'billing', 'erp') AS system,
    if(in_billing, b_day, e_day) AS item_day,
    if(b_customer != '', b_customer, e_party) AS customer""",
    """    multiIf(
        cls = 'missing_in_billing', map('status', '', 'total_minor', '', 'currency', ''),
        cls = 'duplicate_posting', mapUpdate(bm, map('postings', '1')),
        cls IN ('under_applied', 'over_applied'), mapUpdate(bm, map('allocated_minor', toString(alloc))),
        cls = 'region_mismatch', mapUpdate(bm, map('region', b_region)),
        bm) AS bv,
    multiIf(
        cls = 'missing_in_billing', map('status', e_status, 'total_minor', toString(e_sum), 'currency', e_currency),
        cls = 'stale_sync', blank,
        cls = 'missing_in_erp', if(rejected != '', mapUpdate(blank, map('error', rejected)), blank),
        cls = 'duplicate_posting', mapUpdate(em, map('total_minor', toString(e_sum), 'postings', toString(e_n))),
        cls IN ('under_applied', 'over_applied'), mapUpdate(em, map('applied_minor', toString(e_applied))),
        cls = 'region_mismatch', mapUpdate(em, map('region', e_region)),
        em) AS ev""",
    """    /*drift_id*/ AS drift_id,
    /*diff*/ AS diff""",
)
_PAYMENT_CLASSIFIED = _layers(
    "SELECT * FROM $db.reconcile_payment_facts WHERE RunId = {run:String}",
    """    p_n > 0 AS in_billing,
    if(p_currency != '', p_currency, e_currency) AS cur,
    (toYear(p_occurred) > 1971
        AND dateDiff('millisecond', p_occurred, {as_of:DateTime64(3)}) <= /*grace_unapplied*/ * 1000) AS grace_pay,
    (toYear(p_occurred) > 1971
        AND dateDiff('millisecond', p_occurred, {as_of:DateTime64(3)}) <= /*grace_refund*/ * 1000) AS grace_refund,
    (sum_match = 1 OR key IN (/*sum_match*/)) AS matched,
    toInt64(abs(p_amount)) AS refunded,
    abs(toInt128(p_amount) - e_sum) AS d_booked""",
    """    /*tol*/
    abs(refunded - e_memo_sum) AS d_memo""",
    """    (d_memo <= t_abs OR toInt128(d_memo) * 10000 <= toInt128(t_rel) * refunded) AS memo_ok,
    (d_booked <= t_abs OR d_booked * 10000 <= toInt128(t_rel) * abs(toInt128(p_amount))) AS booked_ok""",
    """    multiIf(
        NOT in_billing, if(e_n = 0, '', 'missing_in_billing'),
        p_status != 'succeeded', if(e_n = 0, '', 'missing_in_billing'),
        p_kind = 'payment', multiIf(
            e_n > 0 AND e_currencies != p_currency, 'currency_mismatch',
            p_alloc_n = 0 AND e_applied_n > 0, if(booked_ok, '', 'amount_mismatch'),
            p_alloc_n = 0 AND NOT matched, 'orphan_payment',
            e_n = 0 OR (p_alloc_n > 0 AND e_applied_n = 0), if(grace_pay, 'stale_sync', 'payment_unapplied'),
            ''),
        p_kind IN ('refund', 'credit_note'), multiIf(
            e_memo_n = 0, if(grace_refund, 'stale_sync', 'refund_unposted'),
            e_currencies != p_currency, 'currency_mismatch',
            NOT memo_ok, 'amount_mismatch',
            ''),
        '') AS cls""",
    """    multiIf(
        cls = 'missing_in_billing', if(in_billing, 'failed_in_billing', 'not_in_billing'),
        cls = 'orphan_payment', 'no_invoice',
        cls = 'stale_sync', if(p_kind = 'payment', 'application_pending', 'credit_memo_pending'),
        cls = 'payment_unapplied', multiIf(p_alloc_n = 0, 'matched_not_applied', e_n > 0, 'booked_unapplied',
            'not_applied'),
        cls = 'refund_unposted', 'credit_memo_missing',
        cls = 'currency_mismatch', if(p_kind = 'payment', 'application_currency', 'credit_memo_currency'),
        cls = 'amount_mismatch', if(p_kind = 'payment', 'application_differs', 'credit_memo_differs'),
        '') AS reason,
    multiIf(
        cls = 'missing_in_billing', -e_sum,
        cls = 'currency_mismatch', if(p_kind = 'payment', p_amount, refunded),  -- billing's, as for invoices
        cls = 'amount_mismatch' AND p_kind = 'payment', p_amount - e_sum,
        cls = 'amount_mismatch', refunded - e_memo_sum,
        p_amount) AS amount,
    map('kind', p_kind, 'status', p_status, 'amount_minor', toString(p_amount), 'currency', p_currency,
        'allocated_to', p_alloc_refs) AS bv,
    map('kind', e_type, 'status', e_status, 'amount_minor', if(e_n > 0, toString(e_sum), ''),
        'currency', e_currencies, 'allocated_to', e_applied_refs) AS ev,
    if(cls = 'missing_in_billing', e_entry, key) AS pk,
    if(cls = 'orphan_payment' OR (cls = 'missing_in_billing' AND NOT in_billing), 'billing', 'erp') AS system,
    if(p_region != '', p_region, e_region) AS reg,
    if(in_billing, toDate(p_occurred), e_day) AS item_day,
    if(p_customer != '', p_customer, e_party) AS customer""",
    """    /*drift_id*/ AS drift_id,
    /*diff*/ AS diff""",
)
# N:1 matching of unallocated payments: the customer's open invoices inside the date window sum to the amount
# (or exactly one of them equals it) within the currency's tolerance; and 1:N the other way, several unallocated
# payments of one customer inside the window of an open invoice that together pay it (instalments without a
# reference). The payments: the run's unallocated ones.
_MATCH_PAYMENTS = """
    SELECT key, p_customer, p_amount, p_occurred, p_currency AS cur, e_applied_n, e_applied_refs, /*tol*/ 1 AS one
    FROM $db.reconcile_payment_facts
    WHERE RunId = {run:String} AND p_n > 0 AND p_kind = 'payment' AND p_status = 'succeeded' AND p_alloc_n = 0
"""
# The latest version of every invoice any version of which belongs to one of these customers (an invoice moved to
# another customer is that customer's now), open with something outstanding.
_MATCH_INVOICES = """
    SELECT InvoiceId, st.1 AS CustomerId, st.3 AS outstanding, st.4 AS FinalizedAt, st.6 AS currency
    FROM (
        SELECT InvoiceId,
            argMax((CustomerId, Status, TotalMinor - AmountPaidMinor - AmountCreditedMinor, FinalizedAt, IsDeleted,
                Currency), Version) AS st
        FROM $db.billing_invoices
        PREWHERE KeyHash IN (
            SELECT KeyHash FROM $db.billing_invoices
            PREWHERE CustomerId IN (
                SELECT p_customer FROM $db.reconcile_payment_facts
                WHERE RunId = {run:String} AND p_alloc_n = 0))
        GROUP BY InvoiceId
    )
    WHERE st.2 = 'open' AND st.5 = 0 AND outstanding > 0
"""
_MATCH_JOIN = """
    INNER JOIN (/*invoices*/) AS i ON i.CustomerId = p.p_customer
    WHERE i.FinalizedAt BETWEEN p.p_occurred - toIntervalDay({window:UInt32})
            AND p.p_occurred + toIntervalDay({window:UInt32})
        AND i.currency = p.cur
"""
# One read of the invoices for both directions: each (payment, invoice) pair counts once per payment (side 1: its
# invoices sum to it, or exactly one equals it) and once per invoice (side 2: its payments, more than one, sum to
# it). A payment the ERP applied needs no match of its own, but counts for the invoice the ERP applied it to (the
# other instalments of that invoice are matched with it); any other pair of it is left out. The result: the
# payment keys of every matched group.
_SUM_MATCH = """
SELECT arrayJoin(if(side = 1, [any(pkey)], groupArray(pkey))) AS k FROM (
    SELECT p.key AS pkey, p.p_amount AS amt, p.t_abs AS t_abs, p.t_rel AS t_rel, i.InvoiceId AS ik,
        i.outstanding AS due, p.e_applied_n = 0 AS unapplied, has(splitByChar(',', p.e_applied_refs), ik) AS here
    FROM (/*payments*/) AS p /*join*/
) ARRAY JOIN [1, 2] AS side
WHERE unapplied OR (side = 2 AND here)
GROUP BY side, if(side = 1, pkey, ik)
HAVING if(side = 1,
    abs(sum(due) - any(amt)) <= greatest(any(t_abs), intDiv(toInt128(any(t_rel)) * abs(any(amt)), 10000))
        OR countIf(abs(due - amt) <= greatest(t_abs, intDiv(toInt128(t_rel) * abs(amt), 10000))) = 1,
    count() > 1 AND min(amt) > 0
        AND abs(sum(amt) - any(due)) <= greatest(any(t_abs), intDiv(toInt128(any(t_rel)) * abs(any(due)), 10000)))
"""
_CUSTOMER_CLASSIFIED = """
SELECT *,
    '' AS cur,
    region AS reg,
    if(toYear(c_updated) > 1971
        AND dateDiff('millisecond', c_updated, {as_of:DateTime64(3)}) <= /*grace_customer*/ * 1000,
        'stale_sync', 'customer_unsynced') AS cls,
    if(cls = 'stale_sync', 'customer_pending', 'profile_not_in_billing') AS reason,
    toInt64(0) AS amount,
    map('exists', if(b_n > 0, 'yes', 'no'), 'cdp_user_id', b_cdp_user) AS bv,
    map('exists', 'yes', 'cdp_user_id', c_cdp_user, 'updated_at', formatDateTime(c_updated, '%Y-%m-%dT%H:%i:%S')) AS ev,
    key AS pk,
    /*drift_id*/ AS drift_id,
    /*diff*/ AS diff,
    'billing' AS system,
    toDate(c_updated) AS item_day,
    key AS customer
FROM $db.reconcile_customer_facts WHERE RunId = {run:String}
"""
# Customers, from the run's invoice facts: a billing customer whose compared invoices the ERP booked to no or
# another party has no ERP party mapping (one item per customer; its first such invoice and posting as example).
# Deterministic aggregates only (min, argMin, sorted parties) so the SQL and reconciler/classify.py agree.
_PARTY_CLASSIFIED = """
SELECT *,
    '' AS cur,
    region AS reg,
    'customer_unmatched' AS cls,
    'no_erp_party' AS reason,
    toInt64(0) AS amount,
    map('customer_id', key, 'invoices', toString(invoices)) AS bv,
    map('customer_id', parties, 'invoices', toString(invoices)) AS ev,
    key AS pk,
    /*drift_id*/ AS drift_id,
    /*diff*/ AS diff,
    'erp' AS system,
    first_day AS item_day,
    key AS customer
FROM (
    SELECT b_customer AS key, min(b_region) AS region, min(b_day) AS first_day, count() AS invoices,
        min(f.key) AS invoice, argMin(e_entry, f.key) AS entry,
        arrayStringConcat(arraySlice(arraySort(groupUniqArray(e_party)), 1, 5), ',') AS parties
    FROM $db.reconcile_invoice_facts AS f
    WHERE RunId = {run:String} AND b_n > 0 AND e_n > 0 AND b_customer != '' AND e_party != b_customer
    GROUP BY b_customer
)
"""
_WRITE_FINDINGS = """
INSERT INTO $db.reconcile_findings (RunId, DriftId, Class, ReasonCode, System, Region, Currency, CustomerId,
    InvoiceId, PaymentId, LedgerEntryId, PrimaryKey, KeyType, AmountMinor, BillingValues, ErpValues, DiffFields, Day)
SELECT {run:String}, drift_id, cls, reason, system, reg, cur, customer, /*invoice*/, /*payment*/, /*entry*/, pk,
    '/*key_type*/', amount, bv, ev, diff, item_day
FROM (/*classified*/)
WHERE cls != '' /*only*/
"""
# A customer_unmatched item stands for the customer's invoices of every region: a region run sees its region's
# only, so it raises one that is not open, and leaves an open one as the runs of every region wrote it (it
# rewrote the item's region and counts from its own invoices, and the other region's filter lost it).
_PARTY_REGION_RUN = (
    "AND ({region:String} = '' OR drift_id NOT IN (SELECT DriftId FROM $db.drift_items FINAL "
    "WHERE Class = 'customer_unmatched' AND State != 'resolved'))"
)
# kind -> (classification, InvoiceId, PaymentId, LedgerEntryId, KeyType of its items, which rows a region run
# classifies beyond the facts' own region filter)
_CLASSIFIED = {
    "invoice": (_INVOICE_CLASSIFIED, "key", "''", "e_entry", "invoice", ""),
    "payment": (
        _PAYMENT_CLASSIFIED,
        "''",
        "key",
        "e_entry",
        "payment",
        f"AND ({{region:String}} = '' OR {_PAY_IN_REGION})",
    ),
    "customer": (_CUSTOMER_CLASSIFIED, "''", "''", "''", "customer", ""),
    "party": (_PARTY_CLASSIFIED, "invoice", "''", "entry", "customer", _PARTY_REGION_RUN),
}


_MATCH_UNALLOCATED = """
INSERT INTO $db.reconcile_scope (RunId, KeyType, Key)
SELECT {run:String}, 'sum_match', k FROM (/*sum_match*/)
"""
_MATCHED = "SELECT Key FROM $db.reconcile_scope WHERE RunId = {run:String} AND KeyType = 'sum_match'"


def match_unallocated(store: Store, run_id: str, rules: Mapping[str, Any]) -> None:
    """The run's unallocated payments that match open invoices by amount (_SUM_MATCH), kept with the run's scope
    for the payment classification: computed once, not inside its IN (where an ARRAY JOIN subquery ran 10x
    slower)."""
    sql = _compose(
        _MATCH_UNALLOCATED,
        sum_match=_compose(
            _SUM_MATCH, payments=_MATCH_PAYMENTS, join=_compose(_MATCH_JOIN, invoices=_MATCH_INVOICES), tol=_TOL
        ),
    )
    store.command(sql, {"run": run_id, **rules})


def _classified(kind: str) -> str:
    """The classification SELECT of one kind (the payment kind reads match_unallocated's result)."""
    sql = _compose(_CLASSIFIED[kind][0], tol=_TOL, drift_id=_DRIFT_ID, diff=_DIFF, sum_match=_MATCHED)
    return _compose(
        sql,
        grace_missing=_compose(_GRACE, cls="missing_in_erp"),
        grace_unapplied=_compose(_GRACE, cls="payment_unapplied"),
        grace_refund=_compose(_GRACE, cls="refund_unposted"),
        grace_customer=_compose(_GRACE, cls="customer_unsynced"),
    )


# Long-lived threads: each keeps its store connection (a chDB connection or HTTP client per thread) across runs.
_CLASSIFY_POOL = ThreadPoolExecutor(max_workers=len(_CLASSIFIED), thread_name_prefix="tower-classify")


def classify(store: Store, run_id: str, rules: Mapping[str, Any], region: str = "") -> int:
    """Classify the run's facts (every kind of _CLASSIFIED) into reconcile_findings; returns the number of findings.

    ``rules``: as_of, tol_abs / tol_rel (currency -> minor units / basis points) with *_default, grace
    (class -> seconds) with grace_default, exp (currency -> minor-unit exponent), window (days).
    """
    params = {"run": run_id, "region": region, **rules}
    unallocated = store.query_rows(
        "SELECT count() AS n FROM $db.reconcile_payment_facts WHERE RunId = {run:String} AND p_n > 0 "
        "AND p_alloc_n = 0 AND e_applied_n = 0",
        {"run": run_id},
    )[0]["n"]
    if unallocated:
        match_unallocated(store, run_id, rules)
    statements = [
        _compose(
            _WRITE_FINDINGS,
            classified=_classified(kind),
            invoice=invoice,
            payment=payment,
            entry=entry,
            key_type=key_type,
            only=only,
        )
        + _BULK_INSERT
        for kind, (_, invoice, payment, entry, key_type, only) in _CLASSIFIED.items()
    ]
    # the kinds are independent (the party kind reads the invoice facts, not the findings), and the invoice
    # kind's insert runs on one core: side by side
    for done in [_CLASSIFY_POOL.submit(store.command, sql, params) for sql in statements]:
        done.result()
    rows = store.query_rows(
        "SELECT count() AS n FROM $db.reconcile_findings WHERE RunId = {run:String}", {"run": run_id}
    )
    return int(rows[0]["n"])


def classified_rows(store: Store, run_id: str, kind: str, rules: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The SQL classification of one kind's facts, row by row (tests compare it with reconciler/classify.py)."""
    if kind == "payment":
        match_unallocated(store, run_id, rules)
    sql = _compose(
        "SELECT key, cls, reason, amount, pk, drift_id, bv, ev, diff, system, reg, cur, item_day, customer "
        "FROM (/*classified*/) ORDER BY key",
        classified=_classified(kind),
    )
    return store.query_rows(sql, {"run": run_id, **rules})


def insert_facts_rows(store: Store, kind: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """Write fact rows directly (tests of the classification)."""
    table = {"invoice": "reconcile_invoice_facts", "payment": "reconcile_payment_facts"}[kind]
    cols = list(rows[0])
    data = pa.Table.from_pylist([dict(r) for r in rows])
    return store.insert_arrow(table, data.select(cols))


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


# An item another writer changed after this run started (a run in another process that read newer state, or a
# person) is left as that writer left it: this run's findings may be older than its values.
_MERGE_FROM = """
FROM (SELECT * FROM $db.reconcile_findings WHERE RunId = {run:String} ORDER BY DriftId LIMIT 1 BY DriftId) AS f
LEFT JOIN (
    SELECT DriftId, State, StateNote, FirstSeen, Class, ReasonCode, AmountMinor, UpdatedAt, RunId,
        RunId IN (SELECT RunId FROM $db.reconcile_runs FINAL WHERE State != 'succeeded') AS unfinished
    FROM $db.drift_items FINAL
    WHERE DriftId IN (SELECT DriftId FROM $db.reconcile_findings WHERE RunId = {run:String})
) AS d ON f.DriftId = d.DriftId
WHERE d.UpdatedAt <= {started:DateTime64(3)}
"""
# The run transition of reconciler/classify.run_transition, set-based: new / persisting, or the operator's state
# (an item a run that never finished made new stays new).
_NEW_STATE = (
    "multiIf(d.State IN ('', 'resolved') OR (d.State = 'new' AND d.unfinished), 'new', "
    "d.State IN ('new', 'persisting'), 'persisting', d.State)"
)
_STATE_JSON = (
    "toJSONString(CAST((/*state*/, /*t*/.Class, /*t*/.ReasonCode, /*t*/.AmountMinor), "
    "'Tuple(state String, class String, reason String, amount Int64)'))"
)
_AUDIT_COLS = "AuditId, EventTime, Actor, Action, ObjectType, ObjectId, Before, After, Note, Outcome"
_AUDIT_DETECTED = """
INSERT INTO $db.audit_log (/*audit_cols*/)
SELECT concat('a', replaceAll(toString(generateUUIDv4(f.DriftId)), '-', '')), now64(6), 'reconciler',
    concat('drift.', /*new_state*/), 'drift_item', f.DriftId,
    if(d.State = '', '', /*before*/), /*after*/, concat('run ', {run:String}, ': ', f.ReasonCode), 'ok'
/*from*/
    AND /*new_state*/ != d.State
"""
_ITEM_COLS = (
    "DriftId, Class, ReasonCode, Region, Currency, CustomerId, InvoiceId, PaymentId, LedgerEntryId, AmountMinor, "
    "BillingValues, ErpValues, State, StateNote, FirstSeen, LastSeen, UpdatedAt, RunId, Version, System, Day, "
    "PrimaryKey, KeyType, DiffFields, ResolvedAt"
)
_UPSERT_DETECTED = """
INSERT INTO $db.drift_items (/*item_cols*/)
SELECT f.DriftId, f.Class, f.ReasonCode, f.Region, f.Currency, f.CustomerId, f.InvoiceId, f.PaymentId,
    f.LedgerEntryId, f.AmountMinor, f.BillingValues, f.ErpValues, /*new_state*/,
    if(d.State IN ('', 'resolved'), '', d.StateNote),
    if(d.State IN ('', 'resolved'), {as_of:DateTime64(3)}, d.FirstSeen),
    {as_of:DateTime64(3)}, now64(3), {run:String}, {v:UInt64}, f.System, f.Day, f.PrimaryKey, f.KeyType,
    f.DiffFields, toDateTime64(0, 3)
/*from*/
"""
_RESOLVE_FROM = """
FROM $db.drift_items AS i FINAL
WHERE State != 'resolved' AND UpdatedAt <= {started:DateTime64(3)}
    AND DriftId NOT IN (SELECT DriftId FROM $db.reconcile_findings WHERE RunId = {run:String})
    /*region*/
    /*scope*/
"""
# A region run compares the keys that are in its region now: billing's region where billing has the key, else the
# region of the ERP's first posting (stage B's e_region), and for customers the region of their first CDP profile.
# So it decides the open items of its region whose key is still there, and those of another region whose key moved
# here (their drift gone, no other run would: an item keeps its region until found again); an item of its region
# whose key moved away was not compared by it, so it is not resolved by it either.
_OPEN_ITEMS = (
    "(SELECT /*col*/ FROM $db.drift_items FINAL WHERE State != 'resolved' AND Region /*item_op*/ {region:String} "
    "AND KeyType = '/*kt*/')"
)
_KEY_REGION = "GROUP BY k HAVING if(countIf(src = 0) > 0, anyIf(r, src = 0), argMinIf(r, id, src = 1)) /*key_op*/ "
# Invoice or payment keys of those items: billing's row (src 0), else the ERP's first live posting (src 1) names the
# key's region (the ERP rows found narrowly first, by their hash column, then read FINAL by entry id).
_KEYS_OF_KIND = """(
    SELECT k FROM (
        SELECT /*key*/ AS k, 0 AS src, Region AS r, '' AS id FROM $db./*billing*/ FINAL
        WHERE /*key*/ IN /*open*/ AND NOT IsDeleted
        UNION ALL
        SELECT ExternalRef, 1, Region, EntryId FROM $db.erp_ledger_entries FINAL
        PREWHERE EntryId IN (SELECT EntryId FROM $db.erp_ledger_entries
            WHERE /*hash*/ IN (SELECT cityHash64(/*key*/) FROM /*open*/))
        WHERE NOT IsDeleted AND EntryType IN /*types*/ AND Status NOT IN ('cancelled', 'draft')
            AND ExternalRef IN /*open*/
    )
    /*key_region*/ {region:String})"""
_KEYS_INVOICES = _compose(
    _KEYS_OF_KIND,
    key="InvoiceId",
    billing="billing_invoices",
    hash="LinkHash",
    types="('invoice')",
    open="/*open_inv*/",
)
_KEYS_PAYMENTS = _compose(
    _KEYS_OF_KIND,
    key="PaymentId",
    billing="billing_payments",
    hash="RefHash",
    types="('payment', 'credit_memo')",
    open="/*open_pay*/",
)
_KEYS_CUSTOMERS = """(
    SELECT CustomerId FROM $db.cdp_profiles FINAL
    WHERE CustomerId IN /*open_cus*/ AND NOT IsDeleted AND CustomerId != ''
    GROUP BY CustomerId HAVING argMin(Region, CdpUserId) /*key_op*/ {region:String})"""
_KEYS_OF = """((KeyType = 'invoice' AND InvoiceId IN /*keys_inv*/)
        OR (KeyType = 'payment' AND PaymentId IN /*keys_pay*/) /*keys_cus*/)"""
_REGION_RUN_ITEMS = """
    AND ((Region = {region:String} AND NOT /*moved_away*/) OR (Region != {region:String} AND /*moved_here*/))
"""


def _keys_of(customers: bool, item_op: str, key_op: str) -> str:
    """_KEYS_OF for the open items whose Region is ``item_op`` the run's and whose key's region is ``key_op`` it
    (customers: the CDP tables exist)."""
    sql = _compose(
        _KEYS_OF, keys_cus="OR (KeyType = 'customer' AND CustomerId IN /*keys_customers*/)" if customers else ""
    )
    sql = _compose(sql, keys_inv=_KEYS_INVOICES, keys_pay=_KEYS_PAYMENTS, keys_customers=_KEYS_CUSTOMERS)
    sql = _compose(sql, key_region=_KEY_REGION)
    for kt, col, marker in (("invoice", "InvoiceId", "open_inv"), ("payment", "PaymentId", "open_pay"),
                            ("customer", "CustomerId", "open_cus")):  # fmt: skip
        sql = _compose(sql, **{marker: _compose(_OPEN_ITEMS, col=col, kt=kt)})
    return _compose(sql, item_op=item_op, key_op=key_op)


def _region_run_items(customers: bool) -> str:
    return _compose(
        _REGION_RUN_ITEMS,
        moved_away=_keys_of(customers, item_op="=", key_op="!="),
        moved_here=_keys_of(customers, item_op="!=", key_op="="),
    )


# Incremental runs resolve only items whose key they compared. A customer_unmatched item stands for all the
# customer's invoices and an incremental run sees only the changed ones: it can raise one, only a full run
# resolves one.
_RESOLVE_SCOPE = (
    "AND ((KeyType = 'invoice' AND InvoiceId IN /*scope_inv*/) OR (KeyType = 'payment' AND PaymentId IN /*scope_pay*/) "
    "OR (KeyType = 'customer' AND Class != 'customer_unmatched' AND CustomerId IN /*scope_cus*/))"
)
_AUDIT_RESOLVED = """
INSERT INTO $db.audit_log (/*audit_cols*/)
SELECT concat('a', replaceAll(toString(generateUUIDv4(DriftId)), '-', '')), now64(6), 'reconciler', 'drift.resolved',
    'drift_item', DriftId, /*before*/, /*after*/, concat('run ', {run:String}, ': drift gone'), 'ok'
/*from*/
"""
_UPSERT_RESOLVED = """
INSERT INTO $db.drift_items (/*item_cols*/)
SELECT DriftId, Class, ReasonCode, Region, Currency, CustomerId, InvoiceId, PaymentId, LedgerEntryId, AmountMinor,
    BillingValues, ErpValues, 'resolved', StateNote, FirstSeen, LastSeen, now64(3), {run:String}, {v:UInt64}, System,
    Day, PrimaryKey, KeyType, DiffFields, {as_of:DateTime64(3)}
/*from*/
"""


def merge_queue(
    store: Store,
    run_id: str,
    as_of: dt.datetime,
    *,
    started: dt.datetime,
    full: bool,
    region: str = "",
    customers: bool = True,
) -> dict[str, int]:
    """Findings -> drift items (new / persisting, operator states kept); open items whose keys this run compared
    and did not find -> resolved; neither for an item changed since the run ``started`` (see _MERGE_FROM). Every
    state change is audited. Set-based; the caller holds the queue lock (of this process: runs in two processes
    beside one ClickHouse server share no lock)."""
    params = {"run": run_id, "as_of": as_of, "region": region, "started": started}
    new_state = _NEW_STATE
    counts = store.query_rows(
        f"SELECT count() AS findings, countIf({new_state} = 'new') AS new /*from*/".replace("/*from*/", _MERGE_FROM),
        params,
    )[0]
    audit = _compose(
        _AUDIT_DETECTED,
        audit_cols=_AUDIT_COLS,
        before=_compose(_STATE_JSON, state="d.State", t="d"),
        after=_compose(_STATE_JSON, state=new_state, t="f"),
    )
    store.command(_compose(audit, new_state=new_state).replace("/*from*/", _MERGE_FROM) + _BULK_INSERT, params)
    upsert = _compose(_UPSERT_DETECTED, item_cols=_ITEM_COLS, new_state=new_state).replace("/*from*/", _MERGE_FROM)
    store.command(upsert + _BULK_INSERT, {**params, "v": time.time_ns()})

    if full:
        scope = "" if customers else "AND (KeyType != 'customer' OR Class = 'customer_unmatched')"
        if region:  # it stands for the customer's invoices of every region: only a run that saw them all resolves it
            scope += " AND Class != 'customer_unmatched'"
    else:
        scope = _RESOLVE_SCOPE
    resolve_from = _compose(
        _compose(_RESOLVE_FROM, scope=scope, region=_region_run_items(customers) if region else ""),
        scope_inv=_IN_SCOPE_INV,
        scope_pay=_IN_SCOPE_PAY,
        scope_cus=_IN_SCOPE_CUS,
    )
    resolved = store.query_rows("SELECT count() AS n " + resolve_from, params)[0]["n"]
    if resolved:
        audit = _compose(
            _AUDIT_RESOLVED,
            audit_cols=_AUDIT_COLS,
            before=_compose(_STATE_JSON, state="i.State", t="i"),
            after=_compose(_STATE_JSON, state="'resolved'", t="i"),
        )
        store.command(audit.replace("/*from*/", resolve_from) + _BULK_INSERT, params)
        upsert = _compose(_UPSERT_RESOLVED, item_cols=_ITEM_COLS).replace("/*from*/", resolve_from)
        store.command(upsert + _BULK_INSERT, {**params, "v": time.time_ns()})
    return {"findings": int(counts["findings"]), "new": int(counts["new"]), "resolved": int(resolved)}


# The queue stage audits each change just before it writes the items: a run whose process was lost between the
# two left audit rows for changes that never happened. Its items are the ones it wrote (RunId); for each of its
# audit rows whose item it did not write, the trail says so, so it stays true and append-only.
_AUDIT_NOT_APPLIED = """
INSERT INTO $db.audit_log (/*audit_cols*/)
SELECT concat('a', replaceAll(toString(generateUUIDv4(ObjectId)), '-', '')), now64(6), 'reconciler',
    'drift.not_applied', 'drift_item', ObjectId, After, Before,
    concat('run ', {run:String}, ' was interrupted before it wrote this change: ', Action, ' did not happen'), 'failed'
FROM $db.audit_log
WHERE Actor = 'reconciler' AND Action IN ('drift.new', 'drift.persisting', 'drift.resolved')
    AND startsWith(Note, concat('run ', {run:String}, ': '))
    AND ObjectId NOT IN (SELECT DriftId FROM $db.drift_items FINAL WHERE RunId = {run:String})
"""


def audit_changes_not_applied(store: Store, run_id: str) -> None:
    """For a run closed as interrupted: mark its audited queue changes that it never wrote (see above)."""
    store.command(_compose(_AUDIT_NOT_APPLIED, audit_cols=_AUDIT_COLS), {"run": run_id})


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
    "age": "-toUnixTimestamp64Milli(FirstSeen)",  # ascending: the youngest first
    "updated_at": "UpdatedAt",
}
# An item's age in whole days elapsed (as classify.age_bucket counts it), and its aging bucket from that ``age``.
AGE_DAYS = "intDiv(dateDiff('millisecond', FirstSeen, {now:DateTime64(3)}), 86400000)"
AGE_BUCKET = "multiIf(age <= 1, '0-1d', age <= 7, '2-7d', age <= 30, '8-30d', '>30d')"
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
    AND /*age_days*/ >= {min_age:Int32}
    AND ({max_age:Int32} < 0
        OR /*age_days*/ <= {max_age:Int32})
"""
_DRIFT_LIST = (
    "SELECT DriftId AS drift_id, Class AS class, ReasonCode AS reason_code, State AS state, System AS system, "
    "Region AS region, Currency AS currency, CustomerId AS customer_id, InvoiceId AS invoice_id, "
    "PaymentId AS payment_id, LedgerEntryId AS ledger_entry_id, PrimaryKey AS primary_key, KeyType AS key_type, "
    "AmountMinor AS amount_minor, DiffFields AS diff_fields, FirstSeen AS first_seen, LastSeen AS last_seen, "
    "UpdatedAt AS updated_at, ResolvedAt AS resolved_at, StateNote AS state_note, RunId AS run_id, Day AS day, "
    "/*age_days*/ AS age_days "
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
    where = _compose(_DRIFT_WHERE, age_days=AGE_DAYS)
    sql = _compose(
        _DRIFT_LIST, where=where, sort=DRIFT_SORT[sort], dir="DESC" if descending else "ASC", age_days=AGE_DAYS
    )
    rows = store.query_rows(sql, params)
    count = _compose("SELECT count() AS n FROM $db.drift_items FINAL /*where*/", where=where)
    total = store.query_rows(count, params)[0]["n"]
    return rows, int(total)


def drift_summary(store: Store, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Open items per class, region, state, currency and aging bucket, with their amounts (summed per currency
    only: minor units of two currencies never add up)."""
    sql = _compose(
        "SELECT Class AS class, Region AS region, State AS state, Currency AS currency, count() AS items, "
        "sum(abs(AmountMinor)) AS amount_minor, /*age_bucket*/ AS age_bucket "
        "FROM (SELECT *, /*age_days*/ AS age FROM $db.drift_items FINAL WHERE State != 'resolved') "
        "GROUP BY class, region, state, currency, age_bucket ORDER BY class, region, state, currency, age_bucket",
        age_bucket=AGE_BUCKET,
        age_days=AGE_DAYS,
    )
    return store.query_rows(sql, {"now": now or _now()})


def get_drift(store: Store, drift_id: str) -> dict[str, Any] | None:
    rows = store.query_rows(
        _compose("SELECT /*cols*/ FROM $db.drift_items FINAL WHERE DriftId = {id:String}", cols=_DRIFT_COLS),
        {"id": drift_id},
    )
    return rows[0] if rows else None


def get_drifts(store: Store, drift_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Several items in one read (a bulk action), by drift id."""
    if not drift_ids:
        return {}
    rows = store.query_rows(
        _compose("SELECT /*cols*/ FROM $db.drift_items FINAL WHERE DriftId IN {ids:Array(String)}", cols=_DRIFT_COLS),
        {"ids": list(drift_ids)},
    )
    return {r["DriftId"]: r for r in rows}


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


_STATEMENT_FACTS = """
INSERT INTO $db.reconcile_facts (Key, BillingRegion, BillingCurrency, ErpRegion, ErpCurrency, BillingDay, ErpDay,
    BillingMinor, ErpMinor, Class, RunId, Version, ErpCells)
SELECT key, b_cell_r, b_cell_c, e_cell_r, e_cell_c, bd, ed, bmin, emin,
    if(cls != '', cls, multiIf(
        -- only a difference the tolerance allows: any other unclassified one stays in the residual, to be seen
        bmin != emin AND amt_ok, 'within_tolerance',
        b_cell_r = e_cell_r AND b_cell_c = e_cell_c AND bd != ed AND bmin != 0, 'timing',
        -- one side records no region (an ERP of one entity): its amount is in the statement's blank region
        b_cell_c = e_cell_c AND b_cell_r != e_cell_r AND (b_cell_r = '' OR e_cell_r = '') AND bmin != 0,
        'region_unrecorded',
        '')),
    {run:String}, {v:UInt64}, if(e_n > 1, cells.c, [])
FROM (
    SELECT *,
        if(in_billing AND final, b_total, 0) AS bmin, if(e_n > 0, e_sum, 0) AS emin,
        -- each side's cell is where the statement's totals count it (its own region and currency, blank or
        -- not); a side the key lacks contributes nothing, and takes the other's cell
        if(in_billing, b_region, e_region) AS b_cell_r, if(in_billing, b_currency, e_currency) AS b_cell_c,
        if(e_n > 0, e_region, b_region) AS e_cell_r, if(e_n > 0, e_currency, b_currency) AS e_cell_c,
        if(in_billing, b_day, e_day) AS bd, if(e_n > 0, e_day, b_day) AS ed
    FROM (/*classified*/)
) AS f
-- keys booked more than once: each posting in its own cell (the run's ledger rows, as the invoice facts read them)
LEFT JOIN (
    SELECT ExternalRef AS ck, groupArray((toString(Region), toString(Currency), PeriodDate, AmountMinor)) AS c
    FROM $db.reconcile_ledger_rows
    WHERE RunId = {run:String} AND EntryType = 'invoice' AND Status != 'draft'
    GROUP BY ExternalRef
    HAVING count() > 1
) AS cells ON cells.ck = f.key
"""


def write_statement_facts(store: Store, run_id: str, rules: Mapping[str, Any]) -> None:
    """Each compared invoice key that differs: its statement contributions and the bucket explaining them."""
    sql = _compose(_STATEMENT_FACTS, classified=_classified("invoice"))
    store.command(sql + _BULK_INSERT, {"run": run_id, "v": time.time_ns(), **rules})


_CLEAR_FACTS = """
INSERT INTO $db.reconcile_facts (Key, BillingRegion, BillingCurrency, ErpRegion, ErpCurrency, BillingDay, ErpDay,
    BillingMinor, ErpMinor, Class, RunId, Version)
SELECT Key, BillingRegion, BillingCurrency, ErpRegion, ErpCurrency, BillingDay, ErpDay, 0, 0, '', {run:String},
    {v:UInt64}
FROM $db.reconcile_facts FINAL
WHERE (BillingMinor != 0 OR ErpMinor != 0 OR Class != '')
    -- a region run compares the keys billed in its region (the ERP's region for keys billing lacks: the facts'
    -- BillingRegion either way); a key billed elsewhere and posted here was not compared, its explanation stays,
    -- unless billing moved it here since (then this run compared it: posted here, billed here now)
    AND Key NOT IN (SELECT Key FROM $db.reconcile_facts WHERE RunId = {run:String})
    AND ((({region:String} = '' OR BillingRegion = {region:String}
        OR (ErpRegion = {region:String} AND Key IN (
            SELECT InvoiceId FROM $db.billing_invoices FINAL
            WHERE InvoiceId IN (SELECT Key FROM $db.reconcile_facts FINAL
                    WHERE ErpRegion = {region:String} AND BillingRegion != {region:String})
                AND NOT IsDeleted AND Region = {region:String})))
        /*scope*/) /*stale_here*/)
"""
# Region runs: the explanation of a key billed elsewhere whose ERP side (as its fact has it) lies in this region,
# but no longer as the ledger has it (the ERP re-booked, cancelled or changed those postings): this region's
# statement subtracted a posting that is gone, a residual no run of this region could remove. The fact is cleared;
# the run of the key's own region (or of every region) compares the key and explains what is left.
_FACT_CELLS_HERE = (
    "arraySort(arrayMap(c -> (c.2, c.3, c.4), arrayFilter(c -> c.1 = {region:String} AND c.4 != 0, if(empty(ErpCells), "
    "[(toString(ErpRegion), toString(ErpCurrency), ErpDay, ErpMinor)], ErpCells))))"
)
_STALE_HERE = """
    OR (BillingRegion != {region:String} AND Class != '' AND Key IN (
        SELECT f.Key FROM (
            SELECT Key, /*cells_here*/ AS here FROM $db.reconcile_facts FINAL
            WHERE BillingRegion != {region:String} AND Class != '' AND notEmpty(here)
        ) AS f
        LEFT JOIN (
            SELECT ExternalRef AS k, arraySort(groupArray((toString(Currency), PeriodDate, AmountMinor))) AS live
            FROM $db.erp_ledger_entries FINAL
            PREWHERE EntryId IN (SELECT EntryId FROM $db.erp_ledger_entries WHERE LinkHash IN (
                SELECT cityHash64(Key) FROM $db.reconcile_facts FINAL
                WHERE BillingRegion != {region:String} AND Class != '' AND notEmpty(/*cells_here*/)))
            WHERE NOT IsDeleted AND EntryType = 'invoice' AND Status NOT IN ('cancelled', 'draft')
                AND Region = {region:String} AND AmountMinor != 0
            GROUP BY ExternalRef
        ) AS l ON l.k = f.Key
        WHERE f.here != l.live))
"""


def clear_facts(store: Store, run_id: str, *, full: bool, region: str) -> None:
    """Keys this run compared that match again contribute nothing to the explained differences any more (nor, in a
    region run, the stale ERP side in its region of a key billed elsewhere: _STALE_HERE)."""
    scope = "" if full else "AND Key IN /*scope_inv*/"
    stale = _compose(_STALE_HERE, cells_here=_FACT_CELLS_HERE) if region else ""
    sql = _compose(_compose(_CLEAR_FACTS, scope=scope, stale_here=stale), scope_inv=_IN_SCOPE_INV)
    store.command(sql, {"run": run_id, "v": time.time_ns(), "region": region})


# Billing side: finalized invoices by their region, currency and issue day. ERP side: invoice postings by the
# ERP's own region, currency and period date (drafts are rejected documents, not postings). Explained: the
# per-key contributions of the keys that differ, by class, the ERP side per posting (its own region, currency
# and day: migration 0014). Residual = what no class explains.
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
        SELECT c.1, c.2, c.3, 0, 0, Class, -c.4
        FROM $db.reconcile_facts FINAL
        ARRAY JOIN if(empty(ErpCells), [(toString(ErpRegion), toString(ErpCurrency), ErpDay, ErpMinor)], ErpCells) AS c
        WHERE Class != '' AND c.4 != 0 /*fact_e_filter*/
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


def statement_runs(store: Store) -> list[dict[str, Any]]:
    """The runs that have statement rows: id, scope (region) and when the statement was written (UTC)."""
    rows = store.query_rows(
        "SELECT s.run_id AS run_id, s.created_at AS created_at, r.Region AS region FROM ("
        "SELECT RunId AS run_id, min(CreatedAt) AS created_at FROM $db.reconciliation_statements GROUP BY RunId) AS s "
        "LEFT JOIN (SELECT RunId, Region FROM $db.reconcile_runs FINAL) AS r ON r.RunId = s.run_id"
    )
    for r in rows:
        r["created_at"] = _aware(r["created_at"])
        r["region"] = str(r["region"] or "")
    return rows


def drop_statements(store: Store, run_ids: Collection[str]) -> None:
    """Delete these runs' statements, marking the runs first: a crash between the two leaves rows the next prune
    deletes, never a run whose missing statement reads as a clean one."""
    if not run_ids:
        return
    params = {"ids": sorted(run_ids), "v": time.time_ns()}
    store.command(
        "INSERT INTO $db.reconcile_runs SELECT * REPLACE (1 AS StatementDropped, {v:UInt64} AS Version) "
        "FROM $db.reconcile_runs FINAL WHERE RunId IN {ids:Array(String)}",
        params,
    )
    store.command("DELETE FROM $db.reconciliation_statements WHERE RunId IN {ids:Array(String)}", params)


_STATEMENT_WHERE = (
    "WHERE RunId = {run:String} AND ({region:String} = '' OR Region = {region:String}) "
    "AND ({currency:String} = '' OR Currency = {currency:String}) "
    "AND Day >= {from:Date} AND Day <= {to:Date} AND (NOT {residual:Bool} OR ResidualMinor != 0)"
)


@dataclass(frozen=True)
class StatementScope:
    """The part of a run's statement asked for: its rows, totals and residual all follow it."""

    region: str = ""
    currency: str = ""
    day_from: dt.date | None = None
    day_to: dt.date | None = None


def _statement_params(run_id: str, scope: StatementScope, only_residual: bool = False) -> dict[str, Any]:
    return {
        "run": run_id,
        "region": scope.region,
        "currency": scope.currency,
        "from": scope.day_from or dt.date(1970, 1, 1),
        "to": scope.day_to or dt.date(2149, 6, 1),
        "residual": only_residual,
    }


def statement_residual(store: Store, run_id: str) -> int:
    """The run's headline: the absolute residuals of every region, currency and day added up. Zero or not is
    what it says (it adds minor units of several currencies); ``statement_residuals`` has them per currency."""
    return sum(statement_residuals(store, run_id).values())


def statement_residuals(store: Store, run_id: str, scope: StatementScope = StatementScope()) -> dict[str, int]:
    """Per currency, the absolute residuals of its regions and days (those the filters keep) added up; nonzero
    ones only."""
    rows = store.query_rows(
        _compose(
            "SELECT toString(Currency) AS c, sum(abs(ResidualMinor)) AS r FROM $db.reconciliation_statements FINAL "
            "/*where*/ GROUP BY c HAVING r != 0 ORDER BY c",
            where=_STATEMENT_WHERE,
        ),
        _statement_params(run_id, scope),
    )
    return {str(r["c"]): int(r["r"]) for r in rows}


def latest_statement_run(store: Store) -> str | None:
    """The latest run's statement of the whole estate; a region run's covers its region only (one scheduled
    after an estate-wide run made the default statement lose the other regions). Without one, the latest."""
    rows = store.query_rows(
        "WITH RunId IN (SELECT RunId FROM $db.reconcile_runs FINAL WHERE Region = '') AS estate_wide "
        "SELECT argMaxIf(RunId, CreatedAt, estate_wide) AS whole, countIf(estate_wide) AS n_whole, "
        "argMax(RunId, CreatedAt) AS r, count() AS n FROM $db.reconciliation_statements"
    )
    if not rows or not rows[0]["n"]:
        return None
    return rows[0]["whole"] if rows[0]["n_whole"] else rows[0]["r"]


def list_statements(
    store: Store,
    *,
    run_id: str,
    scope: StatementScope = StatementScope(),
    only_residual: bool = False,
    limit: int = 500,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    where = _STATEMENT_WHERE
    params = {**_statement_params(run_id, scope, only_residual), "limit": limit, "offset": offset}
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


def statement_totals(store: Store, run_id: str, scope: StatementScope = StatementScope()) -> list[dict[str, Any]]:
    """Per region and currency over the days of a run's statement (all, or those the filters keep)."""
    rows = store.query_rows(
        _compose(
            "SELECT Region AS region, Currency AS currency, sum(BillingTotalMinor) AS billing_total_minor, "
            "sum(ErpTotalMinor) AS erp_total_minor, sum(DifferenceMinor) AS difference_minor, "
            "sumMap(Explained) AS explained, sum(ResidualMinor) AS residual_minor, count() AS days "
            "FROM $db.reconciliation_statements FINAL /*where*/ GROUP BY Region, Currency ORDER BY Region, Currency",
            where=_STATEMENT_WHERE,
        ),
        _statement_params(run_id, scope),
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


_AUDIT_FOR = (
    "SELECT * FROM (SELECT *, row_number() OVER (ORDER BY at, audit_id) AS n, count() OVER () AS total FROM ("  # noqa: S608 (constant parts)
    "SELECT AuditId AS audit_id, EventTime AS at, Actor AS actor, Action AS action, Before AS before, "
    "After AS after, Note AS note, Outcome AS outcome FROM $db.audit_log "
    "WHERE ObjectType = {t:String} AND ObjectId = {id:String} ORDER BY EventTime, AuditId LIMIT 1 BY AuditId)) "
    + EARLIEST_AND_LATEST
    + "ORDER BY n"
)


def audit_for(store: Store, object_type: str, object_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """One object's audit trail in time order; past ``limit`` records its first and its last halves, so a long
    one (an action deferred through a long outage) still shows who started it and how it ended."""
    rows = store.query_rows(_AUDIT_FOR, {"t": object_type, "id": object_id, "limit": limit})
    for r in rows:
        del r["n"], r["total"]
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
    write_actions(store, [row])


def write_actions(store: Store, rows: Sequence[Mapping[str, Any]]) -> None:
    """One insert; each row a new version (Version: the write's time, increasing within the batch)."""
    out = []
    for row in rows:
        r = dict(row)
        r["Version"] = time.time_ns()
        for k in ("CreatedAt", "UpdatedAt", "NextAttemptAt"):
            r[k] = _aware(r.get(k))
        out.append(r)
    if out:
        store.insert_arrow("actions", _table(ACTIONS, out))


def get_action(store: Store, action_id: str) -> dict[str, Any] | None:
    rows = store.query_rows(
        _compose("SELECT /*cols*/ FROM $db.actions FINAL WHERE ActionId = {id:String}", cols=_ACTION_COLS),
        {"id": action_id},
    )
    return rows[0] if rows else None


# A replay's idempotency key: its original's, this, and the replay's number.
REPLAY = ":replay:"


def replayed_key(key: str) -> str:
    """The original's key of a replay's (a key that is no replay's, as it is)."""
    return key.split(REPLAY, 1)[0]


def actions_by_key(store: Store, idempotency_key: str) -> list[dict[str, Any]]:
    """The actions of one idempotency key and their replays, oldest first."""
    return store.query_rows(
        _compose(
            "SELECT /*cols*/ FROM $db.actions FINAL WHERE IdempotencyKey = {k:String} "
            "OR startsWith(IdempotencyKey, concat({k:String}, {replay:String})) ORDER BY CreatedAt",
            cols=_ACTION_COLS,
        ),
        {"k": idempotency_key, "replay": REPLAY},
    )


def actions_by_keys(store: Store, idempotency_keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """actions_by_key for several keys in one read: key -> its actions and their replays, oldest first."""
    if not idempotency_keys:
        return {}
    rows = store.query_rows(
        _compose(
            "SELECT /*cols*/ FROM $db.actions FINAL WHERE IdempotencyKey IN {k:Array(String)} "
            "OR splitByString({replay:String}, IdempotencyKey)[1] IN {k:Array(String)} ORDER BY CreatedAt",
            cols=_ACTION_COLS,
        ),
        {"k": list(idempotency_keys), "replay": REPLAY},
    )
    found: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        found.setdefault(replayed_key(row["IdempotencyKey"]), []).append(row)
    return found


def actions_in_states(
    store: Store,
    states: Sequence[str],
    due_before: dt.datetime | None = None,
    *,
    approved_only: bool = False,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Actions in these states, the longest due first; ``approved_only`` leaves out those awaiting a person's
    approval (before the limit: a hundred of them must not hide one that is due)."""
    return store.query_rows(
        _compose(
            "SELECT /*cols*/ FROM $db.actions FINAL WHERE State IN {s:Array(String)} "
            "AND NextAttemptAt <= {due:DateTime64(3)} AND ({approved:UInt8} = 0 OR ApprovedBy != '') "
            "ORDER BY NextAttemptAt, CreatedAt LIMIT {limit:UInt32}",
            cols=_ACTION_COLS,
        ),
        {
            "s": list(states),
            "due": due_before or dt.datetime(2200, 1, 1, tzinfo=dt.UTC),
            "approved": int(approved_only),
            "limit": limit,
        },
    )


ACTION_SORT = {"created_at": "CreatedAt", "updated_at": "UpdatedAt", "state": "State", "class": "Class"}
_ACTION_WHERE = """
WHERE (empty({states:Array(String)}) OR State IN {states:Array(String)})
    AND ({cls:String} = '' OR Class = {cls:String})
    AND ({drift:String} = '' OR DriftId = {drift:String})
    AND ({target:String} = '' OR TargetSystem = {target:String})
    AND ({dead:Int8} < 0 OR DeadLetter = {dead:Int8})
    AND ({original:String} = '' OR OriginalActionId = {original:String})
    AND (empty({ids:Array(String)}) OR ActionId IN {ids:Array(String)})
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
    action_ids: Sequence[str] = (),
    sort: str = "created_at",
    descending: bool = True,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    params = {
        "ids": list(action_ids),
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
    """Succeeded payments billing allocated to this invoice: narrowly first (any version allocating to it, by the
    allocation hashes), then their latest versions; a FINAL pass over every payment took 1.2 s at 10M, twice per
    attempt of a correction."""
    rows = store.query_rows(
        "SELECT PaymentId AS p FROM $db.billing_payments FINAL PREWHERE KeyHash IN (SELECT KeyHash "
        "FROM $db.billing_payments WHERE has(AllocHashes, cityHash64({id:String}))) WHERE NOT IsDeleted "
        "AND Kind = 'payment' AND Status = 'succeeded' AND mapContains(Allocations, {id:String}) ORDER BY PaymentId",
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
