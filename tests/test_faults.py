"""Worst days: kill -9 during sustained ingest (10 times), a full disk under the buffer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.server import ROOT, TowerServer
from tests.test_durability import batch

COUNT = """
import json, sys
from pathlib import Path
from tower_core.settings import Settings
from tower_core.store import open_store
s = open_store(Settings(data_dir=Path(sys.argv[1])))
spans = s.query_rows("SELECT count() AS n, uniqExact(TraceId, SpanId) AS u FROM $db.otel_traces")[0]
ids = [r["i"] for r in s.query_rows("SELECT SpanId AS i FROM $db.otel_traces")]
events = s.query_rows("SELECT EventId AS i, count() AS c FROM $db.business_events FINAL GROUP BY EventId")
print(json.dumps({"spans": spans, "span_ids": ids, "events": {r["i"]: r["c"] for r in events}}))
"""


def stored(data_dir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", COUNT, str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


class Load(threading.Thread):
    """Sends span batches and event batches until stopped; remembers what was acknowledged."""

    def __init__(self, srv: TowerServer, pace_s: float = 0.0) -> None:
        """``pace_s``: a pause after each pair of requests (0: as fast as the server answers)."""
        super().__init__(daemon=True)
        self.srv, self.stop_flag, self.pace_s = srv, threading.Event(), pace_s
        self.acked_spans: set[str] = set()
        self.sent_spans: set[str] = set()
        self.acked_events: set[str] = set()
        self.next_span = 0

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop_flag.is_set():
                first, n = self.next_span, 500
                self.next_span += n
                ids = {f"{i + 1:016x}" for i in range(first, first + n)}
                self.sent_spans |= ids
                evs = [
                    {
                        "specversion": "1.0",
                        "id": f"ev-{first}-{k}",
                        "source": "fault-test",
                        "type": "invoice.paid",
                        "data": {"revops.invoice.id": f"in_{first}_{k}"},
                    }
                    for k in range(20)
                ]
                try:
                    r = client.post(
                        f"{self.srv.url}/v1/traces",
                        content=batch(first, n),
                        headers={"Content-Type": "application/x-protobuf"},
                    )
                    if r.status_code == 200:
                        self.acked_spans |= ids
                    r = client.post(
                        f"{self.srv.url}/v1/events",
                        content=orjson.dumps(evs),
                        headers={"Content-Type": "application/cloudevents-batch+json"},
                    )
                    if r.status_code == 200:
                        self.acked_events |= {e["id"] for e in evs}
                except httpx.HTTPError:
                    time.sleep(0.05)  # the server is down (being killed / restarting): retry later
                if self.pace_s:
                    self.stop_flag.wait(self.pace_s)


@pytest.mark.slow
def test_kill_9_six_times_during_sustained_ingest(tmp_path: Path) -> None:
    srv = TowerServer(tmp_path, TOWER_FLUSH_INTERVAL_S="0.3", TOWER_FLUSH_ROWS="5000").start()
    # paced: unpaced, it acknowledged ~165k spans, far ahead of the flusher, and the drain after the last kill
    # took ~30 s of a CPU-bound suite; at this pace (up to 5,000 spans/s) the flusher still writes a chunk every
    # ~0.3 s when a kill lands. Six kills, not ten: each kill is the same trial, and the suite shares two cores.
    load = Load(srv, pace_s=0.1)
    load.start()
    rnd = random.Random(7)
    try:
        for _ in range(6):
            time.sleep(rnd.uniform(0.5, 2.0))
            srv.kill9()
            srv.start()
        time.sleep(1)
    finally:
        load.stop_flag.set()
        load.join(timeout=30)
    # what the restarts left in the write-ahead buffer is durable there; the property checked here is that all of
    # it reaches the store, once. On a loaded machine the flusher needs more than a fixed pause to catch up (a
    # stop before it did left acknowledged spans in the buffer, which this test then counted as lost).
    deadline = time.monotonic() + 240
    while buffered_bytes(srv) > 0:
        assert time.monotonic() < deadline, "the write-ahead buffer did not drain"
        time.sleep(0.5)
    srv.stop()
    assert not list((tmp_path / "wal").glob("seg-*.wal")), "segments left after a drained stop"
    got = stored(tmp_path / "data")
    assert len(load.acked_spans) > 10_000 and len(load.acked_events) > 200
    assert got["spans"]["n"] == got["spans"]["u"], "a span was stored twice"
    span_ids = set(got["span_ids"])
    assert load.acked_spans <= span_ids, f"{len(load.acked_spans - span_ids)} acknowledged spans lost"
    assert span_ids <= load.sent_spans
    assert set(got["events"]) >= load.acked_events, "acknowledged events lost"
    assert set(got["events"].values()) == {1}, "an event is visible twice"
    print(f"acked {len(load.acked_spans)} spans, {len(load.acked_events)} events; stored {len(span_ids)} spans")


def fill(path: Path) -> None:
    """Write zeros until the file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.needs_root
def test_full_disk_under_the_buffer_503_then_recovers(tmp_path: Path) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the buffer needs root (CI runs as root)")
    wal = tmp_path / "wal"
    wal.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(wal)], check=True)
    try:
        # the flusher stays idle until shutdown, so no flushed segment frees space behind the test's back
        idle = {"TOWER_FLUSH_INTERVAL_S": "60", "TOWER_FLUSH_ROWS": "100000000"}
        with TowerServer(tmp_path, TOWER_WAL_DIR=str(wal), **idle) as srv:
            accepted = 0

            def post(first: int) -> httpx.Response:
                return httpx.post(
                    f"{srv.url}/v1/traces",
                    content=batch(first, 200),
                    headers={"Content-Type": "application/x-protobuf"},
                )

            for k in range(5):
                assert post(k * 200).status_code == 200
                accepted += 200
            fill(wal / "filler")  # the disk is full now
            refused = post(10_000)
            assert refused.status_code == 503, refused.status_code
            assert refused.headers["Retry-After"] == "1" and "buffer" in refused.text
            # a load balancer must send clients elsewhere: /readyz said ready while every request got 503
            for _ in range(2):  # and while the disk stays full (not for 30 s: then clients came back to 503s)
                ready = httpx.get(f"{srv.url}/readyz")
                assert ready.status_code == 503 and "disk refuses writes" in ready.json()["status"], ready.text
            (wal / "filler").unlink()  # space returns: no restart needed
            assert httpx.get(f"{srv.url}/readyz").json()["status"] == "ready"  # seen before any request lands
            for k in range(5):
                assert post(20_000 + k * 200).status_code == 200
                accepted += 200
        got = stored(tmp_path / "data")
        assert got["spans"]["n"] == got["spans"]["u"] == accepted
    finally:
        subprocess.run(["umount", str(wal)], check=False)


def test_readiness_says_503_while_the_write_ahead_buffer_is_nearly_full(tmp_path: Path) -> None:
    """A load balancer should send clients elsewhere before every request gets 503: /readyz said ready while
    the buffer was full."""
    idle = {"TOWER_FLUSH_INTERVAL_S": "60", "TOWER_FLUSH_ROWS": "100000000"}  # nothing drains behind the test
    with TowerServer(tmp_path, TOWER_WAL_MAX_BYTES="400000", **idle) as srv:
        assert httpx.get(f"{srv.url}/readyz").json()["status"] == "ready"
        statuses = []
        for k in range(200):
            r = httpx.post(
                f"{srv.url}/v1/traces", content=batch(k * 50, 50), headers={"Content-Type": "application/x-protobuf"}
            )
            statuses.append(r.status_code)
            if r.status_code != 200:
                break
        ready = httpx.get(f"{srv.url}/readyz")
        assert statuses[-1] == 503 and statuses.count(200) > 3
        assert ready.status_code == 503 and "write-ahead buffer" in ready.json()["status"]


def buffered_bytes(srv: TowerServer) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    return float(next(ln for ln in text.splitlines() if ln.startswith("tower_buffer_bytes ")).split()[1])


def server_errors(srv: TowerServer) -> str:
    """The server log without access-log lines: what explains a failure."""
    lines = [ln for ln in srv.log.read_text().splitlines() if '" 200 OK' not in ln and 'HTTP/1.1" 503' not in ln]
    return "\n".join(lines)[-4000:]


class ClickHouseFixture:
    """The ClickHouse-HTTP test fixture as a process that can be stopped and started on the same data."""

    def __init__(self, data: Path) -> None:
        from tests.conftest import free_port

        self.data, self.port, self.proc = data, free_port(), None

    def start(self) -> None:
        from tests.conftest import wait_for_port

        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fixtures.clickhouse_http_fixture",
                "--data",
                str(self.data),
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.mark.slow
def test_store_down_60s_buffer_then_503_then_drains(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import clickhouse_connect

    ch = ClickHouseFixture(tmp_path / "clickhouse")
    request.addfinalizer(ch.stop)
    ch.start()
    url = f"http://default:@127.0.0.1:{ch.port}/faults"
    srv = TowerServer(
        tmp_path / "tower",
        TOWER_CLICKHOUSE_URL=url,
        TOWER_DATABASE="faults",
        TOWER_WAL_MAX_BYTES=str(6 * 1024 * 1024),
        TOWER_FLUSH_INTERVAL_S="0.3",
    ).start()
    acked: set[str] = set()
    statuses: list[int] = []
    first = 0
    try:
        with httpx.Client(timeout=10) as client:

            def send() -> int:
                nonlocal first
                ids = {f"{i + 1:016x}" for i in range(first, first + 200)}
                r = client.post(
                    f"{srv.url}/v1/traces",
                    content=batch(first, 200),
                    headers={"Content-Type": "application/x-protobuf"},
                )
                first += 200
                if r.status_code == 200:
                    acked.update(ids)
                else:
                    assert r.status_code == 503 and r.headers["Retry-After"]
                return r.status_code

            for _ in range(10):
                assert send() == 200
            ch.stop()  # the store is gone for 60 s under load
            down_until = time.monotonic() + 60
            while time.monotonic() < down_until:
                statuses.append(send())
                time.sleep(0.1)
            assert statuses[0] == 200, "the buffer must keep acknowledging while the store is down"
            assert 503 in statuses, "a full buffer must refuse"
            assert statuses.index(503) > 5
            ch.start()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and buffered_bytes(srv) > 100_000:  # the buffer drains
                time.sleep(0.5)
            assert buffered_bytes(srv) <= 100_000, server_errors(srv)
            for _ in range(5):
                assert send() == 200
    finally:
        srv.stop()
    client = clickhouse_connect.get_client(host="127.0.0.1", port=ch.port)
    try:
        n, u = client.query("SELECT count(), uniqExact(TraceId, SpanId) FROM faults.otel_traces").result_rows[0]
        ids = {r[0] for r in client.query("SELECT SpanId FROM faults.otel_traces").result_rows}
    finally:
        ch.stop()
    assert n == u, "a span was stored twice"
    assert acked <= ids, f"{len(acked - ids)} acknowledged spans lost"
    print(f"store down 60 s: {statuses.count(200)} requests buffered, then {statuses.count(503)} refused (503)")


@pytest.mark.slow
def test_serve_started_while_clickhouse_is_down_buffers_ingest_then_reaches_it(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A restart during a ClickHouse outage: `tower serve` acknowledges into its buffer (it used to exit), says
    why it is not ready, answers API reads 503, and once the server answers migrates and drains."""
    import clickhouse_connect

    ch = ClickHouseFixture(tmp_path / "clickhouse")  # not started: nothing listens on its port yet
    request.addfinalizer(ch.stop)  # a failed assertion left the fixture's process running
    srv = TowerServer(
        tmp_path / "tower",
        TOWER_CLICKHOUSE_URL=f"http://default:@127.0.0.1:{ch.port}/faults",
        TOWER_DATABASE="faults",
        TOWER_FLUSH_INTERVAL_S="0.3",
    ).start(until="/healthz")
    acked: set[str] = set()
    try:
        with httpx.Client(timeout=10) as client:

            def send(first: int) -> None:
                r = client.post(
                    f"{srv.url}/v1/traces",
                    content=batch(first, 200),
                    headers={"Content-Type": "application/x-protobuf"},
                )
                assert r.status_code == 200, r.text
                acked.update(f"{i + 1:016x}" for i in range(first, first + 200))

            for k in range(5):
                send(k * 200)
            ready = client.get(f"{srv.url}/readyz")
            assert ready.status_code == 503
            assert "store not reached since start" in ready.json()["status"], ready.text
            assert "refused" in ready.json()["status"], ready.text  # why, from the last attempt
            assert buffered_bytes(srv) > 0
            drift = client.get(f"{srv.url}/api/drift", headers=srv.auth)
            assert drift.status_code == 503 and drift.headers["X-Tower-Unavailable"] == "store", drift.text

            ch.start()
            deadline = time.monotonic() + 60
            while client.get(f"{srv.url}/readyz").status_code != 200:
                assert time.monotonic() < deadline, server_errors(srv)
                time.sleep(0.3)
            while buffered_bytes(srv) > 0:
                assert time.monotonic() < deadline, server_errors(srv)
                time.sleep(0.3)
            send(1000)  # and on as usual
            assert client.get(f"{srv.url}/api/drift", headers=srv.auth).status_code == 200
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "serving ingest into the write-ahead buffer meanwhile" in log and "Traceback" not in log, log[-3000:]
    client = clickhouse_connect.get_client(host="127.0.0.1", port=ch.port)
    try:
        n, u = client.query("SELECT count(), uniqExact(TraceId, SpanId) FROM faults.otel_traces").result_rows[0]
        ids = {r[0] for r in client.query("SELECT SpanId FROM faults.otel_traces").result_rows}
        links = client.query("SELECT count() FROM faults.business_key_links").result_rows[0][0]
    finally:
        ch.stop()
    assert n == u == len(acked) and ids == acked
    assert links > 0, "the key-link view ran: the attribute names were synced before the flush"


def test_serve_whose_late_store_was_migrated_by_a_newer_release_stops_with_one_line(tmp_path: Path) -> None:
    """What waiting cannot mend, found once the store answers, ends `tower serve` as it would have at start."""
    from tower_core.settings import Settings
    from tower_core.store import migrate, open_store

    ch = ClickHouseFixture(tmp_path / "clickhouse")
    url = f"http://default:@127.0.0.1:{ch.port}/faults"
    ch.start()
    store = open_store(Settings(clickhouse_url=url, database="faults"))
    migrate(store)
    store.command(
        "INSERT INTO $db.schema_migrations (Version, Name, Checksum, AppliedAt) VALUES (9999, 'future', 'x', now64(3))"
    )
    store.close()
    ch.stop()
    srv = TowerServer(tmp_path / "tower", TOWER_CLICKHOUSE_URL=url, TOWER_DATABASE="faults").start(until="/healthz")
    try:
        assert httpx.post(
            f"{srv.url}/v1/traces", content=batch(0, 10), headers={"Content-Type": "application/x-protobuf"}
        ).is_success
        ch.start()
        assert srv.proc is not None
        assert srv.proc.wait(timeout=60) == 2, server_errors(srv)
    finally:
        srv.stop()
        ch.stop()
    last = srv.log.read_text().strip().splitlines()[-1]
    assert last.startswith("tower: error: this database is at schema version 9999"), last
    assert (tmp_path / "tower" / "wal").is_dir() and any((tmp_path / "tower" / "wal").iterdir())  # kept, not flushed


class RefusingPeer:
    """A loopback HTTP peer answering every request as ClickHouse does to a wrong password (516), or as a proxy
    in front of a restarting ClickHouse does (502): a named fake, since the test fixture has no users and no
    proxy. ``port``: bind there (a port a `tower serve` was already pointed at)."""

    def __init__(self, status: int, port: int = 0) -> None:
        import http.server

        if status == 502:
            body, code = b"<html><body><h1>502 Bad Gateway</h1></body></html>", None
        else:
            body, code = b"Code: 516. DB::Exception: default: Authentication failed. (AUTHENTICATION_FAILED)", "516"

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                self.send_response(status)
                if code:
                    self.send_header("X-ClickHouse-Exception-Code", code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _refuse

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_serve_whose_clickhouse_answers_and_refuses_the_login_stops_at_once(tmp_path: Path) -> None:
    """Only a server that does not answer is waited for: one that refuses stops the start."""
    peer = RefusingPeer(403)
    srv = TowerServer(
        tmp_path / "tower",
        TOWER_CLICKHOUSE_URL=f"http://default:wrong@127.0.0.1:{peer.port}/faults",
        TOWER_DATABASE="faults",
    )
    try:
        with pytest.raises(RuntimeError, match="tower serve exited 2") as exited:
            srv.start(until="/healthz")
    finally:
        srv.stop()
        peer.close()
    assert "516" in str(exited.value) and "wrong" not in str(exited.value)


def test_serve_behind_a_proxy_answering_502_waits_and_a_login_refused_later_stops_it(tmp_path: Path) -> None:
    """Reviewer's cases: a proxy's 502 while ClickHouse restarts behind it made `tower serve` exit at start; a
    refused login met after the start was retried every 15 s for good, logged as "does not answer"."""
    from tests.conftest import free_port

    port = free_port()
    proxy = RefusingPeer(502, port)
    srv = TowerServer(
        tmp_path / "tower",
        TOWER_CLICKHOUSE_URL=f"http://default:wrong@127.0.0.1:{port}/faults",
        TOWER_DATABASE="faults",
    ).start(until="/healthz")
    try:
        ready = httpx.get(f"{srv.url}/readyz", timeout=10)
        assert ready.status_code == 503 and "502" in ready.json()["status"], ready.text
        proxy.close()
        refusing = RefusingPeer(403, port)  # the server behind it is back, and refuses this password
        try:
            assert srv.proc is not None
            assert srv.proc.wait(timeout=60) == 2, server_errors(srv)
        finally:
            refusing.close()
    finally:
        srv.stop()
    last = srv.log.read_text().strip().splitlines()[-1]
    assert last.startswith("tower: error: cannot reach ClickHouse") and "516" in last and "wrong" not in last, last
