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


def spans(first: int, start_ns: int, trace: int | None = None) -> bytes:
    """Four spans of invoices in_<first>..., each its own trace (or all of ``trace``)."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "billing"
    ss = rs.scope_spans.add()
    for i in range(first, first + 4):
        sp = ss.spans.add(
            trace_id=(trace or i + 1).to_bytes(16, "big"),
            span_id=(i + 1).to_bytes(8, "big"),
            name="invoice.finalize",
            start_time_unix_nano=start_ns,
            end_time_unix_nano=start_ns + 1000,
        )
        sp.attributes.add(key="revops.invoice.id").value.string_value = f"in_{i if trace is None else first}"
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
    assert apply_telemetry_retention(embedded_store, None) == []  # unset: left as it is
    assert all("+ toIntervalDay(30)" in e for e in engines(embedded_store).values())
    assert sorted(apply_telemetry_retention(embedded_store, 90)) == sorted(TTL_FROM)
    assert sorted(apply_telemetry_retention(embedded_store, 0)) == sorted(TTL_FROM)  # 0: kept for good again
    assert not any(" TTL " in e for e in engines(embedded_store).values())
    assert apply_telemetry_retention(embedded_store, 0) == []


def test_a_span_stamped_far_in_the_future_expires_nothing_it_shares_a_trace_with(
    embedded_store: Store,
) -> None:
    """A review's case: a span of 2150 (a bad clock) wrapped the TTL's DateTime to 2013, and the trace index and
    key links of the real spans of its trace went at once (and an event time before 1970 wrapped to 2105)."""
    migrate(embedded_store)
    sync_key_attributes(embedded_store, key_attribute_names())
    now = time.time_ns()
    far_future = 5_680_281_600 * 10**9  # 2150-01-01
    insert_otlp_spans(embedded_store, [spans(0, now - 3600 * 10**9, trace=77)], "real")
    insert_otlp_spans(embedded_store, [spans(4, far_future, trace=77)], "future")
    insert_otlp_spans(embedded_store, [spans(8, 0, trace=88)], "epoch")  # no clock at all
    apply_telemetry_retention(embedded_store, 30)
    for table in TTL_FROM:
        embedded_store.command(f"OPTIMIZE TABLE $db.`{table}` FINAL")
    left = embedded_store.query_rows("SELECT KeyValue AS k, count() AS n FROM $db.business_key_links FINAL GROUP BY k")
    assert {r["k"] for r in left} == {"in_0", "in_4"}  # the epoch's expired, the real trace's stayed
    index = embedded_store.query_rows("SELECT count() AS n FROM $db.otel_traces_trace_id_ts FINAL")[0]["n"]
    assert index == 1


def test_unset_leaves_an_operators_own_ttl_and_a_setting_replaces_it(embedded_store: Store) -> None:
    """A review's case: the default removed, at every start, a TTL the operator had set."""
    migrate(embedded_store)
    embedded_store.command("ALTER TABLE $db.otel_traces MODIFY TTL toDateTime(Timestamp) + INTERVAL 90 DAY")
    assert apply_telemetry_retention(embedded_store, None) == []
    assert "toIntervalDay(90)" in engines(embedded_store)["otel_traces"]
    assert "otel_traces" in apply_telemetry_retention(embedded_store, 40)
    assert "toIntervalDay(90)" not in engines(embedded_store)["otel_traces"]


def test_the_retention_must_cover_what_the_sla_evaluation_reads_back(tmp_path: Path) -> None:
    # the shipped objectives' 30-day period, their longest threshold (under a day) and a day of margin
    assert days_read_back(load_definitions()) == 32
    line = one_error_line(run(["serve", "--port", "1"], tmp_path, TOWER_TELEMETRY_RETENTION_DAYS="31"))
    assert "TOWER_TELEMETRY_RETENTION_DAYS=31 is shorter than the 32 days" in line
