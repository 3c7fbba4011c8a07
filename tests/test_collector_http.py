"""The collector over HTTP with real clients, against a real `tower serve` subprocess."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link

from tests.conftest import migrated
from tests.otlp_json import step_span
from tests.server import TowerServer
from tests.test_otlp_decode import SPEC_EXAMPLE
from tower_core.store import Store

PB = {"Content-Type": "application/x-protobuf"}
JS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TowerServer]:
    with TowerServer(tmp_path_factory.mktemp("collector"), TOWER_MAX_BODY_BYTES=str(2 * 1024 * 1024)) as srv:
        yield srv


def wait_for(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def tracer(srv: TowerServer, service: str, system: str, region: str = "EU"):
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "revops.system": system, "revops.region": region})
    )
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{srv.url}/v1/traces")))
    return provider, provider.get_tracer(f"sim.{system}")


def test_three_systems_three_trace_ids_one_transaction(server: TowerServer) -> None:
    """CDP, billing and ERP each start their own trace; keys tie them into one business transaction."""
    inv, cus = f"in_{time.time_ns()}", f"cus_{time.time_ns()}"
    tids = {}
    for system, step_attrs in (
        ("cdp", [{"revops.step": "cdp_to_billing", "revops.customer.id": cus, "revops.cdp.user_id": "u1"}]),
        (
            "billing",
            [
                {"revops.step": "cdp_to_billing", "revops.customer.id": cus},
                {
                    "revops.step": "invoice_to_ledger",
                    "revops.invoice.id": inv,
                    "revops.customer.id": cus,
                    "revops.amount_minor": 12_345,
                    "revops.currency": "EUR",
                },
            ],
        ),
        ("erp", [{"revops.step": "invoice_to_ledger", "revops.invoice.id": inv, "revops.ledger.entry.id": "je_1"}]),
    ):
        provider, tr = tracer(server, f"{system}-svc", system)
        with tr.start_as_current_span(f"{system} work") as root:
            tids[system] = format(root.get_span_context().trace_id, "032x")
            for attrs in step_attrs:
                with tr.start_as_current_span(
                    f"{system} {attrs['revops.step']}",
                    # the ERP names its system on the Resource only, as many services do
                    attributes={
                        **({} if system == "erp" else {"revops.system": system}),
                        "revops.region": "EU",
                        **attrs,
                    },
                ):
                    time.sleep(0.01)
        provider.shutdown()
    assert len(set(tids.values())) == 3

    def txn() -> dict | None:
        r = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params={"invoice_id": inv})
        doc = r.json() if r.status_code == 200 else None
        return doc if doc and len(doc["traces"]) == 3 else None

    doc = wait_for(txn)
    assert doc, "transaction never showed all three traces"
    assert {t["trace_id"] for t in doc["traces"]} == set(tids.values())
    assert doc["missing_systems"] == []
    starts = [s["start_ns"] for s in doc["spans"]]
    assert starts == sorted(starts)
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps["invoice_to_ledger"]["complete"] and steps["invoice_to_ledger"]["latency_ms"] > 0
    assert steps["cdp_to_billing"]["complete"]
    # the same transaction from the ERP trace id, and the customer's view includes it
    by_trace = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params={"trace_id": tids["erp"]}).json()
    assert {t["trace_id"] for t in by_trace["traces"]} == set(tids.values())
    by_customer = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params={"customer_id": cus}).json()
    assert {tids["cdp"], tids["billing"]} <= {t["trace_id"] for t in by_customer["traces"]}
    one = httpx.get(f"{server.url}/api/traces/{tids['billing']}", headers=server.auth).json()
    assert one["span_count"] == 3 and {s["trace_id"] for s in one["spans"]} == {tids["billing"]}


def test_a_transaction_is_the_same_from_every_key_however_many_hops_apart(server: TowerServer) -> None:
    """CDP, invoice, payment and ERP-application traces: the application is two hops from the billing trace (via
    the invoice, then the payment). One hop made the payment look unapplied when looked up by the billing trace."""
    tag = f"h{time.time_ns()}"
    cus, inv, pay, le = f"cus_{tag}", f"in_{tag}", f"pi_{tag}", f"le_{tag}"
    t0 = time.time_ns() - 3_600 * 10**9
    tids = {name: f"{n + 5:x}{tag[-6:]}".ljust(32, "0") for n, name in enumerate(("cdp", "bill", "pay", "erp"))}

    def span(trace: str, n: int, system: str, step: str, **keys: str) -> dict:
        return step_span(tids[trace], n, system, step, t0 + n * 10**9, **keys)

    keys = {"revops.customer.id": cus}
    doc = {
        "resourceSpans": [
            span("cdp", 0, "cdp", "cdp_to_billing", **keys),
            span("bill", 1, "billing", "invoice_to_ledger", **keys, **{"revops.invoice.id": inv}),
            span(
                "pay", 2, "billing", "payment_to_cash", **keys, **{"revops.invoice.id": inv, "revops.payment.id": pay}
            ),
            span("erp", 3, "erp", "payment_to_cash", **{"revops.payment.id": pay, "revops.ledger.entry.id": le}),
        ]
    }
    assert httpx.post(f"{server.url}/v1/traces", content=orjson.dumps(doc), headers=JS).status_code == 200

    def traces_from(**params: str) -> set[str]:
        r = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params=params)
        return {t["trace_id"] for t in r.json()["traces"]} if r.status_code == 200 else set()

    assert wait_for(lambda: traces_from(invoice_id=inv) == set(tids.values())), traces_from(invoice_id=inv)
    for params in ({"trace_id": tids["bill"]}, {"payment_id": pay}, {"ledger_entry_id": le}, {"trace_id": tids["erp"]}):
        assert traces_from(**params) == set(tids.values()), params


def test_span_links_join_traces(server: TowerServer) -> None:
    provider, tr = tracer(server, "billing-svc", "billing")
    with tr.start_as_current_span("batch producer") as producer:
        ctx = producer.get_span_context()
    with tr.start_as_current_span("batch consumer", links=[Link(ctx)]) as consumer:
        consumer_tid = format(consumer.get_span_context().trace_id, "032x")
    provider.shutdown()
    producer_tid = format(ctx.trace_id, "032x")

    def linked() -> dict | None:
        r = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params={"trace_id": producer_tid})
        return r.json() if r.status_code == 200 and len(r.json()["traces"]) == 2 else None

    doc = wait_for(linked)
    assert doc and {t["trace_id"] for t in doc["traces"]} == {producer_tid, consumer_tid}


def test_json_spec_example_and_gzip(server: TowerServer) -> None:
    doc = orjson.loads(orjson.dumps(SPEC_EXAMPLE))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "5b8efff798038103d269b633813fc60d"
    r = httpx.post(f"{server.url}/v1/traces", content=orjson.dumps(doc), headers=JS)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {}
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "5b8efff798038103d269b633813fc60e"
    r = httpx.post(
        f"{server.url}/v1/traces", content=gzip.compress(orjson.dumps(doc)), headers={**JS, "Content-Encoding": "gzip"}
    )
    assert r.status_code == 200
    for tid in ("5b8efff798038103d269b633813fc60d", "5b8efff798038103d269b633813fc60e"):
        got = wait_for(lambda t=tid: httpx.get(f"{server.url}/api/traces/{t}", headers=server.auth).status_code == 200)
        assert got
    span = httpx.get(f"{server.url}/api/traces/5b8efff798038103d269b633813fc60d", headers=server.auth).json()["spans"][
        0
    ]
    assert span["name"] == "I'm a server span" and span["attributes"]["count"] == "42"
    assert span["duration_ms"] == 1000.0


def _span_request(trace_hex: str, name: str) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=bytes.fromhex(trace_hex), span_id=b"\x02" * 8, name=name, start_time_unix_nano=1, end_time_unix_nano=2
    )
    return req


def test_gzip_members_are_all_read_and_a_cut_stream_is_refused(server: TowerServer) -> None:
    """A gzip body of two members (RFC 1952; what gzip.decompress reads) used to be acknowledged with the second
    member's spans silently dropped; a stream cut short is a 400, not a partial request."""
    first, second = "a1" * 16, "c2" * 16
    body = gzip.compress(_span_request(first, "m1").SerializeToString())
    body += gzip.compress(_span_request(second, "m2").SerializeToString())
    r = httpx.post(f"{server.url}/v1/traces", content=body, headers={**PB, "Content-Encoding": "gzip"})
    assert r.status_code == 200
    for tid in (first, second):
        assert wait_for(lambda t=tid: httpx.get(f"{server.url}/api/traces/{t}", headers=server.auth).status_code == 200)
    whole = gzip.compress(_span_request("e3" * 16, "cut").SerializeToString())
    for bad in (whole[:-6], whole + b"trailing bytes"):
        r = httpx.post(f"{server.url}/v1/traces", content=bad, headers={**PB, "Content-Encoding": "gzip"})
        assert r.status_code == 400, r.content
        assert "gzip" in status_pb2.Status.FromString(r.content).message
    gz = {**PB, "Content-Encoding": "gzip"}
    padded = httpx.post(f"{server.url}/v1/traces", content=whole + b"\0" * 8, headers=gz)
    assert padded.status_code == 200  # zero padding after the last member is tolerated, as gzip does


def test_a_span_field_sent_twice_is_stored_as_validated(server: TowerServer) -> None:
    """Protobuf reads a repeated singular field as its last value, ClickHouse's reader did not: a span with its
    trace id sent twice was acknowledged and stored without one. What was validated is what is stored."""

    def ld(tag: int, body: bytes) -> bytes:
        return bytes([tag, len(body)]) + body

    tid = "3c" * 16
    span = _span_request(tid, "twice").resource_spans[0].scope_spans[0].spans[0].SerializeToString()
    body = ld(0x0A, ld(0x12, ld(0x12, ld(0x0A, b"\xaa" * 16) + span)))  # an earlier trace_id the later one overrides
    r = httpx.post(f"{server.url}/v1/traces", content=body, headers=PB)
    assert r.status_code == 200
    assert wait_for(lambda: httpx.get(f"{server.url}/api/traces/{tid}", headers=server.auth).status_code == 200)
    spans = httpx.get(f"{server.url}/api/traces/{tid}", headers=server.auth).json()["spans"]
    assert [s["name"] for s in spans] == ["twice"]
    assert httpx.get(f"{server.url}/api/traces/{'aa' * 16}", headers=server.auth).status_code == 404


def test_fields_of_an_unexpected_wire_type_are_dropped_not_stored(server: TowerServer) -> None:
    """Python's reader keeps a known field sent with another wire type (Span.name as a varint) and a group field as
    unknown fields; re-encoded as they were, ClickHouse's reader refused the record after the 200 (dead letter)."""

    def ld(tag: int, body: bytes) -> bytes:
        return bytes([tag, len(body)]) + body

    for n, extra in enumerate((b"\x28\x2a", b"\x9b\x06\x08\x01\x9c\x06")):  # name = varint 42; group field 99
        tid = f"4{n}" * 16
        span = _span_request(tid, "odd").resource_spans[0].scope_spans[0].spans[0].SerializeToString() + extra
        r = httpx.post(f"{server.url}/v1/traces", content=ld(0x0A, ld(0x12, ld(0x12, span))), headers=PB)
        assert r.status_code == 200, r.content
        assert wait_for(lambda t=tid: httpx.get(f"{server.url}/api/traces/{t}", headers=server.auth).status_code == 200)
        assert [
            s["name"] for s in httpx.get(f"{server.url}/api/traces/{tid}", headers=server.auth).json()["spans"]
        ] == ["odd"]


def test_deeply_nested_events_get_a_400_not_a_500(server: TowerServer) -> None:
    deep: object = "x"
    for _ in range(300):
        deep = {"d": deep}
    event = {"specversion": "1.0", "id": "deep-1", "source": "billing", "type": "invoice.paid", "data": deep}
    ce = {"Content-Type": "application/cloudevents+json"}
    r = httpx.post(f"{server.url}/v1/events", content=json.dumps(event), headers=ce)  # (orjson writes 254 levels)
    assert r.status_code == 400 and "deeper than 64" in r.json()["rejected"][0]["error"]
    batch = [{**event, "id": deep}, {**event, "id": "shallow-1", "data": {"revops.invoice.id": "in_1"}}]
    batch_type = {"Content-Type": "application/cloudevents-batch+json"}
    r = httpx.post(f"{server.url}/v1/events", content=json.dumps(batch), headers=batch_type)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1 and r.json()["rejected"][0]["id"] is None  # not echoed: it is not an id


def test_an_empty_cloudevents_batch_is_a_200_and_a_batch_of_only_bad_events_a_400(server: TowerServer) -> None:
    """The CloudEvents JSON format (4.3) makes ``[]`` a valid batch; a producer flushing one got a 400, an error
    it cannot retry away."""
    batch_type = {"Content-Type": "application/cloudevents-batch+json"}
    r = httpx.post(f"{server.url}/v1/events", content=b"[]", headers=batch_type)
    assert (r.status_code, r.json()) == (200, {"accepted": 0, "rejected": []})
    r = httpx.post(f"{server.url}/v1/events", content=b'[{"specversion": "1.0"}]', headers=batch_type)
    assert r.status_code == 400 and r.json()["accepted"] == 0 and len(r.json()["rejected"]) == 1


def test_map_and_nested_array_attribute_values_are_stored_as_json(server: TowerServer) -> None:
    """OTLP allows kvlist (map) values; they were acknowledged and stored as '' (the store's Protobuf schema
    lacked them). A map of scalars is JSON text like the clickhouseexporter's; an array or a map inside an array
    or a map is an empty member (one level is read)."""

    def s(v: str) -> dict:
        return {"stringValue": v}

    def kvlist(**values: dict) -> dict:
        return {"kvlistValue": {"values": [{"key": k, "value": v} for k, v in values.items()]}}

    def array(*values: dict) -> dict:
        return {"arrayValue": {"values": list(values)}}

    attrs = {
        "kv": kvlist(a=s("b"), n={"intValue": "3"}, f={"doubleValue": 1.5}, t={"boolValue": True}, q=s('say "hi"')),
        "kv_nested": kvlist(k=array(s("p"), s("q")), o=kvlist(i=s("j")), deep=kvlist(x=kvlist(y=s("z")))),
        "arr_nested": array(array(s("x")), s("y"), kvlist(m=s("n"))),
        "arr": array(s("in_1"), s("in_2")),
        "empty_kv": {"kvlistValue": {}},
    }
    tid = f"{time.time_ns():032x}"[-32:]
    doc = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": tid,
                                "spanId": "00000000000000aa",
                                "name": "values",
                                "startTimeUnixNano": str(time.time_ns()),
                                "endTimeUnixNano": str(time.time_ns() + 1000),
                                "attributes": [{"key": k, "value": v} for k, v in attrs.items()],
                            }
                        ]
                    }
                ]
            }
        ]
    }
    r = httpx.post(f"{server.url}/v1/traces", content=orjson.dumps(doc), headers=JS)
    assert r.status_code == 200 and r.content in (b"{}", b"")

    def stored() -> dict | None:
        r = httpx.get(f"{server.url}/api/traces/{tid}", headers=server.auth)
        return r.json()["spans"][0]["attributes"] if r.status_code == 200 else None

    got = wait_for(stored)
    assert got is not None
    assert orjson.loads(got["kv"]) == {"a": "b", "n": 3, "f": 1.5, "t": True, "q": 'say "hi"'}
    assert orjson.loads(got["kv_nested"]) == {"k": None, "o": None, "deep": None}
    assert orjson.loads(got["arr_nested"]) == ["", "y", ""]
    assert got["arr"] == '["in_1","in_2"]' and got["empty_kv"] == ""


def test_partial_success_reports_rejected_spans(server: TowerServer) -> None:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="good", start_time_unix_nano=1, end_time_unix_nano=2)
    ss.spans.add(trace_id=b"\x01" * 3, span_id=b"\x02" * 8, name="bad id")
    # a fixed64 the store cannot hold (it would wrap to 1969)
    ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x03" * 8, name="far future", start_time_unix_nano=2**64 - 1)
    r = httpx.post(f"{server.url}/v1/traces", content=req.SerializeToString(), headers=PB)
    assert r.status_code == 200
    resp = ExportTraceServiceResponse.FromString(r.content)
    assert resp.partial_success.rejected_spans == 2 and "bad id" in resp.partial_success.error_message


def test_bad_requests_get_clear_4xx(server: TowerServer) -> None:
    r = httpx.post(f"{server.url}/v1/traces", content=b"\xff\xfe garbage", headers=PB)
    assert r.status_code == 400
    assert "malformed protobuf" in status_pb2.Status.FromString(r.content).message
    r = httpx.post(f"{server.url}/v1/traces", content=b"{nope", headers=JS)
    assert r.status_code == 400 and "malformed JSON" in r.json()["message"]
    r = httpx.post(f"{server.url}/v1/traces", content=b"hello", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    big = b"\x0a" + b"\x00" * (3 * 1024 * 1024)
    r = httpx.post(f"{server.url}/v1/traces", content=big, headers=PB)
    assert r.status_code == 413
    bomb = gzip.compress(b"\0" * (10 * 1024 * 1024))
    r = httpx.post(f"{server.url}/v1/traces", content=bomb, headers={**PB, "Content-Encoding": "gzip"})
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/v1/traces", content=b"", headers=PB)  # empty request
    assert r.status_code == 200
    # the lookups show business keys: a viewer token at least
    assert httpx.get(f"{server.url}/api/traces/{'ab' * 16}").status_code == 401
    assert httpx.get(f"{server.url}/api/transactions", params={"invoice_id": "in_1"}).status_code == 401
    bad = {"Authorization": "Bearer not-a-token"}
    assert httpx.get(f"{server.url}/api/transactions", params={"invoice_id": "in_1"}, headers=bad).status_code == 401
    assert httpx.get(f"{server.url}/api/traces/not-hex", headers=server.auth).status_code == 400
    assert httpx.get(f"{server.url}/api/traces/{'ab' * 16}", headers=server.auth).status_code == 404
    assert httpx.get(f"{server.url}/api/transactions", headers=server.auth).status_code == 400
    assert (
        httpx.get(
            f"{server.url}/api/transactions", headers=server.auth, params={"invoice_id": "never-seen"}
        ).status_code
        == 404
    )


def test_cloudevents_structured_batch_and_traceparent(server: TowerServer) -> None:
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    inv = f"in_ev_{time.time_ns()}"
    ev = {
        "specversion": "1.0",
        "id": f"e-{inv}",
        "source": "billing/stripe",
        "type": "invoice.finalized",
        "time": "2026-01-01T10:00:00.123456789Z",
        "traceparent": f"00-{tid}-00f067aa0ba902b7-01",
        "data": {
            "revops.invoice.id": inv,
            "revops.system": "billing",
            "revops.region": "NA",
            "revops.step": "invoice_to_ledger",
            "revops.amount_minor": 1999,
            "revops.currency": "USD",
        },
    }
    r = httpx.post(
        f"{server.url}/v1/events", content=orjson.dumps(ev), headers={"Content-Type": "application/cloudevents+json"}
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1
    batch = [
        {**ev, "id": f"e2-{inv}", "type": "invoice.paid"},
        {"specversion": "1.0", "id": "x"},
        {**ev, "id": f"e3-{inv}", "traceparent": "garbage"},
        # RFC 3339 in form, not in the calendar or the store's range: rejected, never a 500 nor a poisoned buffer
        {**ev, "id": f"e4-{inv}", "time": "2024-02-30T00:00:00Z"},
        {**ev, "id": f"e5-{inv}", "time": "2026-01-01T25:00:00Z"},
        {**ev, "id": f"e6-{inv}", "time": "2026-01-01T10:00:00+25:00"},
        {**ev, "id": f"e7-{inv}", "time": "2300-01-01T00:00:00Z"},
        {**ev, "id": f"e8-{inv}", "time": "0001-01-01T00:00:00Z"},
        {**ev, "id": f"e9-{inv}", "data": {**ev["data"], "revops.amount_minor": "--5"}},
        # minor units past what the tower takes: sums of such amounts wrapped Int64 in the statement
        {**ev, "id": f"e10-{inv}", "data": {**ev["data"], "revops.amount_minor": str(2**62 + 5)}},
    ]
    r = httpx.post(
        f"{server.url}/v1/events",
        content=orjson.dumps(batch),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    body = r.json()
    assert r.status_code == 200 and body["accepted"] == 1
    assert [b["index"] for b in body["rejected"]] == list(range(1, 10))
    assert "source" in body["rejected"][0]["error"] and "traceparent" in body["rejected"][1]["error"]
    assert all("valid date" in b["error"] for b in body["rejected"][2:5])
    assert all("outside 1900-01-01" in b["error"] for b in body["rejected"][5:7])
    assert "amount_minor" in body["rejected"][7]["error"] and "amount_minor" in body["rejected"][8]["error"]
    r = httpx.post(
        f"{server.url}/v1/events",
        content=orjson.dumps({**ev, "id": "bad-day", "time": "2024-02-30T00:00:00Z"}),
        headers={"Content-Type": "application/cloudevents+json"},
    )
    assert r.status_code == 400 and "valid date" in r.json()["rejected"][0]["error"]
    r = httpx.post(f"{server.url}/v1/events", content=b"[]", headers={"Content-Type": "text/csv"})
    assert r.status_code == 415
    # Content-Encoding as on /v1/traces: gzip read, a bomb refused for its size, an unknown coding named
    structured = {"Content-Type": "application/cloudevents+json"}
    zipped = gzip.compress(orjson.dumps({**ev, "id": f"e10-{inv}", "type": "invoice.voided"}))
    r = httpx.post(f"{server.url}/v1/events", content=zipped, headers={**structured, "Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    bomb = gzip.compress(b"[" + b" " * (21 * 1024 * 1024) + b"]")
    r = httpx.post(f"{server.url}/v1/events", content=bomb, headers={**structured, "Content-Encoding": "gzip"})
    assert r.status_code == 413 and "after decompression" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/events", content=zipped, headers={**structured, "Content-Encoding": "br"})
    assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]

    def txn() -> dict | None:
        r = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params={"invoice_id": inv})
        return r.json() if r.status_code == 200 and len(r.json()["events"]) == 3 else None

    doc = wait_for(txn)
    assert doc and sorted(e["type"] for e in doc["events"]) == ["invoice.finalized", "invoice.paid", "invoice.voided"]
    assert doc["events"][0]["trace_id"] == tid and doc["events"][0]["time"] == "2026-01-01T10:00:00.123456789Z"


def test_a_transaction_seen_only_in_events_without_trace_context_is_found_by_its_keys(server: TowerServer) -> None:
    """Batch jobs and CDP calls often carry no traceparent: their events still make the transaction."""
    inv, cus = f"in_notrace_{time.time_ns()}", f"cus_notrace_{time.time_ns()}"
    events = [
        {
            "specversion": "1.0",
            "id": f"{system}-{inv}",
            "source": f"{system}/batch",
            "type": kind,
            "time": at,
            "data": {
                "revops.invoice.id": inv,
                "revops.customer.id": cus,
                "revops.system": system,
                "revops.step": "invoice_to_ledger",
                **({"revops.ledger.entry.id": f"je_{inv}"} if system == "erp" else {}),
            },
        }
        for system, kind, at in (
            ("billing", "invoice.finalized", "2026-01-01T10:00:00Z"),
            ("erp", "ledger.posted", "2026-01-01T10:05:00Z"),
        )
    ]
    r = httpx.post(
        f"{server.url}/v1/events",
        content=orjson.dumps(events),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert r.status_code == 200 and r.json()["accepted"] == 2

    def txn(params: dict[str, str]) -> dict | None:
        r = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params=params)
        return r.json() if r.status_code == 200 and len(r.json()["events"]) == 2 else None

    doc = wait_for(lambda: txn({"invoice_id": inv}))
    assert doc and [e["id"] for e in doc["events"]] == [f"billing-{inv}", f"erp-{inv}"]
    step = next(s for s in doc["steps"] if s["step"] == "invoice_to_ledger")
    assert step["complete"] and step["latency_ms"] == 300_000
    assert txn({"customer_id": cus}) is not None
    by_entry = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params={"ledger_entry_id": f"je_{inv}"})
    assert by_entry.status_code == 200  # the key of a missing_in_billing item
    # the ERP event names the invoice: the billing side comes with it (it was the ERP event alone)
    assert [e["id"] for e in by_entry.json()["events"]] == [f"billing-{inv}", f"erp-{inv}"]
    newline = httpx.get(f"{server.url}/api/traces/{'ab' * 16}%0A", headers=server.auth)
    assert newline.status_code == 400 and "32 hex" in newline.json()["detail"]
    assert (
        httpx.get(
            f"{server.url}/api/transactions", headers=server.auth, params={"invoice_id": "in_never_seen"}
        ).status_code
        == 404
    )


def test_keys_only_a_trace_less_event_carries_are_followed_and_a_customer_sees_its_erp_traces(
    server: TowerServer,
) -> None:
    """Billing's events without trace context (as Stripe's webhooks arrive) name the invoice and its payment; the
    ERP's posting span names the invoice only, its application span the payment only. The event's payment was
    read only when no span carried the seed, so the invoice's view said the ERP never applied the payment and
    the payment's view lost the posting; a customer's view never hopped to the ERP traces of its invoices."""
    tag = f"ev{time.time_ns()}"
    cus, inv, pay = f"cus_{tag}", f"in_{tag}", f"pi_{tag}"
    t0 = time.time_ns() - 3_600 * 10**9
    tids = {name: f"{n + 7:x}{tag[-8:]}".ljust(32, "0") for n, name in enumerate(("bill", "post", "apply"))}

    def span(trace: str, n: int, system: str, step: str, **keys: str) -> dict:
        return step_span(tids[trace], n, system, step, t0 + n * 10**9, **keys)

    doc = {
        "resourceSpans": [
            span("bill", 0, "billing", "invoice_to_ledger", **{"revops.invoice.id": inv, "revops.customer.id": cus}),
            span("post", 2, "erp", "invoice_to_ledger", **{"revops.invoice.id": inv}),
            span("apply", 70, "erp", "payment_to_cash", **{"revops.payment.id": pay}),
        ]
    }
    assert httpx.post(f"{server.url}/v1/traces", content=orjson.dumps(doc), headers=JS).status_code == 200
    paid = {
        "specversion": "1.0",
        "id": f"evt_{tag}",
        "source": "billing/batch",
        "type": "billing.invoice.paid",
        "time": dt.datetime.fromtimestamp((t0 + 10 * 10**9) / 1e9, dt.UTC).isoformat(),
        "data": {
            "revops.system": "billing",
            "revops.step": "payment_to_cash",
            "revops.invoice.id": inv,
            "revops.payment.id": pay,
            "revops.customer.id": cus,
        },
    }
    r = httpx.post(
        f"{server.url}/v1/events", content=orjson.dumps(paid), headers={"Content-Type": "application/cloudevents+json"}
    )
    assert r.status_code == 200, r.text

    def txn(**params: str) -> dict | None:
        r = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params=params)
        doc = r.json() if r.status_code == 200 else None
        return doc if doc and doc["events"] and len(doc["traces"]) == 3 else None

    for params in ({"invoice_id": inv}, {"payment_id": pay}, {"customer_id": cus}):
        found = wait_for(lambda p=params: txn(**p))  # type: ignore[misc]
        assert found, f"{params}: not all three traces"
        assert {t["trace_id"] for t in found["traces"]} == set(tids.values()), params
        steps = {s["step"]: s for s in found["steps"]}
        assert steps["payment_to_cash"]["complete"], params
        assert steps["payment_to_cash"]["latency_ms"] == pytest.approx(60_001, abs=1), params
        assert steps["invoice_to_ledger"]["complete"], params


def test_an_event_naming_several_invoices_is_found_by_each_of_them(server: TowerServer) -> None:
    """An ERP payment applied to two invoices, sent by a batch job without trace context: it was found by the
    last invoice id only (the event row holds one id per key type)."""
    tag = time.time_ns()
    first, second, pay = f"in_a_{tag}", f"in_b_{tag}", f"py_{tag}"
    event = {
        "specversion": "1.0",
        "id": f"apply-{tag}",
        "source": "erp/batch",
        "type": "erp.payment.applied",
        "time": "2026-01-02T09:00:00Z",
        "data": {"revops.invoice.id": [first, second], "revops.payment.id": pay, "revops.system": "erp"},
    }
    r = httpx.post(
        f"{server.url}/v1/events", content=orjson.dumps(event), headers={"Content-Type": "application/cloudevents+json"}
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1

    def ids(params: dict[str, str]) -> list[str]:
        r = httpx.get(f"{server.url}/api/transactions", headers=server.auth, params=params)
        return [e["id"] for e in r.json()["events"]] if r.status_code == 200 else []

    assert wait_for(lambda: ids({"invoice_id": second})) == [f"apply-{tag}"]
    assert ids({"invoice_id": first}) == [f"apply-{tag}"] == ids({"payment_id": pay})


def test_metrics_count_what_happened(server: TowerServer) -> None:
    def metrics() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}

    before = metrics()
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    ss.spans.add(trace_id=b"\x07" * 16, span_id=b"\x02" * 8, name="good", start_time_unix_nano=1, end_time_unix_nano=2)
    ss.spans.add(trace_id=b"\x07" * 3, span_id=b"\x02" * 8, name="bad id")
    assert httpx.post(f"{server.url}/v1/traces", content=req.SerializeToString(), headers=PB).status_code == 200
    bad_events = [{"specversion": "1.0", "id": "m1", "type": "invoice.paid"}, {"specversion": "1.0", "id": "m2"}]
    r = httpx.post(
        f"{server.url}/v1/events",
        content=orjson.dumps(bad_events),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert r.status_code == 400
    after = metrics()
    assert after["tower_spans_received_total"] - before["tower_spans_received_total"] == 1
    assert after["tower_spans_rejected_total"] - before["tower_spans_rejected_total"] == 1
    assert after["tower_events_rejected_total"] - before["tower_events_rejected_total"] == 2
    assert "tower_flush_seconds_count" in after and "tower_buffer_bytes" in after


def test_a_request_spread_over_more_days_than_a_request_may_is_refused_whole(server: TowerServer) -> None:
    """Each day is a partition of otel_traces (a month, of business_events) that never merges: one request of
    1,000 spans on 1,000 days made 1,000 parts and 13,000 files for good, and held the flusher for seconds."""

    def metric(name: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return next(float(ln.split(" ")[1]) for ln in text.splitlines() if ln.startswith(name + " "))

    day = 86_400 * 10**9
    base = 1_704_067_200 * 10**9  # 2024-01-01

    def spans_on(days: int) -> bytes:
        req = ExportTraceServiceRequest()
        ss = req.resource_spans.add().scope_spans.add()
        for d in range(days):
            start = base + d * day
            ss.spans.add(trace_id=bytes([0x31, d + 1]) * 8, span_id=b"\x05" * 8, name=f"day {d}",
                         start_time_unix_nano=start, end_time_unix_nano=start + 1)  # fmt: skip
        return req.SerializeToString()

    received = metric("tower_spans_received_total")
    r = httpx.post(f"{server.url}/v1/traces", content=spans_on(40), headers=PB)
    assert r.status_code == 400
    status = status_pb2.Status.FromString(r.content)
    assert "fall on 40 days, at most 31" in status.message
    assert metric("tower_spans_received_total") == received  # nothing of it kept
    assert httpx.post(f"{server.url}/v1/traces", content=spans_on(31), headers=PB).status_code == 200
    assert metric("tower_spans_received_total") == received + 31
    events = [
        {"specversion": "1.0", "id": f"spread-{d}", "source": "billing", "type": "invoice.paid",
         "time": dt.datetime.fromtimestamp((base + d * day) / 1e9, dt.UTC).isoformat(),
         "data": {"revops.invoice.id": f"in_spread_{d}"}}
        for d in range(40)
    ]  # fmt: skip
    before = metric("tower_events_received_total")
    r = httpx.post(
        f"{server.url}/v1/events",
        content=orjson.dumps(events),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert r.status_code == 400 and "fall on 40 days" in r.json()["error"]
    assert metric("tower_events_received_total") == before


def test_full_buffer_answers_503_with_retry_after(tmp_path: Path) -> None:
    """With the store slow to drain (long flush interval) and a tiny buffer, the collector refuses."""
    with TowerServer(
        tmp_path, TOWER_WAL_MAX_BYTES="200000", TOWER_FLUSH_INTERVAL_S="60", TOWER_FLUSH_ROWS="100000000"
    ) as srv:
        req = ExportTraceServiceRequest()
        ss = req.resource_spans.add().scope_spans.add()
        for i in range(500):
            sp = ss.spans.add(trace_id=(i + 1).to_bytes(16, "big"), span_id=b"\x01" * 8, name="x" * 50)
            sp.attributes.add(key="k").value.string_value = "v" * 100
        body = req.SerializeToString()
        statuses = [httpx.post(f"{srv.url}/v1/traces", content=body, headers=PB) for _ in range(5)]
        codes = [r.status_code for r in statuses]
        assert codes[0] == 200 and 503 in codes
        refused = next(r for r in statuses if r.status_code == 503)
        assert refused.headers["Retry-After"] == "1"
        assert "buffer" in status_pb2.Status.FromString(refused.content).message
        # a request larger than the whole buffer would be refused on every retry: 413, not 503
        for i in range(500, 1_500):
            sp = ss.spans.add(trace_id=(i + 1).to_bytes(16, "big"), span_id=b"\x01" * 8, name="x" * 50)
            sp.attributes.add(key="k").value.string_value = "v" * 100
        huge = httpx.post(f"{srv.url}/v1/traces", content=req.SerializeToString(), headers=PB)
        assert huge.status_code == 413 and "TOWER_WAL_MAX_BYTES" in status_pb2.Status.FromString(huge.content).message


def test_ingest_tokens_when_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With TOWER_INGEST_TOKENS set, OTLP and CloudEvents ingest take any listed bearer token (rotation) and
    refuse the rest with 401 (OTLP: a google.rpc.Status UNAUTHENTICATED in the request's content type)."""
    with TowerServer(tmp_path, TOWER_INGEST_TOKENS='["tok-new", "tok-old"]', TOWER_FLUSH_INTERVAL_S="0.2") as srv:
        # the real SDK exporter, configured the way OTEL_EXPORTER_OTLP_HEADERS would
        provider = TracerProvider(resource=Resource.create({"service.name": "billing-svc"}))
        exporter = OTLPSpanExporter(endpoint=f"{srv.url}/v1/traces", headers={"Authorization": "Bearer tok-new"})
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("t").start_as_current_span("with token") as sp:
            tid = format(sp.get_span_context().trace_id, "032x")
        provider.shutdown()
        assert wait_for(lambda: httpx.get(f"{srv.url}/api/traces/{tid}", headers=srv.auth).status_code == 200)

        req = ExportTraceServiceRequest()
        req.resource_spans.add().scope_spans.add().spans.add(
            trace_id=b"\x09" * 16, span_id=b"\x01" * 8, name="no token", start_time_unix_nano=1, end_time_unix_nano=2
        )
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic tok-new"}):
            r = httpx.post(f"{srv.url}/v1/traces", content=req.SerializeToString(), headers={**PB, **headers})
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert status_pb2.Status.FromString(r.content).code == 16
        r = httpx.post(f"{srv.url}/v1/traces", content=b"{}", headers=JS)
        assert r.status_code == 401 and "ingest bearer token" in r.json()["message"]
        event = {"specversion": "1.0", "id": "tok-1", "source": "billing", "type": "invoice.paid"}
        ce = {"Content-Type": "application/cloudevents+json"}
        assert httpx.post(f"{srv.url}/v1/events", json=event, headers=ce).status_code == 401
        ok = httpx.post(f"{srv.url}/v1/events", json=event, headers={**ce, "Authorization": "Bearer tok-old"})
        assert ok.status_code == 200, ok.text
        assert (
            httpx.get(f"{srv.url}/api/traces/{'09' * 16}", headers=srv.auth).status_code == 404
        )  # the refused span was not kept

        # `tower demo` hands the token to the simulated estate as OTEL_EXPORTER_OTLP_HEADERS, which the SDK's
        # exporter and the estate's event sender both honour
        from connectors.simulator.telemetry import EventSender
        from tower_core.demo import estate_env
        from tower_core.settings import Settings

        env = estate_env(Settings(ingest_tokens=["tok new/1"]), {})
        assert env == {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20tok%20new%2F1"}
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20tok-old")
        sender = EventSender(f"{srv.url}/v1/events", interval_s=60)
        sender.add({**event, "id": "tok-2"})
        assert sender.flush() and sender.sent == 1
        sender.shutdown()
        provider = TracerProvider(resource=Resource.create({"service.name": "erp-svc"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{srv.url}/v1/traces")))
        with provider.get_tracer("t").start_as_current_span("token from the environment") as sp:
            tid2 = format(sp.get_span_context().trace_id, "032x")
        provider.shutdown()
        assert wait_for(lambda: httpx.get(f"{srv.url}/api/traces/{tid2}", headers=srv.auth).status_code == 200)
        text = httpx.get(f"{srv.url}/metrics").text
        received = next(ln for ln in text.splitlines() if ln.startswith("tower_events_received_total "))
        assert float(received.split()[1]) == 2  # tok-1 and tok-2; the refused ones never counted
        refused = next(ln for ln in text.splitlines() if ln.startswith('tower_ingest_refused_total{reason="unauth'))
        assert float(refused.split()[1]) == 5  # three OTLP protobuf, one OTLP JSON, one CloudEvents


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("testclient", False),
        ("", False),
        (None, False),
    ],
)
def test_ingest_without_tokens_is_open_to_loopback_peers_only(peer: str | None, local: bool) -> None:
    from collector.auth import ingest_refusal

    assert (ingest_refusal(None, [], peer, open_ingest=False) == "") is local
    assert ingest_refusal(None, [], peer, open_ingest=True) == ""  # opened explicitly
    assert ingest_refusal("Bearer t", ["t"], peer, open_ingest=False) == ""  # a token works from anywhere
    assert "bearer token" in ingest_refusal(None, ["t"], peer, open_ingest=True)  # and is then always needed


def test_ingest_from_another_host_without_tokens_is_refused_with_the_way_out(
    embedded_store: Store, tmp_path: Path
) -> None:
    """A tower bound to a public address with no ingest tokens must not take unauthenticated writes: the peer
    (an in-process ASGI client given a TEST-NET address; nothing leaves this machine) gets a 401 naming both
    settings, nothing is buffered, the refusal is counted; TOWER_INGEST_OPEN opens it."""
    from fastapi.testclient import TestClient

    from collector.app import create_app
    from tower_core.settings import Settings

    migrated(embedded_store)
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"\x0a" * 16, span_id=b"\x01" * 8, name="remote", start_time_unix_nano=1, end_time_unix_nano=2
    )
    event = {"specversion": "1.0", "id": "remote-1", "source": "billing", "type": "invoice.paid"}
    ce = {"Content-Type": "application/cloudevents+json"}
    for open_ingest in (False, True):
        settings = Settings(
            database=embedded_store.database,
            wal_dir=tmp_path / f"wal-{open_ingest}",
            ingest_open=open_ingest,
            sla_eval_interval_s=0,
            reconcile_scheduler=False,
        )
        app = create_app(settings, embedded_store)
        with TestClient(app, client=("203.0.113.7", 40000)) as remote:
            traces = remote.post("/v1/traces", content=req.SerializeToString(), headers=PB)
            events = remote.post("/v1/events", json=event, headers=ce)
            buffered = app.state.ingest.wal.pending_bytes
            metrics = remote.get("/metrics").text
        if open_ingest:
            assert traces.status_code == 200 and events.status_code == 200
            continue
        assert traces.status_code == 401 and traces.headers["WWW-Authenticate"] == "Bearer"
        message = status_pb2.Status.FromString(traces.content).message
        assert "TOWER_INGEST_TOKENS" in message and "TOWER_INGEST_OPEN" in message
        assert events.status_code == 401 and "TOWER_INGEST_OPEN" in events.json()["error"]
        assert buffered == 0
        assert 'tower_ingest_refused_total{reason="remote_without_token"} 2.0' in metrics
