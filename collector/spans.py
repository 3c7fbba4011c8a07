"""OTLP spans -> ``otel_traces`` columns and business-key links. Pure: data in, Arrow tables out.

Value rendering follows the OpenTelemetry Collector's clickhouseexporter (strings as-is, other scalars as
text, arrays and maps as JSON) so that tools reading its schema see familiar values.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import pyarrow as pa
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector.correlation import extract_keys
from tower_core.store.arrow_schemas import BUSINESS_KEY_LINKS, OTEL_TRACES

SPAN_KINDS = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
STATUS_CODES = ("Unset", "Ok", "Error")


def _plain(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, kind) if kind else None


def any_value_text(value: Any) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return repr(value.double_value)
    if kind is None:
        return ""
    return orjson.dumps(_plain(value)).decode()


def attributes(kvs: Iterable[Any]) -> list[tuple[str, str]]:
    out = []
    for kv in kvs:
        v = kv.value
        s = v.string_value
        out.append((kv.key, s if s or v.WhichOneof("value") == "string_value" else any_value_text(v)))
    return out


def to_tables(requests: Iterable[ExportTraceServiceRequest], key_names: Mapping[str, str]) -> tuple[pa.Table, pa.Table]:
    """Spans of validated requests -> (otel_traces rows, business_key_links rows)."""
    cols: dict[str, list[Any]] = {name: [] for name in OTEL_TRACES.names}
    ts, tid, sid, psid, tstate, name, kind, svc, rattrs, sname, sver, sattrs, dur, scode, smsg = (
        cols[n]
        for n in (
            "Timestamp",
            "TraceId",
            "SpanId",
            "ParentSpanId",
            "TraceState",
            "SpanName",
            "SpanKind",
            "ServiceName",
            "ResourceAttributes",
            "ScopeName",
            "ScopeVersion",
            "SpanAttributes",
            "Duration",
            "StatusCode",
            "StatusMessage",
        )
    )
    ev_ts, ev_name, ev_attrs = cols["Events.Timestamp"], cols["Events.Name"], cols["Events.Attributes"]
    ln_tid, ln_sid, ln_state, ln_attrs = (
        cols["Links.TraceId"],
        cols["Links.SpanId"],
        cols["Links.TraceState"],
        cols["Links.Attributes"],
    )
    links: dict[tuple[str, str, str, str], list[Any]] = {}
    for req in requests:
        for rs in req.resource_spans:
            res = attributes(rs.resource.attributes)
            res_map = dict(res)
            service = res_map.get("service.name", "")
            for ss in rs.scope_spans:
                scope_name, scope_version = ss.scope.name, ss.scope.version
                for sp in ss.spans:
                    trace = sp.trace_id.hex()
                    start = sp.start_time_unix_nano
                    span_attrs = attributes(sp.attributes)
                    ts.append(start)
                    tid.append(trace)
                    sid.append(sp.span_id.hex())
                    psid.append(sp.parent_span_id.hex())
                    tstate.append(sp.trace_state)
                    name.append(sp.name)
                    kind.append(SPAN_KINDS[sp.kind] if 0 <= sp.kind < len(SPAN_KINDS) else "Unspecified")
                    svc.append(service)
                    rattrs.append(res)
                    sname.append(scope_name)
                    sver.append(scope_version)
                    sattrs.append(span_attrs)
                    end = sp.end_time_unix_nano
                    dur.append(end - start if end > start else 0)
                    code = sp.status.code
                    scode.append(STATUS_CODES[code] if 0 <= code < len(STATUS_CODES) else "Unset")
                    smsg.append(sp.status.message)
                    if sp.events:
                        ev_ts.append([e.time_unix_nano for e in sp.events])
                        ev_name.append([e.name for e in sp.events])
                        ev_attrs.append([attributes(e.attributes) for e in sp.events])
                    else:
                        ev_ts.append([])
                        ev_name.append([])
                        ev_attrs.append([])
                    attr_map = dict(span_attrs)
                    system = attr_map.get("revops.system") or res_map.get("revops.system", "")
                    region = attr_map.get("revops.region") or res_map.get("revops.region", "")
                    end_ts = max(start, end)
                    found = extract_keys(attr_map, key_names)
                    if sp.links:
                        ln_tid.append([ln.trace_id.hex() for ln in sp.links])
                        ln_sid.append([ln.span_id.hex() for ln in sp.links])
                        ln_state.append([ln.trace_state for ln in sp.links])
                        ln_attrs.append([attributes(ln.attributes) for ln in sp.links])
                        found += [("trace", ln.trace_id.hex()) for ln in sp.links if ln.trace_id != sp.trace_id]
                    else:
                        ln_tid.append([])
                        ln_sid.append([])
                        ln_state.append([])
                        ln_attrs.append([])
                    for key_type, value in found:
                        k = (key_type, value, trace, system)
                        cur = links.get(k)
                        if cur is None:
                            links[k] = [region, start, end_ts]
                        else:
                            cur[1] = min(cur[1], start)
                            cur[2] = max(cur[2], end_ts)
    spans = pa.Table.from_pydict(cols, schema=OTEL_TRACES)
    return spans, links_table(links)


def links_table(links: Mapping[tuple[str, str, str, str], list[Any]]) -> pa.Table:
    keys = list(links)
    vals = [links[k] for k in keys]
    return pa.Table.from_pydict(
        {
            "KeyType": [k[0] for k in keys],
            "KeyValue": [k[1] for k in keys],
            "TraceId": [k[2] for k in keys],
            "System": [k[3] for k in keys],
            "Region": [v[0] for v in vals],
            "FirstSeen": [v[1] for v in vals],
            "LastSeen": [v[2] for v in vals],
        },
        schema=BUSINESS_KEY_LINKS,
    )
