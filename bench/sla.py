"""SLA evaluation cost at scale: N invoices over 30 days in 3 regions (billing span + ERP posting span each,
1% of EU's posted late and 0.1% never posted), inserted into otel_traces so the step_activity materialized view
does its real work; then full evaluations (every objective and threshold rule of the shipped definitions).

    .venv/bin/python bench/sla.py --invoices 1000000 [--evaluations 5] [--data /tmp/sla-bench]

Prints the figures and ends with one JSON line:
{"invoices", "spans", "insert_s", "spans_per_s_with_mv", "step_activity_rows", "evaluate_p50_ms", "evaluate_max_ms"}
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.sla.service import SlaService
from tower_core.settings import Settings
from tower_core.store import migrate, open_store

DAY_NS = 86_400_000_000_000
# One row per span, generated in ClickHouse: invoice i starts at a spread instant of the last 30 days; even
# numbers are billing spans, odd numbers the ERP postings (60-600 s later; EU late 1%, never 0.1%).
INSERT = """
INSERT INTO $db.otel_traces (Timestamp, TraceId, SpanId, ServiceName, SpanName, SpanKind, SpanAttributes,
    ResourceAttributes, Duration)
WITH intDiv(number, 2) AS inv, number % 2 = 1 AS is_erp, ['NA', 'EU', 'APAC'][inv % 3 + 1] AS region,
    {start:Int64} + toInt64(intHash64(inv) % toUInt64({span_ns:Int64})) AS t0,
    if(region = 'EU' AND inv % 100 = 7, 2400, 60 + intHash32(inv) % 540) AS latency_s
SELECT fromUnixTimestamp64Nano(if(is_erp, t0 + latency_s * 1000000000, t0)), hex(intHash64(number)),
    hex(number), if(is_erp, 'erp', 'billing'), if(is_erp, 'erp.post_invoice', 'invoice.finalized'), 'Internal',
    map('revops.step', 'invoice_to_ledger', 'revops.system', if(is_erp, 'erp', 'billing'), 'revops.region', region,
        'revops.invoice.id', concat('in_', toString(inv)), 'revops.customer.id', concat('cus_', toString(inv % 50000)),
        'revops.amount_minor', toString(inv % 100000), 'revops.currency', 'EUR', 'http.method', 'POST'),
    map('service.name', if(is_erp, 'erp', 'billing')), 250000000
FROM numbers({lo:UInt64}, {n:UInt64})
WHERE NOT (is_erp AND region = 'EU' AND inv % 1000 = 3)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--invoices", type=int, default=1_000_000)
    ap.add_argument("--evaluations", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path("/tmp/tower-sla-bench"))
    args = ap.parse_args()
    shutil.rmtree(args.data, ignore_errors=True)
    store = open_store(Settings(data_dir=args.data, database="sla_bench"))
    migrate(store)
    now = time.time_ns()
    spans = 2 * args.invoices
    batch = 1_000_000
    started = time.perf_counter()
    for lo in range(0, spans, batch):
        store.command(
            INSERT,
            {
                "start": now - 30 * DAY_NS,
                "span_ns": 30 * DAY_NS - 3_600_000_000_000,
                "lo": lo,
                "n": min(batch, spans - lo),
            },
        )
    insert_s = time.perf_counter() - started
    rows = store.query_rows("SELECT count() AS n FROM $db.step_activity")[0]["n"]
    print(f"inserted {spans:,} spans in {insert_s:.1f} s ({spans / insert_s:,.0f} spans/s with the step views)")
    service = SlaService(Settings(database="sla_bench", sla_eval_interval_s=0), store)
    times = []
    for _ in range(args.evaluations):
        t = time.perf_counter()
        result = service.evaluate(now)
        times.append((time.perf_counter() - t) * 1000)
    eu = next(s for s in result.statuses if s.region == "EU")
    defs = service.definitions
    print(
        f"evaluation of {len(defs.objectives)} objectives + {len(defs.thresholds)} rule(s): "
        f"p50 {statistics.median(times):.0f} ms, max {max(times):.0f} ms; "
        f"EU compliance {eu.compliance:.4f}, stuck {eu.stuck}, firing {len(result.transitions.firing)}"
    )
    print(
        json.dumps(
            {
                "invoices": args.invoices,
                "spans": spans,
                "insert_s": round(insert_s, 2),
                "spans_per_s_with_mv": round(spans / insert_s),
                "step_activity_rows": int(rows),
                "evaluate_p50_ms": round(statistics.median(times), 1),
                "evaluate_max_ms": round(max(times), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
