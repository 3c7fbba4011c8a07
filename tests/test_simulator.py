"""The simulated estate in memory: determinism, ground truth, shape, connector behaviour, demo-pace timeline.

The drift checks use tests/sim_reference.py, an independent row-by-row reading of docs/simulator.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from connectors.base import BillingConnector, BusinessRuleError, ErpConnector, TransientError
from connectors.simulator import FAULT_NAMES, Estate, EstateConfig, FaultRates, InjectedFault, Manifest
from connectors.simulator.faults import POOLED_INVOICE_FAULTS
from connectors.simulator.live import LiveEstate, demo_config
from connectors.simulator.telemetry import Telemetry
from tests.sim_reference import pull_all, reference_drift

AS_OF = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
END_MS = int((AS_OF + dt.timedelta(days=1)).timestamp() * 1000)


def config(seed: int = 7, rates: FaultRates | None = None, **kw: object) -> EstateConfig:
    base = {"customers": 150, "invoices": 2000, "start": AS_OF - dt.timedelta(days=45), "as_of": AS_OF}
    base.update(kw)
    return EstateConfig(seed=seed, fault_rates=rates or FaultRates.default(), **base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def estate() -> Estate:
    return Estate.generate(config())


def snapshot(e: Estate) -> tuple[list, list, list, list, list]:
    return (
        pull_all(e.billing.pull_invoices),
        pull_all(e.billing.pull_payments),
        pull_all(e.erp.pull_ledger_entries),
        pull_all(e.billing.pull_customers),
        pull_all(e.cdp.pull_profiles),
    )


def test_same_seed_same_estate_and_manifest(estate: Estate) -> None:
    again = Estate.generate(config())
    assert again.manifest.to_json() == estate.manifest.to_json()
    assert snapshot(again) == snapshot(estate)
    other = Estate.generate(config(seed=8))
    assert other.manifest.to_json() != estate.manifest.to_json()
    assert snapshot(other)[0] != snapshot(estate)[0]


def test_implements_the_connector_interface(estate: Estate) -> None:
    assert isinstance(estate.billing, BillingConnector)
    assert isinstance(estate.erp, ErpConnector)


def test_clean_estate_injects_nothing_and_reconciles_to_zero() -> None:
    clean = Estate.generate(config(rates=FaultRates.clean()))
    assert len(clean.manifest) == 0
    assert reference_drift(clean) == set()
    assert all(e.status != "draft" for e in pull_all(clean.erp.pull_ledger_entries))
    invoices = pull_all(clean.billing.pull_invoices)
    assert len(invoices) == len({i.invoice_id for i in invoices}) == 2000  # no duplicate deliveries


@pytest.mark.parametrize("seed", [7, 21, 1234])
def test_every_fault_leaves_exactly_its_footprint(seed: int) -> None:
    e = estate_for(seed)
    counts = e.manifest.counts()
    assert all(counts[name] >= 1 for name in FAULT_NAMES), counts
    assert reference_drift(e) == e.manifest.expected()


@pytest.mark.parametrize("seed", [22, 26, 37])
def test_an_orphan_payment_matches_no_open_invoice_of_its_customer(seed: int) -> None:
    """Seeds where an orphan's amount used to equal what exactly one open invoice of its customer owed, within
    the match window: the reconciler's N:1 match then (rightly) reported payment_unapplied, not the manifest's
    orphan_payment. Orphans are now in a currency their customer is never billed in."""
    e = Estate.generate(
        EstateConfig(seed=seed, customers=50, invoices=3000, fault_rates=FaultRates.only(orphan_payment=0.2))
    )
    currencies: dict[str, set[str]] = {}
    for i in e.billing.invoices.values():
        currencies.setdefault(i.customer_id, set()).add(i.currency)
    orphans = [e.billing.payments.get(f.keys["payment_id"]) for f in e.manifest.of("orphan_payment")]
    assert len(orphans) > 50 and None not in orphans
    assert all(p.currency not in currencies.get(p.customer_id, set()) for p in orphans if p is not None)
    assert reference_drift(e) == e.manifest.expected()


def estate_for(seed: int) -> Estate:
    return Estate.generate(config(seed=seed))


def test_manifest_expectations_follow_the_contract(estate: Estate) -> None:
    for f in estate.manifest:
        if f.fault in ("duplicate_webhook", "erp_outage"):
            assert f.expected_class is None
        elif f.fault == "erp_posting_delayed":
            assert (f.expected_class, f.detail["variant"]) in {("stale_sync", "unposted"), (None, "posted_late")}
            if f.expected_class:
                assert dt.timedelta(minutes=20) <= AS_OF - f.at <= dt.timedelta(minutes=50)
        else:
            assert f.primary_key, f
            assert AS_OF - f.at >= dt.timedelta(days=3), f  # past any grace period
    expected = estate.manifest.expected()
    assert ("missing_in_erp", estate.manifest.of("erp_business_rejection")[0].keys["invoice_id"]) in expected
    text = estate.manifest.to_json()
    assert Manifest.from_json(text).to_json() == text


def test_estate_shape(estate: Estate) -> None:
    invoices, payments, entries, customers, profiles = snapshot(estate)
    assert {i.currency for i in invoices} == {"USD", "EUR", "GBP", "JPY"}
    assert {i.region for i in invoices} == {"NA", "EU", "APAC"}
    by_customer = {c.customer_id: c for c in customers}
    children = [c for c in customers if c.parent_id]
    assert children and all(by_customer[c.parent_id].region == c.region for c in children)
    assert {c.plan for c in customers} == {"monthly", "annual"}
    for inv in invoices:
        assert inv.total_minor == inv.subtotal_minor + inv.tax_minor
        rate = by_customer[inv.customer_id].tax_rate_bp
        assert inv.tax_minor == (inv.subtotal_minor * rate + 5000) // 10000
        if inv.currency == "JPY":
            assert by_customer[inv.customer_id].currency == "JPY"
    with_usage = [i for i in invoices if "usage_minor" in i.attributes]
    assert 0 < len(with_usage) < len(invoices)
    for inv in invoices:
        usage = int(inv.attributes.get("usage_minor", 0))
        plan_price = inv.subtotal_minor - usage
        assert plan_price > 0 and plan_price % (1 if inv.currency == "JPY" else 100) == 0
    kinds = Counter((p.kind, p.method, p.status) for p in payments)
    assert kinds[("payment", "card", "succeeded")] and kinds[("payment", "bank_transfer", "succeeded")]
    assert kinds[("payment", "card", "failed")] and any(k[0] == "refund" for k in kinds)
    assert any(k[0] == "credit_note" for k in kinds)
    assert any(len(p.allocations) >= 2 for p in payments)  # one payment for several invoices
    paid_by: Counter[str] = Counter(inv for p in payments if p.kind == "payment" for inv in p.allocations)
    assert any(n >= 2 for n in paid_by.values())  # an invoice paid in parts
    assert {e.entry_type for e in entries} == {"invoice", "payment", "credit_memo"}
    assert len(profiles) > len(customers)  # prospects: CDP profiles that never reached billing


def test_pulls_page_in_change_order_and_resume_from_cursor() -> None:
    e = Estate.generate(config(rates=FaultRates.only(duplicate_webhook=0.01, erp_posting_missing=0.01)))
    all_at_once = pull_all(e.billing.pull_invoices)
    pages, cursor, page = [], None, None
    while page is None or not page.done:
        page = e.billing.pull_invoices(cursor, 7)
        assert len(page.items) <= 7
        pages += page.items
        cursor = page.next_cursor
    assert pages == all_at_once
    assert [i.updated_at for i in pages] == sorted(i.updated_at for i in pages)
    dup = e.manifest.of("duplicate_webhook")[0].keys["invoice_id"]
    assert sum(1 for i in pages if i.invoice_id == dup) == 2  # delivered twice, same version
    # nothing new after the end; a write shows up in the next pull
    ledger_cursor = e.erp.pull_ledger_entries(None, 100_000).next_cursor
    assert e.erp.pull_ledger_entries(ledger_cursor).items == []
    missing = e.manifest.of("erp_posting_missing")[0].keys["invoice_id"]
    e.erp.post_invoice(e.billing.get_invoice(missing))
    new = e.erp.pull_ledger_entries(ledger_cursor).items
    assert [x.external_ref for x in new] == [missing]
    with pytest.raises(BusinessRuleError):
        e.erp.pull_ledger_entries("not-a-cursor")


def test_corrective_acts_are_idempotent_and_remove_the_drift() -> None:
    e = Estate.generate(config(seed=3))
    before = reference_drift(e)
    missing = e.manifest.of("erp_posting_missing")[0].keys["invoice_id"]
    first = e.erp.post_invoice(e.billing.get_invoice(missing))
    again = e.erp.post_invoice(e.billing.get_invoice(missing))
    assert not first.already_done and again.already_done and again.target_ref == first.target_ref
    assert len([x for x in e.erp.find_by_external_ref(missing) if x.entry_type == "invoice"]) == 1

    unapplied = e.manifest.of("payment_not_applied")[0].keys
    pay = e.billing.get_payment(unapplied["payment_id"])
    inv_id = unapplied["invoice_id"]
    assert not e.erp.apply_payment(pay, inv_id, pay.allocations[inv_id]).already_done
    assert e.erp.apply_payment(pay, inv_id, pay.allocations[inv_id]).already_done
    assert e.erp.invoice_entry(inv_id).status == "paid"  # settled now

    under = e.manifest.of("partial_payment_under_applied")[0].keys
    pay = e.billing.get_payment(under["payment_id"])
    outcome = e.erp.apply_payment(pay, under["invoice_id"], pay.allocations[under["invoice_id"]])
    assert not outcome.already_done and outcome.detail.startswith("applied ")

    refund_id = e.manifest.of("refund_not_posted")[0].keys["payment_id"]
    refund = e.billing.get_payment(refund_id)
    assert not e.erp.post_credit_memo(refund).already_done
    assert e.erp.post_credit_memo(refund).already_done

    after = reference_drift(e)
    fixed = {
        ("missing_in_erp", missing),
        ("payment_unapplied", unapplied["payment_id"]),
        ("under_applied", under["invoice_id"]),
        ("refund_unposted", refund_id),
    }
    assert fixed <= before and after == before - fixed


def test_cancel_entry_follows_the_erps_rules_and_then_the_invoice_can_be_posted_again() -> None:
    e = Estate.generate(config(seed=3))
    before = reference_drift(e)
    dup = e.manifest.of("duplicate_erp_posting")[0].keys
    cursor = e.erp.pull_ledger_entries(None, 100_000).next_cursor
    out = e.erp.cancel_entry(dup["ledger_entry_id"], "duplicate")
    assert not out.already_done and e.erp.cancel_entry(dup["ledger_entry_id"], "again").already_done
    (pulled,) = e.erp.pull_ledger_entries(cursor).items  # the cancellation is a change the tower pulls
    assert pulled.status == "cancelled" and pulled.attributes["cancel_reason"] == "duplicate"
    # amount: cancel the wrong posting, post billing's
    amount = e.manifest.of("amount_mismatch")[0].keys
    e.erp.cancel_entry(amount["ledger_entry_id"], "repost")
    invoice = e.billing.get_invoice(amount["invoice_id"])
    posted = e.erp.post_invoice(invoice)
    assert not posted.already_done and e.erp.invoice_entry(invoice.invoice_id).amount_minor == invoice.total_minor
    assert reference_drift(e) == before - {
        ("duplicate_posting", dup["invoice_id"]),
        ("amount_mismatch", amount["invoice_id"]),
    }
    # refused: a paid invoice (payments applied), a payment entry, an unknown id; nothing changes
    settled = e.manifest.of("status_mismatch")[0].keys
    with pytest.raises(BusinessRuleError, match="payments applied"):
        e.erp.cancel_entry(settled["ledger_entry_id"], "x")
    payment_entry = next(x for x in e.erp.entries.records.values() if x.entry_type == "payment")
    with pytest.raises(BusinessRuleError, match="not an invoice posting"):
        e.erp.cancel_entry(payment_entry.entry_id, "x")
    with pytest.raises(BusinessRuleError, match="does not exist"):
        e.erp.cancel_entry("le_nope", "x")
    assert e.erp.invoice_entry(settled["invoice_id"]).status != "cancelled"


def test_business_rejection_and_outages() -> None:
    e = Estate.generate(config(seed=5))
    rejected = e.manifest.of("erp_business_rejection")[0]
    invoice = e.billing.get_invoice(rejected.keys["invoice_id"])
    with pytest.raises(BusinessRuleError, match=r"period \d{4}-\d{2} is closed") as info:
        e.erp.post_invoice(invoice)
    assert str(info.value) == rejected.detail["message"]
    drafts = [x for x in e.erp.find_by_external_ref(invoice.invoice_id) if x.status == "draft"]
    assert drafts and drafts[0].attributes["rejection"] == rejected.detail["message"]

    missing = e.billing.get_invoice(e.manifest.of("erp_posting_missing")[0].keys["invoice_id"])
    e.erp.begin_outage()
    assert not e.erp.health().ok
    for call in (lambda: e.erp.post_invoice(missing), lambda: e.erp.pull_ledger_entries(None)):
        with pytest.raises(TransientError):
            call()
    e.erp.end_outage()
    e.erp.fail_next(2)
    for _ in range(2):
        with pytest.raises(TransientError):
            e.erp.find_by_external_ref(missing.invoice_id)
    assert e.erp.post_invoice(missing).already_done is False
    # outage windows of the manifest are active on the estate's clock
    window = e.manifest.of("erp_outage")[0]
    e.set_clock(window.at + dt.timedelta(seconds=1))
    with pytest.raises(TransientError):
        e.erp.find_by_external_ref(missing.invoice_id)
    e.set_clock(AS_OF)
    assert e.erp.health().ok


def test_rates_and_config_are_validated() -> None:
    with pytest.raises(ValueError, match="within"):
        FaultRates(amount_mismatch=0.5)
    with pytest.raises(ValueError, match="unknown fault"):
        FaultRates.only(nonsense=0.1)
    # eleven invoice faults at 0.1 each: the last got no invoice, silently (six of them at 0.2)
    with pytest.raises(ValueError, match="add up to 1.10: each invoice carries at most one"):
        FaultRates(**dict.fromkeys(POOLED_INVOICE_FAULTS, 0.1))
    with pytest.raises(ValueError, match="needs as_of - start"):
        EstateConfig(start=AS_OF - dt.timedelta(days=5), as_of=AS_OF)
    with pytest.raises(ValueError, match="timezone"):
        EstateConfig(start=dt.datetime(2026, 1, 1), as_of=dt.datetime(2026, 3, 1))
    # the tower reads 1970-71 as "never set": an estate of 1960 drifted otherwise than its manifest said
    with pytest.raises(ValueError, match="on or after 1972-01-01"):
        EstateConfig(start=dt.datetime(1960, 1, 1, tzinfo=dt.UTC), as_of=dt.datetime(1960, 3, 1, tzinfo=dt.UTC))
    f = InjectedFault("erp_posting_missing", "missing_in_erp", {"invoice_id": "in_1"}, ("erp",), "EU", AS_OF)
    assert f.primary_key == "in_1"


def test_invoice_faults_whose_rates_fill_the_pool_are_each_injected() -> None:
    """Rates that add up to exactly 1 (the most allowed): every named fault is in the estate and the manifest."""
    five = ("erp_posting_missing", "amount_mismatch", "status_mismatch", "refund_not_posted", "erp_business_rejection")
    rates = FaultRates.only(**dict.fromkeys(five, 0.2))
    counts = Estate.generate(EstateConfig(seed=1, customers=50, invoices=3_000, fault_rates=rates)).manifest.counts()
    assert all(counts.get(name, 0) > 0 for name in five), counts


def live(rates: FaultRates, telemetry: Telemetry | None = None, seed: int = 3) -> LiveEstate:
    cfg = demo_config(seed=seed, rate_per_min=120, horizon_min=12, customers=40, fault_rates=rates,
                      context_loss_share=0.4, start=AS_OF)  # fmt: skip
    return LiveEstate(cfg, telemetry, clock_ms=lambda: END_MS)


def test_demo_timeline_replays_into_the_generated_state() -> None:
    e = live(FaultRates.default())
    assert e.advance(int(AS_OF.timestamp() * 1000) + 5_000) < len(e.timeline)  # only what is due
    e.advance(END_MS)
    for inv_id, final in e.invoices.items():
        cur = e.billing.invoices.get(inv_id)
        assert dataclasses.replace(cur, updated_at=final.updated_at, paid_at=final.paid_at) == final
    for entry_id, final in e.entries.items():
        cur = e.erp.entries.get(entry_id)
        assert (cur.status, cur.amount_minor, cur.currency) == (final.status, final.amount_minor, final.currency)
    assert len(e.erp.entries) == len(e.entries)


def test_demo_clean_run_injects_nothing() -> None:
    e = live(FaultRates.clean())
    e.advance(END_MS)
    assert len(e.manifest) == 0 and not e.duplicated
    assert all(x.status != "draft" for x in e.erp.entries.values())
    assert len(e.cdp.profiles) == len(e.billing.customers)  # every CDP profile reached billing


def test_demo_telemetry_context_flows_cdp_to_billing_and_is_lost_at_the_erp_for_a_share() -> None:
    exporters = {s: InMemorySpanExporter() for s in ("cdp", "billing", "erp")}
    tel = Telemetry("http://127.0.0.1:9", exporters=exporters, send_events=False)
    e = live(FaultRates.default(), tel)
    e.advance(END_MS)
    tel.flush()
    spans = {s: exporters[s].get_finished_spans() for s in exporters}
    for system, items in spans.items():
        assert items and {x.resource.attributes["service.name"] for x in items} == {f"sim-{system}"}
        assert all(x.attributes["revops.system"] == system and x.attributes["revops.region"] for x in items)
    # CDP -> billing: the customer span is a child of the CDP identify span
    cdp_by_span = {x.context.span_id: x for x in spans["cdp"]}
    customer_spans = [x for x in spans["billing"] if x.name.startswith("customer.")]
    assert customer_spans and all(x.parent is not None and x.parent.span_id in cdp_by_span for x in customer_spans)
    # billing -> ERP: same trace unless the invoice's flow lost its context
    finalize = {x.attributes["revops.invoice.id"]: x for x in spans["billing"] if x.name == "invoice.finalize"}
    lost = kept = 0
    for x in spans["erp"]:
        if x.name != "erp.invoice.post":
            continue
        inv = x.attributes["revops.invoice.id"]
        if e.ctx_lost[inv]:
            assert x.parent is None and x.context.trace_id != finalize[inv].context.trace_id
            lost += 1
        else:
            assert x.parent.span_id == finalize[inv].context.span_id
            kept += 1
    assert lost > 20 and kept > 20
    # business events: CloudEvents with revops data and the span's traceparent; duplicates reuse the id
    events = tel.event_log
    assert {ev["source"] for ev in events} == {"sim-cdp", "sim-billing", "sim-erp"}
    first = next(ev for ev in events if ev["type"] == "erp.invoice.posted")
    assert first["traceparent"].startswith("00-") and first["data"]["revops.invoice.id"].startswith("in_")
    ids = Counter(ev["id"] for ev in events)
    assert {i for i, n in ids.items() if n > 1}  # duplicate_webhook re-sent a delivered event
    tel.shutdown()


def test_a_cursor_from_an_earlier_run_of_the_estate_reads_the_new_run_whole() -> None:
    """A demo restart starts a new estate process whose changes count from 1 again: the reconciler's stored
    cursor (run 0's position) skipped run 1's first changes and pulled nothing."""
    from connectors.simulator.systems import ChangeLog

    run0: ChangeLog[str] = ChangeLog(lambda r: r)
    for i in range(5):
        run0.put(f"old_{i}")
    kept = run0.pull(None, 10).next_cursor
    assert run0.pull(kept, 10).items == []  # the same instance goes on from its cursor
    run1: ChangeLog[str] = ChangeLog(lambda r: r)
    for i in range(3):
        run1.put(f"new_{i}")
    assert run1.pull(kept, 10).items == ["new_0", "new_1", "new_2"]
    assert run1.pull("5", 10).items == ["new_0", "new_1", "new_2"]  # a bare number (older cursor format)
    for bad in ("bogus", ":5", "x:y"):
        with pytest.raises(BusinessRuleError, match="was not issued by this system"):
            run1.pull(bad, 10)


@pytest.mark.parametrize(("seed", "minutes"), [(0, 10), (1, 30), (2, 60)])
def test_a_demo_estate_played_to_its_end_drifts_exactly_as_its_manifest_says(seed: int, minutes: int) -> None:
    """The demo keeps serving after its window: clean changes of its last seconds whose ERP side lands after
    as_of never landed, and read as drift the manifest does not list (settle margin 0 before)."""
    cfg = demo_config(seed=seed, rate_per_min=60, horizon_min=minutes, start=dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    est = LiveEstate(cfg, None, clock_ms=lambda: 0)
    est.advance(10**15)
    assert reference_drift(est, grace=dt.timedelta(0), sla=dt.timedelta(0)) == est.manifest.expected()
