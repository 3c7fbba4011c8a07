"""Synthetic spans generated inside ClickHouse (for benchmarks at 10M-span scale, seconds not minutes).

Transaction t has three traces — CDP, billing, ERP — with distinct trace ids, joined only by business keys,
like an estate whose trace context is lost at every boundary. Deterministic for a given size.
"""

from __future__ import annotations

from tower_core.store.base import Store

_SPANS = """
INSERT INTO $db.otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName,
    ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes, Duration, StatusCode)
SELECT
    fromUnixTimestamp64Nano(toInt64({t0:Int64} + txn * 30000000 + sys * 60000000000 + k * 1000000)) AS Timestamp,
    lower(hex(reinterpretAsFixedString(cityHash64(txn, sys, 'trace')))) ||
        lower(hex(reinterpretAsFixedString(cityHash64(txn, sys, 'trace2')))) AS TraceId,
    lower(hex(reinterpretAsFixedString(cityHash64(txn, sys, k)))) AS SpanId,
    if(k = 0, '', lower(hex(reinterpretAsFixedString(cityHash64(txn, sys, 0))))) AS ParentSpanId,
    concat(system, '.', step, if(k = 0, '', '.child')) AS SpanName, 'Server' AS SpanKind,
    ['segment', 'stripe-billing', 'tryton-erp'][sys + 1] AS ServiceName,
    map('service.name', ServiceName, 'revops.system', system) AS ResourceAttributes,
    'bench' AS ScopeName, '1' AS ScopeVersion,
    map('revops.system', system, 'revops.region', region, 'revops.step', step,
        'revops.customer.id', concat('cus_', toString(txn % 100000)),
        'revops.invoice.id', if(sys = 0, '', concat('in_', toString(txn))),
        'revops.ledger.entry.id', if(sys = 2, concat('je_', toString(txn)), ''),
        'revops.currency', ['USD', 'EUR', 'GBP', 'JPY'][txn % 4 + 1],
        'revops.amount_minor', toString(cityHash64(txn) % 10000000),
        'http.request.method', 'POST', 'http.route', concat('/v1/', step), 'db.system', 'postgresql',
        'server.address', concat(ServiceName, '.internal')) AS SpanAttributes,
    1000000 + cityHash64(txn, sys, k) % 50000000 AS Duration, 'Ok' AS StatusCode
FROM (
    SELECT intDiv(number, {per_txn:UInt32}) AS txn, intDiv(number % {per_txn:UInt32}, {per_trace:UInt32}) AS sys,
        number % {per_trace:UInt32} AS k,
        ['cdp', 'billing', 'erp'][sys + 1] AS system,
        if(sys = 0, 'cdp_to_billing', 'invoice_to_ledger') AS step,
        ['NA', 'EU', 'APAC'][txn % 3 + 1] AS region
    FROM numbers({first:UInt64}, {n:UInt64})
)
SETTINGS max_insert_threads = 2
"""


def generate(store: Store, spans: int, t0_ns: int, spans_per_trace: int = 3, batch: int = 2_000_000) -> int:
    """Insert ``spans`` synthetic spans (their key links come from the view of migration 0008, so
    key_attribute_names must be synced first); returns the number of transactions."""
    per_txn = spans_per_trace * 3
    for first in range(0, spans, batch):
        store.command(
            _SPANS,
            {
                "t0": t0_ns,
                "per_txn": per_txn,
                "per_trace": spans_per_trace,
                "first": first,
                "n": min(batch, spans - first),
            },
        )
    return spans // per_txn
