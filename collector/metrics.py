"""Prometheus metrics of the collector, on a registry per application (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.spans_received = Counter("tower_spans_received", "Spans accepted and acknowledged.", registry=r)
        self.spans_rejected = Counter("tower_spans_rejected", "Spans rejected by validation.", registry=r)
        self.events_received = Counter("tower_events_received", "Business events acknowledged.", registry=r)
        self.events_rejected = Counter("tower_events_rejected", "Business events rejected.", registry=r)
        self.requests_refused = Counter(
            "tower_ingest_refused", "Ingest requests refused, by reason.", ["reason"], registry=r
        )
        self.rows_buffered = Counter("tower_rows_buffered", "Rows written to the write-ahead buffer.", registry=r)
        self.rows_flushed = Counter("tower_rows_flushed", "Rows flushed to the store.", ["table"], registry=r)
        self.buffer_bytes = Gauge("tower_buffer_bytes", "Bytes waiting in the write-ahead buffer.", registry=r)
        self.flush_seconds = Histogram(
            "tower_flush_seconds",
            "Time to flush one buffer segment.",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.flush_errors = Counter("tower_flush_errors", "Failed flush attempts (retried).", registry=r)
        self.wal_damaged_bytes = Counter(
            "tower_wal_damaged_bytes",
            "Bytes of the write-ahead buffer found at start failing their checksum (skipped; a copy of a damaged "
            "segment is kept under <wal dir>/corrupt/), by cause.",
            ["cause"],
            registry=r,
        )
        self.dead_letters = Counter(
            "tower_dead_letter_rows", "Rows set aside in the dead-letter box: the store refuses them.", registry=r
        )
