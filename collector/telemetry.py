"""OpenTelemetry self-instrumentation of the tower.

Exported through OTLP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific variable) is set, and
never to the tower's own receiver: its flush spans would be ingested, flushed and traced again, forever. An
endpoint that is plainly this tower is refused at start; one that reaches it under another name (a host alias,
a load balancer in front of it) is found when the tower receives spans carrying its own instance id, and the
export stops there (``LoopGuard``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from collector.access_log import redact_query
from tower_core.settings import Settings

log = logging.getLogger("tower.telemetry")
_LOCAL = {"127.0.0.1", "localhost", "0.0.0.0", "::1", "::"}
INSTANCE_ID = uuid.uuid4().hex  # service.instance.id of this process's spans: receiving one back means a loop


class LoopGuard(SpanExporter):
    """Exports through ``inner`` until ``stop()``: the tower received its own spans back. From then on spans
    are dropped, so the loop ends after one round instead of filling the store."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.looped = threading.Event()

    def stop(self) -> None:
        if not self.looped.is_set():
            self.looped.set()
            log.warning(
                "this tower received its own spans back: OTEL_EXPORTER_OTLP_ENDPOINT reaches this tower under "
                "another name; self-telemetry stopped (point it at another collector)"
            )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.looped.is_set():
            return SpanExportResult.SUCCESS
        return self.inner.export(spans)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True if self.looped.is_set() else self.inner.force_flush(timeout_millis)


class RedactQueryAddresses(SpanProcessor):
    """A request span's ``url.query`` (FastAPI's own telemetry records it) with every value holding an address
    replaced, as the access log does: the CDP lookup's ``user_id=alice@example.com`` left the tower raw."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        query = (span.attributes or {}).get("url.query")
        if isinstance(query, str):
            redacted = redact_query(f"?{query}")[1:]
            if redacted != query:
                span.set_attribute("url.query", redacted)


def shutdown(provider: TracerProvider, timeout_s: float = 5.0) -> None:
    """Flush the last spans, but never hold the process's exit longer than ``timeout_s``: an endpoint that
    answers slowly held SIGTERM for 32 s (past Docker's 10 s and Kubernetes' 30 s grace periods). The write-ahead
    buffer is closed by then; only the tower's own telemetry can be lost."""
    done = threading.Thread(target=provider.shutdown, name="tower-telemetry-shutdown", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        log.warning("self-telemetry: the last spans were not exported within %.0f s; dropped", timeout_s)


def _host_port(url: str) -> tuple[str, int]:
    u = urlparse(url if "://" in url else f"http://{url}")
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)


def _loopback(host: str) -> bool:
    """A loopback address in any spelling (127.1 is 127.0.0.1); no name is resolved."""
    try:
        return ipaddress.ip_address(socket.inet_aton(host)).is_loopback
    except OSError:
        pass
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def points_at_self(endpoint: str, settings: Settings) -> bool:
    """Plainly this tower: its port on a loopback or its bind address, or its own API URL."""
    host, port = _host_port(endpoint)
    if (host, port) == _host_port(settings.api_url):
        return True
    return port == settings.port and (host in _LOCAL or host == settings.host or _loopback(host))


def setup_telemetry(settings: Settings) -> tuple[TracerProvider, LoopGuard] | None:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    if points_at_self(endpoint, settings):
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT points at this tower; self-telemetry disabled to avoid a loop")
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    service = os.environ.get("OTEL_SERVICE_NAME", "revenue-control-tower")
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.instance.id": INSTANCE_ID}))
    guard = LoopGuard(OTLPSpanExporter())
    provider.add_span_processor(RedactQueryAddresses())  # before the export: processors run in order
    provider.add_span_processor(BatchSpanProcessor(guard))
    trace.set_tracer_provider(provider)
    return provider, guard
