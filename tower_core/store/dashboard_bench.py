"""Benchmark data for bench/dashboard.py: the spans of given invoices (CDP, billing and ERP traces joined only
by business keys, like synthetic_spans but with the bulk estate's own ids), so that opening a drift item of a
bulk estate finds its business transaction. Generated inside ClickHouse; every value is a bound parameter."""

from __future__ import annotations

from collections.abc import Sequence

from tower_core.store.base import Store

_SPANS = """
INSERT INTO $db.otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName,
    ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes, Duration, StatusCode)
SELECT
    fromUnixTimestamp64Nano(toInt64({t0:Int64} + i * 1000000000 + sys * 90000000000)) AS Timestamp,
    lower(hex(reinterpretAsFixedString(cityHash64(inv, sys, 'dash-trace')))) ||
        lower(hex(reinterpretAsFixedString(cityHash64(inv, sys, 'dash-trace2')))) AS TraceId,
    lower(hex(reinterpretAsFixedString(cityHash64(inv, sys, 'dash-span')))) AS SpanId,
    '' AS ParentSpanId,
    concat(system, '.', step) AS SpanName, 'Server' AS SpanKind,
    ['segment', 'stripe-billing', 'tryton-erp'][sys + 1] AS ServiceName,
    map('service.name', ServiceName, 'revops.system', system) AS ResourceAttributes,
    'bench' AS ScopeName, '1' AS ScopeVersion,
    map('revops.system', system, 'revops.region', region, 'revops.step', step, 'revops.customer.id', customer,
        'revops.invoice.id', if(sys = 0, '', inv)) AS SpanAttributes,
    20000000 AS Duration, 'Ok' AS StatusCode
FROM (
    SELECT number AS i, {invoices:Array(String)}[number + 1] AS inv, {customers:Array(String)}[number + 1] AS customer,
        {regions:Array(String)}[number + 1] AS region, arrayJoin([0, 1, 2]) AS sys,
        ['cdp', 'billing', 'erp'][sys + 1] AS system, if(sys = 0, 'cdp_to_billing', 'invoice_to_ledger') AS step
    FROM numbers(length({invoices:Array(String)}))
)
"""


def invoice_spans(
    store: Store, invoices: Sequence[str], customers: Sequence[str], regions: Sequence[str], t0_ns: int
) -> int:
    """Three single-span traces per invoice (CDP profile, billing invoice, ERP posting 3 minutes later)."""
    if not (len(invoices) == len(customers) == len(regions)):
        raise ValueError("invoices, customers and regions must line up")
    for lo in range(0, len(invoices), 50_000):
        hi = lo + 50_000
        store.command(
            _SPANS,
            {
                "t0": t0_ns,
                "invoices": list(invoices[lo:hi]),
                "customers": list(customers[lo:hi]),
                "regions": list(regions[lo:hi]),
            },
        )
    return 3 * len(invoices)
