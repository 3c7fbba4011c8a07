"""Records the store refuses for good: the pure blame rule, and the flusher setting them aside on real chDB
while everything else of the segment lands and the buffer moves on."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from fastapi.testclient import TestClient

from collector.app import create_app
from collector.auth import create_token
from collector.correlation import key_attribute_names
from collector.dead_letter import DeadLetterBox, blame, data_error
from collector.flusher import Flusher
from collector.metrics import CollectorMetrics
from collector.wal import KIND_EVENTS, KIND_SPANS, Record, WriteAheadBuffer
from tests.conftest import migrated
from tests.server import TowerServer
from tests.test_api_roles import tower
from tests.test_wal import request
from tower_core.errors import StoreError
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store.otlp_sql import sync_key_attributes

PARSE = StoreError("Code: 444. DB::Exception: Protobuf messages are corrupted or don't match the provided schema")
DOWN = StoreError("Code: 210. DB::NetException: Connection refused (127.0.0.1:9000)")
BUSY = StoreError("Code: 252. DB::Exception: Too many parts (300) in table otel_traces. (TOO_MANY_PARTS)")
HUGE = StoreError("Code: 241. DB::Exception: Memory limit (for query) exceeded")


def test_a_record_is_blamed_only_when_the_evidence_points_at_it() -> None:
    assert data_error(PARSE) and data_error(ValueError("a conversion bug")) and not data_error(DOWN)
    assert blame([None, HUGE, None]) == [1]  # the store took the others: the refused one is bad
    assert blame([None, DOWN, None]) is None  # ... unless it said it is unreachable or busy: nobody to blame yet
    assert blame([None, BUSY, PARSE]) is None
    assert blame([PARSE, PARSE]) == [0, 1]  # nothing written, but every error is about the data
    assert blame([DOWN, DOWN]) is None  # the store refuses everything: retry, blame nobody
    assert blame([PARSE, DOWN]) is None
    assert blame([None, None]) == []


def _ld(tag: int, body: bytes) -> bytes:
    return bytes([tag, len(body)]) + body


# An OTLP request Python's protobuf parser accepts (the span's name, field 5, sent as a varint is kept as an
# unknown field) and ClickHouse's Protobuf reader refuses. The receiver now drops such fields before buffering
# (tests/test_collector_http.py), so only a buffer written by an earlier version still holds one: the tests below
# put it there.
UNSTORABLE_SPANS = _ld(0x0A, _ld(0x12, _ld(0x12, _ld(0x0A, b"\x07" * 16) + _ld(0x12, b"\x08" * 8) + b"\x28\x01")))


def test_the_flusher_sets_aside_what_the_store_refuses_and_drains_the_rest(
    tmp_path: Path, embedded_store: Store
) -> None:
    migrated(embedded_store)
    names = key_attribute_names()
    sync_key_attributes(embedded_store, names)
    wal = WriteAheadBuffer(tmp_path, max_bytes=50_000_000)
    event = {"specversion": "1.0", "id": "e1", "source": "s", "type": "t", "time_ns": 1_767_225_600_000_000_000}
    broken_events = orjson.dumps({"received_ns": 1, "events": [event]})  # not a BusinessEvent: cannot convert
    wal.append(KIND_SPANS, 100, request(100, seed=0))
    wal.append(KIND_SPANS, 1, UNSTORABLE_SPANS)
    wal.append(KIND_EVENTS, 1, broken_events)
    wal.append(KIND_SPANS, 100, request(100, seed=1))
    wal.seal()
    wal.append(KIND_SPANS, 50, request(50, seed=2))  # a later segment: must not wait behind the bad records
    wal.seal()
    first = wal.sealed()[0]
    metrics = CollectorMetrics()
    # flushed (the good records land, the bad ones are set aside), then the process dies before removing it
    Flusher(wal, embedded_store, names, metrics, flush_rows=5000, flush_interval_s=1).flush_segment(first)
    recovered = WriteAheadBuffer(tmp_path, max_bytes=50_000_000)  # the restart replays both segments
    Flusher(recovered, embedded_store, names, metrics, flush_rows=5000, flush_interval_s=1).drain()
    assert recovered.sealed() == []
    counts = embedded_store.query_rows("SELECT count() AS n, uniqExact(TraceId, SpanId) AS u FROM $db.otel_traces")
    assert counts[0] == {"n": 250, "u": 250}  # every good span once, the later segment included
    box = DeadLetterBox(tmp_path / "dead-letter")
    assert box.names() == [f"{first.id}_c0_r1", f"{first.id}_c0_r2"]  # set aside twice, kept once
    assert (tmp_path / "dead-letter" / f"{first.id}_c0_r1.otlp.pb").read_bytes() == UNSTORABLE_SPANS
    assert (tmp_path / "dead-letter" / f"{first.id}_c0_r2.events.json").read_bytes() == broken_events
    why = json.loads((tmp_path / "dead-letter" / f"{first.id}_c0_r1.error.json").read_text())
    assert why["kind"] == "spans" and why["rows"] == 1 and "Code: 444" in why["error"]
    assert metrics.dead_letters._value.get() == 4  # two records, each set aside by both attempts


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_operators_list_download_and_requeue_dead_letters_through_the_api(
    tmp_path: Path, embedded_store: Store
) -> None:
    migrated(embedded_store)
    settings = Settings(
        database=embedded_store.database,
        wal_dir=tmp_path / "wal",
        admin_token="dl-admin",
        sla_eval_interval_s=0,
        reconcile_scheduler=False,
        flush_interval_s=0.1,
    )
    with TestClient(create_app(settings, embedded_store), client=("127.0.0.1", 50000)) as c:  # a loopback peer
        _, viewer = create_token(embedded_store, "vera", "viewer")
        _, operator = create_token(embedded_store, "otto", "operator")
        as_op = {"Authorization": f"Bearer {operator}"}
        url = "/api/ingest/dead-letters"
        # in the buffer (as an earlier version acknowledged it), then refused by the store: the flusher sets it aside
        c.app.state.ingest.wal.append(KIND_SPANS, 1, UNSTORABLE_SPANS)
        c.app.state.ingest.flusher.notify()

        def listed() -> list[dict[str, Any]]:
            r = c.get(url, headers=as_op)
            assert r.status_code == 200, r.text
            return r.json()["items"]

        _wait(lambda: len(listed()) == 1, "the refused request in the box")
        [letter] = listed()
        assert letter["kind"] == "spans" and letter["rows"] == 1 and "Code: 444" in letter["error"]
        assert c.get(url, headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
        assert c.get(url).status_code == 401
        got = c.get(f"{url}/{letter['name']}/payload", headers=as_op)
        assert got.status_code == 200 and got.content == UNSTORABLE_SPANS
        assert got.headers["content-type"] == "application/x-protobuf"
        for name in ("..", "nope", "x.error"):  # nothing outside the box's own names is served
            assert c.get(f"{url}/{name}/payload", headers=as_op).status_code == 404
            assert c.post(f"{url}/{name}/requeue", headers=as_op).status_code == 404
        assert c.get(f"{url}/a%2F..%2Fb/payload", headers=as_op).status_code in (404, 422)

        # requeued while the store still refuses it: set aside again under a new name, never lost
        r = c.post(f"{url}/{letter['name']}/requeue", headers=as_op)
        assert r.status_code == 200 and r.json()["requeued"] and r.json()["rows"] == 1
        assert c.post(f"{url}/{letter['name']}/requeue", headers=as_op).status_code == 404  # done once
        _wait(lambda: [x["name"] for x in listed()] not in ([], [letter["name"]]), "the record set aside again")
        [again] = listed()
        assert again["name"] != letter["name"] and again["kind"] == "spans"

        # once the cause is gone (here: a record the store takes, set aside as if by an older version), a
        # requeue lands it in the store and empties the box
        box = c.app.state.ingest.dead_letters
        box.remove(again["name"])
        box.put("fixed_c0_r0", Record(KIND_SPANS, 30, request(30, seed=9)), ValueError("a conversion bug, fixed"))
        assert c.post(f"{url}/fixed_c0_r0/requeue", headers=as_op).status_code == 200
        spans = "SELECT count() AS n FROM $db.otel_traces"
        _wait(lambda: embedded_store.query_rows(spans)[0]["n"] == 30, "the requeued spans in the store")
        assert listed() == []
        trail = embedded_store.query_rows(
            "SELECT Actor, ObjectId FROM $db.audit_log WHERE Action = 'ingest.requeue' ORDER BY EventTime"
        )
        assert trail == [{"Actor": "otto", "ObjectId": letter["name"]}, {"Actor": "otto", "ObjectId": "fixed_c0_r0"}]


def test_tower_ingest_cli_lists_and_requeues_through_a_running_api(tmp_path: Path) -> None:
    data = {"TOWER_DATA_DIR": str(tmp_path / "data"), "TOWER_WAL_DIR": str(tmp_path / "wal")}
    left = WriteAheadBuffer(tmp_path / "wal", max_bytes=1_000_000)  # what an earlier version buffered
    left.append(KIND_SPANS, 1, UNSTORABLE_SPANS)
    left.seal()
    left.close()  # the earlier process ended (it held the directory until then)
    with TowerServer(tmp_path, TOWER_ADMIN_TOKEN="dl-cli-admin") as srv:  # replays it at start
        online = {**data, "TOWER_API_URL": srv.url}
        refused = tower(online, "ingest", "dead-letters", cwd=tmp_path)  # no token: one clear line, exit 2
        assert refused.returncode == 2 and "TOWER_ADMIN_TOKEN" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        as_admin = {**online, "TOWER_ADMIN_TOKEN": "dl-cli-admin"}
        box = DeadLetterBox(tmp_path / "wal" / "dead-letter")
        _wait(lambda: len(box.names()) == 1, "the refused request in the box")
        [name] = box.names()
        listed = tower(as_admin, "ingest", "dead-letters", cwd=tmp_path)
        assert (
            listed.returncode == 0
            and name in listed.stdout
            and "1 record(s) set aside (through the API" in (listed.stdout)
        )
        missing = tower(as_admin, "ingest", "requeue", "nope", cwd=tmp_path)
        assert missing.returncode == 2 and "404" in missing.stderr and "nope" in missing.stderr
        done = tower(as_admin, "ingest", "requeue", name, cwd=tmp_path)
        assert done.returncode == 0 and f"requeued {name}: 1 spans" in done.stdout
        _wait(lambda: box.names() not in ([], [name]), "the record set aside again")
    offline = tower({**data, "TOWER_API_URL": "http://127.0.0.1:9"}, "ingest", "dead-letters", cwd=tmp_path)
    assert (
        offline.returncode == 0 and box.names()[0] in offline.stdout and "record(s) set aside (in " in (offline.stdout)
    )
    assert "dl-cli-admin" not in (tmp_path / "server.log").read_text()


class FlakyStore:
    """A fault-injecting wrapper around the real chDB store (named fake: ClickHouse cannot be made to answer
    TOO_MANY_PARTS or drop its connection on cue here): the span inserts whose call numbers are listed fail."""

    def __init__(self, store: Store, failures: dict[int, StoreError]) -> None:
        self.store, self.failures, self.calls, self.down = store, failures, 0, False

    def insert_select(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        error = self.failures.get(self.calls)
        self.down = error is DOWN
        if error is not None:
            raise error
        return self.store.insert_select(*args, **kwargs)

    def ping(self) -> bool:
        return not self.down and self.store.ping()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _segment_of(tmp_path: Path, store: Store, sizes: list[int]) -> WriteAheadBuffer:
    migrated(store)
    sync_key_attributes(store, key_attribute_names())
    wal = WriteAheadBuffer(tmp_path, max_bytes=50_000_000)
    for seed, n in enumerate(sizes):
        wal.append(KIND_SPANS, n, request(n, seed=seed))
    wal.seal()
    return wal


def _stored(store: Store) -> dict[str, int]:
    return store.query_rows("SELECT count() AS rows, uniqExact(TraceId, SpanId) AS spans FROM $db.otel_traces")[0]


def test_a_segment_retried_in_the_same_process_writes_each_span_once(
    tmp_path: Path, embedded_store: Store, monkeypatch: Any
) -> None:
    """Chunk 0 is refused once while the store answers (so its records are written one by one), then chunk 1
    meets an outage and the segment is retried: chunk 0 must not go in again under its own chunk token, and the
    flushed-rows metric counts each row once."""
    import functools

    from collector import flusher as flusher_module

    monkeypatch.setattr(flusher_module, "chunks", functools.partial(flusher_module.chunks, max_rows=30))
    wal = _segment_of(tmp_path, embedded_store, [10, 10, 10, 5])  # chunk 0: three records; chunk 1: one
    flaky = FlakyStore(embedded_store, {1: BUSY, 5: DOWN})  # 1: chunk 0; 2-4: its records; 5: chunk 1
    metrics = CollectorMetrics()
    Flusher(wal, flaky, key_attribute_names(), metrics, flush_rows=5000, flush_interval_s=1).drain()  # type: ignore[arg-type]
    assert wal.sealed() == [] and flaky.calls == 6
    assert _stored(embedded_store) == {"rows": 35, "spans": 35}
    assert metrics.rows_flushed.labels(table="otel_traces")._value.get() == 35


def test_the_flusher_says_how_long_its_writes_have_failed(tmp_path: Path, embedded_store: Store) -> None:
    """Readiness reads it: a store refusing every write (a full disk under it) left /readyz at 200 while every
    ingest request got 503."""
    wal = _segment_of(tmp_path, embedded_store, [10])
    flaky = FlakyStore(embedded_store, {1: DOWN, 2: DOWN})
    flusher = Flusher(wal, flaky, key_attribute_names(), CollectorMetrics(), flush_rows=5000, flush_interval_s=1)  # type: ignore[arg-type]
    assert flusher.failing_for_s() == 0
    flusher.drain(give_up=lambda: True)  # two attempts fail: the segment stays
    assert len(wal.sealed()) == 1 and flaky.calls == 2
    first = flusher.failing_for_s()
    time.sleep(0.2)
    assert 0 < first < flusher.failing_for_s()  # counted from the first failure on, not reset by a later one
    flusher.drain()  # the store writes again
    assert wal.sealed() == [] and flusher.failing_for_s() == 0 and _stored(embedded_store)["spans"] == 10


def test_a_flush_interval_the_flusher_cannot_wait_on_does_not_end_its_thread(
    tmp_path: Path, embedded_store: Store
) -> None:
    """Settings bound the interval now; a wait of 1e10 s raised OverflowError outside the flusher's guard and
    ended its thread, while ingest kept answering 200 and nothing reached the store."""
    wal = _segment_of(tmp_path, embedded_store, [10])
    flusher = Flusher(
        wal, embedded_store, key_attribute_names(), CollectorMetrics(), flush_rows=5000, flush_interval_s=1e10
    )
    flusher.start()
    deadline = time.monotonic() + 20
    while _stored(embedded_store)["spans"] < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    flusher.stop()
    assert _stored(embedded_store) == {"rows": 10, "spans": 10} and flusher.flush_interval_s == 1.0


class LandsThenRefuses(FlakyStore):
    """Named fake like FlakyStore: the listed span inserts land, then fail (a full disk under a view: the spans'
    part is written, a view's is not)."""

    def insert_select(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.store.insert_select(*args, **kwargs)
        if (error := self.failures.get(self.calls)) is not None:
            raise error


def test_spans_that_landed_in_a_failed_insert_are_counted_as_flushed(tmp_path: Path, embedded_store: Store) -> None:
    """After a full disk the store held every span and the buffer was empty, but the flushed-rows counter was
    short of them: the retry counted only the spans still to write, and the failed insert had counted none."""
    wal = _segment_of(tmp_path, embedded_store, [10, 10, 10])
    metrics = CollectorMetrics()
    Flusher(wal, LandsThenRefuses(embedded_store, {1: BUSY}), key_attribute_names(), metrics, flush_rows=5000,
            flush_interval_s=1).drain()  # type: ignore[arg-type]  # fmt: skip
    assert wal.sealed() == [] and _stored(embedded_store) == {"rows": 30, "spans": 30}
    assert metrics.rows_flushed.labels(table="otel_traces")._value.get() == 30


def test_a_busy_store_while_records_are_written_one_by_one_blames_no_record(
    tmp_path: Path, embedded_store: Store
) -> None:
    """The store says TOO_MANY_PARTS for the chunk, takes two of its records, then says it again: the store is
    busy, not the records. Nothing is set aside; the retry writes the other two, and nothing twice."""
    wal = _segment_of(tmp_path, embedded_store, [10, 10, 10, 10])
    flaky = FlakyStore(embedded_store, {1: BUSY, 4: BUSY, 5: BUSY})
    metrics = CollectorMetrics()
    Flusher(wal, flaky, key_attribute_names(), metrics, flush_rows=5000, flush_interval_s=1).drain()  # type: ignore[arg-type]
    assert wal.sealed() == []
    assert _stored(embedded_store) == {"rows": 40, "spans": 40}
    assert DeadLetterBox(tmp_path / "dead-letter").names() == [] and metrics.dead_letters._value.get() == 0
