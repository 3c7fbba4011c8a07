"""Stripe pulls with the official SDK: the pure change selection and mapping, then localstripe on loopback
(through a fault-injecting proxy for 429/5xx backoff), with the OTel spans every remote call emits."""

from __future__ import annotations

import datetime as dt
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


def test_pull_payments_and_refunds(localstripe: Localstripe) -> None:
    billing = StripeBilling("sk_test_tower", localstripe.url, default_region="NA", backoff_s=0.01)
    cursor = None
    while True:
        page = billing.pull_payments(cursor)
        cursor = page.next_cursor
        if page.done:
            break
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
