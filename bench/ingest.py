"""Sustained OTLP/HTTP protobuf ingest from a separate load process over loopback.

Prints spans/s acknowledged and queryable end-to-end, p50/p99 ack latency at a fixed rate, the server's peak
RSS, and the ratio to a raw chDB insert of the same rows measured in the same run; ends with one JSON line.

    .venv/bin/python bench/ingest.py --spans 1000000 --rate 50000 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import ROOT, Server, metric, percentile, realistic_request

PB = {"Content-Type": "application/x-protobuf"}


def build(args: tuple[int, int, int]) -> bytes:
    first, n, seed = args
    return realistic_request(first, n, seed)


def load_process(url: str, bodies: list[bytes], spans_per: int, threads: int, rate: float, out: mp.Queue) -> None:
    """Posts every body once; rate=0 means as fast as possible. Reports (acked spans, seconds, latencies)."""
    latencies: list[float] = []
    acked = [0]
    lock = threading.Lock()
    next_index = [0]
    start = time.perf_counter()

    def worker() -> None:
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(bodies):
                    return
                if rate:
                    due = start + i * spans_per / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                t0 = time.perf_counter()
                while True:
                    r = client.post(f"{url}/v1/traces", content=bodies[i], headers=PB)
                    if r.status_code == 200:
                        break
                    if r.status_code in (429, 503):
                        time.sleep(float(r.headers.get("Retry-After", "1")) / 10)
                        continue
                    raise SystemExit(f"unexpected {r.status_code}: {r.text[:200]}")
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)
                    acked[0] += spans_per

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((acked[0], time.perf_counter() - start, latencies))


def run_load(url: str, bodies: list[bytes], spans_per: int, threads: int, rate: float) -> tuple[int, float, list]:
    q: mp.Queue = mp.Queue()
    p = mp.get_context("fork").Process(target=load_process, args=(url, bodies, spans_per, threads, rate, q))
    p.start()
    result = q.get()
    p.join()
    return result


RAW_SCRIPT = """
import sys, time, json
from pathlib import Path
sys.path.insert(0, {root!r})
from bench._common import realistic_request
from collector.correlation import key_attribute_names
from tower_core.settings import Settings
from tower_core.store import open_store, migrate
from tower_core.store.otlp_sql import insert_otlp_spans, sync_key_attributes
n, per = {n}, {per}
store = open_store(Settings(data_dir=Path({data!r})))
migrate(store)
sync_key_attributes(store, key_attribute_names())
bodies = [realistic_request(i, per, 7) for i in range(0, n, per)]
t, cpu = time.perf_counter(), time.process_time()
for i in range(0, len(bodies), 50):
    insert_otlp_spans(store, bodies[i:i + 50], f"raw_{{i}}")
print(json.dumps({{"spans_per_s": n / (time.perf_counter() - t), "cpu_s": time.process_time() - cpu}}))
"""


def raw_insert_rate(tmp: Path, n: int, per: int) -> tuple[float, float]:
    """(spans/s, CPU seconds per 100,000 spans) of the store's own insert: what ingest cannot go past."""
    script = RAW_SCRIPT.format(root=str(ROOT), n=n, per=per, data=str(tmp / "raw-data"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["spans_per_s"], res["cpu_s"] / n * 100_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=1_000_000, help="spans for the max-throughput phase")
    ap.add_argument("--rate", type=float, default=50_000, help="spans/s of the latency phase")
    ap.add_argument("--seconds", type=float, default=10, help="duration of the latency phase")
    ap.add_argument("--per-request", type=int, default=1000, help="spans per OTLP request")
    ap.add_argument("--threads", type=int, default=4, help="concurrent connections of the load process")
    args = ap.parse_args()
    per = args.per_request
    tmp = Path(tempfile.mkdtemp(prefix="tower-bench-ingest-"))
    n_lat = int(args.rate * args.seconds) // per * per
    print(f"building {args.spans + n_lat:,} realistic spans ...", flush=True)
    with mp.get_context("fork").Pool(2) as pool:
        bodies = pool.map(build, [(i, per, 1) for i in range(0, args.spans + n_lat, per)])
    srv = Server(tmp / "server").start()
    try:
        cpu0 = srv.cpu_s()
        acked, secs, _ = run_load(srv.url, bodies[: args.spans // per], per, args.threads, 0)
        ack_rate = acked / secs
        t0 = time.perf_counter() - secs
        while metric(srv.url, "tower_rows_flushed_total", 'table="otel_traces"') < acked:
            time.sleep(0.05)
        e2e_rate = acked / (time.perf_counter() - t0)
        server_cpu = (srv.cpu_s() - cpu0) / acked * 100_000
        print(
            f"max throughput: {ack_rate:,.0f} spans/s acknowledged, {e2e_rate:,.0f} spans/s queryable end-to-end; "
            f"the server used {server_cpu:.2f} CPU-s per 100,000 spans"
        )
        acked2, secs2, lat = run_load(srv.url, bodies[args.spans // per :], per, args.threads, args.rate)
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        print(
            f"at {args.rate:,.0f} spans/s offered ({acked2 / secs2:,.0f} achieved): ack p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms ({len(lat)} requests of {per} spans)"
        )
        _, peak = srv.rss_mb()
        print(f"server peak RSS: {peak:,.0f} MB")
    finally:
        srv.stop()
    raw, raw_cpu = raw_insert_rate(tmp, min(args.spans, 500_000), per)
    print(
        f"raw chDB insert of the same requests (in-process, no HTTP, no buffer): {raw:,.0f} spans/s, "
        f"{raw_cpu:.2f} CPU-s per 100,000 spans: 100,000 spans/s needs {raw_cpu:.2f} of this machine's "
        f"{os.cpu_count()} cores for the insert alone"
    )
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "spans_per_s": round(e2e_rate),
                "ack_spans_per_s": round(ack_rate),
                "ack_p50_ms": round(p50, 2),
                "ack_p99_ms": round(p99, 2),
                "rss_mb": round(peak),
                "raw_insert_spans_per_s": round(raw),
                "ratio_to_raw": round(e2e_rate / raw, 3),
                "raw_cpu_s_per_100k": round(raw_cpu, 3),
                "server_cpu_s_per_100k": round(server_cpu, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
