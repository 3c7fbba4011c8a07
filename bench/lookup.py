"""Lookup latency with many spans stored: trace by id, and a business transaction by invoice id, over HTTP.

.venv/bin/python bench/lookup.py --spans 10000000 --queries 200 [--unmerged]

The spans are bulk-loaded in 2M-span inserts; by default the tables are then merged (OPTIMIZE ... FINAL), the
state a server's background merges reach after such a load, before the server starts. With --unmerged the
queries run right after the load, against five parts per table and while the server merges them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import ROOT, Server, percentile

LOAD = """
import sys, time, json
from pathlib import Path
from tower_core.settings import Settings
from tower_core.store import open_store, migrate
from tower_core.store.synthetic_spans import generate
from tower_core.store.otlp_sql import sync_key_attributes
from collector.correlation import key_attribute_names
store = open_store(Settings(data_dir=Path(sys.argv[1])))
migrate(store)
sync_key_attributes(store, key_attribute_names())
t = time.perf_counter()
txns = generate(store, int(sys.argv[2]), t0_ns=1_767_225_600_000_000_000)
load_s = time.perf_counter() - t
# the state a server reaches once its background merges have caught up with the bulk load (--unmerged: the state
# right after it, with those merges running during the queries)
for table in sys.argv[3].split(",") if sys.argv[3] else []:
    store.command(f"OPTIMIZE TABLE $db.{table} FINAL")
print(json.dumps({"txns": txns, "load_s": load_s, "merge_s": time.perf_counter() - t - load_s}))
"""


# The lookups' tables, merged after the bulk load unless --unmerged (the trace-id index always, as before).
ADMIN = "twr_bench_lookup_admin"  # the lookups need a viewer token (any role above does)
MERGED = ("otel_traces", "business_key_links", "trace_key_links", "otel_traces_trace_id_ts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument(
        "--unmerged",
        action="store_true",
        help="query right after the bulk load, while the server merges its parts (default: merged first)",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tower-bench-lookup-"))
    merged = "otel_traces_trace_id_ts" if args.unmerged else ",".join(MERGED)
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp / "server" / "data"), str(args.spans), merged],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"loaded {args.spans:,} spans ({loaded['txns']:,} transactions x 3 traces) in {loaded['load_s']:.1f} s; "
        f"merged {merged} in {loaded['merge_s']:.1f} s"
    )
    srv = Server(tmp / "server", TOWER_ADMIN_TOKEN=ADMIN).start()
    rnd = random.Random(42)
    trace_ms, txn_ms = [], []
    try:
        with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
            # trace ids come from the API itself: the transaction of a random invoice lists them
            for i in range(args.queries + 10):
                inv = f"in_{rnd.randrange(loaded['txns'])}"
                t = time.perf_counter()
                r = client.get("/api/transactions", params={"invoice_id": inv})
                elapsed = (time.perf_counter() - t) * 1000
                assert r.status_code == 200 and len(r.json()["traces"]) == 3, (inv, r.status_code, r.text[:300])
                tid = rnd.choice(r.json()["traces"])["trace_id"]
                t = time.perf_counter()
                r2 = client.get(f"/api/traces/{tid}")
                elapsed2 = (time.perf_counter() - t) * 1000
                assert r2.status_code == 200 and r2.json()["span_count"] == 3
                if i >= 10:  # warm-up excluded
                    txn_ms.append(elapsed)
                    trace_ms.append(elapsed2)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "spans": args.spans,
        "trace_p50_ms": round(percentile(trace_ms, 50), 2),
        "trace_p99_ms": round(percentile(trace_ms, 99), 2),
        "txn_p50_ms": round(percentile(txn_ms, 50), 2),
        "txn_p99_ms": round(percentile(txn_ms, 99), 2),
    }
    print(
        f"trace by id: p50 {res['trace_p50_ms']} ms, p99 {res['trace_p99_ms']} ms; "
        f"transaction by invoice id: p50 {res['txn_p50_ms']} ms, p99 {res['txn_p99_ms']} ms"
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
