"""Records the store refuses for good: the pure blame rule, and the flusher setting them aside on real chDB
while everything else of the segment lands and the buffer moves on."""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from collector.correlation import key_attribute_names
from collector.dead_letter import DeadLetterBox, blame, data_error
from collector.flusher import Flusher
from collector.metrics import CollectorMetrics
from collector.wal import KIND_EVENTS, KIND_SPANS, WriteAheadBuffer
from tests.test_wal import request
from tower_core.errors import StoreError
from tower_core.store import Store, migrate
from tower_core.store.otlp_sql import sync_key_attributes

PARSE = StoreError("Code: 444. DB::Exception: Protobuf messages are corrupted or don't match the provided schema")
DOWN = StoreError("Code: 210. DB::NetException: Connection refused (127.0.0.1:9000)")


def test_a_record_is_blamed_only_when_the_evidence_points_at_it() -> None:
    assert data_error(PARSE) and data_error(ValueError("a conversion bug")) and not data_error(DOWN)
    assert blame([None, DOWN, None]) == [1]  # the store took the others: the refused one is bad
    assert blame([PARSE, PARSE]) == [0, 1]  # nothing written, but every error is about the data
    assert blame([DOWN, DOWN]) is None  # the store refuses everything: retry, blame nobody
    assert blame([PARSE, DOWN]) is None
    assert blame([None, None]) == []


def _ld(tag: int, body: bytes) -> bytes:
    return bytes([tag, len(body)]) + body


# An OTLP request Python's protobuf parser accepts (the span's name, field 5, sent as a varint is kept as an
# unknown field) and ClickHouse's Protobuf reader refuses: acknowledged with 200, never storable.
UNSTORABLE_SPANS = _ld(0x0A, _ld(0x12, _ld(0x12, _ld(0x0A, b"\x07" * 16) + _ld(0x12, b"\x08" * 8) + b"\x28\x01")))


def test_the_flusher_sets_aside_what_the_store_refuses_and_drains_the_rest(
    tmp_path: Path, embedded_store: Store
) -> None:
    migrate(embedded_store)
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
