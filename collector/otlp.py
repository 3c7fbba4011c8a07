"""OTLP/HTTP trace requests: decoding (protobuf and JSON), validation and replies. Pure, no IO.

Rules from opentelemetry-proto's specification (DOMAIN.md §5): JSON ids are hex, enums are integers,
int64 may be strings, unknown fields are ignored; replies use the request's content type; spans that fail
validation are dropped and reported as partial success.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import re
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from collector.limits import spread_error

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_ZERO_TRACE = b"\0" * 16
_ZERO_SPAN = b"\0" * 8
MAX_ATTRIBUTES = 1024  # per span, event or link (OTel SDKs default to 128)
MAX_NAME_BYTES = 4096


class OtlpError(Exception):
    """A request the receiver refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(content_type: str | None) -> str:
    """The request's media type, or OtlpError(415)."""
    mt = (content_type or "").split(";", 1)[0].strip().lower()
    if mt in (PROTOBUF, "application/protobuf"):
        return PROTOBUF
    if mt == JSON:
        return JSON
    raise OtlpError(415, f"unsupported content type {mt or '(none)'!r}; use {PROTOBUF} or {JSON}")


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo Content-Encoding without ever holding more than ``limit`` bytes (gzip bombs -> 413)."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        if len(body) > limit:
            raise OtlpError(413, f"request body exceeds {limit} bytes")
        return body
    if enc not in ("gzip", "deflate"):
        raise OtlpError(415, f"unsupported Content-Encoding {enc!r}; use gzip or identity")
    if not body:
        return b""
    out = bytearray()
    data = body
    try:
        while True:  # gzip: one member after another (RFC 1952), as gzip.decompress reads them
            d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
            out += d.decompress(data, limit + 1 - len(out))
            if len(out) > limit or d.unconsumed_tail:
                raise OtlpError(413, f"request body exceeds {limit} bytes after decompression")
            out += d.flush()
            if not d.eof:
                raise OtlpError(400, f"invalid {enc} body: the stream is truncated")
            data = d.unused_data
            if not data.strip(b"\0"):  # the end (zero padding after a member is tolerated, as by gzip)
                break
            if enc != "gzip" or not data.startswith(b"\x1f\x8b"):
                raise OtlpError(400, f"invalid {enc} body: {len(data)} bytes after the end of the stream")
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise OtlpError(400, f"invalid {enc} body: {exc}") from None
    if len(out) > limit:
        raise OtlpError(413, f"request body exceeds {limit} bytes after decompression")
    return bytes(out)


_ID_FIELDS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}


_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON carries ids as hex; protobuf's JSON mapping expects base64 for bytes fields."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                # an id that is not hex (odd length, spaces, other letters) becomes one of the wrong length, so its
                # span is rejected alone (partial success) like an id of the wrong length, not the whole request
                raw = bytes.fromhex(value) if _HEX.fullmatch(value) else b"\x00"
                out[key] = base64.b64encode(raw).decode()
            else:
                out[key] = _hex_ids_to_base64(value)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    return node


def decode(body: bytes, mt: str) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    if not body:
        return req
    if mt == PROTOBUF:
        try:
            req.ParseFromString(body)
        except DecodeError as exc:
            raise OtlpError(400, f"malformed protobuf: {exc}") from None
        # a field this schema does not know, or a known one of another wire type, is kept as an unknown field and
        # re-encoded as sent, which ClickHouse's Protobuf reader refuses: dropped, as receivers of newer fields do
        req.DiscardUnknownFields()
        return req
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpError(400, f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OtlpError(400, "an OTLP JSON request must be an object")
    try:
        json_format.ParseDict(_hex_ids_to_base64(doc), req, ignore_unknown_fields=True)
    except (json_format.ParseError, binascii.Error, ValueError, TypeError, RecursionError) as exc:
        raise OtlpError(400, f"invalid OTLP JSON: {str(exc)[:300]}") from None
    return req


@dataclass(frozen=True)
class Validated:
    request: ExportTraceServiceRequest
    accepted: int
    rejected: int
    error_message: str


MAX_TIME_UNIX_NANO = 2**63 - 1  # DateTime64(9) and signed nanoseconds end here (2262-04-11)


def _span_problem(span: Any) -> str | None:
    # each field read once into a local: this runs for every span on the acknowledgement path
    trace_id, span_id, parent = span.trace_id, span.span_id, span.parent_span_id
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
        return "trace_id must be 16 non-zero bytes"
    if len(span_id) != 8 or span_id == _ZERO_SPAN:
        return "span_id must be 8 non-zero bytes"
    if parent and len(parent) != 8:
        return "parent_span_id must be empty or 8 bytes"
    start, end, events, links = span.start_time_unix_nano, span.end_time_unix_nano, span.events, span.links
    if end and end < start:
        return "end_time_unix_nano is before start_time_unix_nano"
    if (
        start > MAX_TIME_UNIX_NANO
        or end > MAX_TIME_UNIX_NANO
        or (events and max(e.time_unix_nano for e in events) > MAX_TIME_UNIX_NANO)
    ):
        return "a time is past 2262-04-11, beyond what the store holds"
    if len(span.attributes) > MAX_ATTRIBUTES:
        return f"{len(span.attributes)} attributes (at most {MAX_ATTRIBUTES})"
    if len(span.name) > MAX_NAME_BYTES:
        return f"name longer than {MAX_NAME_BYTES} characters"
    if len(events) > MAX_ATTRIBUTES or len(links) > MAX_ATTRIBUTES:
        return f"more than {MAX_ATTRIBUTES} events or links"
    for link in links:
        if len(link.trace_id) != 16 or len(link.span_id) != 8:
            return "a link's trace_id/span_id has the wrong length"
    return None


def from_instance(req: ExportTraceServiceRequest, instance_id: str) -> bool:
    """Does a resource of the request carry ``service.instance.id`` = ``instance_id``?"""
    for rs in req.resource_spans:
        for kv in rs.resource.attributes:
            if kv.key == "service.instance.id" and kv.value.string_value == instance_id:
                return True
    return False


def validate(req: ExportTraceServiceRequest) -> Validated:
    """Drop invalid spans in place; count what was kept and why the rest was not. OtlpError (400, the request
    refused whole) when the spans kept fall on more days than a request may (``limits.spread_error``)."""
    accepted = rejected = 0
    first_problem = ""
    starts: list[int] = []
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            bad = []
            for i, span in enumerate(ss.spans):
                problem = _span_problem(span)
                if problem:
                    bad.append(i)
                    first_problem = first_problem or f"{problem} (span {span.name!r})"
                else:
                    starts.append(span.start_time_unix_nano)
            for i in reversed(bad):
                del ss.spans[i]
            rejected += len(bad)
            accepted += len(ss.spans)
    if (spread := spread_error(starts, "spans")) is not None:
        raise OtlpError(400, spread)
    message = f"{rejected} span(s) rejected; first: {first_problem}" if rejected else ""
    return Validated(req, accepted, rejected, message)


def response(mt: str, rejected: int = 0, message: str = "") -> bytes:
    resp = ExportTraceServiceResponse()
    if rejected:
        resp.partial_success.rejected_spans = rejected
        resp.partial_success.error_message = message
    if mt == PROTOBUF:
        return resp.SerializeToString()
    return orjson.dumps(json_format.MessageToDict(resp))


def status_body(mt: str, code: int, message: str) -> bytes:
    """A google.rpc.Status in the request's content type."""
    grpc_code = {400: 3, 401: 16, 413: 3, 415: 3, 429: 8, 503: 14}.get(code, 2)
    status = status_pb2.Status(code=grpc_code, message=message)
    if mt == PROTOBUF:
        return status.SerializeToString()
    return orjson.dumps(json_format.MessageToDict(status))
