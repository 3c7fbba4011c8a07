"""Dashboard page loads at scale: the API calls each page makes (dashboard/api_client.py page_loads, issued
exactly as the pages issue them) against `tower serve` holding 1M invoices (simulator bulk writer, default
fault mix, reconciled once) and 10M spans (synthetic_spans, plus the spans of every faulty invoice so that an
opened item finds its transaction).

    .venv/bin/python bench/dashboard.py [--invoices 1000000] [--spans 10000000] [--samples 40]

Prints p50/p99 per page and per call, and ends with one JSON line mapping each page to its p99 in ms (goal:
every page <= 1500 ms).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import ROOT, Server, percentile
from dashboard import api_client

ADMIN = "bench-dashboard-admin"
GOAL_MS = 1500.0

# Runs in a subprocess that owns the fresh chDB path (only one process may open it), before the server starts.
LOAD = """
import json, sys, time
from pathlib import Path
from collector.correlation import key_attribute_names
from connectors.simulator import EstateConfig, FaultRates
from connectors.simulator.bulk import bulk_load
from tower_core.settings import Settings
from tower_core.store import migrate, open_store
from tower_core.store.dashboard_bench import invoice_spans
from tower_core.store.otlp_sql import sync_key_attributes
from tower_core.store.synthetic_spans import generate

data, invoices, spans = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = open_store(Settings(data_dir=data))
migrate(store)
sync_key_attributes(store, key_attribute_names({}))
t = time.perf_counter()
config = EstateConfig(seed=7, customers=max(200, invoices // 50), invoices=invoices, fault_rates=FaultRates.default())
result = bulk_load(store, config)
bulk_s = time.perf_counter() - t
faulty = {}
for f in result.manifest.faults:
    inv = f.keys.get("invoice_id")
    if inv and inv not in faulty:
        faulty[inv] = (f.keys.get("customer_id", ""), f.region or "NA")
now = time.time_ns()
t = time.perf_counter()
txns = generate(store, spans, t0_ns=now - 10 * 3600 * 10**9)
item_spans = invoice_spans(store, list(faulty), [c for c, _ in faulty.values()], [r for _, r in faulty.values()],
                           now - 12 * 3600 * 10**9)
spans_s = time.perf_counter() - t
store.command("OPTIMIZE TABLE $db.otel_traces_trace_id_ts FINAL")
print(json.dumps({"bulk_s": bulk_s, "spans_s": spans_s, "rows": result.rows, "txns": txns, "item_spans": item_spans,
                  "faults": len(result.manifest.faults)}))
"""


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def wait_run(url: str, run_id: str, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = httpx.get(f"{url}/api/runs/{run_id}", headers=auth(), timeout=30).json()
        if doc.get("state") in ("succeeded", "failed"):
            return doc
        time.sleep(0.5)
    raise SystemExit(f"run {run_id} did not finish")


class TimedApi(api_client.TowerApi):
    """The dashboard's client, recording every call's latency by route."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: dict[str, list[float]] = {}
        self.recording = False  # off during warm-ups

    def request(self, method: str, path: str, **kwargs: object) -> object:
        t = time.perf_counter()
        try:
            return super().request(method, path, **kwargs)
        finally:
            route = path if not path.startswith("/api/drift/") else "/api/drift/{id}"
            if self.recording:
                self.calls.setdefault(f"{method} {route}", []).append((time.perf_counter() - t) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--invoices", type=int, default=1_000_000)
    ap.add_argument("--spans", type=int, default=10_000_000)
    ap.add_argument("--samples", type=int, default=40, help="Timed loads per page (after 3 warm-ups).")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tower-bench-dashboard-"))
    try:
        out = subprocess.run(
            [sys.executable, "-c", LOAD, str(tmp / "server" / "data"), str(args.invoices), str(args.spans)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise SystemExit(f"loading failed:\n{out.stderr[-3000:]}")
        loaded = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"loaded {args.invoices:,} invoices ({loaded['faults']:,} faults) in {loaded['bulk_s']:.1f} s and "
            f"{args.spans + loaded['item_spans']:,} spans in {loaded['spans_s']:.1f} s",
            flush=True,
        )
        srv = Server(
            tmp / "server",
            TOWER_ADMIN_TOKEN=ADMIN,
            TOWER_RECONCILE_INTERVAL_S="0",
            TOWER_RECONCILE_FULL_INTERVAL_S="0",
            TOWER_SLA_EVAL_INTERVAL_S="0",
        ).start()
        try:
            t = time.perf_counter()
            started = httpx.post(f"{srv.url}/api/runs", json={"full": True}, headers=auth(), timeout=60).json()
            run = wait_run(srv.url, started["run_id"])
            print(
                f"full reconciliation: {run['state']} in {time.perf_counter() - t:.1f} s, "
                f"{run['drift_open']:,} open drift items",
                flush=True,
            )
            t = time.perf_counter()
            httpx.post(f"{srv.url}/api/sla/evaluate", json={}, headers=auth(), timeout=600).raise_for_status()
            print(f"SLA evaluation (what the scheduler does every minute): {time.perf_counter() - t:.1f} s", flush=True)
            api = TimedApi(srv.url, ADMIN, 60.0)
            pages: dict[str, list[float]] = {}
            loads = api_client.page_loads(api)
            first = api.drift_item(api_client.first_item(api) or "none")
            spans = len((first.get("transaction") or {}).get("spans", []))
            print(f"the item page opens {first['class']} {first['primary_key']}: {spans} spans in its transaction")
            for page, load in loads.items():
                for i in range(args.samples + 3):
                    api.recording = i >= 3
                    t = time.perf_counter()
                    result = load()
                    elapsed = (time.perf_counter() - t) * 1000
                    loaded_parts = result if isinstance(result, tuple) else (result,)
                    errors = {k: v for part in loaded_parts for k, v in getattr(part, "errors", {}).items()}
                    if errors:
                        raise SystemExit(f"{page}: {errors}")
                    if i >= 3:
                        pages.setdefault(page, []).append(elapsed)
            rss, peak = srv.rss_mb()
        finally:
            srv.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'page':<20}{'p50 ms':>10}{'p99 ms':>10}")
    for page, ms in pages.items():
        flag = "" if percentile(ms, 99) <= GOAL_MS else "  (over the 1.5 s goal)"
        print(f"{page:<20}{percentile(ms, 50):>10.1f}{percentile(ms, 99):>10.1f}{flag}")
    print(f"\n{'API call':<40}{'p50 ms':>10}{'p99 ms':>10}")
    for call, ms in sorted(api.calls.items()):
        print(f"{call:<40}{percentile(ms, 50):>10.1f}{percentile(ms, 99):>10.1f}")
    print(f"server RSS {rss:.0f} MB (peak {peak:.0f} MB)")
    print(json.dumps({page: round(percentile(ms, 99), 1) for page, ms in pages.items()}))


if __name__ == "__main__":
    main()
