"""The tower traces its own work through OTLP, but never into its own receiver."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from collector.telemetry import points_at_self
from tests.fixtures.fault_proxy import FaultProxy
from tests.server import TowerServer
from tests.test_durability import batch
from tower_core.settings import Settings


@pytest.mark.parametrize(
    ("endpoint", "is_self"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8000/v1/traces", True),
        ("127.0.0.1:8000", True),
        ("http://127.0.0.1:4318", False),
        ("http://collector.internal:8000", False),
        ("http://127.1:8000", True),  # 127.0.0.1 spelt short
        ("http://127.0.0.2:8000", True),
        ("http://[::1]:8000", True),
        ("http://tower.internal:9000/", True),  # TOWER_API_URL: the tower behind its own name
        ("http://tower.internal:8000", False),
    ],
)
def test_points_at_self(endpoint: str, is_self: bool) -> None:
    assert points_at_self(endpoint, Settings(port=8000, api_url="http://tower.internal:9000")) is is_self


@pytest.mark.slow
def test_flush_spans_exported_to_another_collector(tmp_path: Path) -> None:
    with (
        TowerServer(tmp_path / "observer") as observer,
        TowerServer(
            tmp_path / "tower", OTEL_EXPORTER_OTLP_ENDPOINT=observer.url, OTEL_BSP_SCHEDULE_DELAY="200"
        ) as tower,
    ):
        r = httpx.post(
            f"{tower.url}/v1/traces", content=batch(0, 10), headers={"Content-Type": "application/x-protobuf"}
        )
        assert r.status_code == 200
        deadline = time.monotonic() + 20
        found = None
        while time.monotonic() < deadline and not found:
            r = httpx.get(f"{observer.url}/metrics")
            received = [ln for ln in r.text.splitlines() if ln.startswith("tower_spans_received_total ")]
            if received and float(received[0].split()[1]) > 0:
                found = True
            time.sleep(0.2)
        assert found, "the observer never received the tower's own spans"
        # the tower did not ingest its own telemetry: it received exactly the 10 spans sent to it
        text = httpx.get(f"{tower.url}/metrics").text
        assert "tower_spans_received_total 10.0" in text


def received(srv: TowerServer) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    return float(next(ln for ln in text.splitlines() if ln.startswith("tower_spans_received_total ")).split()[1])


@pytest.mark.slow
def test_a_tower_exporting_to_itself_behind_another_name_stops_after_one_round(tmp_path: Path) -> None:
    """An endpoint reaching the tower under another name (here a proxy in front of it, as a load balancer)
    passed the start-up check: each ingest request was traced, exported back and ingested again, ~4 spans/s
    forever. The tower now knows its own spans (service.instance.id), stores none of them and stops exporting."""
    tower = TowerServer(tmp_path, OTEL_BSP_SCHEDULE_DELAY="100")
    with FaultProxy(tower.url) as proxy:
        tower.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = proxy.url
        with tower:
            r = httpx.post(
                f"{tower.url}/v1/traces", content=batch(0, 10), headers={"Content-Type": "application/x-protobuf"}
            )
            assert r.status_code == 200
            deadline = time.monotonic() + 30
            while "received its own spans back" not in tower.log.read_text():
                assert time.monotonic() < deadline, tower.log.read_text()[-2000:]
                time.sleep(0.2)
            time.sleep(1)  # a batch already on its way lands; nothing follows it
            settled = received(tower)
            time.sleep(2)
            assert received(tower) == settled == 10  # the 10 sent; none of the tower's own
            assert proxy.seen  # the spans did come back through the proxy


def test_an_address_in_a_request_query_leaves_the_tower_redacted() -> None:
    """FastAPI's own telemetry records url.query: the access log redacted the CDP lookup's user_id, the
    exported span carried alice@example.com."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from collector.telemetry import RedactQueryAddresses

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(RedactQueryAddresses())
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    for query in ("user_id=alice%40example.com&limit=5", "limit=5"):
        tracer.start_span("GET /api/cdp/events", attributes={"url.query": query}).end()
    first, second = (s.attributes["url.query"] for s in exported.get_finished_spans())  # type: ignore[index]
    assert "alice" not in first and "example.com" not in first and first.endswith("&limit=5")
    assert second == "limit=5"


@pytest.mark.slow
def test_a_slow_telemetry_endpoint_does_not_hold_the_exit(tmp_path: Path) -> None:
    """An endpoint answering after a minute held SIGTERM for 32 s, past Docker's 10 s grace period."""
    import socket
    import subprocess

    with socket.socket() as hang:  # accepts connections and never answers
        hang.bind(("127.0.0.1", 0))
        hang.listen(16)
        endpoint = f"http://127.0.0.1:{hang.getsockname()[1]}"
        tower = TowerServer(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="100").start()
        assert tower.proc is not None
        r = httpx.post(
            f"{tower.url}/v1/traces", content=batch(0, 10), headers={"Content-Type": "application/x-protobuf"}
        )
        assert r.status_code == 200
        time.sleep(1)  # an export is under way, waiting on the endpoint
        started = time.monotonic()
        tower.proc.terminate()
        try:
            tower.proc.wait(timeout=25)
        except subprocess.TimeoutExpired:
            tower.proc.kill()
            raise
        took = time.monotonic() - started
    assert took < 15, f"exit took {took:.1f} s"  # uvicorn exits by the signal it got (-15) once shut down
    assert "were not exported within" in tower.log.read_text()
