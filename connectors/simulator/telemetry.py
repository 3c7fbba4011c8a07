"""The estate's own instrumentation: one OpenTelemetry TracerProvider per system (its own ``service.name``),
exporting OTLP/HTTP to the tower's ``/v1/traces``, and CloudEvents batches to ``/v1/events``.

Spans carry DOMAIN.md §2 attributes. A span is created with explicit start/end times (the moment the
simulated system did the work) and an explicit parent: the caller decides whether trace context survives
a hop (CDP -> billing always; billing -> ERP except for the share of flows that lose it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util.re import parse_env_headers

log = logging.getLogger("tower.simulator")
SYSTEMS = ("cdp", "billing", "erp")
SERVICE = {"cdp": "sim-cdp", "billing": "sim-billing", "erp": "sim-erp"}
BATCH_CT = "application/cloudevents-batch+json"
AttrValue = str | int | Sequence[str]


def traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class EventSender:
    """Buffers CloudEvents and posts them as batches from a background thread; keeps them on failure
    (bounded), so a briefly unavailable collector loses nothing."""

    def __init__(self, url: str, interval_s: float = 0.5, max_buffer: int = 100_000) -> None:
        self.url = url
        self.interval_s = interval_s
        self.max_buffer = max_buffer
        self.buffer: list[dict[str, Any]] = []
        self.dropped = 0
        self.sent = 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        # the same headers the OTLP exporters send (OTEL_EXPORTER_OTLP_HEADERS), e.g. the tower's ingest token
        headers = parse_env_headers(os.environ.get("OTEL_EXPORTER_OTLP_HEADERS", ""), liberal=True)
        self.client = httpx.Client(timeout=10, headers=headers)
        self.thread = threading.Thread(target=self._run, name="sim-events", daemon=True)
        self.thread.start()

    def add(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.buffer.append(event)
            if len(self.buffer) > self.max_buffer:
                self.dropped += len(self.buffer) - self.max_buffer
                del self.buffer[: len(self.buffer) - self.max_buffer]

    def flush(self) -> bool:
        """Send what is buffered; True when the buffer is empty afterwards."""
        while True:
            with self.lock:
                batch = self.buffer[:1000]
            if not batch:
                return True
            try:
                r = self.client.post(self.url, content=orjson.dumps(batch), headers={"content-type": BATCH_CT})
            except httpx.HTTPError as exc:
                log.debug("events not delivered yet: %s", exc)
                return False
            if r.status_code >= 500 or r.status_code == 429:
                return False
            if r.status_code >= 400:
                log.warning("collector refused %d events: %s", len(batch), r.text[:300])
            with self.lock:
                del self.buffer[: len(batch)]
            self.sent += len(batch)

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.flush()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.client.close()


class Telemetry:
    """Spans and business events of the three simulated systems."""

    def __init__(
        self,
        api_url: str,
        *,
        exporters: Mapping[str, SpanExporter] | None = None,
        send_events: bool = True,
        environment: str = "demo",
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.providers: dict[str, TracerProvider] = {}
        self.tracers: dict[str, trace.Tracer] = {}
        for system in SYSTEMS:
            resource = Resource.create(
                {
                    "service.name": SERVICE[system],
                    "service.namespace": "simulated-estate",
                    "deployment.environment": environment,
                    "revops.system": system,
                }
            )
            provider = TracerProvider(resource=resource)
            exporter = (exporters or {}).get(system) or OTLPSpanExporter(
                endpoint=f"{self.api_url}/v1/traces", timeout=10
            )
            provider.add_span_processor(
                BatchSpanProcessor(exporter, schedule_delay_millis=500, max_export_batch_size=512)
            )
            self.providers[system] = provider
            self.tracers[system] = provider.get_tracer("connectors.simulator", "0.1.0")
        self.events = EventSender(f"{self.api_url}/v1/events") if send_events else None
        self.event_log: list[dict[str, Any]] = []  # kept only without a sender (tests)

    def span(
        self,
        system: str,
        name: str,
        start_ms: int,
        duration_ms: int,
        attributes: Mapping[str, AttrValue],
        parent: SpanContext | None = None,
        *,
        error: str | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> SpanContext:
        ctx = trace.set_span_in_context(NonRecordingSpan(parent), Context()) if parent is not None else Context()
        attrs = {"revops.system": system, **attributes}
        span = self.tracers[system].start_span(
            name, context=ctx, kind=kind, attributes=attrs, start_time=start_ms * 1_000_000
        )
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=(start_ms + max(1, duration_ms)) * 1_000_000)
        return span.get_span_context()

    def event(
        self,
        system: str,
        event_type: str,
        event_id: str,
        time_ms: int,
        data: Mapping[str, Any],
        ctx: SpanContext | None,
        subject: str = "",
    ) -> dict[str, Any]:
        secs, ms = divmod(time_ms, 1000)
        doc: dict[str, Any] = {
            "specversion": "1.0",
            "id": event_id,
            "source": SERVICE[system],
            "type": event_type,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z",
            "datacontenttype": "application/json",
            "data": {"revops.system": system, **data},
        }
        if subject:
            doc["subject"] = subject
        if ctx is not None:
            doc["traceparent"] = traceparent(ctx)
        self.send(doc)
        return doc

    def send(self, doc: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.add(doc)
        else:
            self.event_log.append(doc)

    def flush(self, timeout_s: float = 10.0) -> None:
        for p in self.providers.values():
            p.force_flush(int(timeout_s * 1000))
        if self.events is not None:
            self.events.flush()

    def shutdown(self) -> None:
        for p in self.providers.values():
            p.shutdown()
        if self.events is not None:
            self.events.shutdown()
