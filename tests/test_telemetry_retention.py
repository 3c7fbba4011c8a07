"""TOWER_TELEMETRY_RETENTION_DAYS: spans and what is derived from them expire by their own time (a storage review:
they were kept for good, ~1.9 KB per invoice flow, with no setting and no word in the README)."""

from __future__ import annotations

import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector.correlation import key_attribute_names
from reconciler.sla.definitions import days_read_back, load_definitions
from tests.test_cli import one_error_line, run
from tower_core.store import Store, migrate
from tower_core.store.otlp_sql import insert_otlp_spans, sync_key_attributes
from tower_core.store.telemetry_retention import TTL_FROM, apply_telemetry_retention

DAY_NS = 86_400 * 10**9


def spans(first: int, start_ns: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "billing"
    ss = rs.scope_spans.add()
    for i in range(first, first + 4):
        sp = ss.spans.add(
            trace_id=(i + 1).to_bytes(16, "big"),
            span_id=(i + 1).to_bytes(8, "big"),
            name="invoice.finalize",
            start_time_unix_nano=start_ns,
            end_time_unix_nano=start_ns + 1000,
        )
        sp.attributes.add(key="revops.invoice.id").value.string_value = f"in_{i}"
    return req.SerializeToString()


def counts(store: Store) -> dict[str, int]:
    return {
        t: store.query_rows(f"SELECT count() AS n FROM $db.`{t}` {'' if t == 'otel_traces' else 'FINAL'}")[0]["n"]
        for t in ("otel_traces", "otel_traces_trace_id_ts", "business_key_links", "trace_key_links")
    }


def engines(store: Store) -> dict[str, str]:
    rows = store.query_rows(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String}", {"db": store.database}
    )
    return {r["name"]: r["engine_full"] for r in rows if r["name"] in TTL_FROM}


def test_rows_older_than_the_retention_go_and_newer_ones_stay(embedded_store: Store) -> None:
    migrate(embedded_store)
    sync_key_attributes(embedded_store, key_attribute_names())
    now = time.time_ns()
    insert_otlp_spans(embedded_store, [spans(0, now - 400 * DAY_NS)], "old")  # 400 days ago
    insert_otlp_spans(embedded_store, [spans(100, now - DAY_NS)], "new")  # yesterday
    assert counts(embedded_store) == dict.fromkeys(counts(embedded_store), 8)

    assert sorted(apply_telemetry_retention(embedded_store, 30)) == sorted(TTL_FROM)
    assert all("+ toIntervalDay(30)" in e for e in engines(embedded_store).values()), engines(embedded_store)
    for table in TTL_FROM:
        embedded_store.command(f"OPTIMIZE TABLE $db.`{table}` FINAL")
    assert counts(embedded_store) == dict.fromkeys(counts(embedded_store), 4)
    kept = embedded_store.query_rows("SELECT DISTINCT KeyValue AS k FROM $db.business_key_links ORDER BY k")
    assert [r["k"] for r in kept] == ["in_100", "in_101", "in_102", "in_103"]

    assert apply_telemetry_retention(embedded_store, 30) == []  # unchanged: nothing rewritten at the next start
    assert sorted(apply_telemetry_retention(embedded_store, 90)) == sorted(TTL_FROM)
    assert sorted(apply_telemetry_retention(embedded_store, 0)) == sorted(TTL_FROM)  # 0: kept for good again
    assert not any(" TTL " in e for e in engines(embedded_store).values())
    assert apply_telemetry_retention(embedded_store, 0) == []


def test_the_retention_must_cover_what_the_sla_evaluation_reads_back(tmp_path: Path) -> None:
    assert days_read_back(load_definitions()) == 30  # the shipped objectives' 30-day period
    line = one_error_line(run(["serve", "--port", "1"], tmp_path, TOWER_TELEMETRY_RETENTION_DAYS="7"))
    assert "TOWER_TELEMETRY_RETENTION_DAYS=7 is shorter than the 30 days" in line
