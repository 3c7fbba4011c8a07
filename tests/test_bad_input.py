"""Hostile requests get a clear 4xx, the server's memory stays bounded, and nothing is half-written."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.server import TowerServer

PB = {"Content-Type": "application/x-protobuf"}
JS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TowerServer]:
    with TowerServer(tmp_path_factory.mktemp("bad-input")) as srv:
        yield srv


def rss_mb(srv: TowerServer) -> float:
    assert srv.proc is not None
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def received(srv: TowerServer) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    return float(next(ln for ln in text.splitlines() if ln.startswith("tower_spans_received_total ")).split()[1])


def refused(srv: TowerServer) -> dict[str, float]:
    text = httpx.get(f"{srv.url}/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("tower_ingest_refused_total{")]
    return {ln.split('reason="')[1].split('"')[0]: float(ln.split()[1]) for ln in lines}


REASON = {400: "malformed", 413: "too_large", 415: "unsupported_media_type"}


def one_span(**attrs: str) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    sp = (
        req.resource_spans.add()
        .scope_spans.add()
        .spans.add(trace_id=b"\x07" * 16, span_id=b"\x08" * 8, name="s", start_time_unix_nano=1, end_time_unix_nano=2)
    )
    for k, v in attrs.items():
        sp.attributes.add(key=k).value.string_value = v
    return req


def test_hostile_bodies_get_4xx_with_bounded_memory(server: TowerServer) -> None:
    before_rss, before_spans, before_refused = rss_mb(server), received(server), refused(server)
    answered: list[int] = []
    cases: list[tuple[str, bytes, dict[str, str], int]] = []
    cases.append(
        (
            "gzip bomb (1 GiB of zeros)",
            gzip.compress(b"\0" * (1 << 30), compresslevel=9),
            {**PB, "Content-Encoding": "gzip"},
            413,
        )
    )
    cases.append(("deeply nested JSON", b'{"resourceSpans": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JS, 400))
    many = one_span()
    for i in range(10_000):
        many.resource_spans[0].scope_spans[0].spans[0].attributes.add(key=f"k{i}").value.string_value = "v"
    cases.append(("10k attributes on one span", many.SerializeToString(), PB, 400))
    bad_utf8 = one_span(name="ok").SerializeToString().replace(b"ok", b"\xff\xfe")
    cases.append(("invalid UTF-8 in a protobuf string", bad_utf8, PB, 400))
    cases.append(("invalid UTF-8 in JSON", b'{"resourceSpans": [{"x": "\xff\xfe"}]}', JS, 400))
    huge = ExportTraceServiceRequest()
    huge.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\x01" * 1_000_000, span_id=b"\x02" * 8)
    cases.append(("1 MB trace id", huge.SerializeToString(), PB, 400))
    cases.append(
        (
            "JSON trace id of 100k hex chars",
            b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"'
            + b"ab" * 50_000
            + b'","spanId":"'
            + b"01" * 8
            + b'"}]}]}]}',
            JS,
            400,
        )
    )
    cases.append(("plain text", b"spans", {"Content-Type": "text/plain"}, 415))
    for name, body, headers, expected in cases:
        r = httpx.post(f"{server.url}/v1/traces", content=body, headers=headers, timeout=60)
        assert r.status_code == expected, f"{name}: {r.status_code} {r.content[:200]!r}"
        answered.append(r.status_code)
        if headers["Content-Type"] == PB["Content-Type"]:
            message = status_pb2.Status.FromString(r.content).message
        elif expected == 415:
            message = r.json()["message"]
        else:
            message = r.json()["message"]
        assert message, f"{name}: no message"
    assert received(server) == before_spans  # nothing of it was kept
    assert rss_mb(server) - before_rss < 300, "memory grew beyond the request caps"
    # events: invalid UTF-8, nesting, oversize
    for body, ctype in (
        (b"\xff\xfe", "application/cloudevents+json"),
        (b"[" * 100_000 + b"]" * 100_000, "application/cloudevents-batch+json"),
        (b" " * (25 * 1024 * 1024), "application/cloudevents+json"),
    ):
        r = httpx.post(f"{server.url}/v1/events", content=body, headers={"Content-Type": ctype}, timeout=60)
        assert 400 <= r.status_code < 500 and r.json()["error"]
        answered.append(r.status_code)
    # each request refused whole is counted by its reason: a client failing every request showed nowhere
    after = refused(server)
    counted = {k: after.get(k, 0) - before_refused.get(k, 0) for k in set(after) | set(before_refused)}
    tally = {REASON[code]: float(answered.count(code)) for code in set(answered)}
    assert {k: v for k, v in counted.items() if v} == tally and set(tally) == set(REASON.values())


def test_api_errors_are_json_4xx(server: TowerServer) -> None:
    for method, path in (
        ("GET", "/api/traces/" + "z" * 10_000),
        ("GET", "/api/transactions?invoice_id=" + "x" * 5000),
        ("POST", "/api/tokens"),
        ("GET", "/api/nope"),
    ):
        r = httpx.request(method, f"{server.url}{path}")
        assert 400 <= r.status_code < 500, (path, r.status_code)
        assert "detail" in r.json()


def test_api_body_cap_and_no_cors_by_default(server: TowerServer) -> None:
    r = httpx.post(
        f"{server.url}/api/tokens",
        content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while streaming
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(f"{server.url}/api/tokens", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    pre = httpx.options(
        f"{server.url}/api/drift", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in pre.headers


ADMIN = "bad-input-admin"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with TowerServer(tmp_path_factory.mktemp("bad-input-secured"), TOWER_ADMIN_TOKEN=ADMIN) as srv:
        tokens = {"admin": ADMIN}
        for role in ("viewer", "operator"):
            made = httpx.post(f"{srv.url}/api/tokens", json={"name": f"{role}-1", "role": role}, headers=bearer(ADMIN))
            tokens[role] = made.json()["token"]
        yield {"url": srv.url, **tokens}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit_of(s: dict[str, Any], **params: str) -> list[dict[str, Any]]:
    return httpx.get(f"{s['url']}/api/audit", params={"limit": "1000", **params}, headers=bearer(ADMIN)).json()["items"]


def test_a_body_refused_as_too_large_changes_nothing(secured: dict[str, Any]) -> None:
    def padded() -> Iterator[bytes]:  # valid JSON, then spaces past the cap, streamed without Content-Length
        yield b'{"name": "ghost-413", "role": "admin"}'
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(f"{secured['url']}/api/tokens", content=padded(), headers={**JS, **bearer(ADMIN)})
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]
    names = [t["name"] for t in httpx.get(f"{secured['url']}/api/tokens", headers=bearer(ADMIN)).json()]
    assert "ghost-413" not in names and "viewer-1" in names  # the route never ran
    assert not [a for a in audit_of(secured, action="token.create") if "ghost-413" in a["after"]]


def test_a_malformed_body_meets_the_token_and_role_check_first(secured: dict[str, Any]) -> None:
    url = f"{secured['url']}/api/runs"
    assert httpx.post(f"{secured['url']}/api/tokens", content=b"{", headers=JS).status_code == 401
    denied = httpx.post(url, content=b'{"full": tru', headers={**JS, **bearer(secured["viewer"])})
    assert denied.status_code == 403 and "operator role" in denied.json()["detail"]
    bad = httpx.post(url, content=b'{"full": tru', headers={**JS, **bearer(secured["operator"])})
    assert bad.status_code == 422  # the operator may: now the body's error
    refused = {(a["actor"], a["outcome"]) for a in audit_of(secured, object_type="api", object_id="POST /api/runs")}
    assert {("viewer-1", "denied"), ("operator-1", "rejected")} <= refused


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/audit?since=0001-01-01T00:00:00%2B01:00", None),
        ("GET", "/api/audit?until=9999-12-31T23:59:59-01:00", None),
        ("GET", "/api/sla/breaches?since=1969-12-31T23:00:00Z", None),
        ("POST", "/api/runs", {"as_of": "0001-01-01T00:00:00+01:00"}),
        ("POST", "/api/sla/evaluate", {"now": "1900-01-01T00:00:00Z"}),
        ("GET", "/api/drift?min_age_days=4294967296", None),
        ("GET", "/api/drift?min_amount=18446744073709551616", None),
        ("POST", "/api/drift/bulk", {"action": "acknowledge", "expected_count": 0, "note": "n",
                                     "filter": {"min_amount": 18446744073709551616}}),
    ],
)  # fmt: skip
def test_times_and_numbers_the_store_cannot_hold_are_422(
    secured: dict[str, Any], method: str, path: str, body: dict[str, Any] | None
) -> None:
    """They used to wrap silently (a filter meaning "nothing" matched everything), answer 503 "store unavailable"
    to a request that can never succeed, or store a run nobody could list again (500 on GET /api/runs)."""
    r = httpx.request(method, f"{secured['url']}{path}", json=body, headers=bearer(ADMIN))
    assert r.status_code == 422, r.text
    assert httpx.get(f"{secured['url']}/api/runs", headers=bearer(ADMIN)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/drift/x0/acknowledge", b'{"note": NaN}'),
        ("/api/runs", b'{"as_of": Infinity}'),
        ("/api/sla/evaluate", b'{"now": NaN}'),
        ("/api/drift/bulk", b'{"action": "acknowledge", "expected_count": 1e400, "note": "n", "filter": {}}'),
        ("/api/tokens", b'{"name": NaN, "role": "viewer"}'),
        ("/api/sources/skipped/dismiss", b'{"stream": "invoices", "ref": -Infinity, "note": "n"}'),
    ],
)
def test_non_finite_numbers_in_a_body_are_a_422_not_a_500(secured: dict[str, Any], path: str, body: bytes) -> None:
    """Python's JSON reader takes NaN and Infinity; the 422 that echoes them back could not be written as JSON."""
    r = httpx.post(f"{secured['url']}{path}", content=body, headers={**JS, **bearer(ADMIN)})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] and any(isinstance(e.get("input"), str) for e in r.json()["detail"])


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        ("/api/runs", b'{"region": "\\ud800"}', JS),  # a lone surrogate, as JSON escapes it
        ("/api/drift/x0/ignore", b'{"note": "\xed\xa0\x80"}', JS),  # the same, as (invalid) UTF-8 bytes
        ("/api/drift/x0/acknowledge", b'{"\\udfff": 1}', JS),  # in a key
        ("/api/tokens", b"\xff", {"Content-Type": "text/plain"}),  # not JSON, not UTF-8
        ("/api/sla/evaluate", b'{"now": "\\ud800"}', JS),
    ],
)
def test_a_body_that_is_not_valid_unicode_is_a_422_not_a_500(
    secured: dict[str, Any], path: str, body: bytes, content_type: dict[str, str]
) -> None:
    """The 422 echoes the rejected input, which could not be encoded as UTF-8 JSON."""
    r = httpx.post(f"{secured['url']}{path}", content=body, headers={**content_type, **bearer(ADMIN)})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["detail"]


@pytest.mark.parametrize("name", ["   ", " alice", "alice ", "al  ice", "al\tice"])
def test_a_token_name_that_would_blur_the_audit_trail_is_refused(secured: dict[str, Any], name: str) -> None:
    r = httpx.post(f"{secured['url']}/api/tokens", json={"name": name, "role": "operator"}, headers=bearer(ADMIN))
    assert r.status_code == 422, r.text
    ok = httpx.post(f"{secured['url']}/api/tokens", json={"name": "Ann Lee", "role": "viewer"}, headers=bearer(ADMIN))
    assert ok.status_code == 201
