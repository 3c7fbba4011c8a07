"""Correlation rules as plain functions (no store)."""

from __future__ import annotations

import pytest

from collector import correlation as corr
from collector import events


def test_extract_keys_reads_conventions_mappings_and_arrays() -> None:
    names = corr.key_attribute_names({"stripe.invoice_id": "revops.invoice.id", "x": "not.a.key"})
    attrs = {
        "revops.customer.id": "cus_1",
        "stripe.invoice_id": "in_9",
        "revops.payment.id": '["py_1","py_2"]',
        "revops.ledger.entry.id": "",
        "x": "ignored",
    }
    keys = corr.extract_keys(attrs, names)
    assert set(keys) == {("customer", "cus_1"), ("invoice", "in_9"), ("payment", "py_1"), ("payment", "py_2")}
    assert corr.extract_keys({"revops.invoice.id": "x" * 300}, names) == []  # absurd ids are not keys


def test_a_mapped_key_name_in_a_cloudevents_data_is_a_key() -> None:
    """CloudEvents extension names cannot hold a dot, so a mapped name (stripe.invoice_id) arrives in ``data``."""
    names = corr.key_attribute_names({"stripe.invoice_id": "revops.invoice.id"})
    doc = {
        "specversion": "1.0",
        "id": "e1",
        "source": "billing",
        "type": "invoice.paid",
        "time": "2026-01-01T00:00:00Z",
    }
    mapped = events.parse_event({**doc, "data": {"stripe.invoice_id": "in_9", "other": "x"}}, 0, names)
    conventional = events.parse_event({**doc, "id": "e2", "data": {"revops.invoice.id": "in_8"}}, 0, names)
    not_an_object = events.parse_event({**doc, "id": "e3", "data": ["stripe.invoice_id"]}, 0, names)
    table, _ = events.to_tables([mapped, conventional, not_an_object], [0, 0, 0], names)
    assert table.column("InvoiceId").to_pylist() == ["in_9", "in_8", ""]


def test_seed_key_needs_exactly_one() -> None:
    assert corr.seed_key({"invoice_id": "in_1", "trace_id": None}) == ("invoice", "in_1")
    with pytest.raises(ValueError):
        corr.seed_key({"invoice_id": "in_1", "customer_id": "c"})
    with pytest.raises(ValueError):
        corr.seed_key({"invoice_id": None})


def L(kt: str, kv: str, trace: str, system: str, first: int = 0) -> corr.Link:
    return corr.Link(kt, kv, trace, system, first, first)


def test_customer_keys_do_not_expand_but_identifying_keys_do() -> None:
    links = [
        L("invoice", "in_1", "t_bill", "billing"),
        L("customer", "cus_1", "t_bill", "billing"),
        L("payment", "py_1", "t_bill", "billing"),
        L("trace", "t_other", "t_bill", "billing"),
    ]
    follow = corr.keys_to_follow(links, known={("invoice", "in_1")})
    assert follow == {("payment", "py_1"), ("trace", "t_other")}
    assert corr.customers_of(links) == {"cus_1"}


def test_pick_cdp_trace_is_latest_before_transaction_start() -> None:
    sec = 1_000_000_000
    cands = [
        L("customer", "cus_1", "cdp_old", "cdp", 100 * sec),
        L("customer", "cus_1", "cdp_new", "cdp", 900 * sec),
        L("customer", "cus_1", "cdp_after", "cdp", 2000 * sec),
        L("customer", "cus_2", "cdp_c2", "cdp", 5000 * sec),
        L("customer", "cus_1", "billing_t", "billing", 50 * sec),
    ]
    picked = corr.pick_customer_sync(corr.sync_activities(cands), txn_start_ns=1000 * sec)
    assert picked == {("trace", "cdp_new"), ("trace", "cdp_c2")}  # billing_t is older than the change


def test_the_customer_sync_is_the_cdp_change_and_billings_first_update_from_then_on() -> None:
    """CDP changes and billing's customer updates, as traces or trace-less events (the Segment receiver's)."""
    sec = 1_000_000_000
    cands = [
        L("customer", "cus_1", "cdp_t", "cdp", 10 * sec),
        L("customer", "cus_1", "bill_old", "billing", 5 * sec),  # an update before the change
        L("customer", "cus_1", "bill_t", "billing", 40 * sec),
    ]
    events = [
        {"event_id": "ev_cdp", "customer": "cus_1", "system": "cdp", "time_ns": 20 * sec},
        {"event_id": "ev_bill", "customer": "cus_1", "system": "billing", "time_ns": 20 * sec + 3},
        {"event_id": "ev_erp", "customer": "cus_1", "system": "erp", "time_ns": 21 * sec},
        {"event_id": "ev_late", "customer": "cus_2", "system": "cdp", "time_ns": 90 * sec},
    ]
    acts = corr.sync_activities(cands, events)
    assert corr.update_candidates(acts, txn_start_ns=30 * sec) == {"bill_t"}  # the one after the change
    assert corr.pick_customer_sync(acts, txn_start_ns=30 * sec) == {
        ("event", "ev_cdp"),  # the latest change no later than the start
        ("event", "ev_bill"),  # billing's first update from then on
        ("event", "ev_late"),  # cus_2 changed only after: the earliest
    }
    # stamped in whole seconds: an update 0.3 s after the change reads as before it, and still counts
    same_second = [L("customer", "c", "cdp", "cdp", 7 * sec + 300), L("customer", "c", "bill", "billing", 7 * sec)]
    picked = corr.pick_customer_sync(corr.sync_activities(same_second), 9 * sec, updates={"bill"})
    assert picked == {("trace", "cdp"), ("trace", "bill")}
    # a billing trace is an update only when known to name no invoice: the customer's invoice trace is not one
    invoices = [*same_second, L("customer", "c", "inv_t", "billing", 8 * sec)]
    acts = corr.sync_activities(invoices)
    assert corr.update_candidates(acts, 9 * sec) == {"bill", "inv_t"}
    assert corr.pick_customer_sync(acts, 9 * sec, updates={"inv_t"}) == {("trace", "cdp"), ("trace", "inv_t")}
    assert corr.pick_customer_sync(acts, 9 * sec) == {("trace", "cdp")}


def span(trace: str, system: str, step: str, start: int, dur: int) -> corr.SpanView:
    return corr.SpanView(
        trace, f"{start:016x}", "", "s", system, start, dur, "Ok", {"revops.system": system, "revops.step": step}
    )


def test_step_timing_from_three_traces_and_missing_systems() -> None:
    spans = [
        span("t_cdp", "cdp", "cdp_to_billing", 1_000, 10),
        span("t_bill", "billing", "cdp_to_billing", 2_000, 500),
        span("t_bill", "billing", "invoice_to_ledger", 10_000, 100),
        span("t_erp", "erp", "invoice_to_ledger", 50_000_000, 2_000_000),
        span("t_bill", "billing", "payment_to_cash", 60_000_000, 100),
    ]
    steps = {s.step: s for s in corr.step_timings(spans)}
    assert steps["cdp_to_billing"].latency_ms == pytest.approx((2_500 - 1_000) / 1e6)
    assert steps["invoice_to_ledger"].start_ns == 10_000 and steps["invoice_to_ledger"].end_ns == 52_000_000
    assert steps["invoice_to_ledger"].complete
    assert not steps["payment_to_cash"].complete and steps["payment_to_cash"].missing_systems == ("erp",)
    doc = corr.assemble(("invoice", "in_1"), [L("invoice", "in_1", "t_bill", "billing")], spans)
    assert [t["trace_id"] for t in doc["traces"]] == ["t_cdp", "t_bill", "t_erp"]  # time order
    assert [s["start_ns"] for s in doc["spans"]] == sorted(s["start_ns"] for s in doc["spans"])
    assert doc["missing_systems"] == []
    only_billing = corr.assemble(("invoice", "in_1"), [], spans[1:3])
    assert only_billing["missing_systems"] == ["cdp", "erp"]


def step_span(trace: str, system: str, start: int, *, status: str = "Ok", on_resource: bool = False) -> corr.SpanView:
    attrs = {"revops.step": "invoice_to_ledger", "revops.invoice.id": "in_1"}
    resource = {"revops.system": system} if on_resource else {}
    if not on_resource:
        attrs["revops.system"] = system
    return corr.SpanView(trace, f"s{start}", "", "x", system, start, 1_000, status, attrs, [], resource)


def test_a_system_named_on_the_resource_counts_as_the_spans_system() -> None:
    """How the simulator's services (and most SDK users) name their system: once, on the Resource."""
    spans = [step_span("t_b", "billing", 0, on_resource=True), step_span("t_e", "erp", 5_000, on_resource=True)]
    [timing] = corr.step_timings(spans)
    assert timing.complete and timing.latency_ms == pytest.approx(0.006)
    doc = corr.assemble(("invoice", "in_1"), [], spans)
    assert doc["systems_seen"] == ["billing", "erp"] and [s["system"] for s in doc["spans"]] == ["billing", "erp"]


def test_a_later_duplicate_posting_or_payment_does_not_stretch_the_step() -> None:
    """The step ends at the first target activity from its start, as the SLA measures it: the ERP's second
    posting an hour later made a 2 s step read as an hour; an ERP posting before the start is history."""
    sec = 1_000_000_000
    spans = [
        step_span("t_e0", "erp", 0),  # an older posting of the same key: before the start
        step_span("t_b", "billing", 10 * sec),
        step_span("t_e1", "erp", 12 * sec),
        step_span("t_e2", "erp", 3_600 * sec),  # the duplicate
    ]
    [timing] = corr.step_timings(spans)
    assert timing.start_ns == 10 * sec and timing.end_ns == 12 * sec + 1_000
    assert timing.latency_ms == pytest.approx(2_000.001)
    assert corr.step_end(10 * sec, [(0, 1_000)]) is None  # only history: not ended
    assert corr.step_end(10 * sec, [(9 * sec, 11 * sec)]) == 11 * sec  # running across the start
    assert corr.step_end(10 * sec + 700, [(10 * sec + 300, 10 * sec + 300)]) == 10 * sec + 700  # same second


def test_a_failed_posting_does_not_complete_its_step() -> None:
    """An error span or a *failed/rejected* event is an attempt, not the posting (the SLA views agree)."""
    spans = [step_span("t_b", "billing", 0), step_span("t_e", "erp", 5_000, status="Error")]
    [timing] = corr.step_timings(spans)
    assert not timing.complete and timing.end_ns is None and timing.failed_systems == ("erp",)
    event = corr.EventView("ev1", "invoice.posting_failed", 9_000, "erp", "invoice_to_ledger", "", {})
    [timing] = corr.step_timings(spans[:1], [event])
    assert not timing.complete and timing.failed_systems == ("erp",)
    ok = corr.EventView("ev2", "invoice.posted", 9_000, "erp", "invoice_to_ledger", "", {})
    [timing] = corr.step_timings(spans[:1], [event, ok])
    assert timing.complete and timing.end_ns == 9_000


def test_event_times_take_a_leap_second_and_traceparents_of_later_versions() -> None:
    assert events.parse_time("2016-12-31T23:59:60Z") == events.parse_time("2017-01-01T00:00:00Z")
    assert events.parse_time("2016-12-31T23:59:60.5Z") == events.parse_time("2017-01-01T00:00:00.5Z")
    doc = {"specversion": "1.0", "id": "e1", "source": "s", "type": "t"}
    tid, sid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    later = events.parse_event({**doc, "traceparent": f"01-{tid}-{sid}-01-what-comes-next"}, 0)
    assert (later.trace_id, later.span_id) == (tid, sid)
    for bad in (f"00-{tid}-{sid}-01-extra", f"ff-{tid}-{sid}-01", f"0-{tid}-{sid}-01"):
        with pytest.raises(events.EventError, match="traceparent"):
            events.parse_event({**doc, "traceparent": bad}, 0)


def test_a_step_is_read_from_the_span_as_the_sla_reads_it() -> None:
    """The SLA's activity view reads revops.step from the span only; the transaction view agrees."""
    only_resource = corr.SpanView(
        "t", "s1", "", "x", "erp", 0, 1_000, "Ok", {}, [], {"revops.step": "invoice_to_ledger"}
    )
    assert only_resource.step == "" and corr.step_timings([only_resource]) == []


def test_the_events_of_a_key_no_span_carries_seed_the_lookup_with_their_other_keys() -> None:
    rows = [
        {"invoice": "in_1", "payment": "", "ledger_entry": "je_1"},
        {"invoice": "in_1", "payment": "py_1", "ledger_entry": ""},
    ]
    assert corr.event_seeds(rows) == {("invoice", "in_1"), ("ledger_entry", "je_1"), ("payment", "py_1")}
    assert corr.event_seeds([]) == set()


def test_erp_records_complete_a_step_the_transaction_shows_and_start_none() -> None:
    """The ERP's pulled records end a step as the SLA counts them; they never make a step of their own."""
    SEC = 1_000_000_000
    billing = [span("t_bill", "billing", "invoice_to_ledger", 10 * SEC, 100)]
    records = [
        corr.RecordActivity("invoice_to_ledger", "erp", 5 * SEC, 5 * SEC),  # before the start: not its end
        corr.RecordActivity("invoice_to_ledger", "erp", 70 * SEC, 70 * SEC),
        corr.RecordActivity("payment_to_cash", "erp", 90 * SEC, 90 * SEC),  # no payment step in this transaction
    ]
    (step,) = corr.step_timings(billing, (), records)
    assert (step.step, step.end_ns, step.complete, step.missing_systems) == ("invoice_to_ledger", 70 * SEC, True, ())
    (waiting,) = corr.step_timings(billing)
    assert not waiting.complete and waiting.missing_systems == ("erp",)
