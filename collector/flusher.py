"""Background flusher: seals the write-ahead buffer every ``flush_interval_s`` (or sooner once
``flush_rows`` wait) and drains sealed segments into the store in deterministic chunks.

A chunk's spans carry an insert_deduplication_token derived from (segment, chunk), so a retry in this process
inserts nothing twice. A segment replayed after a crash writes only the spans otel_traces does not hold, under
a new token (collector/replay.py says why the old one cannot be trusted), and runs the views of otel_traces again
over the spans it does hold (a crash can land the spans' part and lose a view's). Business events need no token:
their tables are idempotent by content. Store errors are retried with exponential backoff for as long as the
process runs; meanwhile the buffer fills and ingest answers 503 once it is full.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
from opentelemetry import trace
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from collector import dead_letter, replay
from collector import events as ev
from collector.metrics import CollectorMetrics
from collector.wal import KIND_EVENTS, KIND_SPANS, Record, Segment, WriteAheadBuffer
from tower_core.errors import StoreError
from tower_core.store import Store
from tower_core.store.otlp_sql import insert_otlp_spans, rederive_span_views
from tower_core.store.traces import stored_span_keys

log = logging.getLogger("tower.flusher")
tracer = trace.get_tracer("tower.collector")
CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class Chunk:
    index: int
    records: list[Record]


def chunks(records: Iterator[Record], max_rows: int = CHUNK_ROWS) -> Iterator[Chunk]:
    """Split a segment's records at fixed row counts: the same segment always yields the same chunks."""
    batch: list[Record] = []
    rows = index = 0
    for rec in records:
        batch.append(rec)
        rows += rec.rows
        if rows >= max_rows:
            yield Chunk(index, batch)
            batch, rows, index = [], 0, index + 1
    if batch:
        yield Chunk(index, batch)


def event_tables(chunk: Chunk, key_names: Mapping[str, str]) -> dict[str, pa.Table]:
    """Rows the chunk's business events write, per table (pure)."""
    events: list[ev.BusinessEvent] = []
    received: list[int] = []
    for r in chunk.records:
        if r.kind == KIND_EVENTS:
            doc = orjson.loads(r.payload)
            for e in doc["events"]:
                events.append(ev.BusinessEvent.from_json(e))
                received.append(doc["received_ns"])
    if not events:
        return {}
    table, links = ev.to_tables(events, received, key_names)
    return {"business_events": table, "business_key_links": links} if links.num_rows else {"business_events": table}


class Flusher:
    def __init__(
        self,
        wal: WriteAheadBuffer,
        store: Store,
        key_names: Mapping[str, str],
        metrics: CollectorMetrics,
        *,
        flush_rows: int,
        flush_interval_s: float,
    ) -> None:
        self.wal, self.store, self.key_names, self.metrics = wal, store, key_names, metrics
        self.dead_letters = dead_letter.DeadLetterBox(wal.dir / "dead-letter")
        self.flush_rows, self.flush_interval_s = flush_rows, flush_interval_s
        # segment id -> chunk index -> True once this process wrote or set aside the chunk (a retry of the segment
        # skips it), False once some of its records were written one by one (a retry checks what is stored):
        # either way its chunk token would not catch rows that landed under the records' own tokens.
        self._progress: dict[str, dict[int, bool]] = {}
        self._wake = threading.Event()
        self.failing_since: float | None = None  # monotonic time of the first failed write since the last success
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tower-flusher", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """Called after an append: wakes the flusher early once enough rows wait."""
        if self.wal.active_rows >= self.flush_rows:
            self._wake.set()

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        if not self.started:  # `tower serve` stopped before its store was reached: nothing to drain
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=drain_timeout_s + 5)

    def _run(self) -> None:
        while True:
            try:
                self._wake.wait(self.flush_interval_s)
            except (OverflowError, ValueError):  # settings bound the interval; should one still pass: flush now
                log.exception("cannot wait %s s between flushes; flushing without waiting", self.flush_interval_s)
                self.flush_interval_s = 1.0
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self.wal.seal()
                self.drain(give_up=self._stop.is_set)
                if not self.wal.sealed():  # everything written: whatever failed before is over
                    self.failing_since = None
            except Exception:  # the flusher must outlive any error: the segment stays and is retried next tick
                self.metrics.flush_errors.inc()
                self._failed()
                log.exception("flush failed; the buffer keeps the data and the next tick retries")
            if stopping:
                return

    def drain(self, give_up: Callable[[], bool] = lambda: False) -> None:
        """Flush every sealed segment, oldest first, retrying store errors until ``give_up()``."""
        for segment in self.wal.sealed():
            retrying = Retrying(
                retry=retry_if_exception_type(StoreError),
                wait=wait_exponential(multiplier=0.2, max=5),
                stop=lambda rs: give_up() and rs.attempt_number > 1,
                reraise=True,
                before_sleep=self._on_retry,
            )
            try:
                for attempt in retrying:
                    with attempt:
                        self.flush_segment(segment)
            except StoreError as exc:
                log.warning("flush of segment %s deferred: %s", segment.id, exc)
                return
            self.wal.remove(segment)
            self.failing_since = None
            self._progress.pop(segment.id, None)
            self.metrics.buffer_bytes.set(self.wal.pending_bytes)

    def _still_to_write(
        self, requests: list[bytes], token: str
    ) -> tuple[list[bytes], str, int | None, StoreError | None]:
        """A replayed chunk's spans that otel_traces does not hold, under a token of this process's life (the
        old one may name a part that a crash kept from landing; see collector/replay.py), how many spans that
        leaves (None: all of them), and the store's refusal to derive the stored spans' view rows again, if it
        refused for its own state (busy, out of disk): the chunk must then be retried, not forgotten."""
        spans = replay.index(requests)
        if spans is None:
            return [], token, 0, None
        stored = stored_span_keys(self.store, spans.keys, spans.first_day, spans.last_day)
        retry: StoreError | None = None
        if stored:
            # the crash (or a full disk under a view) may have kept a view's part of the same insert from
            # landing: derive those rows again. A failure must not hold back the spans still to write; one that
            # says the store cannot write now fails the chunk after them (the segment stays and is retried),
            # any other is logged (retrying it could hold the buffer for good)
            try:
                views = ", ".join(rederive_span_views(self.store, stored, spans.first_day, spans.last_day))
            except StoreError as exc:
                self.metrics.flush_errors.inc()
                log.error("replay: the views of %s's stored spans could not be derived again: %s", token, exc)
                views = "failed"
                retry = exc if dead_letter.store_side(exc) else None
            log.info(
                "replay: %d of %d spans of %s already stored; views derived again: %s",
                len(stored),
                len(spans.keys),
                token,
                views or "none",
            )
        if len(stored) == len(spans.keys):
            return [], token, 0, retry
        # a fresh token per set of stored spans (it only grows): a token names its content, and a retry writing
        # fewer spans under the token of a landed attempt would be dropped as that attempt's duplicate
        left = len(spans.keys) - len(stored) if stored else None
        return replay.without(requests, stored), f"{token}_r{self.wal.epoch}_{len(stored)}", left, retry

    def _failed(self) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def failing_for_s(self) -> float:
        """How long every write to the store has failed (0 while they succeed): readiness reads it."""
        since = self.failing_since
        return 0.0 if since is None else time.monotonic() - since

    def _on_retry(self, state: Any) -> None:
        self.metrics.flush_errors.inc()
        self._failed()
        log.warning("flush failed (attempt %s): %s", state.attempt_number, state.outcome.exception())

    def flush_segment(self, segment: Segment) -> None:
        with tracer.start_as_current_span("tower.flush_segment") as span:
            span.set_attribute("tower.wal.segment", segment.id)
            started = time.perf_counter()
            replayed = segment.epoch != self.wal.epoch  # an earlier process may have flushed part of it
            span.set_attribute("tower.wal.replayed", replayed)
            progress = self._progress.setdefault(segment.id, {})
            for chunk in chunks(WriteAheadBuffer.read(segment)):
                if progress.get(chunk.index):
                    continue
                token = f"wal_{segment.epoch}_s{segment.seq}_c{chunk.index}"
                set_aside: list[int] | None = []
                try:
                    self._write(chunk, token, replayed or chunk.index in progress, counted_before=replayed)
                except Exception as exc:
                    if not self.store.ping():
                        raise  # a store that does not answer refuses everything: no record to blame, retried
                    progress[chunk.index] = False  # record-by-record writes follow
                    set_aside = self._set_aside_refused(segment, chunk, token, exc)
                    if set_aside is None:
                        raise  # nothing points at a record but at the store: retried as a whole
                progress[chunk.index] = True
                if not replayed:  # this process's own chunk: counted once it is written, however many tries
                    self._count_flushed(
                        Chunk(chunk.index, [r for i, r in enumerate(chunk.records) if i not in set_aside])
                    )
            self.metrics.flush_seconds.observe(time.perf_counter() - started)
            span.set_attribute("tower.rows", segment.rows)

    def _count_flushed(self, chunk: Chunk) -> None:
        spans = sum(r.rows for r in chunk.records if r.kind == KIND_SPANS)
        if spans:
            self.metrics.rows_flushed.labels(table="otel_traces").inc(spans)
        for table, data in event_tables(chunk, self.key_names).items():
            self.metrics.rows_flushed.labels(table=table).inc(data.num_rows)

    def _write(self, chunk: Chunk, token: str, replayed: bool, counted_before: bool = True) -> None:
        """``counted_before``: a segment of an earlier process, which may have counted the spans already stored:
        this process counts what it writes of it. A segment of this process is counted by the caller once its
        chunk is written (a chunk retried record by record, or again as a whole, counted its rows each time)."""
        span_requests = [r.payload for r in chunk.records if r.kind == KIND_SPANS]
        left: int | None = None
        retry: StoreError | None = None
        if span_requests and replayed:
            span_requests, token, left, retry = self._still_to_write(span_requests, token)
        if span_requests:
            insert_otlp_spans(self.store, span_requests, token)
        if retry is not None:
            raise retry
        rows = left if left is not None else sum(r.rows for r in chunk.records if r.kind == KIND_SPANS)
        if counted_before and rows and span_requests:
            self.metrics.rows_flushed.labels(table="otel_traces").inc(rows)
        # no token: business_events replaces on the event id and the link and step tables aggregate,
        # so a retry cannot duplicate anything, and a token could only hide a part lost in a crash
        for table, data in event_tables(chunk, self.key_names).items():
            self.store.insert_arrow(table, data)
            if counted_before:
                self.metrics.rows_flushed.labels(table=table).inc(data.num_rows)

    def _set_aside_refused(self, segment: Segment, chunk: Chunk, token: str, exc: Exception) -> list[int] | None:
        """A chunk the store refused, written record by record (each checked against what is stored, so nothing
        lands twice); the records to blame go to the dead-letter box (collector/dead_letter.py), and their
        indexes are returned. None when the failures point at the store instead (the store answered: the caller
        asked)."""
        self.metrics.flush_errors.inc()
        log.warning("chunk %s refused (%s); writing its records one by one", token, exc)
        outcomes: list[BaseException | None] = []
        for i, record in enumerate(chunk.records):
            try:
                own = segment.epoch == self.wal.epoch
                self._write(Chunk(chunk.index, [record]), f"{token}_i{i}", replayed=True, counted_before=not own)
                outcomes.append(None)
            except Exception as err:
                outcomes.append(err)
        blamed = dead_letter.blame(outcomes)
        if blamed is None:
            return None
        for i in blamed:
            record, error = chunk.records[i], outcomes[i]
            assert error is not None
            where = self.dead_letters.put(f"{segment.id}_c{chunk.index}_r{i}", record, error)
            self.metrics.dead_letters.inc(record.rows)
            log.error("set aside %d rows the store refuses: %s (%s)", record.rows, where, error)
        return blamed
