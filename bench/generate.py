"""Bulk estate generation benchmark: N invoices with payments and ledger lines into a fresh embedded store.

    .venv/bin/python bench/generate.py --invoices 10000000

Prints the time, rows per table, peak RSS, and ends with one JSON line
{"invoices", "seconds", "rss_mb", "rows", "rows_per_s", "faults"}. Goal on the 2-core machine: 10M in <= 120 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from connectors.simulator import EstateConfig, FaultRates
from connectors.simulator.bulk import bulk_load
from tower_core.settings import Settings
from tower_core.store import migrate, open_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--invoices", type=int, default=10_000_000)
    ap.add_argument("--customers", type=int, default=0, help="default invoices/20")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--data-dir", type=Path, default=None, help="chDB path (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = ap.parse_args()
    console = Console()
    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="tower-bench-generate-"))
        data_dir = tmp / "data"
    as_of = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    config = EstateConfig(
        seed=args.seed,
        customers=args.customers or max(200, args.invoices // 20),
        invoices=args.invoices,
        start=as_of - dt.timedelta(days=60),
        as_of=as_of,
        fault_rates=FaultRates.default(),
    )
    store = open_store(Settings(data_dir=data_dir, database="bench", clickhouse_url=None))
    migrate(store)
    try:
        with Progress(
            TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task("generate", total=args.invoices)
            result = bulk_load(
                store,
                config,
                manifest_path=data_dir.parent / "manifest.json",
                progress=lambda table, rows, done: bar.update(task, completed=done),
            )
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = sum(result.rows.values())
        for name, n in result.rows.items():
            console.print(f"{name:>20}: {n:>12,} rows")
        console.print(f"{args.invoices:,} invoices, {rows:,} rows in {result.seconds:.1f} s "
                      f"({rows / result.seconds:,.0f} rows/s), peak RSS {rss_mb:,.0f} MB, "
                      f"{len(result.manifest):,} injected faults")  # fmt: skip
        print(
            json.dumps(
                {
                    "invoices": args.invoices,
                    "seconds": round(result.seconds, 2),
                    "rss_mb": round(rss_mb),
                    "rows": rows,
                    "rows_per_s": round(rows / result.seconds),
                    "faults": len(result.manifest),
                    "cpu_s": round(result.cpu_s, 1),
                    "generate_cpu_s": round(result.generate_cpu_s, 1),
                }
            )
        )
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
