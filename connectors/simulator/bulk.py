"""Bulk mode: a whole estate written straight into the store's state tables, in columnar chunks.

A producer thread generates chunk after chunk (numpy and Arrow, which release the GIL for most work); one
writer thread per table inserts them (tower_core/store/simulator.py ``BulkWriter``), so generation and the
three tables' inserts overlap on all cores. Queues are bounded, so memory stays at a few chunks. The
manifest (the same faults as the in-memory estate of the same config) is written to a JSON file.
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
from tower_core.store import reconcile as reconcile_store
from tower_core.store import simulator as sim_store

Progress = Callable[[str, int, int], None]  # (table, rows just written, invoices done)
_DONE = object()


@dataclass
class BulkResult:
    manifest: Manifest
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    generate_cpu_s: float = 0.0  # CPU of the generating thread (the rest of the process CPU is inserting)
    cpu_s: float = 0.0


def _duplicates(table: pa.Table) -> int:
    """duplicate_webhook rows repeat an invoice; they are not new invoices."""
    return table.num_rows - len(table.column("InvoiceId").unique())


class _Pipeline:
    """Producer -> per-table writer threads; the first error stops everything and is re-raised."""

    def __init__(self, store: Store, progress: Progress | None) -> None:
        self.writer = sim_store.BulkWriter(store)
        self.progress = progress
        self.lock = threading.Lock()
        self.rows: dict[str, int] = dict.fromkeys(sim_store.BULK_TABLES, 0)
        self.invoices_done = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.queues: dict[str, queue.Queue] = {name: queue.Queue(maxsize=2) for name in sim_store.BULK_TABLES}
        self.threads = [
            threading.Thread(target=self._write, args=(name,), name=f"sim-bulk-{name}", daemon=True)
            for name in sim_store.BULK_TABLES
        ]

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def _write(self, name: str) -> None:
        q = self.queues[name]
        while True:
            item = q.get()
            if item is _DONE or self.stop.is_set():
                return
            try:
                self.writer.insert(name, item)
            except BaseException as exc:
                self._fail(exc)
                return
            with self.lock:
                self.rows[name] += item.num_rows
                if name == "billing_invoices":
                    self.invoices_done += item.num_rows - _duplicates(item)
                done = self.invoices_done
            if self.progress:
                self.progress(name, item.num_rows, done)

    def put(self, name: str, item: object) -> None:
        while not self.stop.is_set():
            try:
                self.queues[name].put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self, config: EstateConfig, gen: Generated, then: Callable[[], None]) -> float:
        """Generate into the writers; ``then`` runs once generation is done, while the writers finish."""
        for t in self.threads:
            t.start()
        start = time.thread_time()
        try:
            for name, table in generate_tables(config, gen):
                if self.stop.is_set():
                    break
                self.put(name, table)
        except BaseException as exc:
            self._fail(exc)
        generate_cpu = time.thread_time() - start
        for name in self.queues:
            self.put(name, _DONE)
        if not self.stop.is_set():
            then()
        for t in self.threads:
            while t.is_alive():
                t.join(timeout=0.5)
                if self.stop.is_set():  # a writer failed: unblock the others
                    for q in self.queues.values():
                        try:
                            q.put_nowait(_DONE)
                        except queue.Full:
                            pass
        self.writer.close()
        if self.error is not None:
            raise self.error
        return generate_cpu


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
    cpu0 = time.process_time()
    if fresh:
        sim_store.truncate(store)
        reconcile_store.mark_state_replaced(store)  # the next reconcile run compares the new estate whole
    gen = Generated(config, generate_customers(config), generate_outages(config))
    pipeline = _Pipeline(store, progress)
    done: list[Manifest] = []

    def write_manifest() -> None:
        done.append(gen.manifest())
        if manifest_path is not None:
            manifest_path.parent.mkdir(parents=True, exist_ok=True)
            manifest_path.write_text(done[0].to_json())

    generate_cpu = pipeline.run(config, gen, write_manifest)
    return BulkResult(done[0], pipeline.rows, time.perf_counter() - t0, generate_cpu, time.process_time() - cpu0)
