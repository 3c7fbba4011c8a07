"""ClickHouse-side OTLP decoding (tower_core.store.otlp_sql) on both backends."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector.correlation import key_attribute_names
from tests.conftest import migrated
from tower_core.store import Store
from tower_core.store.otlp_sql import insert_otlp_spans, length_delimited, sync_key_attributes


def make_request() -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "stripe-billing"
    rs.resource.attributes.add(key="revops.system").value.string_value = "billing"
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = "billing.sdk", "2.1"
    sp = ss.spans.add(
        trace_id=bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
        span_id=bytes.fromhex("b7ad6b7169203331"),
        parent_span_id=bytes.fromhex("00f067aa0ba902b7"),
        name="finalize invoice",
        kind=3,
        start_time_unix_nano=1_767_225_600_123_456_789,
        end_time_unix_nano=1_767_225_600_223_456_789,
    )
    attrs = sp.attributes
    attrs.add(key="revops.invoice.id").value.string_value = "in_1"
    attrs.add(key="stripe.invoice_id").value.string_value = "in_alias"
    attrs.add(key="revops.payment.id").value.string_value = '["py_1","py_2"]'
    attrs.add(key="revops.region").value.string_value = "EU"
    attrs.add(key="revops.amount_minor").value.int_value = 123456789012
    attrs.add(key="ratio").value.double_value = 0.25
    attrs.add(key="flag").value.bool_value = True
    attrs.add(key="quote").value.string_value = "it's \\ \t"
    keys = attrs.add(key="revops.ledger.entry.id").value.array_value.values  # an SDK's list attribute
    keys.add().string_value, keys.add().string_value = "le_1", "le_2"
    attrs.add(key="tags").value.array_value.values.add().int_value = 7
    sp.status.code, sp.status.message = 2, "declined"
    ev = sp.events.add(time_unix_nano=1_767_225_600_200_000_000, name="retry")
    ev.attributes.add(key="attempt").value.int_value = 2
    link = sp.links.add(trace_id=bytes.fromhex("11" * 16), span_id=bytes.fromhex("22" * 8))
    link.attributes.add(key="batch").value.string_value = "b1"
    return req.SerializeToString()


def test_spans_and_links_rendered_like_the_exporter(store: Store) -> None:
    migrated(store)
    sync_key_attributes(store, key_attribute_names({"stripe.invoice_id": "revops.invoice.id"}))
    insert_otlp_spans(store, [make_request()], "t_1")
    insert_otlp_spans(store, [make_request()], "t_1")  # retried flush: same token, nothing twice
    rows = store.query_rows(
        "SELECT toUnixTimestamp64Nano(Timestamp) AS ts, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, "
        "ServiceName, ScopeName, ScopeVersion, SpanAttributes, Duration, StatusCode, StatusMessage, "
        "Events.Name AS en, Events.Attributes AS ea, Links.TraceId AS lt, Links.Attributes AS la "
        "FROM $db.otel_traces"
    )
    assert len(rows) == 1
    r = rows[0]
    assert r["ts"] == 1_767_225_600_123_456_789 and r["Duration"] == 100_000_000
    assert (r["TraceId"], r["SpanId"], r["ParentSpanId"]) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
        "00f067aa0ba902b7",
    )
    assert (r["SpanName"], r["SpanKind"], r["ServiceName"]) == ("finalize invoice", "Client", "stripe-billing")
    assert (r["ScopeName"], r["ScopeVersion"], r["StatusCode"], r["StatusMessage"]) == (
        "billing.sdk",
        "2.1",
        "Error",
        "declined",
    )
    attrs = dict(r["SpanAttributes"])
    assert attrs["revops.amount_minor"] == "123456789012" and attrs["ratio"] == "0.25"
    assert attrs["flag"] == "true" and attrs["quote"] == "it's \\ \t"
    assert attrs["revops.ledger.entry.id"] == '["le_1","le_2"]' and attrs["tags"] == '["7"]'
    assert r["en"] == ["retry"] and dict(r["ea"][0]) == {"attempt": "2"}
    assert r["lt"] == ["11" * 16] and dict(r["la"][0]) == {"batch": "b1"}
    links = store.query_rows(
        "SELECT KeyType AS t, KeyValue AS v, System AS s, any(Region) AS region FROM $db.business_key_links "
        "GROUP BY t, v, s ORDER BY t, v"
    )
    assert [(x["t"], x["v"]) for x in links] == [
        ("invoice", "in_1"),
        ("invoice", "in_alias"),
        ("ledger_entry", "le_1"),
        ("ledger_entry", "le_2"),
        ("payment", "py_1"),
        ("payment", "py_2"),
        ("trace", "11" * 16),
    ]
    assert {x["s"] for x in links} == {"billing"} and {x["region"] for x in links} == {"EU"}


def test_length_delimited_framing() -> None:
    framed = length_delimited([b"a" * 300, b"bc"])
    assert framed[:2] == bytes([0xAC, 0x02]) and framed[302:] == b"\x02bc"


def test_key_attribute_names_follow_the_settings(store: Store) -> None:
    migrated(store)
    sync_key_attributes(store, key_attribute_names({"stripe.invoice_id": "revops.invoice.id"}))
    sync_key_attributes(store, key_attribute_names())  # the mapping was removed from the settings
    insert_otlp_spans(store, [make_request()], "t_2")
    keys = store.query_rows("SELECT DISTINCT KeyValue AS v FROM $db.business_key_links WHERE KeyType = 'invoice'")
    assert [k["v"] for k in keys] == ["in_1"]


def test_enum_values_the_specification_does_not_define_render_empty(store: Store) -> None:
    """kind -2 was stored as Consumer and status -2 as Error (ClickHouse counts negative indexes from the end)."""
    migrated(store)
    req = ExportTraceServiceRequest()
    spans = req.resource_spans.add().scope_spans.add().spans
    for i, (kind, code) in enumerate([(-2, -2), (9, 7), (2, 2), (0, 0)]):
        sp = spans.add(trace_id=bytes([i + 1]) * 16, span_id=bytes([i + 1]) * 8, name=f"s{i}", kind=kind)
        sp.start_time_unix_nano, sp.end_time_unix_nano = 1_767_225_600_000_000_000, 1_767_225_600_100_000_000
        sp.status.code = code
    insert_otlp_spans(store, [req.SerializeToString()], "t_enum")
    rows = store.query_rows("SELECT SpanName AS n, SpanKind AS k, StatusCode AS c FROM $db.otel_traces ORDER BY n")
    assert [(r["k"], r["c"]) for r in rows] == [("", ""), ("", ""), ("Server", "Error"), ("Unspecified", "Unset")]


def test_zero_values_are_values_not_absence(store: Store) -> None:
    """int 0, false, 0.0 and "" are set on the wire (proto3 oneof): they were stored as empty strings, so a
    zero-amount invoice lost its amount; bytes after them must not read as "false"."""
    migrated(store)
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="replicas").value.int_value = 0
    sp = rs.scope_spans.add().spans.add(trace_id=b"\x05" * 16, span_id=b"\x05" * 8, name="zero")
    sp.start_time_unix_nano, sp.end_time_unix_nano = 1_767_225_600_000_000_000, 1_767_225_600_100_000_000
    a = sp.attributes
    a.add(key="revops.amount_minor").value.int_value = 0
    a.add(key="paid").value.bool_value = False
    a.add(key="ok").value.bool_value = True
    a.add(key="ratio").value.double_value = 0.0
    a.add(key="note").value.string_value = ""
    a.add(key="raw").value.bytes_value = b"\x00\x01"
    a.add(key="unset")  # an AnyValue with no member set
    arr = a.add(key="flags").value.array_value.values
    arr.add().int_value, arr.add().bool_value = 0, False
    insert_otlp_spans(store, [req.SerializeToString()], "t_zero")
    [row] = store.query_rows("SELECT SpanAttributes AS a, ResourceAttributes AS r FROM $db.otel_traces")
    assert dict(row["a"]) == {
        "revops.amount_minor": "0",
        "paid": "false",
        "ok": "true",
        "ratio": "0",
        "note": "",
        "raw": "AAE=",
        "unset": "",
        "flags": '["0","false"]',
    }
    assert dict(row["r"]) == {"replicas": "0"}


def postings(invoice_ids: tuple[str, ...], first_id: int) -> bytes:
    """One ERP posting span per invoice id value, each its own trace."""
    req = ExportTraceServiceRequest()
    spans = req.resource_spans.add().scope_spans.add().spans
    for i, value in enumerate(invoice_ids):
        sp = spans.add(trace_id=bytes([first_id + i]) * 16, span_id=bytes([first_id + i]) * 8, name="post")
        sp.start_time_unix_nano, sp.end_time_unix_nano = 1_767_225_600_000_000_000, 1_767_225_600_100_000_000
        sp.attributes.add(key="revops.invoice.id").value.string_value = value
        sp.attributes.add(key="revops.step").value.string_value = "invoice_to_ledger"
        sp.attributes.add(key="revops.system").value.string_value = "erp"
    return req.SerializeToString()


def test_span_key_values_are_read_as_events_read_them(store: Store) -> None:
    """'[EU]-INV-7' is an id, not an empty JSON list; a 200-character Cyrillic id (400 bytes) is within the
    256-character limit. Both were never indexed from spans while events carrying them were (migration 0018)."""
    from collector.correlation import extract_keys

    migrated(store)
    names = key_attribute_names({})
    sync_key_attributes(store, names)
    odd, long = "[EU]-INV-7", "и" * 200
    insert_otlp_spans(store, [postings((odd, long, '["in_a","in_b"]'), first_id=0x30)], "t_keys")
    linked = {r["v"] for r in store.query_rows("SELECT KeyValue AS v FROM $db.business_key_links")}
    active = {r["v"] for r in store.query_rows("SELECT KeyValue AS v FROM $db.step_activity")}
    expected = {odd, long, "in_a", "in_b"}
    assert linked == expected and active == expected
    python_side = {
        v for raw in (odd, long, '["in_a","in_b"]') for _, v in extract_keys({"revops.invoice.id": raw}, names)
    }
    assert python_side == expected


def test_migration_0018_reads_again_the_spans_stored_before_it_and_can_run_twice(store: Store) -> None:
    from tower_core.store.migrate import available

    for m in available():
        if m.version < 18:
            for statement in m.statements():
                store.command(statement)
    names = key_attribute_names({})
    sync_key_attributes(store, names)
    odd, long = "[EU]-INV-7", "и" * 200
    insert_otlp_spans(store, [postings((odd, long, "in_plain"), first_id=0x40)], "t_before_0018")

    def links() -> list[tuple[str, str]]:
        rows = store.query_rows("SELECT KeyValue AS v, TraceId AS t FROM $db.business_key_links FINAL ORDER BY v")
        return [(r["v"], r["t"]) for r in rows]

    assert [v for v, _ in links()] == ["in_plain"]  # the old view: the list misread, the length in bytes
    (m18,) = [m for m in available() if m.version == 18]
    for _ in range(2):
        for statement in m18.statements():
            store.command(statement)
    assert sorted(v for v, _ in links()) == sorted([odd, long, "in_plain"])
    counts = store.query_rows("SELECT KeyValue AS v, count() AS n FROM $db.step_activity FINAL GROUP BY v")
    assert {r["v"]: r["n"] for r in counts} == {odd: 1, long: 1, "in_plain": 1}
