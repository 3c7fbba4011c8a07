"""PII in the CDP's spans: the pure scrubber, then the real OTel SDK exporter against a running `tower serve`."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from collector.span_pii import may_hold_pii, scrub_cdp_spans, scrubbed_payload
from connectors.segment.tracking import PiiPolicy
from tests.server import TowerServer

KEY = "span-pii-key"
HASH = PiiPolicy.build("hash", KEY, ["email", "phone", "name", "address"])
DROP = PiiPolicy.build("drop", None, ["email", "phone", "name", "address"])
EMAIL = "heidi.secret@example.com"


def kv(key: str, value: object) -> KeyValue:
    if isinstance(value, list):
        return KeyValue(key=key, value=AnyValue(array_value={"values": [AnyValue(string_value=v) for v in value]}))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def request(system: str) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([kv("revops.system", system), kv("service.name", f"{system}-svc")])
    span = rs.scope_spans.add().spans.add(name="identify", trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    span.attributes.extend(
        [
            kv("revops.customer.id", EMAIL),
            kv("revops.invoice.id", "in_1"),
            kv("enduser.id", EMAIL),
            kv("Phone Number", "+1 555 0199"),
            kv("client.address", "203.0.113.9"),
            kv("cc", [EMAIL, "none"]),
            kv("seats", 3),
            kv("product_name", "Pro"),
        ]
    )
    span.events.add(name="traits").attributes.extend([kv("email", EMAIL)])
    return req


def attrs(req: ExportTraceServiceRequest) -> dict[str, object]:
    span = req.resource_spans[0].scope_spans[0].spans[0]
    out: dict[str, object] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = (
            [v.string_value for v in a.value.array_value.values] if kind == "array_value" else getattr(a.value, kind)
        )
    return out


def test_cdp_spans_are_hashed_and_other_systems_left_alone() -> None:
    req = request("cdp")
    assert scrub_cdp_spans(req, HASH) == 6
    got = attrs(req)
    assert got["revops.customer.id"] == HASH.identifier(EMAIL) == got["enduser.id"]  # one pseudonym, as in events
    assert got["revops.invoice.id"] == "in_1" and got["seats"] == 3 and got["product_name"] == "Pro"
    assert got["cc"] == [HASH.digest(EMAIL), "none"]
    assert str(got["Phone Number"]).startswith("hmac-sha256:") and str(got["client.address"]).startswith("hmac")
    assert "secret" not in str(req) and "555" not in str(req) and "203.0.113" not in str(req)
    billing = request("billing")
    assert scrub_cdp_spans(billing, HASH) == 0 and attrs(billing)["enduser.id"] == EMAIL


def test_a_span_that_names_itself_the_cdps_is_scrubbed_in_another_systems_block() -> None:
    """The store reads a span's own revops.system before its resource's, and so does the scrubber."""
    req = request("billing")
    spans = req.resource_spans[0].scope_spans[0].spans
    spans[0].attributes.append(kv("revops.system", "cdp"))
    spans.add(name="charge", trace_id=b"\x03" * 16, span_id=b"\x04" * 8).attributes.extend([kv("email", EMAIL)])
    payload, changed = scrubbed_payload(req, HASH)
    assert changed == 6 and payload == req.SerializeToString()  # the payload is the scrubbed request's bytes
    got = attrs(ExportTraceServiceRequest.FromString(payload))
    assert got["enduser.id"] == HASH.identifier(EMAIL) and got["revops.system"] == "cdp"
    assert spans[1].attributes[0].value.string_value == EMAIL  # billing's own span is billing's data
    untouched = request("billing")
    assert scrubbed_payload(untouched, HASH) == (untouched.SerializeToString(), 0)


def test_the_look_at_the_bytes_never_passes_over_what_the_walk_would_scrub() -> None:
    """Blocks whose bytes hold no e-mail address and no PII key are not walked (the walk costs ~6 ms per 1,000
    spans in Python): every attribute the walk scrubs must make the look say yes."""
    policy = PiiPolicy.build("hash", KEY, ["email", "phone", "name", "ip", "first_name", "address"])
    clean = [kv("server.address", "api.internal"), kv("service.name", "cdp"), kv("seats", 3), kv("id", "a@b")]
    for odd in (
        kv("Phone Number", "1"), kv("FIRST NAME", "x"), kv("first__name", "x"), kv("Name", "x"), kv("IP", "1.2.3.4"),
        kv("billing_email", "x"), kv("client.address", "1.2.3.4"), kv("note", f"write to {EMAIL}"), kv("cc", [EMAIL]),
        kv("revops.customer.phone", "+1 555 0100"),  # a revops name is a PII field too, not only a business key
        kv("billing.server.address", "x"),  # not server.address itself: only whole keys are passed over
        kv("EMA\u0130L_secondary", "1"),  # 'İ' lower-cases differently in str and bytes
    ):  # fmt: skip
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.extend([kv("revops.system", "cdp")])
        span = rs.scope_spans.add().spans.add(name="s", trace_id=b"@" * 16, span_id=b"@a.bc@@@")  # '@' in binary
        span.attributes.extend([*clean, odd])
        assert may_hold_pii(rs.SerializeToString(), policy), odd.key
        assert scrub_cdp_spans(req, policy) == 1, odd.key
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([kv("revops.system", "cdp")])
    rs.scope_spans.add().spans.add(name="s", trace_id=b"@" * 16, span_id=b"\x01" * 8).attributes.extend(clean)
    assert not may_hold_pii(rs.SerializeToString(), policy) and scrub_cdp_spans(req, policy) == 0


def test_addresses_in_the_names_and_status_messages_of_the_cdps_spans_are_hashed_where_they_stand() -> None:
    """Only attribute lists were walked: a span named after a user, or a status message quoting one (exception
    text often does), kept the address."""

    def named(system: str) -> ExportTraceServiceRequest:
        req = request(system)
        ss = req.resource_spans[0].scope_spans[0]
        ss.scope.name = f"scope-of {EMAIL}"
        ss.spans[0].name = f"identify {EMAIL}"
        ss.spans[0].status.message = f"rejected profile for {EMAIL}"
        ss.spans[0].events[0].name = f"sent to {EMAIL}"
        return req

    for policy, shown in ((HASH, HASH.digest(EMAIL)), (DROP, "[email]")):
        payload, _ = scrubbed_payload(named("cdp"), policy)
        ss = ExportTraceServiceRequest.FromString(payload).resource_spans[0].scope_spans[0]
        assert (ss.scope.name, ss.spans[0].name) == (f"scope-of {shown}", f"identify {shown}")
        assert (ss.spans[0].status.message, ss.spans[0].events[0].name) == (
            f"rejected profile for {shown}",
            f"sent to {shown}",
        )
        assert EMAIL.encode() not in payload
    billing = named("billing")
    assert scrubbed_payload(billing, HASH) == (billing.SerializeToString(), 0)


def nested(value: object) -> AnyValue:
    if isinstance(value, dict):
        return AnyValue(kvlist_value={"values": [KeyValue(key=k, value=nested(v)) for k, v in value.items()]})
    if isinstance(value, list):
        return AnyValue(array_value={"values": [nested(v) for v in value]})
    return AnyValue(string_value=str(value))


def test_addresses_and_pii_fields_inside_maps_and_nested_arrays_are_hashed() -> None:
    """Map (kvlist) values and arrays of arrays are stored as JSON now; the scrubber looked one array deep."""
    traits = {"email": EMAIL, "note": f"reach {EMAIL}", "plan": "pro", "more": [[EMAIL, "x"], {"Phone": "+1 555 0199"}]}
    for policy in (HASH, DROP):
        req = request("cdp")
        span = req.resource_spans[0].scope_spans[0].spans[0]
        span.attributes.append(KeyValue(key="traits", value=nested(traits)))
        span.attributes.append(KeyValue(key="lists", value=nested([[EMAIL], "ok"])))
        scrub_cdp_spans(req, policy)
        text = str(req)
        assert "secret" not in text and "555" not in text, policy.mode
        (got,) = [a.value for a in span.attributes if a.key == "traits"]
        members = {m.key: m.value for m in got.kvlist_value.values}
        assert members["plan"].string_value == "pro"
        if policy.mode == "hash":
            assert members["email"].string_value == HASH.digest(EMAIL)
            assert members["more"].array_value.values[0].array_value.values[0].string_value == HASH.digest(EMAIL)
        else:
            assert members["email"].WhichOneof("value") is None


def test_drop_mode_removes_what_it_would_hash() -> None:
    req = request("cdp")
    scrub_cdp_spans(req, DROP)
    got = attrs(req)
    assert set(got) == {"revops.invoice.id", "cc", "seats", "product_name"} and got["cc"] == ["", "none"]
    assert "secret" not in str(req)


def test_a_served_tower_stores_the_cdps_spans_without_pii(tmp_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    with TowerServer(tmp_path, TOWER_CDP_PII_HMAC_KEY=KEY) as server:
        tids = {}
        for system in ("cdp", "billing"):
            provider = TracerProvider(resource=Resource.create({"service.name": system, "revops.system": system}))
            provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{server.url}/v1/traces")))
            with provider.get_tracer("t").start_as_current_span(
                "identify", attributes={"revops.customer.id": EMAIL, "email": EMAIL, "plan": "pro"}
            ) as span:
                tids[system] = format(span.get_span_context().trace_id, "032x")
            provider.shutdown()
        # a billing service's span that says it is the CDP's (a relay): the CDP's data, scrubbed
        provider = TracerProvider(resource=Resource.create({"service.name": "relay", "revops.system": "billing"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{server.url}/v1/traces")))
        with provider.get_tracer("t").start_as_current_span(
            "relay", attributes={"revops.system": "cdp", "email": EMAIL}
        ) as span:
            tids["relay"] = format(span.get_span_context().trace_id, "032x")
        provider.shutdown()

        def spans(tid: str) -> list[dict]:
            r = httpx.get(f"{server.url}/api/traces/{tid}", headers=server.auth)
            return r.json()["spans"] if r.status_code == 200 else []

        deadline = time.monotonic() + 15
        while not all(spans(tid) for tid in tids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        cdp, billing, relay = spans(tids["cdp"]), spans(tids["billing"]), spans(tids["relay"])
        assert cdp and billing and relay
        assert relay[0]["attributes"]["email"] == HASH.digest(EMAIL)
        assert EMAIL not in orjson.dumps(cdp).decode() and cdp[0]["attributes"]["plan"] == "pro"
        assert cdp[0]["attributes"]["revops.customer.id"] == HASH.identifier(EMAIL)
        assert billing[0]["attributes"]["email"] == EMAIL  # only the CDP's spans are the CDP's data
        # the pseudonym is a key like any other: the CDP trace is found by it
        r = httpx.get(
            f"{server.url}/api/transactions", headers=server.auth, params={"customer_id": HASH.identifier(EMAIL)}
        )
        assert r.status_code == 200 and tids["cdp"] in {t["trace_id"] for t in r.json()["traces"]}
