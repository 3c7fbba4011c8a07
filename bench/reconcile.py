"""Reconciler benchmark: a bulk estate of N invoices (with payments and ledger lines, the simulator's default
fault mix) in a fresh chDB path; full reconcile time and peak RSS; an incremental reconcile after 10k
invoices changed; and datacompy (polars backend) comparing the same invoices to the same ledger, same run.

    .venv/bin/python -m bench.reconcile --invoices 10000000

Ends with one JSON line: {"invoices", "full_s", "incremental_s", "rss_mb", "datacompy_s", "ratio_vs_datacompy"}
(with ``--floor``, also "floor_s": the least any full run must read, each read timed alone, and the ratio that bounds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.classify import Rules  # noqa: E402
from reconciler.runner import WATERMARK_OVERLAP, Reconciler  # noqa: E402
from tower_core.settings import Settings  # noqa: E402
from tower_core.store import migrate, open_store  # noqa: E402
from tower_core.store import reconcile as q  # noqa: E402
from tower_core.store import reconcile_bench as qb  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Samples this process's RSS every 20 ms while a block runs (chDB runs inside this process)."""

    def __enter__(self) -> PeakRss:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def load_estate(store, invoices: int, seed: int):  # type: ignore[no-untyped-def]
    """The simulator's bulk writer (default fault mix) and its manifest."""
    from connectors.simulator import EstateConfig, FaultRates
    from connectors.simulator.bulk import bulk_load

    config = EstateConfig(
        seed=seed, customers=max(200, invoices // 50), invoices=invoices, fault_rates=FaultRates.default()
    )
    last = [0.0]

    def progress(table: str, rows: int, done: int) -> None:
        if time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            print(f"  bulk: {done:,} / {invoices:,} invoices", flush=True)

    result = bulk_load(store, config, progress=progress)
    return config, result


def datacompy_compare(store) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """datacompy (polars) comparing billing invoices with ERP invoice postings on the invoice id."""
    import datacompy
    import polars as pl

    t0 = time.perf_counter()
    invoices = pl.from_arrow(qb.invoices_frame(store))
    ledger = pl.from_arrow(qb.ledger_invoice_frame(store))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cmp = datacompy.PolarsCompare(invoices, ledger, join_columns="invoice_id", df1_name="billing", df2_name="erp")
    mismatched = cmp.all_mismatch().height + cmp.df1_unq_rows.height + cmp.df2_unq_rows.height
    return time.perf_counter() - t0, load_s, mismatched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--invoices", type=int, default=1_000_000)
    ap.add_argument("--changed", type=int, default=10_000, help="invoices changed before the incremental run")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--data-dir", type=Path, default=None, help="chDB path (default: a fresh temporary dir)")
    ap.add_argument("--skip-datacompy", action="store_true")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also time the least any full run must read (both comparisons, the differing keys' values), each alone",
    )
    args = ap.parse_args()
    if not args.skip_datacompy and importlib.util.find_spec("datacompy") is None:
        sys.exit("bench.reconcile: datacompy is not installed (pip install -e '.[bench]', or --skip-datacompy)")

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tower-bench-reconcile-"))
    store = open_store(Settings(data_dir=data_dir, database="bench", clickhouse_url=None))
    migrate(store)
    print(f"estate: {args.invoices:,} invoices into {data_dir}", flush=True)
    t0 = time.perf_counter()
    config, bulk = load_estate(store, args.invoices, args.seed)
    print(f"  loaded in {time.perf_counter() - t0:.1f}s: {bulk.rows}", flush=True)
    expected = bulk.manifest.expected()
    # incremental runs re-read the last few seconds before the previous run's start (WATERMARK_OVERLAP); wait
    # them out so the incremental figure measures the 10k changed invoices, not the tail of the bulk load
    time.sleep(WATERMARK_OVERLAP.total_seconds() + 0.5)

    rules = Rules.from_settings(Settings(reconcile_grace_s={"*": 7200}))
    rec = Reconciler(store, rules)
    with PeakRss() as peak:
        t0 = time.perf_counter()
        full = rec.run(full=True, as_of=config.as_of, pull_sources=False)
        full_s = time.perf_counter() - t0
    found = {(i["class"], i["primary_key"]) for i in q.all_open_items(store)}
    recall = len(expected & found) / max(1, len(expected))
    precision = len(expected & found) / max(1, len(found))
    stages = {k: round(v, 2) for k, v in full.timings.items()}
    print(f"full reconcile: {full_s:.2f}s ({stages}), peak RSS {peak.peak:.0f} MB", flush=True)
    print(
        f"  {full.findings:,} drift items (expected {len(expected):,}): recall {recall:.2%}, precision "
        f"{precision:.2%}; statement residual {full.residual_minor}",
        flush=True,
    )

    floor_s = 0.0
    if args.floor:  # on the estate the full run compared, with the keys it found differing
        floor = qb.floor_reads(store, full.run_id)
        floor_s = sum(floor.values())
        print(f"floor (reads alone): {floor_s:.2f}s ({ {k: round(v, 2) for k, v in floor.items()} })", flush=True)

    changed = qb.change_invoices(store, args.changed, args.seed)
    t0 = time.perf_counter()
    inc = rec.run(as_of=config.as_of, pull_sources=False)
    incremental_s = time.perf_counter() - t0
    stages = {k: round(v, 2) for k, v in inc.timings.items()}
    print(
        f"incremental reconcile of {changed:,} changed invoices: {incremental_s:.2f}s ({stages}); "
        f"{inc.keys_compared:,} keys compared, {inc.new:,} new, {inc.resolved:,} resolved",
        flush=True,
    )

    datacompy_s = load_s = 0.0
    if not args.skip_datacompy:
        datacompy_s, load_s, mismatched = datacompy_compare(store)
        print(
            f"datacompy (polars) invoices vs ledger: {datacompy_s:.2f}s compare (+{load_s:.2f}s loading frames "
            f"from ClickHouse), {mismatched:,} mismatching rows",
            flush=True,
        )
    ratio = round(datacompy_s / full_s, 2) if datacompy_s else None
    bound = round(datacompy_s / floor_s, 2) if datacompy_s and floor_s else None
    if bound:
        print(f"a full run doing nothing but the floor's reads would be {bound}x datacompy's speed", flush=True)
    if args.data_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(
        json.dumps(
            {
                "invoices": args.invoices,
                "full_s": round(full_s, 3),
                "incremental_s": round(incremental_s, 3),
                "rss_mb": round(peak.peak, 1),
                "datacompy_s": round(datacompy_s, 3),
                "ratio_vs_datacompy": ratio,
                **({"floor_s": round(floor_s, 3), "floor_ratio_vs_datacompy": bound} if args.floor else {}),
            }
        ),
        flush=True,
    )
    os._exit(0)  # chDB's embedded server keeps threads; nothing else is left to do


if __name__ == "__main__":
    main()
