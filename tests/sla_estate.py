"""A small invoice_to_ledger estate for the SLA tests, sent through the real OpenTelemetry SDK (OTLP/HTTP
protobuf) to a running ``tower serve``. Timestamps lie in the past so the burn-rate windows fill without
waiting; the tests then evaluate "as of" chosen instants (POST /api/sla/evaluate with ``now``).

Each invoice: a billing span (step invoice_to_ledger, system billing) and, ``latency`` later, an ERP posting
span in its own trace (context lost at the batch boundary, so only the invoice key joins them).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

REGIONS = ("NA", "EU", "APAC")
MIN = 60_000_000_000  # one minute in ns


@dataclass(frozen=True)
class Delay:
    """Invoices of ``region`` started in [start, end) take ``latency`` to post (None = never posted)."""

    region: str
    start_ns: int
    end_ns: int
    latency_ns: int | None


def base_ns(hours_ago: float) -> int:
    """A minute-aligned instant in the past."""
    t = time.time_ns() - int(hours_ago * 3600 * 1e9)
    return t - t % MIN


def iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat()


def send_estate(
    url: str,
    start_ns: int,
    hours: float,
    *,
    every_min: int = 2,
    latency_ns: int = MIN,
    delays: tuple[Delay, ...] = (),
    prefix: str = "in",
) -> list[str]:
    """Send the estate's spans; returns every invoice id (oldest first, the last one posted normally)."""
    providers = {}
    tracers = {}
    for system in ("billing", "erp"):
        provider = TracerProvider(resource=Resource.create({"service.name": f"sim-{system}"}))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{url}/v1/traces"), max_export_batch_size=512)
        )
        providers[system], tracers[system] = provider, provider.get_tracer(f"sim.{system}")
    invoices = []
    n = int(hours * 60 / every_min)
    for i in range(n):
        t = start_ns + i * every_min * MIN
        for r, region in enumerate(REGIONS):
            inv = f"{prefix}_{region}_{i:05d}"
            invoices.append(inv)
            lat: int | None = latency_ns + r * 1_000_000_000
            for d in delays:
                if d.region == region and d.start_ns <= t < d.end_ns:
                    lat = d.latency_ns
            common = {"revops.step": "invoice_to_ledger", "revops.region": region, "revops.invoice.id": inv}
            span = tracers["billing"].start_span(
                "invoice.finalized", start_time=t, attributes={**common, "revops.system": "billing"}
            )
            span.end(end_time=t + 200_000_000)
            if lat is not None:
                posted = t + lat
                span = tracers["erp"].start_span(
                    "erp.post_invoice", start_time=posted, attributes={**common, "revops.system": "erp"}
                )
                span.end(end_time=posted + 300_000_000)
    for provider in providers.values():
        provider.force_flush()
        provider.shutdown()
    return invoices


def wait_stored(url: str, invoice: str, auth: dict[str, str], timeout: float = 60.0) -> None:
    """Until the invoice's billing and ERP spans are queryable (the flusher drains in order)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/api/transactions", params={"invoice_id": invoice}, headers=auth, timeout=10)
        if r.status_code == 200 and {"billing", "erp"} <= set(r.json()["systems_seen"]):
            return
        time.sleep(0.2)
    raise TimeoutError(f"invoice {invoice} not stored after {timeout}s")


def evaluate(url: str, token: str, now_ns: int) -> dict:
    r = httpx.post(
        f"{url}/api/sla/evaluate",
        json={"now": iso(now_ns)},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    r.raise_for_status()
    return r.json()


class Receiver:
    """A real HTTP webhook receiver on 127.0.0.1 that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        received = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The messages once at least ``count`` arrived (or whatever arrived by the timeout)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)
