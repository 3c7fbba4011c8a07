"""kill -9 during flushing: every acknowledged span is stored exactly once after restart, with its business-key
link and trace-id index row (what the views of otel_traces derive)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.server import ROOT, TowerServer

COUNT_SCRIPT = """
import json, sys
from pathlib import Path
from tower_core.settings import Settings
from tower_core.store import open_store
s = open_store(Settings(data_dir=Path(sys.argv[1])))
print(json.dumps(s.query_rows(
    "SELECT count() AS n, uniqExact(TraceId, SpanId) AS u, "
    "(SELECT uniqExact(KeyValue) FROM $db.business_key_links WHERE KeyType = 'invoice') AS invoice_links, "
    "(SELECT uniqExact(TraceId) FROM $db.otel_traces_trace_id_ts) AS indexed_traces FROM $db.otel_traces")[0]))
"""


def stored(data_dir: Path) -> dict[str, int]:
    """Count in a separate process once the server is stopped (one chDB path per process)."""
    out = subprocess.run(
        [sys.executable, "-c", COUNT_SCRIPT, str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def batch(offset: int, n: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "billing"
    ss = rs.scope_spans.add()
    for i in range(offset, offset + n):
        sp = ss.spans.add(
            trace_id=(i // 4 + 1).to_bytes(16, "big"),
            span_id=(i + 1).to_bytes(8, "big"),
            name="finalize",
            start_time_unix_nano=1_767_225_600_000_000_000 + i * 1000,
            end_time_unix_nano=1_767_225_600_000_500_000 + i * 1000,
        )
        for k in range(10):
            sp.attributes.add(key=f"attr.{k}").value.string_value = f"value-{i}-{k}"
        sp.attributes.add(key="revops.invoice.id").value.string_value = f"in_{i // 4}"
    return req.SerializeToString()


def flushed(srv: TowerServer) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=5).text
    return sum(
        float(ln.split(" ")[1])
        for ln in text.splitlines()
        if ln.startswith('tower_rows_flushed_total{table="otel_traces"}')
    )


def buffered(srv: TowerServer) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=5).text
    return sum(float(ln.split(" ")[1]) for ln in text.splitlines() if ln.startswith("tower_buffer_bytes "))


@pytest.mark.slow
def test_kill_9_during_flush_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    srv = TowerServer(tmp_path, TOWER_FLUSH_INTERVAL_S="0.5", TOWER_FLUSH_ROWS="20000").start()
    acked = 0
    per_request = 2000
    try:
        with httpx.Client(timeout=30) as client:
            while acked < 60_000:  # three chunks of TOWER_FLUSH_ROWS: the kill lands after the first
                r = client.post(
                    f"{srv.url}/v1/traces",
                    content=batch(acked, per_request),
                    headers={"Content-Type": "application/x-protobuf"},
                )
                assert r.status_code == 200, r.text
                acked += per_request
        deadline = time.monotonic() + 30
        seen = flushed(srv)
        while seen == 0 and time.monotonic() < deadline:
            seen = flushed(srv)
        assert 0 < seen < acked, f"kill must land mid-drain (flushed {seen} of {acked})"
        srv.kill9()
    finally:
        srv.stop()
    srv.start()  # replays the buffer
    # until the replay has emptied the buffer (what is left there is kept, not lost: a stop in the middle of it
    # failed this test on a loaded machine after a fixed 60 s). The buffer gauge counts the segments on disk, so
    # it is non-zero from the start until the replay is done. Not `flushed + seen == acked`: what was flushed
    # between reading `seen` and the kill is not flushed again, and waiting for it ran out the deadline.
    deadline = time.monotonic() + 240
    while buffered(srv) > 0:
        assert time.monotonic() < deadline, "the replay did not empty the buffer"
        time.sleep(0.2)
    srv.stop()
    traces = acked // 4  # four spans per trace, one invoice per trace
    assert stored(tmp_path / "data") == {"n": acked, "u": acked, "invoice_links": traces, "indexed_traces": traces}
