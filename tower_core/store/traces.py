"""Trace and correlation reads (the collector's lookups). All values are bound parameters."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable
from typing import Any

from tower_core.models import key_ref
from tower_core.store.base import EARLIEST_AND_LATEST, Store

_SPANS_OF_TRACES = (
    "SELECT toUnixTimestamp64Nano(Timestamp) AS start_ns, TraceId AS trace_id, SpanId AS span_id, "
    "ParentSpanId AS parent_span_id, SpanName AS name, SpanKind AS kind, ServiceName AS service, "
    "Duration AS duration_ns, StatusCode AS status, StatusMessage AS status_message, "
    "SpanAttributes AS attributes, Links.TraceId AS link_trace_ids, "
    "mapFilter((k, v) -> startsWith(k, 'revops.'), ResourceAttributes) AS resource FROM $db.otel_traces "
    "WHERE TraceId IN {ids:Array(String)} "
    "AND Timestamp >= fromUnixTimestamp64Nano({lo:Int64}) AND Timestamp <= fromUnixTimestamp64Nano({hi:Int64}) "
    "ORDER BY Timestamp, SpanId LIMIT 1 BY TraceId, SpanId LIMIT {limit:UInt32}"
)


_LINKS_FOR_KEYS = (
    "SELECT key_type, key_value, trace_id, system, first_ns, last_ns, total FROM ("  # noqa: S608 (constant parts)
    "SELECT KeyType AS key_type, KeyValue AS key_value, TraceId AS trace_id, System AS system, "
    "toUnixTimestamp64Nano(min(FirstSeen)) AS first_ns, toUnixTimestamp64Nano(max(LastSeen)) AS last_ns, "
    "row_number() OVER (ORDER BY first_ns, trace_id, key_type, key_value, system) AS n, count() OVER () AS total "
    "FROM $db.business_key_links WHERE (KeyType, KeyValue) IN {keys:Array(Tuple(String, String))} "
    "GROUP BY KeyType, KeyValue, TraceId, System) " + EARLIEST_AND_LATEST + "ORDER BY first_ns DESC"
)

_EVENTS_FOR = (
    "SELECT * FROM ("  # noqa: S608 (constant parts)
    "SELECT EventId AS event_id, Type AS type, toUnixTimestamp64Nano(Time) AS time_ns, System AS system, "
    "Step AS step, TraceId AS trace_id, CustomerId AS customer, InvoiceId AS invoice, PaymentId AS payment, "
    "LedgerEntryId AS ledger_entry, KeyRefs AS key_refs, row_number() OVER (ORDER BY time_ns, event_id) AS n, "
    "count() OVER () AS total FROM $db.business_events FINAL "
    "WHERE InvoiceId IN {inv:Array(String)} OR PaymentId IN {pay:Array(String)} "
    "OR LedgerEntryId IN {led:Array(String)} OR hasAny(KeyRefs, {refs:Array(String)}) "
    "OR TraceId IN {tr:Array(String)} OR CustomerId IN {cus:Array(String)}) " + EARLIEST_AND_LATEST + "ORDER BY time_ns"
)


def stored_span_keys(
    store: Store, keys: Collection[tuple[str, str]], first_day: dt.date, last_day: dt.date
) -> set[tuple[str, str]]:
    """Which of these (TraceId, SpanId) otel_traces holds; the days (UTC, widened by one each way for a server in
    another time zone) bound the partitions read. A replay's check, see collector/replay.py."""
    if not keys:
        return set()
    rows = store.query_rows(
        "SELECT DISTINCT TraceId AS t, SpanId AS s FROM $db.otel_traces "
        "WHERE toDate(Timestamp) BETWEEN {d0:Date} AND {d1:Date} "
        "AND TraceId IN {tids:Array(String)} AND SpanId IN {sids:Array(String)}",
        {
            "d0": first_day - dt.timedelta(days=1),
            "d1": last_day + dt.timedelta(days=1),
            "tids": sorted({t for t, _ in keys}),
            "sids": sorted({s for _, s in keys}),
        },
    )
    return {(r["t"], r["s"]) for r in rows} & set(keys)


def trace_range(store: Store, trace_id: str) -> tuple[int, int] | None:
    """[start, end] in ns of a trace, from the trace-id lookup table (a primary-key read)."""
    rows = store.query_rows(
        "SELECT toUnixTimestamp64Nano(min(Start)) AS s, toUnixTimestamp64Nano(max(End)) AS e, count() AS n "
        "FROM $db.otel_traces_trace_id_ts WHERE TraceId = {t:String}",
        {"t": trace_id},
    )
    if not rows or not rows[0]["n"]:
        return None
    return int(rows[0]["s"]), int(rows[0]["e"])


def trace_ranges(store: Store, trace_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
    rows = store.query_rows(
        "SELECT TraceId AS t, toUnixTimestamp64Nano(min(Start)) AS s, toUnixTimestamp64Nano(max(End)) AS e "
        "FROM $db.otel_traces_trace_id_ts WHERE TraceId IN {ids:Array(String)} GROUP BY TraceId",
        {"ids": sorted(set(trace_ids))},
    )
    return {r["t"]: (int(r["s"]), int(r["e"])) for r in rows}


def spans_of_traces(store: Store, ranges: dict[str, tuple[int, int]], limit: int = 1_000_000) -> list[dict[str, Any]]:
    """Spans of the given traces (the earliest ``limit``), reading only the time range the lookup table gives."""
    if not ranges:
        return []
    lo = min(r[0] for r in ranges.values())
    hi = max(r[1] for r in ranges.values())
    return store.query_rows(_SPANS_OF_TRACES, {"ids": sorted(ranges), "lo": lo, "hi": hi, "limit": limit})


def links_for_keys(store: Store, keys: Iterable[tuple[str, str]], limit: int = 1000) -> list[dict[str, Any]]:
    """key -> trace links for the given (key_type, value) pairs. Past ``limit``: the earliest half and the latest
    half, each row with the total (so the caller can say the answer is cut). The earliest define a transaction
    (the invoice's finalization, its posting), the latest are what happens now; the newest alone lost the first."""
    keys = sorted(set(keys))
    if not keys:
        return []
    return store.query_rows(
        _LINKS_FOR_KEYS,
        {"keys": keys, "limit": limit},
    )


_LINK_COLUMNS = (
    "SELECT KeyType AS key_type, KeyValue AS key_value, TraceId AS trace_id, System AS system, "
    "toUnixTimestamp64Nano(min(FirstSeen)) AS first_ns, toUnixTimestamp64Nano(max(LastSeen)) AS last_ns "
    "FROM $db.business_key_links WHERE "
)
_GROUPED = " GROUP BY KeyType, KeyValue, TraceId, System ORDER BY first_ns DESC LIMIT {limit:UInt32}"
_EXPANSION_LINKS = _LINK_COLUMNS + "(KeyType, KeyValue) IN {keys:Array(Tuple(String, String))}" + _GROUPED
_CUSTOMER_SYNC_LINKS = (
    _LINK_COLUMNS + "KeyType = 'customer' AND KeyValue IN {c:Array(String)} AND System IN ('cdp', 'billing')" + _GROUPED
)


def expansion_links(store: Store, keys: Iterable[tuple[str, str]], limit: int = 1000) -> list[dict[str, Any]]:
    """One read for a transaction's next hop: the traces carrying these identifying keys (the latest ``limit``)."""
    keys = sorted(set(keys))
    if not keys:
        return []
    return store.query_rows(_EXPANSION_LINKS, {"keys": keys, "limit": limit})


def customer_sync_links(store: Store, customers: Iterable[str], limit: int = 1000) -> list[dict[str, Any]]:
    """The customers' CDP traces and billing's traces naming them (the latest ``limit``): a transaction picks its
    customer's sync among them (``correlation.pick_customer_sync``)."""
    customers = sorted(set(customers) - {""})
    if not customers:
        return []
    return store.query_rows(_CUSTOMER_SYNC_LINKS, {"c": customers, "limit": limit})


def sync_events(store: Store, customers: Iterable[str], limit: int = 100) -> list[dict[str, Any]]:
    """The customers' trace-less events of the CDP -> billing sync (the Segment receiver's profile changes,
    billing's customer events), the latest ``limit``: a transaction picks its customer's sync among them."""
    customers = sorted(set(customers) - {""})
    if not customers:
        return []
    return store.query_rows(
        "SELECT EventId AS event_id, Type AS type, toUnixTimestamp64Nano(Time) AS time_ns, System AS system, "
        "Step AS step, TraceId AS trace_id, CustomerId AS customer, InvoiceId AS invoice, PaymentId AS payment, "
        "LedgerEntryId AS ledger_entry, KeyRefs AS key_refs FROM $db.business_events FINAL "
        "WHERE CustomerId IN {c:Array(String)} AND Step = 'cdp_to_billing' AND System IN ('cdp', 'billing') "
        "AND TraceId = '' ORDER BY time_ns DESC, event_id LIMIT {limit:UInt32}",
        {"c": customers, "limit": limit},
    )


def links_for_traces(store: Store, trace_ids: Iterable[str]) -> list[dict[str, Any]]:
    """All keys seen on the given traces."""
    ids = sorted(set(trace_ids))
    if not ids:
        return []
    return store.query_rows(
        "SELECT KeyType AS key_type, KeyValue AS key_value, TraceId AS trace_id, System AS system, "
        "toUnixTimestamp64Nano(min(FirstSeen)) AS first_ns, toUnixTimestamp64Nano(max(LastSeen)) AS last_ns "
        "FROM $db.trace_key_links WHERE TraceId IN {ids:Array(String)} "
        "GROUP BY TraceId, KeyType, KeyValue, System",
        {"ids": ids},
    )


_ERP_ACTIVITY = """
SELECT Step AS step, toUnixTimestamp64Nano(FirstSeen) AS first_ns, toUnixTimestamp64Nano(max(LastSeen)) AS last_ns
FROM $db.step_activity
WHERE Step IN ('invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger') AND Day >= {since:Date}
    AND System = 'erp' AND ((KeyType = 'invoice' AND KeyValue IN {inv:Array(String)})
        OR (KeyType = 'payment' AND KeyValue IN {pay:Array(String)}))
GROUP BY Step, KeyType, KeyValue, FirstSeen
ORDER BY first_ns
LIMIT {limit:UInt32}
"""


def erp_activity(
    store: Store, keys: Iterable[tuple[str, str]], since: dt.date, limit: int = 1000
) -> list[dict[str, Any]]:
    """The ERP's activity on the flow steps of these invoices and payments from ``since`` on, as the SLA counts
    it: from its spans and events, and from the records the reconciler pulled (an ERP exporting no spans, or a
    posting the tower's own corrective sync wrote)."""
    inv = sorted({v for t, v in keys if t == "invoice"})
    pay = sorted({v for t, v in keys if t == "payment"})
    if not inv and not pay:
        return []
    return store.query_rows(_ERP_ACTIVITY, {"since": since, "inv": inv, "pay": pay, "limit": limit})


def events_for(
    store: Store,
    keys: Iterable[tuple[str, str]],
    trace_ids: Iterable[str],
    limit: int = 1000,
    customers: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Business events carrying one of the identifying keys, one of the traces, or (a customer's transaction)
    one of ``customers``; past ``limit`` the earliest and the latest halves, each row with the total."""
    by_type: dict[str, list[str]] = {"invoice": [], "payment": [], "ledger_entry": []}
    for key_type, value in keys:
        if key_type in by_type:
            by_type[key_type].append(value)
    return store.query_rows(
        _EVENTS_FOR,
        {
            "cus": sorted(set(customers) - {""}),
            "inv": by_type["invoice"],
            "pay": by_type["payment"],
            "led": by_type["ledger_entry"],
            # the same keys in KeyRefs' form: an event naming several of one type
            "refs": [key_ref(t, v) for t, values in by_type.items() for v in values],
            "tr": sorted(set(trace_ids) - {""}),
            "limit": limit,
        },
    )
