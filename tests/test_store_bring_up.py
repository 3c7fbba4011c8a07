"""`tower serve` whose ClickHouse server did not answer at start (collector/store_bring_up.py), in-process: what
the API does until the store is reached and migrated, and how the bring-up retries and gives up."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from collector.app import create_app
from collector.store_bring_up import STOP_WAIT_S, StoreBringUp
from tests.test_durability import batch
from tower_core.errors import ConfigError, StoreError, StoreUnreachable
from tower_core.settings import Settings
from tower_core.store import Store, migrate
from tower_core.store.reach import retry_until_reached

ADMIN = "bring-up-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def test_until_the_store_is_reached_and_migrated_the_api_answers_503_writes_nothing_and_buffers_ingest(
    embedded_store: Store, tmp_path: Path
) -> None:
    """A reviewer's case: the server answered between two attempts, and the API wrote a token and ran a run into a
    database the bring-up then refused (a newer release's). Nothing reaches the store before the migrations. The
    database exists and is migrated here (as a newer release's would be), so only the gate can answer 503."""
    migrate(embedded_store)
    release = threading.Event()
    attempts: list[float] = []

    def ready_store() -> None:
        attempts.append(time.monotonic())
        if not release.is_set():
            raise StoreUnreachable("cannot reach ClickHouse at 127.0.0.1:1: connection refused")
        migrate(embedded_store)

    bring_up = StoreBringUp(embedded_store, ready_store, on_fatal=lambda: None, max_wait_s=0.2)
    settings = Settings(  # type: ignore[call-arg]
        database=embedded_store.database,
        wal_dir=tmp_path / "wal",
        admin_token=ADMIN,
        sla_eval_interval_s=0,
        reconcile_scheduler=False,
        flush_interval_s=0.1,
        ingest_tokens=["bring-up-ingest"],
    )
    with TestClient(create_app(settings, embedded_store, bring_up=bring_up)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "store not reached since start" in ready.json()["status"]
        assert "connection refused" in ready.json()["status"]
        for method, path, body in (
            ("POST", "/api/tokens", {"name": "early", "role": "operator"}),
            ("POST", "/api/runs", {"full": True}),
            ("GET", "/api/drift", None),
            ("GET", "/api/runs", None),
        ):
            r = c.request(method, path, json=body, headers=AUTH)
            assert r.status_code == 503 and r.headers["X-Tower-Unavailable"] == "store", (path, r.text)
        spans = c.post(
            "/v1/traces",
            content=batch(0, 8),
            headers={"Content-Type": "application/x-protobuf", "Authorization": "Bearer bring-up-ingest"},
        )
        assert spans.status_code == 200, spans.text
        for table in ("api_tokens", "reconcile_runs", "audit_log"):  # nothing written
            assert embedded_store.query_rows(f"SELECT count() AS n FROM $db.{table}")[0]["n"] == 0, table

        release.set()
        deadline = time.monotonic() + 20
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline and bring_up.fatal is None, bring_up.fatal
            time.sleep(0.05)
        assert c.post("/api/tokens", json={"name": "later", "role": "operator"}, headers=AUTH).status_code == 201

        # the spans' part is visible a moment before the part their key-link view writes in the same insert
        def stored(table: str) -> int:
            return int(embedded_store.query_rows(f"SELECT count() AS n FROM $db.{table}")[0]["n"])

        while stored("otel_traces") < 8 or stored("business_key_links") == 0:
            assert time.monotonic() < deadline, "the buffered spans were not flushed with their key links"
            time.sleep(0.05)
        assert stored("otel_traces") == 8  # the key attribute names were synced before the flush: links above
    assert len(attempts) >= 2


def _bring_up(parts: list[BaseException | None], fatal: list[str], **kw: object) -> tuple[StoreBringUp, list[int]]:
    """A bring-up whose store answers at once and whose parts raise ``parts`` in turn (None: they start)."""
    calls: list[int] = []

    def start_parts() -> None:
        calls.append(1)
        exc = parts.pop(0)
        if exc is not None:
            raise exc

    class NoStore:
        backend, database = "server", "t"

    bring_up = StoreBringUp(NoStore(), lambda: None, on_fatal=lambda: fatal.append("stop"), max_wait_s=0.05)  # type: ignore[arg-type]
    bring_up.start(start_parts)
    return bring_up, calls


def _wait(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_parts_that_find_the_server_gone_again_are_retried_not_fatal() -> None:
    """A reviewer's case: the server went away right after the migrations; `tower serve` exited 2 and left its
    flusher running on a closed buffer."""
    fatal: list[str] = []
    bring_up, calls = _bring_up([StoreUnreachable("connection refused"), None], fatal)
    _wait(lambda: bring_up.started)
    assert calls == [1, 1] and bring_up.fatal is None and not fatal


@pytest.mark.parametrize("refusal", [StoreError("Authentication failed"), ConfigError("schema version 9999")])
def test_an_answer_that_refuses_stops_the_process_once(refusal: Exception) -> None:
    """Waiting cannot mend a refused login or a newer release's database: once, not every 15 s for good."""
    fatal: list[str] = []
    bring_up, calls = _bring_up([refusal, None], fatal)
    _wait(lambda: bring_up.fatal is not None)
    time.sleep(0.2)
    assert calls == [1] and fatal == ["stop"] and not bring_up.started and str(refusal) in str(bring_up.fatal)


def test_retries_only_while_no_server_answers_and_a_stop_ends_the_wait() -> None:
    stop = threading.Event()
    seen: list[int] = []
    outcomes: list[Exception] = [StoreUnreachable("refused"), StoreUnreachable("timed out")]

    def attempt() -> None:
        if outcomes:
            raise outcomes.pop(0)

    assert retry_until_reached(attempt, stop, lambda n, e: seen.append(n), max_wait_s=0.05)
    assert seen == [1, 2]
    with pytest.raises(StoreError, match="login"):
        retry_until_reached(lambda: (_ for _ in ()).throw(StoreError("login")), stop, lambda n, e: None)

    def never() -> None:
        raise StoreUnreachable("refused")

    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    assert not retry_until_reached(never, stop, lambda n, e: None, max_wait_s=60)
    assert time.monotonic() - t0 < 5  # the stop ended the wait, not the 60 s


def test_a_stop_does_not_wait_out_an_attempt_that_hangs() -> None:
    """A reviewer's case: a server that accepts and never answers held SIGTERM for 30 s (past Docker's 10 s)."""
    hang = threading.Event()

    class NoStore:
        backend, database = "server", "t"

    bring_up = StoreBringUp(NoStore(), hang.wait, on_fatal=lambda: None)  # type: ignore[arg-type]
    bring_up.start(lambda: None)
    time.sleep(0.1)
    t0 = time.monotonic()
    bring_up.stop()
    assert time.monotonic() - t0 < STOP_WAIT_S + 1
    hang.set()
    _wait(lambda: not bring_up._thread.is_alive())
    assert not bring_up.started  # what the attempt found after the stop started nothing


def test_a_tls_handshake_cut_short_is_no_answer_and_tls_that_cannot_work_is_an_error() -> None:
    """A review's case: a TCP proxy with no server behind it (accepts, then closes) under an https URL stopped
    `tower serve` as a TLS error instead of being waited for. https to a plain-HTTP server stays an error."""
    import http.server
    import socket

    from tower_core.store import open_store

    closer = socket.socket()
    closer.bind(("127.0.0.1", 0))
    closer.listen()
    stop = threading.Event()

    def close_each() -> None:
        closer.settimeout(0.2)
        while not stop.is_set():
            try:
                closer.accept()[0].close()
            except TimeoutError:
                continue

    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=close_each, daemon=True).start()
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        for port, expected in ((closer.getsockname()[1], StoreUnreachable), (plain.server_address[1], StoreError)):
            store = open_store(Settings(clickhouse_url=f"https://127.0.0.1:{port}"), connect=False)
            with pytest.raises(StoreError) as raised:
                store.connect()
            assert type(raised.value) is expected, raised.value
    finally:
        stop.set()
        plain.shutdown()
        closer.close()
