"""OTLP spans into ``otel_traces`` and ``business_key_links`` with ClickHouse doing the decoding.

The flusher hands over the write-ahead buffer's OTLP protobuf requests as-is (length-delimited); ClickHouse's
Protobuf input format parses them against the schema below, and one INSERT ... SELECT per table flattens
resource -> scope -> span and renders attributes the way the OpenTelemetry Collector's clickhouseexporter
does. No Python runs per span, which is what makes sustained ingest fast on two cores.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Collection, Mapping

from tower_core.store.base import Store, check_column, check_identifier

log = logging.getLogger("tower.store")

# The subset of opentelemetry-proto (trace/v1, common/v1, resource/v1) the tower stores. Field numbers are the
# specification's; unknown fields (dropped counts, values nested deeper than below) are skipped by the reader.
# ClickHouse's schema cannot recurse, so a value is read one level deep: an array's or a map's (kvlist's)
# scalars, rendered as JSON text as the OpenTelemetry Collector's clickhouseexporter stores them. An array or a
# map inside one renders as an empty member: reading a second level cost ~15% of the insert rate (in-process,
# realistic spans: 48k spans/s without maps, 46k with this one level, 39k with two).
OTLP_PROTO = " ".join(
    """
syntax = "proto3";
message ScalarValue { string string_value = 1; bool bool_value = 2; int64 int_value = 3; double double_value = 4;
  bytes bytes_value = 7; }
message ArrayValue { repeated ScalarValue values = 1; }
message ScalarKeyValue { string key = 1; ScalarValue value = 2; }
message KeyValueList { repeated ScalarKeyValue values = 1; }
message AnyValue { string string_value = 1; bool bool_value = 2; int64 int_value = 3; double double_value = 4;
  ArrayValue array_value = 5; KeyValueList kvlist_value = 6; bytes bytes_value = 7; }
message KeyValue { string key = 1; AnyValue value = 2; }
message Resource { repeated KeyValue attributes = 1; }
message InstrumentationScope { string name = 1; string version = 2; }
message Status { string message = 2; int32 code = 3; }
message Event { fixed64 time_unix_nano = 1; string name = 2; repeated KeyValue attributes = 3; }
message Link { bytes trace_id = 1; bytes span_id = 2; string trace_state = 3; repeated KeyValue attributes = 4; }
message Span { bytes trace_id = 1; bytes span_id = 2; string trace_state = 3; bytes parent_span_id = 4;
  string name = 5; int32 kind = 6; fixed64 start_time_unix_nano = 7; fixed64 end_time_unix_nano = 8;
  repeated KeyValue attributes = 9; repeated Event events = 11; repeated Link links = 13; Status status = 15; }
message ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2; }
message ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2; }
message ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1; }
""".split()
)

# Nullable: a field absent on the wire reads as NULL, so the oneof member that was set is known (an int 0, a false,
# a 0.0 or an empty string are values, not absence)
_SCALAR = (
    "string_value Nullable(String), bool_value Nullable(Bool), int_value Nullable(Int64), "
    "double_value Nullable(Float64), bytes_value Nullable(String)"
)
_KV = (
    f"Array(Tuple(key String, value Tuple({_SCALAR}, array_value Tuple(values Array(Tuple({_SCALAR}))), "
    f"kvlist_value Tuple(values Array(Tuple(key String, value Tuple({_SCALAR})))))))"
)
STRUCTURE = (
    f"resource_spans Array(Tuple(resource Tuple(attributes {_KV}), scope_spans Array(Tuple(scope Tuple("
    f"name String, version String), spans Array(Tuple(trace_id String, span_id String, trace_state String, "
    f"parent_span_id String, name String, kind Int32, start_time_unix_nano UInt64, end_time_unix_nano UInt64, "
    f"attributes {_KV}, events Array(Tuple(time_unix_nano UInt64, name String, attributes {_KV})), "
    f"links Array(Tuple(trace_id String, span_id String, trace_state String, attributes {_KV})), "
    f"status Tuple(message String, code Int32)))))))"
)

# AnyValue -> text as the clickhouseexporter renders scalars: the member that is set, zero values included.


def _scalar(v: str) -> str:
    return (
        f"ifNull(coalesce({v}.string_value, toString({v}.int_value), toString({v}.double_value), "
        f"if(isNull({v}.bool_value), NULL, if({v}.bool_value, 'true', 'false')), base64Encode({v}.bytes_value)), '')"
    )


def _json_scalar(v: str) -> str:
    """A scalar as a JSON value: numbers and booleans bare, text and bytes (base64) quoted, absent null."""
    return (
        f"multiIf(isNotNull({v}.string_value), toJSONString({v}.string_value), isNotNull({v}.int_value), "
        f"toString({v}.int_value), isNotNull({v}.double_value), toJSONString({v}.double_value), "
        f"isNotNull({v}.bool_value), if({v}.bool_value, 'true', 'false'), isNotNull({v}.bytes_value), "
        f"toJSONString(base64Encode({v}.bytes_value)), 'null')"
    )


def _json_map(values: str, var: str, item: str) -> str:
    pair = f"concat(toJSONString({var}.key), ':', {item})"
    return f"concat('{{', arrayStringConcat(arrayMap({var} -> {pair}, {values}), ','), '}}')"


# an array value renders as a JSON array of its scalars' texts (["in_1","in_2"]), as the key rules expect; a map
# (kvlist) as a JSON object of its scalars ({"k":"v","n":3})
_VALUE = (
    "multiIf(notEmpty(kv.value.array_value.values), "
    f"toJSONString(arrayMap(x -> {_scalar('x')}, kv.value.array_value.values)), "
    "notEmpty(kv.value.kvlist_value.values), "
    f"{_json_map('kv.value.kvlist_value.values', 'm', _json_scalar('m.value'))}, "
    f"{_scalar('kv.value')})"
)


def _attrs(expr: str) -> str:
    return (
        f"CAST((arrayMap(kv -> kv.key, {expr}), arrayMap(kv -> {_VALUE}, {expr})), "
        "'Map(LowCardinality(String), String)')"
    )


_SETTINGS = (
    "SETTINGS insert_deduplication_token = '$token', max_threads = 1, max_insert_threads = 1, "
    "format_schema_source = 'string', format_schema_message_name = 'ExportTraceServiceRequest', "
    f"format_schema = '{OTLP_PROTO}'"
)
_FROM = (
    f"FROM input('{STRUCTURE}') ARRAY JOIN resource_spans AS rs ARRAY JOIN rs.scope_spans AS ss "
    "ARRAY JOIN ss.spans AS sp"
)

INSERT_SPANS = (
    "INSERT INTO $db.otel_traces " + _SETTINGS + " SELECT "
    "fromUnixTimestamp64Nano(toInt64(sp.start_time_unix_nano)) AS Timestamp, "
    "lower(hex(sp.trace_id)) AS TraceId, lower(hex(sp.span_id)) AS SpanId, "
    "lower(hex(sp.parent_span_id)) AS ParentSpanId, sp.trace_state AS TraceState, sp.name AS SpanName, "
    # an enum value the specification does not define renders as '' (a negative index counts from the end)
    "if(sp.kind BETWEEN 0 AND 5, ['Unspecified', 'Internal', 'Server', 'Client', 'Producer', 'Consumer'][sp.kind + 1], "
    "'') AS SpanKind, "
    "ResourceAttributes['service.name'] AS ServiceName, "
    + _attrs("rs.resource.attributes")
    + " AS ResourceAttributes, "
    "ss.scope.name AS ScopeName, ss.scope.version AS ScopeVersion, " + _attrs("sp.attributes") + " AS SpanAttributes, "
    "if(sp.end_time_unix_nano > sp.start_time_unix_nano, sp.end_time_unix_nano - sp.start_time_unix_nano, 0) "
    "AS Duration, if(sp.status.code BETWEEN 0 AND 2, ['Unset', 'Ok', 'Error'][sp.status.code + 1], '') AS StatusCode, "
    "sp.status.message AS StatusMessage, "
    "arrayMap(e -> fromUnixTimestamp64Nano(toInt64(e.time_unix_nano)), sp.events) AS `Events.Timestamp`, "
    "arrayMap(e -> e.name, sp.events) AS `Events.Name`, "
    "arrayMap(e -> " + _attrs("e.attributes") + ", sp.events) AS `Events.Attributes`, "
    "arrayMap(l -> lower(hex(l.trace_id)), sp.links) AS `Links.TraceId`, "
    "arrayMap(l -> lower(hex(l.span_id)), sp.links) AS `Links.SpanId`, "
    "arrayMap(l -> l.trace_state, sp.links) AS `Links.TraceState`, "
    "arrayMap(l -> " + _attrs("l.attributes") + ", sp.links) AS `Links.Attributes` " + _FROM
)


def length_delimited(messages: list[bytes]) -> bytes:
    """Protobuf's length-delimited framing (varint length before each message), as the reader expects."""
    out = bytearray()
    for msg in messages:
        n = len(msg)
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        out += msg
    return bytes(out)


def insert_otlp_spans(store: Store, requests: list[bytes], token: str) -> None:
    """Insert the spans of serialized ExportTraceServiceRequests; the materialized view of migration 0008
    derives their business-key links."""
    check_identifier(token)
    store.insert_select(INSERT_SPANS.replace("$token", f"{token}_spans"), length_delimited(requests), "Protobuf")


def sync_key_attributes(store: Store, key_names: Mapping[str, str]) -> None:
    """Make key_attribute_names equal ``key_names`` (attribute -> key type) without a moment of emptiness."""
    version = time.time_ns()
    current = {
        r["AttrName"]: r["KeyType"]
        for r in store.query_rows("SELECT AttrName, KeyType FROM $db.key_attribute_names FINAL WHERE NOT IsDeleted")
    }
    if current == dict(key_names):
        return
    names = sorted(set(key_names) | set(current))
    store.command(
        "INSERT INTO $db.key_attribute_names (AttrName, KeyType, Version, IsDeleted) "
        "SELECT n.1, n.2, {v:UInt64}, n.3 FROM (SELECT arrayJoin({rows:Array(Tuple(String, String, UInt8))}) AS n)",
        {"v": version, "rows": [(n, key_names.get(n, current.get(n, "")), int(n not in key_names)) for n in names]},
    )


# --- the views' rows of spans already stored (a replay's repair) ----------------------------------------------
# A kill -9 can land the spans' part and lose a view's part of the same insert (each target table commits its own
# part). The targets are idempotent aggregates (min / max / anyLast), so a replay runs each view's own query,
# read from the live definition, over the spans already stored and inserts the result again: nothing doubles,
# and no second copy of a view's SQL can drift from the migrations.
_SPAN_VIEWS = """
SELECT name, as_select AS query, create_table_query AS ddl FROM system.tables
WHERE database = {db:String} AND engine = 'MaterializedView' AND name IN (
    SELECT arrayJoin(arrayFilter((t, d) -> d = {db:String}, dependencies_table, dependencies_database))
    FROM system.tables WHERE database = {db:String} AND name = 'otel_traces')
ORDER BY name
"""
_STORED_SPANS = (
    "(SELECT * FROM $db.otel_traces WHERE toDate(Timestamp) BETWEEN {d0:Date} AND {d1:Date} "
    "AND (TraceId, SpanId) IN {keys:Array(Tuple(String, String))}) AS otel_traces"
)


def rederive_span_views(
    store: Store, keys: Collection[tuple[str, str]], first_day: dt.date, last_day: dt.date
) -> list[str]:
    """Run every view of otel_traces again over these stored spans (TraceId, SpanId); the days (UTC, widened by
    one each way like the replay's check) bound the partitions read. Returns the views re-run; a view whose
    definition does not read otel_traces in the one way this expects is left out, with a warning."""
    if not keys:
        return []
    db = check_identifier(store.database)
    source = re.compile(rf"\bFROM {re.escape(db)}\.otel_traces\b")
    params = {
        "d0": first_day - dt.timedelta(days=1),
        "d1": last_day + dt.timedelta(days=1),
        "keys": sorted(keys),
    }
    done = []
    for view in store.query_rows(_SPAN_VIEWS, {"db": db}):
        target = re.search(rf"\bTO\s+{re.escape(db)}\.(\w+)\s*\(", view["ddl"])
        query, found = source.subn(lambda _: "FROM " + _STORED_SPANS, view["query"])
        if target is None or found != 1:
            log.warning(
                "view %s: its rows of replayed spans cannot be derived again (unexpected definition)", view["name"]
            )
            continue
        cols = ", ".join(
            f"`{check_column(r['name'])}`"
            for r in store.query_rows(
                "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} ORDER BY position",
                {"db": db, "t": view["name"]},
            )
        )
        table = check_identifier(target.group(1))
        # the query is the store's own view definition, the names are checked; every value is a bound parameter
        sql = f"INSERT INTO $db.`{table}` ({cols}) SELECT {cols} FROM ({query}) SETTINGS insert_deduplicate = 0"  # noqa: S608
        store.command(sql, params)
        done.append(view["name"])
    return done
