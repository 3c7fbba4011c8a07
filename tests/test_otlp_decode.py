"""OTLP decoding and validation as plain functions."""

from __future__ import annotations

import gzip

import orjson
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from collector import otlp

# Shaped after opentelemetry-proto's examples/trace.json (hex ids, integer enums, string int64).
SPEC_EXAMPLE = {
    "resourceSpans": [
        {
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]},
            "scopeSpans": [
                {
                    "scope": {
                        "name": "my.library",
                        "version": "1.0.0",
                        "attributes": [{"key": "my.scope.attribute", "value": {"stringValue": "some scope attribute"}}],
                    },
                    "spans": [
                        {
                            "traceId": "5b8efff798038103d269b633813fc60c",
                            "spanId": "eee19b7ec3c1b174",
                            "parentSpanId": "eee19b7ec3c1b173",
                            "name": "I'm a server span",
                            "startTimeUnixNano": "1544712660000000000",
                            "endTimeUnixNano": "1544712661000000000",
                            "kind": 2,
                            "attributes": [
                                {"key": "my.span.attr", "value": {"stringValue": "some value"}},
                                {"key": "count", "value": {"intValue": "42"}},
                            ],
                            "futureField": {"ignored": True},
                        }
                    ],
                }
            ],
        }
    ]
}


def test_spec_json_example_decodes_with_hex_ids_and_string_int64() -> None:
    req = otlp.decode(orjson.dumps(SPEC_EXAMPLE), otlp.JSON)
    span = req.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
    assert span.span_id.hex() == "eee19b7ec3c1b174"
    assert span.start_time_unix_nano == 1544712660000000000
    assert span.kind == 2
    assert span.attributes[1].value.int_value == 42
    checked = otlp.validate(req)
    assert (checked.accepted, checked.rejected) == (1, 0)


def test_invalid_spans_are_dropped_and_counted() -> None:
    doc = orjson.loads(orjson.dumps(SPEC_EXAMPLE))
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans.append({**spans[0], "traceId": "00" * 16, "name": "zero trace"})
    spans.append({**spans[0], "spanId": "abcd", "name": "short span id"})
    checked = otlp.validate(otlp.decode(orjson.dumps(doc), otlp.JSON))
    assert (checked.accepted, checked.rejected) == (1, 2)
    assert "2 span(s) rejected" in checked.error_message and "zero trace" in checked.error_message
    resp = ExportTraceServiceResponse.FromString(otlp.response(otlp.PROTOBUF, checked.rejected, checked.error_message))
    assert resp.partial_success.rejected_spans == 2
    as_json = orjson.loads(otlp.response(otlp.JSON, 2, "x"))
    assert as_json["partialSuccess"]["rejectedSpans"] == "2"


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\xff\x01"])
def test_malformed_protobuf_is_400(body: bytes) -> None:
    with pytest.raises(otlp.OtlpError) as err:
        otlp.decode(body, otlp.PROTOBUF)
    assert err.value.status == 400


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[1,2]",
        b'{"resourceSpans": "nope"}',
    ],
)
def test_malformed_json_is_400(body: bytes) -> None:
    with pytest.raises(otlp.OtlpError) as err:
        otlp.decode(body, otlp.JSON)
    assert err.value.status == 400


def test_decompress_caps_output_size() -> None:
    bomb = gzip.compress(b"\0" * 5_000_000)
    assert len(bomb) < 10_000
    with pytest.raises(otlp.OtlpError) as err:
        otlp.decompress(bomb, "gzip", limit=1_000_000)
    assert err.value.status == 413
    assert otlp.decompress(gzip.compress(b"abc"), "gzip", limit=10) == b"abc"
    with pytest.raises(otlp.OtlpError) as err:
        otlp.decompress(b"not gzip", "gzip", limit=100)
    assert err.value.status == 400
    with pytest.raises(otlp.OtlpError) as err:
        otlp.decompress(b"x", "br", limit=100)
    assert err.value.status == 415


def test_status_body_in_request_content_type() -> None:
    st = status_pb2.Status.FromString(otlp.status_body(otlp.PROTOBUF, 400, "bad"))
    assert (st.code, st.message) == (3, "bad")
    assert orjson.loads(otlp.status_body(otlp.JSON, 400, "bad"))["message"] == "bad"


def test_media_type() -> None:
    assert otlp.media_type("application/x-protobuf") == otlp.PROTOBUF
    assert otlp.media_type("application/json; charset=utf-8") == otlp.JSON
    with pytest.raises(otlp.OtlpError) as err:
        otlp.media_type("text/plain")
    assert err.value.status == 415


def test_an_id_that_is_not_hex_rejects_its_span_alone() -> None:
    """Odd length, spaces (bytes.fromhex skips them) or other letters: the span is rejected with partial success,
    as an id of the wrong length is, instead of the whole request (and the valid span with it) being a 400."""
    good = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "name": "ok",
        "startTimeUnixNano": "1767225600000000000",
        "endTimeUnixNano": "1767225601000000000",
    }
    bad_ids = ["zz" * 16, "5b8efff798038103d269b633813fc60", "5b8efff7 98038103d269b633813fc60c"]
    spans = [good] + [{**good, "traceId": t, "name": f"bad{i}"} for i, t in enumerate(bad_ids)]
    body = orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]})
    checked = otlp.validate(otlp.decode(body, otlp.JSON))
    assert (checked.accepted, checked.rejected) == (1, 3) and "trace_id" in checked.error_message
    assert [s.name for s in checked.request.resource_spans[0].scope_spans[0].spans] == ["ok"]
