"""Transaction and trace answers past their limits: what is kept (the earliest and the latest traces and events of
a busy key, the earliest spans) and that the answer says it was cut. Real chDB; the limits are lowered so that a
few spans show it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector import lookups
from collector.correlation import key_attribute_names
from collector.events import parse_event, to_tables
from tests.conftest import migrated
from tower_core.store import Store
from tower_core.store.otlp_sql import insert_otlp_spans, sync_key_attributes

T0 = 1_767_225_600_000_000_000
MIN = 60 * 1_000_000_000


def request(spans: list[tuple[str, int, str, str]], trace_of: Any = None) -> bytes:
    """spans: (system, start_ns, step, span id hex); each its own trace unless ``trace_of`` maps it to one."""
    req = ExportTraceServiceRequest()
    for system, start, step, sid in spans:
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="revops.system").value.string_value = system
        sp = rs.scope_spans.add().spans.add(
            trace_id=bytes.fromhex(trace_of(sid) if trace_of else sid * 2),
            span_id=bytes.fromhex(sid),
            name=step,
            start_time_unix_nano=start,
            end_time_unix_nano=start + 1_000_000,
        )
        sp.attributes.add(key="revops.invoice.id").value.string_value = "in_busy"
        sp.attributes.add(key="revops.step").value.string_value = step
    return req.SerializeToString()


@pytest.fixture
def store(embedded_store: Store) -> Store:
    migrated(embedded_store)
    sync_key_attributes(embedded_store, key_attribute_names({}))
    return embedded_store


def test_a_busy_invoice_keeps_its_defining_traces_and_says_it_was_cut(store: Store, monkeypatch: Any) -> None:
    """Finalized at T0, posted ten minutes later, then carried by 30 reminder traces: with room for 10 traces the
    answer used to hold the newest 10 only, so the posting and its step were gone without a word."""
    monkeypatch.setattr(lookups, "MAX_TRACES", 10)
    spans = [
        ("billing", T0, "invoice_to_ledger", f"{1:016x}"),
        ("erp", T0 + 10 * MIN, "invoice_to_ledger", f"{2:016x}"),
    ]
    spans += [("billing", T0 + (60 + i) * MIN, "reminder", f"{100 + i:016x}") for i in range(30)]
    insert_otlp_spans(store, [request(spans)], "busy")
    doc = lookups.get_transaction(store, ("invoice", "in_busy"))
    assert doc is not None and doc["truncated"]["traces"] and not doc["truncated"]["spans"]
    kept = {t["trace_id"] for t in doc["traces"]}
    assert {f"{1:016x}" * 2, f"{2:016x}" * 2} <= kept and f"{129:016x}" * 2 in kept  # earliest and latest
    [step] = [s for s in doc["steps"] if s["step"] == "invoice_to_ledger"]
    assert step["complete"] and step["latency_ms"] == pytest.approx(10 * 60_000 + 1)
    monkeypatch.setattr(lookups, "MAX_TRACES", 200)
    whole = lookups.get_transaction(store, ("invoice", "in_busy"))
    assert whole is not None and not any(whole["truncated"].values()) and len(whole["traces"]) == 32


def test_a_huge_trace_is_answered_with_its_earliest_spans_and_marked(store: Store, monkeypatch: Any) -> None:
    monkeypatch.setattr(lookups, "MAX_SPANS", 5)
    one_trace = "ab" * 16
    spans = [("billing", T0 + i * MIN, "invoice_to_ledger", f"{i + 1:016x}") for i in range(12)]
    insert_otlp_spans(store, [request(spans, trace_of=lambda _: one_trace)], "huge")
    trace = lookups.get_trace(store, one_trace)
    assert trace is not None and trace["truncated"] and trace["span_count"] == 5
    assert [s["span_id"] for s in trace["spans"]] == [f"{i + 1:016x}" for i in range(5)]
    doc = lookups.get_transaction(store, ("trace", one_trace))
    assert doc is not None and doc["truncated"]["spans"] and len(doc["spans"]) == 5


def test_a_customer_with_more_events_than_an_answer_holds_gets_the_first_and_the_latest(
    store: Store, monkeypatch: Any
) -> None:
    """The oldest 1,000 of 1,100 events were shown and the newest dropped, with no marker."""
    monkeypatch.setattr(lookups, "MAX_EVENTS", 10)
    names = key_attribute_names({})
    docs = [
        {
            "specversion": "1.0",
            "id": f"e{i:03d}",
            "source": "crm",
            "type": "customer.touched",
            "time": f"2026-01-0{1 + i // 10}T00:{i % 10:02d}:00Z",
            "data": {"revops.customer.id": "cus_busy"},
        }
        for i in range(30)
    ]
    events = [parse_event(d, i, names) for i, d in enumerate(docs)]
    table, _ = to_tables(events, [0] * len(events), names)
    store.insert_arrow("business_events", table)
    doc = lookups.get_transaction(store, ("customer", "cus_busy"))
    assert doc is not None and doc["truncated"]["events"]
    ids = [e["id"] for e in doc["events"]]
    assert ids == [f"e{i:03d}" for i in (*range(5), *range(25, 30))], orjson.dumps(ids)


def test_a_posting_known_from_the_erps_records_completes_the_step_as_the_sla_counts_it(store: Store) -> None:
    """An ERP exporting no spans (Tryton), or a posting the tower's own corrective sync wrote: the reconciler
    pulls the record and the SLA counts the step done, but the transaction said "waiting for erp" and late."""
    import datetime as dt

    from reconciler.sla.ledger_activity import Activity
    from tower_core.store.sla import write_step_activity

    insert_otlp_spans(store, [request([("billing", T0, "invoice_to_ledger", f"{1:016x}")])], "billing_only")
    (waiting,) = lookups.get_transaction(store, ("invoice", "in_busy"))["steps"]  # type: ignore[index]
    assert (waiting["complete"], waiting["missing_systems"]) == (False, ["erp"])
    posted = dt.datetime.fromtimestamp((T0 + 7 * MIN) / 1e9, dt.UTC)
    write_step_activity(store, "erp", [Activity("invoice_to_ledger", "invoice", "in_busy", "EU", posted)])
    other = posted - dt.timedelta(minutes=5)  # another invoice's posting: not this step's end
    write_step_activity(store, "erp", [Activity("invoice_to_ledger", "invoice", "in_other", "EU", other)])
    (step,) = lookups.get_transaction(store, ("invoice", "in_busy"))["steps"]  # type: ignore[index]
    assert step["complete"] and step["latency_ms"] == 7 * 60_000 and step["missing_systems"] == []
    assert step["end"] == posted.strftime("%Y-%m-%dT%H:%M:%S.000000000Z")
