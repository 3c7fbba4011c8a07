"""OpenTelemetry self-instrumentation of the tower.

Exported through OTLP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific variable) is set, and
never to the tower's own receiver: its flush spans would be ingested, flushed and traced again, forever.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tower_core.settings import Settings

log = logging.getLogger("tower.telemetry")
_LOCAL = {"127.0.0.1", "localhost", "0.0.0.0", "::1", "::"}


def points_at_self(endpoint: str, settings: Settings) -> bool:
    u = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = u.port or (443 if u.scheme == "https" else 80)
    return port == settings.port and (u.hostname in _LOCAL or u.hostname == settings.host)


def setup_telemetry(settings: Settings) -> TracerProvider | None:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    if points_at_self(endpoint, settings):
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT points at this tower; self-telemetry disabled to avoid a loop")
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "revenue-control-tower")})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider
