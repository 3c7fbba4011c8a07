"""The ingest service: validate, make durable in the write-ahead buffer, acknowledge.

Routers call it; it owns the buffer, the flusher and the collector's metrics. Nothing here blocks the
event loop: the fsync'd append runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from collector import event_pii, otlp, span_pii
from collector import events as ev
from collector.auth import ingest_refusal
from collector.correlation import key_attribute_names
from collector.dead_letter import KIND_NAMES
from collector.flusher import Flusher
from collector.limits import spread_error
from collector.metrics import CollectorMetrics
from collector.telemetry import INSTANCE_ID
from collector.wal import KIND_EVENTS, KIND_SPANS, BufferFull, BufferWriteError, WriteAheadBuffer
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store.otlp_sql import sync_key_attributes

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

log = logging.getLogger("tower.collector.ingest")

RETRY_AFTER_S = 1
# readiness: not ready past this share of the write-ahead buffer, or after the store refused writes this long
READY_BUFFER_SHARE = 0.9
READY_FLUSH_FAILING_S = 30.0
# after the buffer's own disk refused a write (full, read-only), readiness writes this much to it to see whether it
# takes a request again: the load balancer that stops sending on 503 sends nothing that could tell
READY_DISK_PROBE_BYTES = 64 * 1024
# /metrics' reason of a request refused whole, by its status
_REFUSAL_REASONS = {400: "malformed", 413: "too_large", 415: "unsupported_media_type"}


class Refused(Exception):
    """The buffer cannot take the request now: 503 + Retry-After."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Reply:
    status: int
    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


class IngestService:
    def __init__(self, settings: Settings, store: Store, *, store_ready: bool = True) -> None:
        """``store_ready=False``: the store has not answered yet; the buffer takes requests meanwhile, and
        prepare_store() and start() follow once it answers (collector.store_bring_up)."""
        self.settings = settings
        self.store = store
        self.ingest_tokens = [t.get_secret_value() for t in settings.ingest_tokens]
        self.metrics = CollectorMetrics()
        self.key_names = key_attribute_names(settings.key_attribute_map)
        # the CDP's PII policy, built once: its spans, its CloudEvents and Stripe's CDP user ids go through it
        self.cdp_pii = span_pii.policy_for(settings)
        if store_ready:
            self.prepare_store()
        self.wal = WriteAheadBuffer(settings.wal_dir, settings.wal_max_bytes)
        self.flusher = Flusher(
            self.wal,
            store,
            self.key_names,
            self.metrics,
            flush_rows=settings.flush_rows,
            flush_interval_s=settings.flush_interval_s,
        )
        self.metrics.buffer_bytes.set(self.wal.pending_bytes)
        self._report_damage()
        self.dead_letters = self.flusher.dead_letters  # the records the store refused (the flusher fills it)
        # set when the tower exports its own telemetry: called when those spans come back (collector.telemetry)
        self.own_spans_received: Callable[[], None] | None = None
        self._requeue_lock = threading.Lock()
        self._disk_refused: tuple[float, str] | None = None  # (when, why) the buffer's disk last refused a write

    def _report_damage(self) -> None:
        """What the write-ahead buffer found damaged at start: logged and counted once."""
        for d in self.wal.damage:
            cause = "torn_tail" if d.torn_tail else "checksum"
            self.metrics.wal_damaged_bytes.labels(cause=cause).inc(d.length)
            if d.torn_tail:  # a crash while writing the last record: never acknowledged
                log.info("write-ahead buffer %s: %d bytes of an unfinished last record skipped", d.segment, d.length)
            else:
                log.error(
                    "write-ahead buffer %s: %d bytes at offset %d fail their checksum; skipped, the records after "
                    "them are kept, and a copy of the segment is in %s",
                    d.segment,
                    d.length,
                    d.offset,
                    self.wal.dir / "corrupt",
                )

    def refusal(self, authorization: str | None, peer: str | None) -> str:
        """Why an ingest request may not go on, '' if it may (collector.auth.ingest_refusal); refusals are
        counted."""
        reason = ingest_refusal(authorization, self.ingest_tokens, peer, self.settings.ingest_open)
        if reason:
            label = "unauthenticated" if self.ingest_tokens else "remote_without_token"
            self.metrics.requests_refused.labels(reason=label).inc()
        return reason

    def not_ready(self) -> list[str]:
        """Why ingest cannot be counted on now: a load balancer should send clients elsewhere meanwhile."""
        why = []
        used = self.wal.pending_bytes / self.wal.max_bytes
        if used >= READY_BUFFER_SHARE:
            why.append(f"write-ahead buffer {used:.0%} full")
        failing = self.flusher.failing_for_s()
        if failing >= READY_FLUSH_FAILING_S:
            why.append(f"writes to the store failing for {failing:.0f} s")
        refused = self._disk_refused
        if refused is not None:
            probe = self.wal.dir / f".ready-probe-{threading.get_ident()}"
            try:
                with open(probe, "wb") as f:
                    f.write(b"\0" * READY_DISK_PROBE_BYTES)
                    f.flush()
                    os.fsync(f.fileno())
                self._disk_refused = None
            except OSError as exc:
                why.append(f"the write-ahead buffer's disk refuses writes ({refused[1]}; still: {exc.strerror})")
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink(missing_ok=True)
        return why

    def prepare_store(self) -> None:
        sync_key_attributes(self.store, self.key_names)  # read by the span -> key-link materialized view

    @property
    def started(self) -> bool:
        return self.flusher.started

    def start(self) -> None:
        self.flusher.start()

    def stop(self) -> None:
        self.flusher.stop()
        self.wal.close()

    def count_refusal(self, status: int) -> int:
        """Count a request refused whole (a client failing every request shows on /metrics); returns status."""
        self.metrics.requests_refused.labels(reason=_REFUSAL_REASONS.get(status, "malformed")).inc()
        return status

    def _never_fits(self, payload: bytes) -> str | None:
        """A request larger than the whole buffer would get 503 on every retry: it is refused as too large."""
        if len(payload) + 64 <= self.wal.max_bytes:  # 64: the record's framing, generously
            return None
        return f"request of {len(payload)} bytes is larger than the write-ahead buffer (TOWER_WAL_MAX_BYTES)"

    def _append(self, kind: int, rows: int, payload: bytes) -> None:
        try:
            self.wal.append(kind, rows, payload)
        except BufferFull as exc:
            self.metrics.requests_refused.labels(reason="buffer_full").inc()
            raise Refused("buffer_full", str(exc)) from None
        except BufferWriteError as exc:
            self.metrics.requests_refused.labels(reason="disk").inc()
            self._disk_refused = (time.monotonic(), str(exc))
            raise Refused("disk", str(exc)) from None
        self._disk_refused = None
        self.metrics.rows_buffered.inc(rows)
        self.metrics.buffer_bytes.set(self.wal.pending_bytes)
        self.flusher.notify()

    def traces(self, body: bytes, content_type: str | None, encoding: str | None) -> Reply:
        """OTLP/HTTP export. Sync: FastAPI runs it in its threadpool."""
        try:
            mt = otlp.media_type(content_type)
        except otlp.OtlpError as exc:
            status = self.count_refusal(exc.status)
            return Reply(status, otlp.status_body(otlp.JSON, exc.status, exc.message), otlp.JSON)
        try:
            raw = otlp.decompress(body, encoding, self.settings.max_body_bytes)
            req = otlp.decode(raw, mt)
            if self.own_spans_received is not None and otlp.from_instance(req, INSTANCE_ID):
                return self._own_spans(req, mt)
            checked = otlp.validate(req)
        except otlp.OtlpError as exc:
            return Reply(self.count_refusal(exc.status), otlp.status_body(mt, exc.status, exc.message), mt)
        self.metrics.spans_rejected.inc(checked.rejected)
        if checked.rejected and not checked.accepted:  # nothing usable: the request as a whole is bad
            return Reply(self.count_refusal(400), otlp.status_body(mt, 400, checked.error_message), mt)
        if checked.accepted:
            # what was validated, scrubbed and canonically encoded: a client's bytes may repeat a field, which
            # protobuf reads as its last value and ClickHouse's reader does not (a span stored without its trace id)
            payload, _ = span_pii.scrubbed_payload(req, self.cdp_pii)
            if (too_big := self._never_fits(payload)) is not None:
                return Reply(self.count_refusal(413), otlp.status_body(mt, 413, too_big), mt)
            try:
                self._append(KIND_SPANS, checked.accepted, payload)
            except Refused as exc:
                return Reply(503, otlp.status_body(mt, 503, str(exc)), mt, {"Retry-After": str(RETRY_AFTER_S)})
            self.metrics.spans_received.inc(checked.accepted)
        return Reply(200, otlp.response(mt, checked.rejected, checked.error_message), mt)

    def _own_spans(self, req: ExportTraceServiceRequest, mt: str) -> Reply:
        """The tower's own spans, back through an alias of its endpoint: not stored, and the export stops (else
        each round's ingest is traced and exported again, forever)."""
        assert self.own_spans_received is not None
        self.own_spans_received()
        n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        self.metrics.spans_rejected.inc(n)
        return Reply(200, otlp.response(mt, n, "this tower's own spans: its self-telemetry loops back; stopped"), mt)

    def events(self, body: bytes, content_type: str | None, encoding: str | None = None) -> Reply:
        """CloudEvents ingest: valid events are kept, invalid ones reported (partial success)."""
        received_ns = time.time_ns()
        try:
            body = otlp.decompress(body, encoding, self.settings.max_body_bytes)  # the same caps as OTLP's
        except otlp.OtlpError as exc:
            return _json(self.count_refusal(exc.status), {"error": exc.message})
        try:
            good, bad = ev.parse_body(body, content_type, received_ns, self.key_names)
        except ev.EventError as exc:
            status = 415 if "content type" in str(exc) else 400
            return _json(self.count_refusal(status), {"error": str(exc)})
        self.metrics.events_rejected.inc(len(bad))
        good = [event_pii.scrubbed(e, self.cdp_pii) for e in good]
        if not good and not bad:  # an empty batch is valid (CloudEvents JSON format, 4.3), as an empty OTLP request
            return _json(200, {"accepted": 0, "rejected": []})
        if not good:
            status = self.count_refusal(400)
            return _json(status, {"error": "no valid event in the request", "accepted": 0, "rejected": bad})
        if (spread := spread_error((e.time_ns for e in good), "events")) is not None:
            return _json(self.count_refusal(400), {"error": spread})
        payload = orjson.dumps({"received_ns": received_ns, "events": [e.to_json() for e in good]})
        if (too_big := self._never_fits(payload)) is not None:
            return _json(self.count_refusal(413), {"error": too_big})
        try:
            self._append(KIND_EVENTS, len(good), payload)
        except Refused as exc:
            return _json(503, {"error": str(exc)}, {"Retry-After": str(RETRY_AFTER_S)})
        self.metrics.events_received.inc(len(good))
        return _json(200, {"accepted": len(good), "rejected": bad})

    def requeue_dead_letter(self, name: str) -> dict[str, Any] | None:
        """A record the store refused, back into the buffer once its cause is fixed (an upgrade, a schema
        change); None when the box has no such name. Refused when the buffer is full. The append is fsync'd
        before the box forgets the record, so a crash in between keeps it in both places (at least once, never
        lost). The lock makes a double click one requeue."""
        with self._requeue_lock:
            found = self.dead_letters.get(name)
            if found is None:
                return None
            why, record = found
            self._append(record.kind, record.rows, record.payload)
            self.dead_letters.remove(name)
        return {"name": name, "kind": KIND_NAMES[record.kind], "rows": record.rows, "error": why.get("error", "")}

    def append_events(self, events: list[ev.BusinessEvent], received_ns: int) -> None:
        """Buffer business events a connector already built (webhooks, CDP); raises Refused when full."""
        payload = orjson.dumps({"received_ns": received_ns, "events": [e.to_json() for e in events]})
        self._append(KIND_EVENTS, len(events), payload)
        self.metrics.events_received.inc(len(events))


def _json(status: int, doc: dict, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps(doc), "application/json", headers or {})
