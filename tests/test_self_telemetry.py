"""The tower traces its own work through OTLP, but never into its own receiver."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from collector.telemetry import points_at_self
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
    ],
)
def test_points_at_self(endpoint: str, is_self: bool) -> None:
    assert points_at_self(endpoint, Settings(port=8000)) is is_self


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
