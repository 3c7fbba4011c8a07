"""Stripe pulls with the official SDK: the pure change selection and mapping, then localstripe on loopback
(through a fault-injecting proxy for 429/5xx backoff), with the OTel spans every remote call emits."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest
import stripe
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from connectors.base import BillingConnector, BusinessRuleError, TransientError
from connectors.stripe import mapping
from connectors.stripe.connector import StripeBilling
from connectors.stripe.mapping import Change, Cursor, select_changes
from tests.fixtures.external import Localstripe
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.stripe_newer_api import NewerStripeApi
from tests.test_stripe_webhooks import paid_subscription_invoice, stripe_client

T = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)

# ------------------------------------------------------------------ pure


def test_changes_come_oldest_first_one_per_object_latest_change() -> None:
    changes = [Change(10, "evt_b", "invoice", "in_1"), Change(12, "evt_c", "invoice", "in_1"),
               Change(10, "evt_a", "invoice", "in_2"), Change(11, "evt_d", "invoice", "in_3")]  # fmt: skip
    page, cur, done = select_changes(changes, None, 10)
    assert [(c.key, c.change_id) for c in page] == [("in_2", "evt_a"), ("in_3", "evt_d"), ("in_1", "evt_c")]
    assert done and cur == Cursor(12, frozenset({"evt_c"}))
    assert select_changes(changes, cur, 10)[0] == []


def test_limit_cuts_pages_and_the_same_second_is_not_lost() -> None:
    changes = [Change(10, f"evt_{i}", "invoice", f"in_{i}") for i in range(3)] + [
        Change(11, "evt_9", "invoice", "in_9")
    ]
    page1, cur1, done1 = select_changes(changes, None, 2)
    assert (
        [c.key for c in page1] == ["in_0", "in_1"] and not done1 and cur1 == Cursor(10, frozenset({"evt_0", "evt_1"}))
    )
    # a change arriving later in the same second is still returned after the cursor
    late = [*changes, Change(10, "evt_late", "invoice", "in_late")]
    page2, cur2, done2 = select_changes(late, Cursor.decode(cur1.encode()), 2)
    assert [c.key for c in page2] == ["in_2", "in_late"] and not done2
    page3, _, done3 = select_changes(late, cur2, 2)
    assert [c.key for c in page3] == ["in_9"] and done3


def test_bad_cursor_is_a_clear_error() -> None:
    with pytest.raises(mapping.MappingError, match="not a Stripe cursor"):
        Cursor.decode("garbage")


def test_invoice_and_payment_mapping_minor_units() -> None:
    inv = mapping.to_invoice(
        {"id": "in_1", "customer": {"id": "cus_1"}, "currency": "eur", "subtotal": 1000, "tax": 200, "total": 1200,
         "amount_paid": 1200, "status": "paid", "created": 1_790_000_000, "metadata": {"region": "EU"},
         "status_transitions": {"finalized_at": 1_790_000_010, "paid_at": 1_790_000_020}, "payment_intent": "pi_1"},
        T, "NA",
    )  # fmt: skip
    assert (inv.invoice_id, inv.customer_id, inv.region, inv.currency) == ("in_1", "cus_1", "EU", "EUR")
    assert (inv.subtotal_minor, inv.tax_minor, inv.total_minor, inv.amount_paid_minor) == (1000, 200, 1200, 1200)
    assert inv.status == "paid" and inv.paid_at == dt.datetime.fromtimestamp(1_790_000_020, dt.UTC)
    pi = {"id": "pi_1", "customer": "cus_1", "currency": "eur", "amount": 1200, "amount_received": 1200,
          "status": "succeeded", "invoice": "in_1", "created": 1_790_000_020}  # fmt: skip
    pay = mapping.payment_from_intent(pi, T, "NA")
    assert (pay.kind, pay.amount_minor, pay.status, pay.allocations) == ("payment", 1200, "succeeded", {"in_1": 1200})
    refund = mapping.payment_from_refund({"id": "re_1", "amount": 200, "currency": "eur", "status": "succeeded",
                                          "payment_intent": "pi_1", "created": 1_790_000_030}, pi, T, "NA")  # fmt: skip
    assert (refund.kind, refund.allocations, refund.related_payment_id) == ("refund", {"in_1": 200}, "pi_1")
    cn = mapping.payment_from_credit_note({"id": "cn_1", "invoice": "in_1", "total": 300, "currency": "eur",
                                           "status": "void"}, T, "")  # fmt: skip
    assert (cn.kind, cn.status, cn.allocations) == ("credit_note", "failed", {"in_1": 300})


def test_a_payment_occurred_when_it_succeeded_not_when_its_intent_was_created() -> None:
    """An invoice's PaymentIntent is created at finalization and may succeed days later: its grace period ran from
    the creation, so a payment confirmed a second before a run was a payment_unapplied break at once."""
    at = dt.datetime.fromtimestamp
    pi = {"id": "pi_1", "currency": "usd", "amount": 500, "amount_received": 500, "status": "succeeded",
          "invoice": "in_1", "created": 1_790_000_000}  # fmt: skip
    assert mapping.payment_from_intent(pi, T, "NA", None, 1_790_086_400).occurred_at == at(1_790_086_400, dt.UTC)
    charged = {**pi, "charges": {"data": [{"status": "failed", "created": 1_790_000_100},
                                          {"status": "succeeded", "created": 1_790_003_600}]}}  # fmt: skip
    assert mapping.payment_from_intent(charged, T, "NA").occurred_at == at(1_790_003_600, dt.UTC)
    latest = {**pi, "latest_charge": {"status": "succeeded", "created": 1_790_007_200}}
    assert mapping.payment_from_intent(latest, T, "NA").occurred_at == at(1_790_007_200, dt.UTC)
    assert mapping.payment_from_intent(pi, T, "NA").occurred_at == at(1_790_000_000, dt.UTC)  # nothing better known
    pending = {**pi, "status": "processing", "latest_charge": {"status": "pending", "created": 1_790_007_200}}
    assert mapping.payment_from_intent(pending, T, "NA").occurred_at == at(1_790_000_000, dt.UTC)


@pytest.mark.parametrize(
    ("currency", "stripe_amount", "iso_minor"),
    [
        ("isk", 50_000, 500),  # Stripe: two decimals ("100 represents 1 krona"); ISO: none
        ("mga", 250_000, 25_000_000),  # Stripe: zero-decimal; ISO: two decimals
        ("jpy", 5_000, 5_000),
        ("kwd", 12_340, 12_340),
        ("usd", 1_200, 1_200),
        ("huf", 150_000, 150_000),  # a Stripe "special case" that is two-decimal in the API, as in ISO
    ],
)
def test_stripe_amounts_become_iso_minor_units(currency: str, stripe_amount: int, iso_minor: int) -> None:
    """A 500 ISK Stripe invoice (total 50000) was posted to the ERP as 50,000 ISK, and a correct posting was
    flagged amount_mismatch with a repost proposed."""
    obj = {"id": "in_1", "customer": "cus_1", "currency": currency, "subtotal": stripe_amount, "total": stripe_amount,
           "amount_paid": stripe_amount, "status": "paid", "created": T0, "tax": 0}  # fmt: skip
    inv = mapping.to_invoice(obj, T, "NA")
    assert (inv.subtotal_minor, inv.total_minor, inv.amount_paid_minor) == (iso_minor,) * 3
    pi = {"id": "pi_1", "customer": "cus_1", "currency": currency, "amount": stripe_amount,
          "amount_received": stripe_amount, "status": "succeeded", "invoice": "in_1", "created": T0}  # fmt: skip
    assert mapping.payment_from_intent(pi, T, "NA").allocations == {"in_1": iso_minor}
    refund = {"id": "re_1", "amount": stripe_amount, "currency": currency, "status": "succeeded", "created": T0}
    assert mapping.payment_from_refund(refund, pi, T, "NA").amount_minor == iso_minor
    cn = {"id": "cn_1", "invoice": "in_1", "total": stripe_amount, "currency": currency, "status": "issued"}
    assert mapping.payment_from_credit_note(cn, T, "NA").amount_minor == iso_minor
    event = {"id": "evt_1", "object": "event", "type": "invoice.finalized", "created": T0, "data": {"object": obj}}
    business = mapping.to_business_event(event, "NA")
    assert business is not None and business.attributes["revops.amount_minor"] == str(iso_minor)


def test_a_stripe_amount_that_is_not_whole_minor_units_is_refused_not_truncated() -> None:
    """The pull truncated 12345.6 to 12345 where the webhook refused it; an ISK amount Stripe would never send
    (not whole kronur) is refused rather than rounded."""
    base = {"id": "in_1", "customer": "cus_1", "currency": "usd", "status": "open", "created": T0}
    with pytest.raises(mapping.MappingError, match="total is not an amount"):
        mapping.to_invoice({**base, "total": 12_345.6}, T, "NA")
    pi = {"id": "pi_1", "currency": "usd", "amount": 999.99, "amount_received": 999.99, "status": "succeeded"}
    with pytest.raises(mapping.MappingError, match="not an amount"):
        mapping.payment_from_intent(pi, T, "NA")
    with pytest.raises(mapping.MappingError, match="not a whole number of ISK"):
        mapping.to_invoice({**base, "currency": "isk", "total": 50_050}, T, "NA")
    # two invoices of 2**62 made a statement of negative totals (ClickHouse's Int64 sums wrap)
    with pytest.raises(mapping.MappingError, match="total: 4611686018427387909 minor units is beyond"):
        mapping.to_invoice({**base, "total": 2**62 + 5}, T, "NA")
    assert mapping.to_invoice({**base, "total": 10**15}, T, "NA").total_minor == 10**15


# Shapes of the pinned API version (stripe 16.1.0 sends 2026-10-28.endive; these changed in 2025-03-31.basil),
# abbreviated from docs.stripe.com/api: the invoice's tax is total_taxes, its payment is in payments
# (InvoicePayments), and PaymentIntents and Charges no longer name their invoice.
T0 = 1_790_000_000


def basil_invoice(inv_id: str = "in_1", total: int = 12000, tax: int = 2000, payments: bool = True) -> dict:
    obj = {
        "id": inv_id, "object": "invoice", "customer": "cus_1", "currency": "usd", "status": "paid",
        "subtotal": total - tax, "total": total, "total_excluding_tax": total - tax, "amount_due": total,
        "amount_paid": total, "amount_remaining": 0, "created": T0, "metadata": {},
        "status_transitions": {"finalized_at": T0 + 10, "paid_at": T0 + 20},
        "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0,
        "total_taxes": [{"amount": tax, "tax_behavior": "exclusive", "taxable_amount": total - tax,
                         "taxability_reason": "standard_rated", "type": "tax_rate_details",
                         "tax_rate_details": {"tax_rate": "txr_1"}}],
    }  # fmt: skip
    if payments:
        obj["payments"] = {"object": "list", "data": [invoice_payment("inpay_1", inv_id, "pi_1", total)]}
    return obj


def invoice_payment(ip_id: str, inv_id: str, pi_id: str, amount: int, status: str = "paid") -> dict:
    return {"id": ip_id, "object": "invoice_payment", "amount_paid": amount if status == "paid" else None,
            "amount_requested": amount, "currency": "usd", "invoice": inv_id, "is_default": True,
            "livemode": False, "status": status, "created": T0 + 20,
            "payment": {"type": "payment_intent", "payment_intent": pi_id},
            "status_transitions": {"paid_at": T0 + 20 if status == "paid" else None, "canceled_at": None}}  # fmt: skip


def basil_intent(pi_id: str, amount: int) -> dict:
    return {"id": pi_id, "object": "payment_intent", "customer": "cus_1", "currency": "usd", "amount": amount,
            "amount_received": amount, "status": "succeeded", "created": T0 + 20, "latest_charge": "ch_1",
            "payment_method_types": ["card"], "metadata": {}}  # fmt: skip


def test_invoice_mapping_reads_the_tax_and_payment_of_the_pinned_api_version() -> None:
    inv = mapping.to_invoice(basil_invoice(), T, "NA")
    assert (inv.subtotal_minor, inv.tax_minor, inv.total_minor) == (10000, 2000, 12000)
    assert inv.attributes == {"stripe.payment_intent": "pi_1"}
    # a paid payment wins over an earlier canceled attempt, whatever the order
    two = basil_invoice()
    two["payments"]["data"].insert(0, invoice_payment("inpay_0", "in_1", "pi_0", 12000, status="canceled"))
    assert mapping.to_invoice(two, T, "NA").attributes == {"stripe.payment_intent": "pi_1"}
    # the shape before basil (localstripe's) still reads
    old = {"id": "in_2", "total": 1100, "subtotal": 1000, "total_tax_amounts": [{"amount": 60}, {"amount": 40}],
           "payment_intent": "pi_9", "currency": "usd"}  # fmt: skip
    inv = mapping.to_invoice(old, T, "NA")
    assert (inv.tax_minor, inv.attributes) == (100, {"stripe.payment_intent": "pi_9"})


def test_payments_are_allocated_from_invoice_payments_when_the_intent_names_no_invoice() -> None:
    rows = [invoice_payment("inpay_1", "in_1", "pi_1", 7000), invoice_payment("inpay_2", "in_2", "pi_1", 5000),
            invoice_payment("inpay_3", "in_3", "pi_1", 900, status="canceled")]  # fmt: skip
    paid = mapping.invoice_allocations(rows)
    assert paid == {"in_1": 7000, "in_2": 5000}  # only paid InvoicePayments count
    pi = basil_intent("pi_1", 12000)
    assert mapping.payment_from_intent(pi, T, "NA").allocations == {}  # nothing to go by without the lookup
    assert mapping.payment_from_intent(pi, T, "NA", paid).allocations == {"in_1": 7000, "in_2": 5000}
    refund = {"id": "re_1", "object": "refund", "amount": 3000, "currency": "usd", "status": "succeeded",
              "payment_intent": "pi_1", "charge": "ch_1", "created": T0 + 30}  # fmt: skip
    one = mapping.payment_from_refund(refund, pi, T, "NA", {"in_1": 12000})
    assert (one.allocations, one.related_payment_id, one.customer_id) == ({"in_1": 3000}, "pi_1", "cus_1")
    # a refund of a payment spread over two invoices is not split by guess
    assert mapping.payment_from_refund(refund, pi, T, "NA", paid).allocations == {}


@pytest.mark.parametrize(
    ("status", "expected"),
    [("pending", "pending"), ("requires_action", "pending"), ("succeeded", "succeeded"), ("failed", "failed"),
     ("canceled", "failed"), ("some_new_state", "pending")],
)  # fmt: skip
def test_refund_status_only_failed_and_canceled_are_failed(status: str, expected: str) -> None:
    """A refund waiting for the customer (requires_action) is in progress, not a failure."""
    refund = {"id": "re_1", "amount": 500, "currency": "usd", "status": status, "payment_intent": "pi_1"}
    assert mapping.payment_from_refund(refund, {"id": "pi_1", "invoice": "in_1"}, T, "NA").status == expected


# ------------------------------------------------------------------ localstripe


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def drain_invoices(billing: StripeBilling, cursor: str | None, limit: int = 1000) -> tuple[list, str]:
    items: list = []
    for _ in range(100):
        page = billing.pull_invoices(cursor, limit)
        items += page.items
        cursor = page.next_cursor
        if page.done:
            break
    return items, cursor or ""


def test_pull_invoices_since_the_cursor(localstripe: Localstripe, spans: InMemorySpanExporter) -> None:
    billing = StripeBilling("sk_test_tower", localstripe.url, default_region="NA", backoff_s=0.01)
    assert isinstance(billing, BillingConnector) and billing.health().ok
    _, cursor = drain_invoices(billing, None)
    client = stripe_client(localstripe)
    first = paid_subscription_invoice(client, region="EU", amount=4200)
    second = paid_subscription_invoice(client, region="APAC", amount=990)
    spans.clear()
    items, cursor2 = drain_invoices(billing, cursor, limit=1)  # one invoice per page
    mine = {i.invoice_id: i for i in items}  # the latest state of each (an invoice may change in two seconds)
    assert set(mine) == {first.id, second.id} and 2 <= len(items) <= 4
    a = mine[first.id]
    assert (a.total_minor, a.amount_paid_minor, a.currency, a.status, a.region) == (4200, 4200, "USD", "paid", "EU")
    assert a.source_system == "stripe" and a.customer_id == first.customer
    assert drain_invoices(billing, cursor2)[0] == []  # nothing changed since
    names = [s.name for s in spans.get_finished_spans()]
    assert "stripe.events.list" in names and "stripe.invoices.retrieve" in names
    retrieve = next(s for s in spans.get_finished_spans() if s.name == "stripe.invoices.retrieve")
    assert retrieve.attributes["revops.system"] == "billing" and retrieve.attributes["revops.invoice.id"] in mine


def test_a_deleted_draft_invoice_is_skipped_not_a_blocked_pull(localstripe: Localstripe) -> None:
    """Its invoice.created event stays in the Events API (30 days) while the invoice answers 404."""
    billing = StripeBilling("sk_test_tower", localstripe.url, default_region="NA", backoff_s=0.01)
    _, cursor = drain_invoices(billing, None)
    client = stripe_client(localstripe)
    paid = paid_subscription_invoice(client, amount=500)
    draft = client.v1.invoices.create(params={"customer": paid.customer, "subscription": paid.subscription})
    assert draft.status == "draft"
    client.v1.invoices.delete(draft.id)
    later = paid_subscription_invoice(client, amount=700)
    items, _ = drain_invoices(billing, cursor)
    assert {i.invoice_id for i in items} == {paid.id, later.id}  # the draft's events are passed over
    for _ in range(20):  # page by page: a page that is not the last is never empty (the runner stops there)
        page = billing.pull_invoices(cursor, 1)
        assert page.items or page.done
        if page.done:
            break
        cursor = page.next_cursor


def drained_payments_cursor(billing: StripeBilling) -> str | None:
    """The payments cursor after everything already in the server was pulled."""
    cursor = None
    while True:
        page = billing.pull_payments(cursor)
        cursor = page.next_cursor
        if page.done:
            return cursor


def test_pull_payments_and_refunds(localstripe: Localstripe) -> None:
    billing = StripeBilling("sk_test_tower", localstripe.url, default_region="NA", backoff_s=0.01)
    cursor = drained_payments_cursor(billing)
    client = stripe_client(localstripe)
    inv = paid_subscription_invoice(client, amount=5000)
    refund = client.v1.refunds.create(params={"payment_intent": inv.payment_intent, "amount": 1500})
    page = billing.pull_payments(cursor)
    by_id = {p.payment_id: p for p in page.items}
    pay, ref = by_id[inv.payment_intent], by_id[refund.id]
    assert (pay.kind, pay.amount_minor, pay.status, pay.allocations) == ("payment", 5000, "succeeded", {inv.id: 5000})
    assert (ref.kind, ref.amount_minor, ref.allocations, ref.related_payment_id) == (
        "refund",
        1500,
        {inv.id: 1500},
        inv.payment_intent,
    )
    assert ref.customer_id == inv.customer and ref.currency == "USD"
    assert billing.pull_payments(page.next_cursor).items == []


def test_a_pulled_payment_confirmed_after_its_intent_was_created_occurred_at_the_confirmation(
    localstripe: Localstripe,
) -> None:
    billing = StripeBilling("sk_test_tower", localstripe.url, default_region="NA", backoff_s=0.01)
    cursor = drained_payments_cursor(billing)
    client = stripe_client(localstripe)
    cus = client.v1.customers.create()
    pm = client.v1.payment_methods.create(
        params={"type": "card", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}
    )
    client.v1.payment_methods.attach(pm.id, params={"customer": cus.id})
    pi = client.v1.payment_intents.create(
        params={
            "amount": 5000,
            "currency": "usd",
            "customer": cus.id,
            "payment_method": pm.id,
            "metadata": {"invoice": "in_confirmed_later"},  # (one naming none would make the pull ask basil's API)
        }
    )
    time.sleep(2.1)  # Stripe stamps whole seconds
    confirmed_s = int(time.time())
    assert client.v1.payment_intents.confirm(pi.id).status == "succeeded"
    pay = next(p for p in billing.pull_payments(cursor).items if p.payment_id == pi.id)
    assert pay.status == "succeeded" and pay.allocations == {"in_confirmed_later": 5000}
    assert pay.occurred_at.timestamp() >= confirmed_s > pi.created


def test_429_and_5xx_are_retried_with_backoff(localstripe: Localstripe, spans: InMemorySpanExporter) -> None:
    with FaultProxy(localstripe.url) as proxy:
        billing = StripeBilling("sk_test_tower", proxy.url, backoff_s=0.01)
        proxy.plan.extend(["429", "503", "429"])
        spans.clear()
        page = billing.pull_invoices(None, 1)
        assert page.items and proxy.seen[:3] == ["429", "503", "429"]
        attempts = [s for s in spans.get_finished_spans() if s.name == "stripe.events.list"]
        assert [s.attributes["tower.attempt"] for s in attempts] == [1, 2, 3, 4]
        proxy.plan.extend(["503"] * 10)
        with pytest.raises(TransientError, match="after 5 attempts"):
            billing.pull_invoices(None, 1)


def test_client_errors_are_business_rule_errors_not_retried(localstripe: Localstripe) -> None:
    billing = StripeBilling("sk_test_tower", localstripe.url, backoff_s=0.01)
    with pytest.raises(BusinessRuleError, match="stripe invoices.retrieve"):
        billing._retrieve("invoice", "in_does_not_exist")
    with pytest.raises(stripe.StripeError):  # the raw SDK agrees it is a 404
        stripe_client(localstripe).v1.invoices.retrieve("in_does_not_exist")


# ------------------------------------------------------------------ Stripe's newer API (a loopback fake)


def newer_api_account() -> NewerStripeApi:
    """in_1 paid by pi_1 (12000, then 3000 refunded as re_1 on ch_1); pi_2 pays in_2 and in_3 together."""
    charge = {"id": "ch_1", "object": "charge", "amount": 12000, "amount_captured": 12000, "amount_refunded": 3000,
              "currency": "usd", "customer": "cus_1", "payment_intent": "pi_1", "refunded": False,
              "status": "succeeded", "created": T0 + 20, "metadata": {}}  # fmt: skip
    refund = {"id": "re_1", "object": "refund", "amount": 3000, "currency": "usd", "status": "succeeded",
              "payment_intent": "pi_1", "charge": "ch_1", "created": T0 + 40, "metadata": {}}  # fmt: skip
    objects = {
        "in_1": basil_invoice(payments=False),  # a plain retrieve leaves payments out
        "pi_1": basil_intent("pi_1", 12000),
        "pi_2": basil_intent("pi_2", 12000),
        "ch_1": charge,
        "re_1": refund,
        "cus_1": {"id": "cus_1", "object": "customer", "metadata": {"region": "EU"}},
    }

    def event(eid: str, etype: str, obj: dict, t: int) -> dict:
        return {"id": eid, "object": "event", "type": etype, "created": t, "data": {"object": obj}}

    events = [
        event("evt_6", "refund.created", refund, T0 + 40),
        event("evt_5", "charge.refunded", charge, T0 + 40),  # no refunds list since 2022-11-15
        event("evt_3", "payment_intent.succeeded", objects["pi_2"], T0 + 20),
        event("evt_2", "payment_intent.succeeded", objects["pi_1"], T0 + 20),
        event("evt_1", "invoice.paid", objects["in_1"], T0 + 20),
    ]
    payments = [invoice_payment("inpay_1", "in_1", "pi_1", 12000), invoice_payment("inpay_2", "in_2", "pi_2", 7000),
                invoice_payment("inpay_3", "in_3", "pi_2", 5000)]  # fmt: skip
    return NewerStripeApi(objects, events, payments)


def test_a_malformed_answer_fails_the_pull_with_a_line_naming_it() -> None:
    """A Stripe-shaped answer with an event without data, or an invoice whose total is not whole minor units:
    the run's error was a bare ``'data'``, or the amount was truncated. (The answers come from the test double
    of Stripe's API: localstripe cannot be made to answer malformed JSON.)"""
    no_data = {"id": "evt_1", "object": "event", "type": "invoice.finalized", "created": T0 + 5}
    no_data_pi = {**no_data, "id": "evt_0", "type": "payment_intent.succeeded"}
    with NewerStripeApi({}, [no_data, no_data_pi], []) as api:
        billing = StripeBilling("sk_test_tower", api.url, default_region="NA", backoff_s=0.01)
        with pytest.raises(BusinessRuleError, match=r"stripe invoices pull: malformed answer \(KeyError: 'data'\)"):
            billing.pull_invoices(None)
        with pytest.raises(BusinessRuleError, match=r"stripe payments pull: malformed answer"):
            billing.pull_payments(None)
    odd = {**basil_invoice(payments=False), "total": 12_000.5}
    event = {"id": "evt_2", "object": "event", "type": "invoice.paid", "created": T0 + 5, "data": {"object": odd}}
    with NewerStripeApi({"in_1": odd}, [event], []) as api:
        billing = StripeBilling("sk_test_tower", api.url, default_region="NA", backoff_s=0.01)
        with pytest.raises(BusinessRuleError, match="stripe invoices pull: total is not an amount in minor units"):
            billing.pull_invoices(None)


def test_pulls_read_the_newer_api_through_invoice_payments() -> None:
    with newer_api_account() as api:
        billing = StripeBilling("sk_test_tower", api.url, default_region="NA", backoff_s=0.01)
        (inv,) = billing.pull_invoices(None).items
        assert (inv.invoice_id, inv.tax_minor, inv.total_minor, inv.region) == ("in_1", 2000, 12000, "EU")
        assert inv.attributes == {"stripe.payment_intent": "pi_1"}
        page = billing.pull_payments(None)
        by_id = {p.payment_id: p for p in page.items}
        assert set(by_id) == {"pi_1", "pi_2", "re_1"}  # the charge id is no refund
        assert by_id["pi_1"].allocations == {"in_1": 12000}
        assert by_id["pi_2"].allocations == {"in_2": 7000, "in_3": 5000}
        ref = by_id["re_1"]
        assert (ref.kind, ref.amount_minor, ref.status, ref.allocations) == (
            "refund",
            3000,
            "succeeded",
            {"in_1": 3000},
        )
        assert (ref.related_payment_id, ref.customer_id, ref.region) == ("pi_1", "cus_1", "EU")
        asked = [r for r in api.requests if r.startswith("/v1/invoice_payments") and "pi_1" in r]
        assert len(asked) == 1  # the refund reuses what its payment's lookup found


def test_localstripe_without_invoice_payments_falls_back_and_is_asked_once(
    localstripe: Localstripe, spans: InMemorySpanExporter
) -> None:
    """localstripe has no /v1/invoice_payments (404): PaymentIntents without an invoice stay unallocated, and
    the endpoint is not asked again for every payment."""
    billing = StripeBilling("sk_test_tower", localstripe.url, default_region="NA", backoff_s=0.01)
    cursor = drained_payments_cursor(billing)
    client = stripe_client(localstripe)
    cus = client.v1.customers.create(params={"email": "walk-in@example.com"})
    pm = client.v1.payment_methods.create(
        params={"type": "card", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}
    )
    client.v1.payment_methods.attach(pm.id, params={"customer": cus.id})
    intents = [
        client.v1.payment_intents.create(
            params={"amount": amount, "currency": "usd", "customer": cus.id, "payment_method": pm.id, "confirm": True}
        )
        for amount in (2500, 3500)
    ]
    inv = paid_subscription_invoice(client, amount=4000)  # its intent names the invoice: no lookup needed
    spans.clear()
    by_id = {p.payment_id: p for p in billing.pull_payments(cursor).items}
    for pi in intents:
        assert (by_id[pi.id].status, by_id[pi.id].allocations) == ("succeeded", {})
    assert by_id[inv.payment_intent].allocations == {inv.id: 4000}
    asked = [s for s in spans.get_finished_spans() if s.name == "stripe.invoice_payments.list"]
    assert len(asked) == 1 and billing._invoice_payments_api is False
