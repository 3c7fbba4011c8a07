"""Mixed load on loopback: OTLP ingest and dashboard API reads at the same time, bounded in time.

Reports ingest throughput, p99 latencies per kind, error rate, the server's RSS over time, and checks that
every acknowledged span is stored exactly once. Ends with one JSON line.

    .venv/bin/python bench/load.py --seconds 180 --rate 20000 --readers 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import ROOT, Server, percentile, realistic_request

ADMIN = "twr_bench_load_admin"
READS = (
    "/api/drift?limit=50",
    "/api/drift/summary",
    "/api/sla/compliance",
    "/api/overview/aging",
    "/api/transactions?invoice_id=in_{inv:09d}",
    "/api/runs",
)
COUNT = """
import json, sys
from pathlib import Path
from tower_core.settings import Settings
from tower_core.store import open_store
s = open_store(Settings(data_dir=Path(sys.argv[1])))
print(json.dumps(s.query_rows("SELECT count() AS n, uniqExact(TraceId, SpanId) AS u FROM $db.otel_traces")[0]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--rate", type=float, default=20_000, help="offered spans/s")
    ap.add_argument("--readers", type=int, default=4, help="concurrent dashboard readers")
    args = ap.parse_args()
    per = 1000
    tmp = Path(tempfile.mkdtemp(prefix="tower-bench-load-"))
    srv = Server(tmp / "server", TOWER_ADMIN_TOKEN=ADMIN).start()
    stop = threading.Event()
    lock = threading.Lock()
    ingest_ms: list[float] = []
    read_ms: list[float] = []
    errors = {"ingest": 0, "read": 0}
    kinds: Counter[str] = Counter()  # what the errors were, for the report
    acked = [0]
    rss: list[tuple[float, float]] = []
    start = time.perf_counter()
    n_requests = int(args.rate * args.seconds / per)
    print(f"building {n_requests * per:,} spans ...", flush=True)
    bodies = [realistic_request(i * per, per, 3) for i in range(n_requests)]
    start = time.perf_counter()

    def ingest() -> None:
        with httpx.Client(timeout=30) as c:
            for i, body in enumerate(bodies):
                if stop.is_set():
                    return
                delay = start + i * per / args.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                t = time.perf_counter()
                r = c.post(f"{srv.url}/v1/traces", content=body, headers={"Content-Type": "application/x-protobuf"})
                with lock:
                    ingest_ms.append((time.perf_counter() - t) * 1000)
                    if r.status_code == 200:
                        acked[0] += per
                    else:
                        errors["ingest"] += 1
                        kinds[f"ingest {r.status_code} {r.text[:80]}"] += 1

    def reader(k: int) -> None:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
            i = k
            while not stop.is_set():
                path = READS[i % len(READS)].format(inv=(i * 7919) % max(1, acked[0] // 3 or 1))
                i += 1
                t = time.perf_counter()
                r = c.get(f"{srv.url}{path}")
                with lock:
                    read_ms.append((time.perf_counter() - t) * 1000)
                    if r.status_code >= 500 or (r.status_code >= 400 and r.status_code != 404):
                        errors["read"] += 1
                        kinds[f"read {r.status_code} {path.split('?')[0]}"] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=ingest)] + [
        threading.Thread(target=reader, args=(k,)) for k in range(args.readers)
    ]
    for t in threads:
        t.start()
    while threads[0].is_alive() and time.perf_counter() - start < args.seconds + 30:
        rss.append((round(time.perf_counter() - start, 1), round(srv.rss_mb()[0])))
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    time.sleep(3)
    peak = srv.rss_mb()[1]
    srv.stop()
    out = subprocess.run(
        [sys.executable, "-c", COUNT, str(tmp / "server" / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    stored = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(tmp, ignore_errors=True)
    total = len(ingest_ms) + len(read_ms)
    res = {
        "seconds": round(elapsed, 1),
        "spans_acked": acked[0],
        "spans_per_s": round(acked[0] / elapsed),
        "ingest_p99_ms": round(percentile(ingest_ms, 99), 1),
        "read_p50_ms": round(percentile(read_ms, 50), 1),
        "read_p99_ms": round(percentile(read_ms, 99), 1),
        "reads": len(read_ms),
        "error_rate": round((errors["ingest"] + errors["read"]) / max(1, total), 5),
        "rss_peak_mb": round(peak),
        "rss_mb_over_time": rss[:: max(1, len(rss) // 20)],
        "stored": stored["n"],
        "lost": acked[0] - stored["u"],
        "duplicated": stored["n"] - stored["u"],
    }
    print(
        f"{res['spans_per_s']:,} spans/s for {res['seconds']} s with {args.readers} dashboard readers: "
        f"ingest p99 {res['ingest_p99_ms']} ms, reads p50 {res['read_p50_ms']} / p99 {res['read_p99_ms']} ms "
        f"({res['reads']} reads), error rate {res['error_rate']:.3%}, peak RSS {res['rss_peak_mb']} MB, "
        f"lost {res['lost']}, duplicated {res['duplicated']}"
    )
    for kind, n in kinds.most_common():
        print(f"  {n:6d} x {kind}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
