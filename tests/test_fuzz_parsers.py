"""Property-based fuzzing of every parser that reads untrusted bytes: each input either parses or raises the
parser's own 4xx-class error — never anything else (which the API would turn into a 5xx).

Hypothesis runs HYPOTHESIS_EXAMPLES inputs per parser (default 400; the count tried is printed)."""

from __future__ import annotations

import os
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector import events as ev
from collector import otlp
from connectors.segment.tracking import PiiPolicy, TrackingError, parse_request
from connectors.stripe.signature import sign
from connectors.stripe.webhook import DeliveryError, read_delivery
from tests.test_otlp_decode import SPEC_EXAMPLE

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
TRIED: dict[str, int] = {}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=6),
    max_leaves=40,
)


def _count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, and a valid document with random bytes flipped, cut or spliced in."""
    flips = st.tuples(st.integers(0, max(0, len(seed) - 1)), st.binary(min_size=1, max_size=8), st.booleans())
    return st.binary(max_size=2000) | flips.map(
        lambda f: seed[: f[0]] + f[1] + (seed[f[0] + len(f[1]) :] if f[2] else seed[f[0] :])
    )


VALID_PB = otlp.decode(orjson.dumps(SPEC_EXAMPLE), otlp.JSON).SerializeToString()


@FUZZ
@given(_mutations(VALID_PB))
def test_otlp_protobuf_decoder(body: bytes) -> None:
    _count("otlp protobuf")
    try:
        checked = otlp.validate(otlp.decode(body, otlp.PROTOBUF))
    except otlp.OtlpError as exc:
        assert 400 <= exc.status < 500
        return
    assert checked.accepted + checked.rejected >= 0
    ExportTraceServiceRequest.FromString(checked.request.SerializeToString())


@FUZZ
@given(_mutations(orjson.dumps(SPEC_EXAMPLE)) | json_values.map(orjson.dumps))
def test_otlp_json_decoder(body: bytes) -> None:
    _count("otlp json")
    try:
        otlp.validate(otlp.decode(body, otlp.JSON))
    except otlp.OtlpError as exc:
        assert 400 <= exc.status < 500


EVENT = {
    "specversion": "1.0",
    "id": "e1",
    "source": "s",
    "type": "t",
    "time": "2026-01-01T00:00:00Z",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "data": {"revops.invoice.id": "i"},
}


@FUZZ
@given(
    _mutations(orjson.dumps([EVENT, EVENT]))
    | json_values.map(orjson.dumps)
    | st.dictionaries(st.sampled_from(list(EVENT) + ["revopsregion", "x"]), json_values).map(
        lambda d: orjson.dumps({**EVENT, **d})
    )
)
def test_cloudevents_parser(body: bytes) -> None:
    _count("cloudevents")
    for ctype in (ev.BATCH, ev.STRUCTURED):
        try:
            good, bad = ev.parse_body(body, ctype, time.time_ns())
        except ev.EventError:
            continue
        if good:
            ev.to_tables(good, [0] * len(good), {"revops.invoice.id": "invoice"})
        assert all("error" in b for b in bad)


POLICY = PiiPolicy.build("hash", "k", ["email", "phone", "name", "address"])


@FUZZ
@given(json_values | st.fixed_dictionaries({"batch": st.lists(json_values, max_size=4)}))
def test_segment_tracking_parser(doc: object) -> None:
    _count("segment")
    for path_type in (None, "identify", "track", "group"):
        try:
            parsed = parse_request(doc, path_type, time.time_ns(), POLICY, ["customerId"], "NA")
        except TrackingError:
            continue
        assert all("error" in r for r in parsed.rejected)


SECRET = "whsec_fuzz"


@FUZZ
@given(
    _mutations(
        orjson.dumps(
            {
                "id": "evt_1",
                "type": "invoice.paid",
                "data": {
                    "object": {
                        "id": "in_1",
                        "object": "invoice",
                        "customer": "cus_1",
                        "currency": "usd",
                        "total": 100,
                        "amount_paid": 100,
                    }
                },
            }
        )
    )
    | json_values.map(orjson.dumps)
)
def test_stripe_webhook_parser(body: bytes) -> None:
    _count("stripe webhook")
    now = int(time.time())
    try:
        read_delivery(body, f"t={now},v1={sign(body, SECRET, now)}", [SECRET], 300, now, "NA")  # signed garbage
    except DeliveryError:
        pass
    with pytest.raises(DeliveryError):
        read_delivery(body, f"t={now},v1={'0' * 64}", [SECRET], 300, now, "NA")


def test_report_inputs_tried() -> None:
    """Printed with -s / in the CI log; a parser missing here did not get its inputs (the file's tests run in
    order on one worker: --dist loadfile)."""
    print("fuzz inputs tried:", TRIED)
    parsers = {"otlp protobuf", "otlp json", "cloudevents", "segment", "stripe webhook"}
    assert set(TRIED) == parsers and all(n >= min(EXAMPLES, 50) for n in TRIED.values()), TRIED
