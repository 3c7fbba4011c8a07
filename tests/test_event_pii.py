"""PII in the CDP's CloudEvents: the pure scrubber, then a served tower's buffer and its correlation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import orjson
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from collector.event_pii import scrubbed
from collector.events import parse_event
from connectors.segment.tracking import PiiPolicy
from tests.server import TowerServer

KEY = "event-pii-key"
HASH = PiiPolicy.build("hash", KEY, ["email", "phone", "name", "address"])
DROP = PiiPolicy.build("drop", None, ["email", "phone", "name", "address"])
EMAIL = "hank.secret@example.com"
TRACE = "a1" * 16


def cloud_event(system: str, **extra: object) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"ce-{system}",
        "source": f"sim-{system}",
        "type": "cdp.profile.updated",
        "time": "2026-11-27T10:00:00Z",
        "traceparent": f"00-{TRACE}-{'b2' * 8}-01",
        "revopssystem": system,
        "data": {
            "revops.cdp.user_id": EMAIL,
            "revops.customer.id": "cus_hank",
            "email": EMAIL,
            "phone": "+1 555 0100",
            "note": f"changed by {EMAIL}",
            "plan": "pro",
        },
        **extra,
    }


def test_the_cdps_events_are_hashed_and_other_systems_left_alone() -> None:
    event = parse_event(cloud_event("cdp", subject=EMAIL), 0)
    out = scrubbed(event, HASH)
    data = orjson.loads(out.data)
    assert out.attributes["revops.cdp.user_id"] == HASH.identifier(EMAIL) == data["revops.cdp.user_id"]
    assert out.attributes["revops.customer.id"] == "cus_hank" and data["plan"] == "pro"
    assert data["email"] == HASH.digest(EMAIL) and data["phone"].startswith("hmac-sha256:")
    assert data["note"] == HASH.digest(f"changed by {EMAIL}") and out.subject == HASH.identifier(EMAIL)
    assert EMAIL not in orjson.dumps(out.to_json()).decode() and "555" not in out.data
    billing = parse_event(cloud_event("billing"), 0)
    assert scrubbed(billing, HASH) is billing  # only the CDP's events are the CDP's data
    dropped = scrubbed(event, DROP)
    assert "revops.cdp.user_id" not in dropped.attributes and dropped.subject == ""
    assert set(orjson.loads(dropped.data)) == {"revops.customer.id", "plan"}
    addressed = scrubbed(parse_event({**cloud_event("cdp"), "id": EMAIL}, 0), DROP)
    assert addressed.event_id and EMAIL not in addressed.event_id  # an id stays an id (keyed), never the address


def test_a_served_tower_buffers_the_cdps_events_hashed_and_joins_them_to_its_spans(tmp_path: Path) -> None:
    """The CDP's CloudEvents were buffered and stored as sent, while its spans were pseudonymized: the raw address
    was kept, and one CDP user had two keys (raw in events, pseudonym in spans), so the two never joined."""
    with TowerServer(tmp_path, TOWER_CDP_PII_HMAC_KEY=KEY, TOWER_FLUSH_INTERVAL_S="30") as server:
        batch = [cloud_event("cdp"), {**cloud_event("billing"), "traceparent": f"00-{'c3' * 16}-{'d4' * 8}-01"}]
        r = httpx.post(
            f"{server.url}/v1/events",
            content=orjson.dumps(batch),
            headers={"Content-Type": "application/cloudevents-batch+json"},
        )
        assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
        wal = b"".join(p.read_bytes() for p in (tmp_path / "wal").rglob("*") if p.is_file())
        assert b"ce-cdp" in wal and HASH.identifier(EMAIL).encode() in wal  # buffered, uncompressed, hashed
        # the billing event's four (its key attribute, and three in its data), as sent; none of the CDP's
        assert wal.count(EMAIL.encode()) == 4
    with server:  # the stop flushed the buffer; a CDP span names the same user
        provider = TracerProvider(resource=Resource.create({"service.name": "cdp", "revops.system": "cdp"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{server.url}/v1/traces")))
        with provider.get_tracer("t").start_as_current_span("identify", attributes={"revops.cdp.user_id": EMAIL}) as sp:
            span_trace = format(sp.get_span_context().trace_id, "032x")
        provider.shutdown()
    # one key for the user, linking the event's trace and the span's (read once the server is stopped: one chDB
    # path per process)
    out = subprocess.run(
        [sys.executable, "-c", LINKS_SCRIPT, str(tmp_path / "data")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout) == [{"v": HASH.identifier(EMAIL), "t": sorted([TRACE, span_trace])}]


LINKS_SCRIPT = """
import json, sys
from pathlib import Path
from tower_core.settings import Settings
from tower_core.store import open_store
s = open_store(Settings(data_dir=Path(sys.argv[1])))
print(json.dumps(s.query_rows(
    "SELECT KeyValue AS v, arraySort(groupUniqArray(lower(TraceId))) AS t FROM $db.business_key_links "
    "WHERE KeyType = 'cdp_user' AND System = 'cdp' GROUP BY KeyValue")))
"""
