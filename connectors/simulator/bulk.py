"""Bulk mode: a whole estate written straight into the store's state tables, in columnar chunks.

Generation (numpy, releases the GIL for most work) runs in a producer thread while the main thread inserts
the previous chunk, so both cores work. The manifest (same faults as the in-memory estate of the same
config) is written to a JSON file.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from connectors.simulator.config import EstateConfig
from connectors.simulator.estate import Generated, generate_tables
from connectors.simulator.faults import Manifest
from connectors.simulator.generate import generate_customers, generate_outages
from tower_core.store import Store
from tower_core.store import simulator as sim_store

Progress = Callable[[str, int, int], None]  # (table, rows just written, invoices done)


@dataclass
class BulkResult:
    manifest: Manifest
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def bulk_load(
    store: Store,
    config: EstateConfig,
    *,
    fresh: bool = True,
    manifest_path: Path | None = None,
    progress: Progress | None = None,
) -> BulkResult:
    """Generate ``config``'s estate and insert it; returns the manifest and rows written per table."""
    t0 = time.perf_counter()
    if fresh:
        sim_store.truncate(store)
    gen = Generated(config, generate_customers(config), generate_outages(config))
    q: queue.Queue[tuple[str, pa.Table] | BaseException | None] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in generate_tables(config, gen):
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)

    producer = threading.Thread(target=produce, name="sim-bulk-generate", daemon=True)
    producer.start()
    rows: dict[str, int] = dict.fromkeys(sim_store.BULK_TABLES, 0)
    invoices_done = 0
    try:
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            name, table = item
            store.insert_arrow(name, table)
            rows[name] += table.num_rows
            if name == "billing_invoices":
                invoices_done += table.num_rows - int(_duplicates(table))
            if progress:
                progress(name, table.num_rows, invoices_done)
    finally:
        stop.set()
        producer.join(timeout=30)
    manifest = gen.manifest()
    if manifest_path is not None:
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(manifest.to_json())
    return BulkResult(manifest, rows, time.perf_counter() - t0)


def _duplicates(table: pa.Table) -> int:
    """duplicate_webhook rows repeat an invoice; they are not new invoices."""
    return table.num_rows - len(table.column("InvoiceId").unique())
