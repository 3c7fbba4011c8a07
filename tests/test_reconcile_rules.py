"""The reconciler's pure decisions as plain functions: classification, queue states, aging, tolerance,
policy, idempotency keys and the circuit breaker state machine."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pytest

from reconciler import classify as c
from reconciler import policy, run_owner
from reconciler.breaker import Breaker
from tower_core.models import Invoice, LedgerEntry
from tower_core.settings import Settings

AS_OF = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
RULES = c.Rules(grace_s={"*": 7200}, default_grace_s=7200, tolerances={"USD": c.Tolerance(1, 0)})


def invoice_facts(**over: Any) -> dict[str, Any]:
    """Facts of one invoice key as the store's comparison query returns them: a clean match by default."""
    issued = AS_OF - dt.timedelta(days=5)
    facts = {
        "key": "in_1",
        "b_n": 1,
        "b_customer": "cus_1",
        "b_region": "EU",
        "b_currency": "USD",
        "b_total": 12_000,
        "b_tax": 2_000,
        "b_subtotal": 10_000,
        "b_status": "open",
        "b_issued": issued,
        "b_finalized": issued,
        "b_day": issued.date(),
        "e_n": 1,
        "e_currency": "USD",
        "e_amount": 12_000,
        "e_sum": 12_000,
        "e_status": "open",
        "e_entry": "le_1",
        "e_region": "EU",
        "e_party": "cus_1",
        "e_day": issued.date(),
        "rejected": "",
        "e_applied": 0,
        "b_alloc": 0,
        "b_alloc_unposted": 0,
        "b_credit_unposted": 0,
    }
    facts.update(over)
    return facts


def payment_facts(**over: Any) -> dict[str, Any]:
    facts = {
        "key": "py_1",
        "p_n": 1,
        "p_kind": "payment",
        "p_status": "succeeded",
        "p_amount": 12_000,
        "p_currency": "USD",
        "p_region": "EU",
        "p_customer": "cus_1",
        "p_occurred": AS_OF - dt.timedelta(days=4),
        "p_alloc_n": 1,
        "p_alloc_refs": "in_1",
        "e_n": 1,
        "e_memo_n": 0,
        "e_applied_n": 1,
        "e_sum": 12_000,
        "e_memo_sum": 0,
        "e_type": "payment",
        "e_status": "posted",
        "e_currency": "USD",
        "e_currencies": "USD",
        "e_region": "EU",
        "e_party": "cus_1",
        "e_entry": "le_2",
        "e_day": (AS_OF - dt.timedelta(days=4)).date(),
        "e_applied_refs": "in_1",
    }
    facts.update(over)
    return facts


def test_clean_invoice_is_no_drift() -> None:
    assert c.classify_invoice(invoice_facts(), RULES, AS_OF) is None


def test_a_posting_in_another_region_is_a_region_mismatch_unless_the_erp_records_none() -> None:
    f = c.classify_invoice(invoice_facts(e_region="NA"), RULES, AS_OF)
    assert f is not None and (f.cls, f.reason, f.region) == (c.REGION_MISMATCH, "posted_in_other_region", "EU")
    assert f.diff_fields == ["region"] and f.amount_minor == int(invoice_facts()["b_total"])
    assert c.classify_invoice(invoice_facts(e_region=""), RULES, AS_OF) is None
    f = c.classify_invoice(invoice_facts(e_region="NA", e_amount=1), RULES, AS_OF)  # the amount comes first
    assert f is not None and f.cls == c.AMOUNT_MISMATCH


@pytest.mark.parametrize(
    ("over", "cls", "reason"),
    [
        ({"e_n": 0, "e_sum": 0, "e_amount": None, "e_currency": ""}, c.MISSING_IN_ERP, "not_posted"),
        ({"e_n": 0, "e_sum": 0, "rejected": "period 2025-12 is closed"}, c.MISSING_IN_ERP, "erp_rejected"),
        ({"b_n": 0, "b_status": "", "b_currency": "", "b_total": None}, c.MISSING_IN_BILLING, "not_in_billing"),
        ({"e_n": 2, "e_sum": 24_000}, c.DUPLICATE_POSTING, "posted_twice"),
        ({"e_currency": "EUR"}, c.CURRENCY_MISMATCH, "currency_differs"),
        ({"e_amount": 10_000, "e_sum": 10_000}, c.AMOUNT_MISMATCH, "amount_tax"),
        ({"e_amount": 13_500, "e_sum": 13_500}, c.AMOUNT_MISMATCH, "amount_differs"),
        ({"b_alloc": 5_000, "e_applied": 3_000}, c.UNDER_APPLIED, "applied_less"),
        ({"b_alloc": 5_000, "e_applied": 6_000}, c.OVER_APPLIED, "applied_more"),
        ({"b_status": "paid", "b_alloc": 12_000, "e_applied": 12_000}, c.STATUS_MISMATCH, "paid_but_open"),
        ({"b_status": "void"}, c.STATUS_MISMATCH, "voided_but_posted"),
        ({"b_status": "draft"}, c.STATUS_MISMATCH, "draft_but_posted"),
    ],
)
def test_invoice_classes(over: dict[str, Any], cls: str, reason: str) -> None:
    f = c.classify_invoice(invoice_facts(**over), RULES, AS_OF)
    assert f is not None
    assert (f.cls, f.reason) == (cls, reason)
    assert f.primary_key == ("le_1" if cls == c.MISSING_IN_BILLING else "in_1")
    assert f.diff_fields, "a finding carries the fields whose values differ"


def test_field_level_diff_carries_both_sides() -> None:
    f = c.classify_invoice(invoice_facts(e_amount=13_500, e_sum=13_500), RULES, AS_OF)
    assert f is not None
    assert f.billing["total_minor"] == "12000" and f.erp["total_minor"] == "13500"
    assert f.diff_fields == ["total_minor"]
    assert f.amount_minor == -1_500


def test_amount_inside_tolerance_is_no_drift() -> None:
    assert c.classify_invoice(invoice_facts(e_amount=12_001, e_sum=12_001), RULES, AS_OF) is None
    assert c.classify_invoice(invoice_facts(e_amount=12_002, e_sum=12_002), RULES, AS_OF) is not None
    relative = c.Rules(default_tolerance=c.Tolerance(0, 50))  # 0.5 %
    assert c.classify_invoice(invoice_facts(e_amount=12_060, e_sum=12_060), relative, AS_OF) is None
    assert c.classify_invoice(invoice_facts(e_amount=12_061, e_sum=12_061), relative, AS_OF) is not None


def test_unposted_inside_grace_is_stale_sync_then_missing() -> None:
    recent = AS_OF - dt.timedelta(minutes=30)
    facts = invoice_facts(e_n=0, e_sum=0, b_finalized=recent, b_issued=recent)
    f = c.classify_invoice(facts, RULES, AS_OF)
    assert f is not None and (f.cls, f.reason) == (c.STALE_SYNC, "posting_pending")
    later = c.classify_invoice(facts, RULES, AS_OF + dt.timedelta(hours=3))
    assert later is not None and later.cls == c.MISSING_IN_ERP
    # a rejected posting is not "still on its way"
    rejected = c.classify_invoice({**facts, "rejected": "period closed"}, RULES, AS_OF)
    assert rejected is not None and rejected.reason == "erp_rejected"


def test_unapplied_payment_explains_open_invoice() -> None:
    """Billing paid, ERP open because the payment never reached it: the payment is the item, not the invoice."""
    facts = invoice_facts(b_status="paid", b_alloc=12_000, b_alloc_unposted=12_000, e_applied=0)
    assert c.classify_invoice(facts, RULES, AS_OF) is None


def test_payment_classes() -> None:
    assert c.classify_payment(payment_facts(), RULES, AS_OF) is None
    f = c.classify_payment(payment_facts(e_n=0, e_applied_n=0, e_sum=0), RULES, AS_OF)
    assert f is not None and (f.cls, f.primary_key) == (c.PAYMENT_UNAPPLIED, "py_1")
    fresh = payment_facts(e_n=0, e_applied_n=0, p_occurred=AS_OF - dt.timedelta(minutes=5))
    f = c.classify_payment(fresh, RULES, AS_OF)
    assert f is not None and f.cls == c.STALE_SYNC
    orphan = payment_facts(p_alloc_n=0, p_alloc_refs="", e_n=0, e_applied_n=0)
    f = c.classify_payment(orphan, RULES, AS_OF)
    assert f is not None and (f.cls, f.reason) == (c.ORPHAN_PAYMENT, "no_invoice")
    f = c.classify_payment({**orphan, "sum_match": True}, RULES, AS_OF)
    assert f is not None and (f.cls, f.reason) == (c.PAYMENT_UNAPPLIED, "matched_not_applied")
    # the ERP booked the allocated payment's cash and applied it to no invoice
    cash = payment_facts(e_applied_n=0, e_applied_refs="")
    f = c.classify_payment(cash, RULES, AS_OF)
    assert f is not None and (f.cls, f.reason, f.amount_minor) == (c.PAYMENT_UNAPPLIED, "booked_unapplied", 12_000)
    f = c.classify_payment({**cash, "p_occurred": AS_OF - dt.timedelta(minutes=5)}, RULES, AS_OF)
    assert f is not None and (f.cls, f.reason) == (c.STALE_SYNC, "application_pending")
    # an unallocated payment the ERP applied: the ERP's rows must total what billing collected
    applied = payment_facts(p_alloc_n=0, p_alloc_refs="", e_sum=12_000 + 5_000)
    f = c.classify_payment(applied, RULES, AS_OF)
    assert f is not None and (f.cls, f.reason, f.amount_minor) == (c.AMOUNT_MISMATCH, "application_differs", -5_000)
    assert c.classify_payment({**applied, "e_sum": 12_001}, RULES, AS_OF) is None  # inside USD's tolerance
    refund = payment_facts(key="re_1", p_kind="refund", e_n=0, e_memo_n=0, e_applied_n=0)
    f = c.classify_payment(refund, RULES, AS_OF)
    assert f is not None and (f.cls, f.primary_key) == (c.REFUND_UNPOSTED, "re_1")
    posted = {**refund, "e_n": 1, "e_memo_n": 1, "e_type": "credit_memo", "e_sum": 12_000, "e_memo_sum": 12_000}
    assert c.classify_payment(posted, RULES, AS_OF) is None
    assert c.classify_payment({**posted, "p_amount": -12_000, "e_sum": -12_000}, RULES, AS_OF) is None  # either sign
    assert c.classify_payment({**posted, "e_memo_sum": 12_001}, RULES, AS_OF) is None  # inside the USD tolerance
    f = c.classify_payment({**posted, "e_sum": 11_000, "e_memo_sum": 11_000}, RULES, AS_OF)
    assert f is not None and (f.cls, f.reason, f.primary_key) == (c.AMOUNT_MISMATCH, "credit_memo_differs", "re_1")
    assert f.amount_minor == 1_000 and f.erp["amount_minor"] == "11000"
    f = c.classify_payment({**posted, "e_currencies": "EUR", "e_currency": "EUR"}, RULES, AS_OF)
    assert f is not None and (f.cls, f.reason) == (c.CURRENCY_MISMATCH, "credit_memo_currency")
    f = c.classify_payment(payment_facts(e_n=2, e_currencies="EUR,USD"), RULES, AS_OF)  # one application of two
    assert f is not None and (f.cls, f.reason, f.primary_key) == (c.CURRENCY_MISMATCH, "application_currency", "py_1")
    assert f.erp["currency"] == "EUR,USD" and "currency" in f.diff_fields
    assert c.classify_payment(payment_facts(p_status="failed", e_n=0), RULES, AS_OF) is None


@pytest.mark.parametrize(
    ("days", "bucket"), [(0, "0-1d"), (1, "0-1d"), (2, "2-7d"), (7, "2-7d"), (8, "8-30d"), (30, "8-30d"), (31, ">30d")]
)
def test_age_buckets(days: int, bucket: str) -> None:
    assert c.age_bucket(AS_OF - dt.timedelta(days=days, hours=1), AS_OF) == bucket
    lo, hi = c.age_bucket_bounds(bucket)
    assert lo <= days and (hi is None or days <= hi)


def test_drift_id_is_stable_and_class_specific() -> None:
    assert c.drift_id(c.MISSING_IN_ERP, "in_1") == c.drift_id(c.MISSING_IN_ERP, "in_1")
    assert c.drift_id(c.MISSING_IN_ERP, "in_1") != c.drift_id(c.STALE_SYNC, "in_1")
    assert len(c.drift_id("x", "y")) == 32


def test_run_transitions() -> None:
    assert c.run_transition(None, True) == c.NEW
    assert c.run_transition(c.NEW, True) == c.PERSISTING
    assert c.run_transition(c.PERSISTING, True) == c.PERSISTING
    assert c.run_transition(c.RESOLVED, True) == c.NEW  # came back
    assert c.run_transition(c.NEW, True, set_by_unfinished_run=True) == c.NEW  # no finished run reported it yet
    assert c.run_transition(c.PERSISTING, True, set_by_unfinished_run=True) == c.PERSISTING
    assert c.run_transition(c.ACKNOWLEDGED, True) == c.ACKNOWLEDGED
    assert c.run_transition(c.IGNORED, True) == c.IGNORED
    for state in (c.NEW, c.PERSISTING, c.ACKNOWLEDGED, c.IGNORED):
        assert c.run_transition(state, False) == c.RESOLVED
    assert c.run_transition(None, False) is None


def test_manual_transitions() -> None:
    assert c.manual_transition(c.NEW, c.ACKNOWLEDGED, "on it, FIN-1") == c.ACKNOWLEDGED
    assert c.manual_transition(c.ACKNOWLEDGED, c.IGNORED, "known FX difference") == c.IGNORED
    for target in (c.IGNORED, c.ACKNOWLEDGED):  # the audit record's why, either way
        with pytest.raises(c.TransitionError, match="note"):
            c.manual_transition(c.NEW, target, "  ")
    with pytest.raises(c.TransitionError, match="resolved"):
        c.manual_transition(c.RESOLVED, c.ACKNOWLEDGED, "")
    with pytest.raises(c.TransitionError, match="already"):
        c.manual_transition(c.ACKNOWLEDGED, c.ACKNOWLEDGED, "")
    with pytest.raises(c.TransitionError):
        c.manual_transition(c.NEW, c.RESOLVED, "")


def test_residual_and_statement_buckets() -> None:
    assert c.residual(10_000, 9_000, {c.MISSING_IN_ERP: 1_000}) == 0
    assert c.residual(10_000, 9_000, {}) == 1_000
    assert c.statement_class(None, 100, 101) == c.TOLERANCE
    assert c.statement_class(None, 100, 100) == ""


def test_rules_from_settings() -> None:
    s = Settings(
        reconcile_tolerance_abs_minor={"*": 2, "JPY": 0},
        reconcile_tolerance_rel_bp={"EUR": 25},
        reconcile_grace_s={"*": 600, "payment_unapplied": 86_400},
        reconcile_match_window_days=10,
    )
    rules = c.Rules.from_settings(s)
    assert rules.tolerance("USD") == c.Tolerance(2, 0)
    assert rules.tolerance("JPY") == c.Tolerance(0, 0)
    assert rules.tolerance("EUR") == c.Tolerance(2, 25)
    assert rules.grace(c.MISSING_IN_ERP) == dt.timedelta(seconds=600)
    assert rules.grace(c.PAYMENT_UNAPPLIED) == dt.timedelta(days=1)
    assert rules.match_window_days == 10


def test_a_map_without_a_default_keeps_the_documented_one() -> None:
    """Setting one class's grace made every other class's 24 h (not the documented 2 h), and one currency's
    tolerance made every other currency's 0 (not 1 minor unit)."""
    rules = c.Rules.from_settings(
        Settings(reconcile_grace_s={"refund_unposted": 3_600}, reconcile_tolerance_abs_minor={"JPY": 0})
    )
    assert rules.grace(c.MISSING_IN_ERP) == dt.timedelta(seconds=7_200) == c.Rules.from_settings(Settings()).grace("x")
    assert rules.grace(c.REFUND_UNPOSTED) == dt.timedelta(seconds=3_600)
    assert rules.tolerance("USD") == c.Tolerance(1, 0) and rules.tolerance("JPY") == c.Tolerance(0, 0)


def test_policy() -> None:
    assert policy.decision(c.MISSING_IN_ERP, auto_enabled=True) == "auto"
    assert policy.decision(c.MISSING_IN_ERP, auto_enabled=False) == "operator"
    for cls in (c.AMOUNT_MISMATCH, c.CURRENCY_MISMATCH, c.DUPLICATE_POSTING):
        assert policy.decision(cls, auto_enabled=True) == "approval"
    assert policy.decision(c.ORPHAN_PAYMENT, auto_enabled=True) == "manual"
    assert policy.target_ref(c.PAYMENT_UNAPPLIED, {"invoice_id": "", "payment_id": "py_1"}) == "py_1"
    assert policy.target_ref(c.MISSING_IN_ERP, {"invoice_id": "in_1", "payment_id": ""}) == "in_1"
    assert set(policy.AUTO_ORDER) == c.TECHNICAL and policy.AUTO_ORDER[0] == c.MISSING_IN_ERP
    assert policy.auto_rank(c.MISSING_IN_ERP) < policy.auto_rank(c.PAYMENT_UNAPPLIED) < policy.auto_rank("other")


def test_a_correction_stops_once_billing_moved_on() -> None:
    gone = policy.source_moved_on
    for status in ("open", "paid", "uncollectible"):
        assert gone("post_invoice", ("in_1", status), None) == ""
    assert gone("post_invoice", ("in_1", "void"), None) == "billing now has invoice in_1 as void"
    assert gone("repost_invoice", ("in_1", "draft"), None) == "billing now has invoice in_1 as draft"
    assert gone("post_invoice", ("in_1", None), None) == "billing no longer has invoice in_1"
    assert gone("reverse_duplicate", ("in_1", "void"), None) == ""  # cancelling a twin writes nothing new
    assert gone("apply_payment", None, ("py_1", "succeeded")) == ""
    assert gone("apply_payment", None, ("py_1", "failed")) == "billing now has payment py_1 as failed"
    assert gone("post_credit_memo", None, ("re_1", None)) == "billing no longer has payment re_1"


def test_a_run_is_abandoned_only_when_its_process_is_gone() -> None:
    alive = {4242: "9001"}.get

    def ticks(pid: int) -> str:
        return alive(pid) or ""

    minute, day = dt.timedelta(minutes=1), dt.timedelta(days=1)
    assert not run_owner.abandoned("h1/4242/9001", minute, "h1", ticks)  # running here, right now
    assert run_owner.abandoned("h1/4242/8000", minute, "h1", ticks)  # the pid names another process now
    assert run_owner.abandoned("h1/5555/9001", minute, "h1", ticks)  # gone
    assert not run_owner.abandoned("h2/5555/1", minute, "h1", ticks)  # another host: cannot tell yet
    assert run_owner.abandoned("h2/5555/1", day, "h1", ticks)  # ... until it is far too old to be running
    assert run_owner.abandoned("", minute, "h1", ticks)  # written before migration 0022
    me = run_owner.this_process()
    host, pid, start = me.rsplit("/", 2)
    assert pid == str(os.getpid()) and start == run_owner.start_ticks(os.getpid()) != ""
    assert not run_owner.abandoned(me, minute, host)


def _posting(entry_id: str, amount: int, currency: str = "USD", minute: int = 0) -> LedgerEntry:
    at = dt.datetime(2026, 1, 5, 12, minute, tzinfo=dt.UTC)
    return LedgerEntry(entry_id, "invoice", "in_1", "cus_1", "EU", currency, amount, "open", at, at)


def test_business_corrections_keep_the_posting_billing_agrees_with_and_post_only_without_one() -> None:
    billing = Invoice("in_1", "cus_1", "EU", "USD", 1_000, 100, 1_100, "open", AS_OF, AS_OF)
    wrong, right = _posting("le_a", 1_500), _posting("le_b", 1_100, minute=5)
    # amount: cancel the wrong one, then post billing's
    assert policy.correction("repost_invoice", [wrong], billing) == policy.Correction(("le_a",), True, "")
    # currency: same amount, other currency is wrong too
    eur = _posting("le_e", 1_100, "EUR")
    assert policy.correction("repost_invoice", [eur], billing) == policy.Correction(("le_e",), True, "")
    # a right posting exists (e.g. a retry after the post): keep it, cancel the rest, post nothing
    assert policy.correction("repost_invoice", [right, wrong], billing) == policy.Correction(("le_a",), False, "le_b")
    assert policy.correction("repost_invoice", [right], billing) == policy.Correction((), False, "le_b")
    # after a crash between cancel and post: nothing live, only the post is left
    assert policy.correction("repost_invoice", [], billing) == policy.Correction((), True, "")
    # duplicates: keep the one matching billing even if posted later, else the earliest; never post
    assert policy.correction("reverse_duplicate", [wrong, right], billing) == policy.Correction(
        ("le_a",), False, "le_b"
    )
    twin = _posting("le_c", 1_500, minute=9)
    assert policy.correction("reverse_duplicate", [twin, wrong], billing) == policy.Correction(("le_c",), False, "le_a")
    assert policy.correction("reverse_duplicate", [right], billing) == policy.Correction((), False, "le_b")
    with pytest.raises(ValueError, match="not a business-rule correction"):
        policy.correction("post_invoice", [right], billing)
    assert policy.ALIASES["adjust_invoice"] == policy.OPERATIONS[c.AMOUNT_MISMATCH]


def test_idempotency_key() -> None:
    k1 = policy.idempotency_key(c.MISSING_IN_ERP, {"invoice_id": "in_1", "payment_id": ""}, "erp:in_1")
    k2 = policy.idempotency_key(c.MISSING_IN_ERP, {"payment_id": "", "invoice_id": "in_1"}, "erp:in_1")
    assert k1 == k2  # key order and empty keys do not matter
    assert k1 != policy.idempotency_key(c.MISSING_IN_ERP, {"invoice_id": "in_2"}, "erp:in_2")
    assert k1 != policy.idempotency_key(c.MISSING_IN_ERP, {"invoice_id": "in_1"}, "tryton:in_1")


def test_breaker_opens_after_threshold_and_half_opens_after_timeout() -> None:
    b = Breaker(failure_threshold=3, reset_after_s=10.0)
    for t in (0.0, 1.0):
        b = b.record_failure(t)
        assert b.current(t) == "closed"
    b = b.record_failure(2.0)
    assert b.current(2.0) == "open"
    ok, b = b.allow(5.0)
    assert not ok and b.retry_in(5.0) == pytest.approx(7.0)
    ok, b = b.allow(12.0)  # half-open: one trial call
    assert ok and b.state == "half_open"
    ok2, b = b.allow(12.1)
    assert not ok2, "only one trial call while half-open"
    b = b.record_failure(12.5)  # the trial failed: open again for a full timeout
    assert b.current(13.0) == "open" and b.retry_in(13.0) == pytest.approx(9.5)
    ok, b = b.allow(23.0)
    assert ok
    b = b.record_success(23.1)
    assert b.current(23.1) == "closed" and b.failures == 0
    ok, b = b.allow(23.2)
    assert ok


def test_a_trial_that_ends_without_a_verdict_frees_the_half_open_breaker() -> None:
    """A half-open trial that failed before or apart from the system (the tower refused the action itself) says
    nothing about the system: the next call is a new trial, and the breaker never stays stuck half-open."""
    b = Breaker(failure_threshold=1, reset_after_s=1.0).record_failure(0.0)
    ok, b = b.allow(1.5)
    assert ok and b.trial_in_flight
    assert not b.allow(1.6)[0]
    b = b.release(1.7)
    assert b.current(1.7) == "half_open" and b.failures == 1
    ok, b = b.allow(1.8)
    assert ok and b.trial_in_flight
    closed = Breaker().release(0.0)
    assert closed.current(0.0) == "closed" and closed.allow(0.0)[0]


def test_a_trial_that_never_reports_back_lapses_after_the_reset_time() -> None:
    """The caller of a trial died (or a store error cut it short) before recording its verdict: after another
    ``reset_after_s`` the breaker lets a new trial through instead of refusing every call for good."""
    b = Breaker(failure_threshold=1, reset_after_s=1.0).record_failure(0.0)
    ok, b = b.allow(1.5)
    assert ok and b.trial_in_flight
    assert not b.allow(2.4)[0]  # still out
    ok, b = b.allow(2.6)
    assert ok and b.trial_in_flight and b.trial_started == 2.6


def test_breaker_success_resets_the_failure_count() -> None:
    b = Breaker(failure_threshold=2, reset_after_s=1.0)
    b = b.record_failure(0.0).record_success(0.1).record_failure(0.2)
    assert b.current(0.2) == "closed"


@pytest.mark.parametrize("state", ["new", "persisting", "acknowledged", "ignored", "resolved"])
def test_the_acts_offered_on_an_item_are_what_the_api_takes(state: str) -> None:
    """An ignored item's three dashboard buttons were enabled and each answered 409 or 422: the item's detail
    says what the transition rules (manual_transition) and the corrective sync accept, and the page offers that."""

    def takes(target: str) -> bool:
        try:
            c.manual_transition(state, target, "a note")
        except c.TransitionError:
            return False
        return True

    acts = c.operator_acts(state, "approval")
    assert acts["acknowledge"] == takes(c.ACKNOWLEDGED) and acts["ignore"] == takes(c.IGNORED)
    assert acts["sync"] == (state not in (c.RESOLVED, c.IGNORED))
    assert c.operator_acts(state, "manual")["sync"] is False


def test_statement_retention_keeps_the_latest_runs_each_scopes_latest_and_each_days_last() -> None:
    from reconciler.retention import StatementRetention, StatementRun, statements_to_drop

    now = dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC)
    hour = dt.timedelta(hours=1)
    runs = [StatementRun(f"r{i}", "", now - i * hour) for i in range(60)]  # one an hour, the newest first
    runs.append(StatementRun("eu", "EU", now - 100 * hour))
    drop = statements_to_drop(runs, now, StatementRetention(keep_runs=3, keep_days=2))
    kept = {r.run_id for r in runs} - drop
    # r0-r2 (latest); eu (its scope's latest); each day's last: the 28th (r0), the 27th (r13, 23:00); the 26th is
    # past the two days kept
    assert kept == {"r0", "r1", "r2", "eu", "r13"}
    assert statements_to_drop(runs, now, StatementRetention(keep_runs=100, keep_days=0)) == set()
    assert statements_to_drop([], now, StatementRetention()) == set()
