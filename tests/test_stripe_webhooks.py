"""Stripe webhooks: signature verification and event mapping (pure), then the real endpoint fed by
localstripe's own signed deliveries, bad signatures and redeliveries."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import stripe

from connectors.stripe import mapping
from connectors.stripe.signature import SignatureError, sign, verify
from connectors.stripe.webhook import DeliveryError, read_delivery
from tests.fixtures.external import Localstripe
from tests.server import TowerServer

SECRET, OLD_SECRET = "whsec_current_0123456789", "whsec_previous_9876543210"
ADMIN = "admin-token-for-webhook-tests"
NOW = 1_795_000_000


def _header(body: bytes, secrets: list[str], t: int = NOW) -> str:
    return f"t={t}," + ",".join(f"v1={sign(body, s, t)}" for s in secrets)


# ------------------------------------------------------------------ signature (pure)


def test_valid_signature_returns_its_timestamp() -> None:
    body = b'{"id": "evt_1"}'
    assert verify(body, _header(body, [SECRET]), [SECRET], 300, NOW + 10) == NOW


def test_rotation_any_configured_secret_and_any_v1_may_match() -> None:
    body = b'{"id": "evt_1"}'
    # Stripe signs with both secrets during rotation; the tower may hold only the new one...
    assert verify(body, _header(body, [OLD_SECRET, SECRET]), [SECRET], 300, NOW) == NOW
    # ...or still only the old one, or both.
    assert verify(body, _header(body, [SECRET]), [OLD_SECRET, SECRET], 300, NOW) == NOW


@pytest.mark.parametrize(
    ("header", "secrets", "now", "reason"),
    [
        (None, [SECRET], NOW, "missing Stripe-Signature"),
        ("", [SECRET], NOW, "missing Stripe-Signature"),
        ("v1=abc", [SECRET], NOW, "no valid timestamp"),
        (f"t={NOW}", [SECRET], NOW, "no v1 signature"),
        ("GOOD", ["whsec_other"], NOW, "no Stripe-Signature v1 signature matches"),
        ("GOOD", [SECRET], NOW + 301, "outside the 300 s tolerance"),
        ("GOOD", [SECRET], NOW - 301, "outside the 300 s tolerance"),
        ("GOOD", [], NOW, "no Stripe webhook secret is configured"),
        ("SIGNED_WITH_EMPTY", [SECRET, ""], NOW, "no Stripe-Signature v1 signature matches"),  # a key anyone holds
        (f"t={NOW}\xb2,v1={'0' * 64}", [SECRET], NOW, "no valid timestamp"),  # "²" passes str.isdigit()
        (f"t={NOW},v1=\xe9", [SECRET], NOW, "no v1 signature"),  # compare_digest refuses non-ASCII str
    ],
)
def test_bad_signatures_are_refused_with_the_reason(
    header: str | None, secrets: list[str], now: int, reason: str
) -> None:
    body = b'{"id": "evt_1"}'
    if header == "GOOD":
        header = _header(body, [SECRET])
    elif header == "SIGNED_WITH_EMPTY":
        header = _header(body, [""])
    with pytest.raises(SignatureError, match=reason):
        verify(body, header, secrets, 300, now)


def test_a_changed_body_breaks_the_signature() -> None:
    body = b'{"id": "evt_1", "amount": 100}'
    header = _header(body, [SECRET])
    with pytest.raises(SignatureError):
        verify(body.replace(b"100", b"900"), header, [SECRET], 300, NOW)


# ------------------------------------------------------------------ mapping (pure)


def _event(etype: str, obj: dict, eid: str = "evt_123") -> dict:
    return {"id": eid, "object": "event", "type": etype, "created": NOW, "livemode": False, "data": {"object": obj}}


def test_invoice_finalized_maps_to_domain_attributes() -> None:
    obj = {
        "id": "in_1",
        "object": "invoice",
        "customer": "cus_1",
        "total": 12345,
        "currency": "eur",
        "status": "open",
        "customer_email": "jane@example.com",
        "metadata": {"region": "EU", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
    }
    ev = mapping.to_business_event(_event("invoice.finalized", obj), default_region="NA")
    assert ev is not None
    assert ev.source == "stripe" and ev.event_id == "evt_123" and ev.type == "billing.invoice.finalized"
    assert ev.time_ns == NOW * 1_000_000_000
    assert ev.trace_id == "a" * 32 and ev.span_id == "b" * 16
    a = ev.attributes
    assert a["revops.system"] == "billing" and a["revops.region"] == "EU" and a["revops.step"] == "invoice_to_ledger"
    assert (a["revops.invoice.id"], a["revops.customer.id"]) == ("in_1", "cus_1")
    assert (a["revops.amount_minor"], a["revops.currency"]) == ("12345", "EUR")
    assert "jane@example.com" not in ev.data  # customer PII is not copied into the event


def test_paid_invoice_carries_the_payment_and_the_paid_amount() -> None:
    obj = {
        "id": "in_1",
        "customer": "cus_1",
        "total": 500,
        "amount_paid": 500,
        "currency": "usd",
        "payment_intent": "pi_1",
        "status": "paid",
    }
    for etype in ("invoice.paid", "invoice.payment_succeeded"):
        ev = mapping.to_business_event(_event(etype, obj), "NA")
        assert ev is not None and ev.type == "billing.invoice.paid"
        assert ev.attributes["revops.payment.id"] == "pi_1" and ev.attributes["revops.step"] == "payment_to_cash"
        assert ev.attributes["revops.region"] == "NA"  # from settings when metadata has none


def test_payment_refund_and_credit_note_mapping() -> None:
    pi = {
        "id": "pi_1",
        "customer": "cus_1",
        "amount": 700,
        "amount_received": 700,
        "currency": "usd",
        "invoice": "in_9",
        "status": "succeeded",
    }
    ev = mapping.to_business_event(_event("payment_intent.succeeded", pi), "")
    assert ev is not None
    assert ev.attributes["revops.payment.id"] == "pi_1" and ev.attributes["revops.invoice.id"] == "in_9"
    assert ev.attributes["revops.amount_minor"] == "700" and "revops.region" not in ev.attributes
    charge = {
        "id": "ch_1",
        "object": "charge",
        "customer": "cus_1",
        "currency": "usd",
        "amount_refunded": 300,
        "payment_intent": "pi_1",
        "invoice": "in_9",
        "refunds": {
            "data": [
                {"id": "re_old", "amount": 100, "created": NOW - 5},
                {"id": "re_new", "amount": 200, "created": NOW},
            ]
        },
    }
    ev = mapping.to_business_event(_event("charge.refunded", charge), "")
    assert ev is not None and ev.attributes["revops.step"] == "refund_to_ledger"
    assert ev.attributes["revops.payment.id"] == "re_new" and ev.attributes["revops.amount_minor"] == "200"
    assert ev.attributes["revops.related_payment.id"] == "pi_1"
    cn = {"id": "cn_1", "customer": "cus_1", "invoice": "in_9", "total": 250, "currency": "gbp"}
    ev = mapping.to_business_event(_event("credit_note.created", cn), "")
    assert ev is not None and ev.type == "billing.credit_note.created"
    assert (ev.attributes["revops.payment.id"], ev.attributes["revops.currency"]) == ("cn_1", "GBP")


def test_invoice_paid_of_the_pinned_api_version_names_its_payment_from_payments() -> None:
    """Since 2025-03-31.basil an invoice has no payment_intent; its InvoicePayments name the PaymentIntent."""
    obj = {"id": "in_1", "object": "invoice", "customer": "cus_1", "total": 500, "amount_paid": 500,
           "currency": "usd", "status": "paid", "total_taxes": [],
           "payments": {"object": "list", "data": [{"id": "inpay_1", "object": "invoice_payment", "invoice": "in_1",
                        "amount_paid": 500, "status": "paid", "is_default": True,
                        "payment": {"type": "payment_intent", "payment_intent": "pi_1"}}]}}  # fmt: skip
    ev = mapping.to_business_event(_event("invoice.paid", obj), "NA")
    assert ev is not None and ev.attributes["revops.payment.id"] == "pi_1"


def test_charge_refunded_without_its_refunds_list_invents_no_refund() -> None:
    """Since API 2022-11-15 a Charge does not embed its refunds: two partial refunds (1500, then 1000) arrive as
    charge.refunded with the running total only. No refund id or per-refund amount is made up from it."""
    seen = []
    for eid, refunded in [("evt_a", 1500), ("evt_b", 2500)]:
        charge = {"id": "ch_1", "object": "charge", "amount": 10000, "amount_captured": 10000,
                  "amount_refunded": refunded, "currency": "usd", "customer": "cus_1", "payment_intent": "pi_1",
                  "refunded": False, "status": "succeeded", "created": NOW - 100, "metadata": {}}  # fmt: skip
        ev = mapping.to_business_event(_event("charge.refunded", charge, eid), "NA")
        assert ev is not None and ev.type == "billing.refund.created"
        a = ev.attributes
        assert "revops.payment.id" not in a and "revops.amount_minor" not in a
        assert (a["revops.related_payment.id"], a["revops.customer.id"], a["stripe.charge.id"]) == (
            "pi_1",
            "cus_1",
            "ch_1",
        )
        seen.append(a["stripe.charge.amount_refunded"])
    assert seen == ["1500", "2500"]  # the charge's cumulative figure, named as such


@pytest.mark.parametrize(
    ("etype", "canonical"), [("refund.created", "billing.refund.created"), ("refund.updated", "billing.refund.updated")]
)
def test_refund_events_carry_the_refunds_own_id_and_amount(etype: str, canonical: str) -> None:
    refund = {"id": "re_2", "object": "refund", "amount": 1000, "currency": "usd", "status": "succeeded",
              "payment_intent": "pi_1", "charge": "ch_1", "created": NOW, "metadata": {}}  # fmt: skip
    ev = mapping.to_business_event(_event(etype, refund), "NA")
    assert ev is not None and ev.type == canonical and ev.subject == "re_2"
    a = ev.attributes
    assert (a["revops.payment.id"], a["revops.amount_minor"], a["revops.currency"]) == ("re_2", "1000", "USD")
    assert (a["revops.related_payment.id"], a["revops.step"], a["stripe.refund.status"]) == (
        "pi_1",
        "refund_to_ledger",
        "succeeded",
    )


def test_customer_events_keep_ids_not_pii_and_untracked_types_are_none() -> None:
    cus = {"id": "cus_1", "email": "jane@example.com", "name": "Jane", "metadata": {"cdp_user_id": "u-1"}}
    ev = mapping.to_business_event(_event("customer.updated", cus), "EU")
    assert ev is not None and ev.attributes["revops.customer.id"] == "cus_1"
    assert ev.attributes["revops.cdp.user_id"] == "u-1" and ev.attributes["revops.step"] == "cdp_to_billing"
    assert "jane" not in ev.data.lower() and "revops.currency" not in ev.attributes
    assert mapping.to_business_event(_event("plan.created", {"id": "plan_1"}), "") is None


def test_a_cdp_user_id_that_is_an_address_becomes_the_cdps_pseudonym_or_nothing() -> None:
    """Billing's metadata.cdp_user_id names the CDP user; an address there was stored raw (and as an SLA key)."""
    from connectors.segment.tracking import PiiPolicy

    policy = PiiPolicy.build("hash", "k", ["email"])
    cus = {"id": "cus_1", "metadata": {"cdp_user_id": "Hank@Example.com"}}
    ev = mapping.to_business_event(_event("customer.created", cus), "EU", policy.identifier)
    assert ev is not None and ev.attributes["revops.cdp.user_id"] == policy.identifier("hank@example.com")
    assert "example.com" not in orjson.dumps(ev.to_json()).decode().lower()
    bare = mapping.to_business_event(_event("customer.created", cus), "EU")  # no policy at hand: dropped
    assert bare is not None and "revops.cdp.user_id" not in bare.attributes


def test_delivery_errors_are_clear() -> None:
    body = orjson.dumps({"id": "evt_1", "object": "event", "type": "invoice.paid", "created": NOW, "data": {}})
    with pytest.raises(DeliveryError, match="data.object"):
        read_delivery(body, _header(body, [SECRET]), [SECRET], 300, NOW, "")
    body = b"not json"
    with pytest.raises(DeliveryError, match="malformed JSON"):
        read_delivery(body, _header(body, [SECRET]), [SECRET], 300, NOW, "")


# ------------------------------------------------------------------ the endpoint, fed by localstripe


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TowerServer]:
    server = TowerServer(
        tmp_path_factory.mktemp("tower-webhooks"),
        TOWER_ADMIN_TOKEN=ADMIN,
        TOWER_STRIPE_WEBHOOK_SECRETS=orjson.dumps([SECRET, OLD_SECRET]).decode(),
        TOWER_STRIPE_DEFAULT_REGION="NA",
    )
    with server:
        yield server


def _stored_rows(tower: TowerServer, event_id: str, timeout: float = 15) -> int:
    """Rows queries see for the event, once flushed (0 if it never shows up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{tower.url}/webhooks/stripe/events/{event_id}", headers={"Authorization": f"Bearer {ADMIN}"})
        if r.status_code == 200:
            return r.json()["rows"]
        assert r.status_code == 404, r.text
        time.sleep(0.2)
    return 0


def _post(tower: TowerServer, body: bytes, header: str | None) -> httpx.Response:
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header.encode("latin-1")  # the raw header bytes, non-ASCII ones too
    return httpx.post(f"{tower.url}/webhooks/stripe", content=body, headers=headers, timeout=10)


def paid_subscription_invoice(client: stripe.StripeClient, region: str = "EU", amount: int = 12345) -> stripe.Invoice:
    """A customer with a card subscribes: localstripe creates the invoice and pays it at once."""
    cus = client.v1.customers.create(params={"email": "buyer@example.com", "metadata": {"region": region}})
    pm = client.v1.payment_methods.create(
        params={"type": "card", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}
    )
    client.v1.payment_methods.attach(pm.id, params={"customer": cus.id})
    client.v1.customers.update(cus.id, params={"invoice_settings": {"default_payment_method": pm.id}})
    product = client.v1.products.create(params={"name": "Tower plan"})
    plan = client.v1.plans.create(
        params={"amount": amount, "currency": "usd", "interval": "month", "product": product.id}
    )
    sub = client.v1.subscriptions.create(params={"customer": cus.id, "items": [{"plan": plan.id}]})
    return client.v1.invoices.retrieve(sub.latest_invoice)


def stripe_client(ls: Localstripe) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_tower", base_addresses={"api": ls.url}, max_network_retries=0)


def test_localstripe_signed_deliveries_become_business_events(tower: TowerServer, localstripe: Localstripe) -> None:
    localstripe.register_webhook("tower-webhooks", f"{tower.url}/webhooks/stripe", SECRET)
    client = stripe_client(localstripe)
    invoice = paid_subscription_invoice(client)
    assert invoice.status == "paid"
    events = [e.to_dict() for e in client.v1.events.list(params={"limit": 100}).auto_paging_iter()]
    wanted = {
        e["type"]: e["id"]
        for e in events
        if e["type"] in ("invoice.payment_succeeded", "payment_intent.succeeded")
        and e["data"]["object"]["id"] in (invoice.id, invoice.payment_intent)
    }
    assert set(wanted) == {"invoice.payment_succeeded", "payment_intent.succeeded"}
    for event_id in wanted.values():  # localstripe delivers ~1 s after the change
        assert _stored_rows(tower, event_id) == 1
    untracked = next(e["id"] for e in events if e["type"] == "plan.created")
    assert _stored_rows(tower, untracked, timeout=1) == 0


def test_bad_or_missing_signature_is_400_and_nothing_is_stored(tower: TowerServer) -> None:
    doc = _event(
        "invoice.finalized", {"id": "in_bad", "customer": "cus_1", "total": 1, "currency": "usd"}, eid="evt_forged"
    )
    doc["created"] = int(time.time())
    body = orjson.dumps(doc)
    now = int(time.time())
    for header, reason in [
        (None, "missing Stripe-Signature"),
        (_header(body, ["whsec_attacker"], now), "matches a configured endpoint secret"),
        (_header(body, [SECRET], now - 3600), "tolerance"),
        (f"t={now}\xb2,v1={'0' * 64}", "no valid timestamp"),  # non-ASCII header bytes: a 400, not a 500
        (f"t={now},v1=\xe9", "no v1 signature"),
    ]:
        r = _post(tower, body, header)
        assert r.status_code == 400 and reason in r.json()["error"]
    # a correctly signed copy of another event proves the flusher ran since; the forged one is not stored
    ok = dict(doc, id="evt_genuine")
    ok_body = orjson.dumps(ok)
    assert _post(tower, ok_body, _header(ok_body, [SECRET], now)).status_code == 200
    assert _stored_rows(tower, "evt_genuine") == 1
    assert _stored_rows(tower, "evt_forged", timeout=0.5) == 0


def test_a_redelivered_event_is_reported_and_stored_once(tower: TowerServer, tmp_path: Path) -> None:
    doc = _event(
        "invoice.finalized",
        {"id": "in_dup", "customer": "cus_1", "total": 10, "currency": "usd"},
        eid="evt_redelivered",
    )
    doc["created"] = int(time.time())
    body = orjson.dumps(doc)
    first = _post(tower, body, _header(body, [SECRET], int(time.time())))
    assert first.status_code == 200 and first.json()["duplicate"] is False
    # Stripe re-signs each attempt (new t), and during rotation may sign with the old secret only
    again = _post(tower, body, _header(body, [OLD_SECRET], int(time.time()) + 1))
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert _stored_rows(tower, "evt_redelivered") == 1


def test_an_unsigned_cloudevent_cannot_pose_as_stripe_or_the_cdp(tower: TowerServer) -> None:
    """/v1/events is unsigned: an event under the sources the signed receivers own would make the genuine Stripe
    delivery look like a repeat (or replace it). Refused, with where such events go; other events are kept."""
    forged = {"specversion": "1.0", "id": "evt_planted", "type": "invoice.paid", "time": "2026-01-01T00:00:00Z"}
    batch = [
        {**forged, "source": "stripe"},
        {**forged, "source": " Stripe "},
        {**forged, "source": "cdp", "id": "m-planted"},
        {**forged, "source": "billing-bus", "id": "evt_other"},
    ]
    r = httpx.post(
        f"{tower.url}/v1/events",
        content=orjson.dumps(batch),
        headers={"Content-Type": "application/cloudevents-batch+json"},
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    rejected = r.json()["rejected"]
    assert [x["index"] for x in rejected] == [0, 1, 2] and "/webhooks/stripe" in rejected[0]["error"]
    alone = httpx.post(
        f"{tower.url}/v1/events",
        content=orjson.dumps(batch[0]),
        headers={"Content-Type": "application/cloudevents+json"},
    )
    assert alone.status_code == 400 and "reserved" in alone.text
    doc = _event("invoice.paid", {"id": "in_pl", "customer": "cus_1", "total": 7, "currency": "usd"}, eid="evt_planted")
    doc["created"] = int(time.time())
    body = orjson.dumps(doc)
    genuine = _post(tower, body, _header(body, [SECRET], int(time.time())))
    assert genuine.status_code == 200 and genuine.json()["duplicate"] is False
    assert _stored_rows(tower, "evt_planted") == 1


def test_redelivery_after_a_restart_is_still_recognized(tmp_path: Path) -> None:
    server = TowerServer(tmp_path, TOWER_ADMIN_TOKEN=ADMIN, TOWER_STRIPE_WEBHOOK_SECRETS=f'["{SECRET}"]')
    doc = _event(
        "payment_intent.succeeded",
        {"id": "pi_r", "customer": "cus_1", "amount": 5, "currency": "usd"},
        eid="evt_across_restart",
    )
    doc["created"] = int(time.time())
    body = orjson.dumps(doc)
    with server:
        assert _post(server, body, _header(body, [SECRET], int(time.time()))).json()["duplicate"] is False
        assert _stored_rows(server, "evt_across_restart") == 1
    with server:  # same data dir, fresh process: the in-memory recent set is gone, the store remembers
        r = _post(server, body, _header(body, [SECRET], int(time.time())))
        assert r.status_code == 200 and r.json()["duplicate"] is True
        assert _stored_rows(server, "evt_across_restart") == 1


@pytest.mark.parametrize(
    ("etype", "change", "reason"),
    [
        ("invoice.finalized", {"data": ["x"]}, "data.object"),
        ("invoice.finalized", {"data": "x"}, "data.object"),
        ("invoice.finalized", {"obj": {"metadata": ["EU"]}}, "unexpected shape"),
        ("invoice.finalized", {"obj": {"total": "12.50"}}, "total is not an amount"),
        ("invoice.finalized", {"obj": {"total": 12.5}}, "total is not an amount"),
        ("invoice.finalized", {"obj": {"total": 10**20}}, "total is not an amount"),  # JSON readers make it a float
        ("invoice.finalized", {"obj": {"total": "99999999999999999999"}}, "is beyond"),
        ("charge.refunded", {"obj": {"refunds": {"data": [{"id": "re_1", "created": "x"}]}}}, "unexpected shape"),
        ("invoice.finalized", {"created": 10**12}, "Unix time in seconds"),
    ],
)
def test_a_signed_delivery_of_an_unexpected_shape_is_a_400_and_nothing_is_stored(
    tower: TowerServer, etype: str, change: dict, reason: str
) -> None:
    """Stripe retries a 500 for days; a shape the tower cannot read must say which field, and an amount beyond
    Int64 must not be stored as 0."""
    eid = f"evt_shape_{abs(hash((etype, repr(change)))) % 10**9}"
    doc = _event(
        etype, {"id": "in_shape", "customer": "cus_1", "total": 100, "currency": "usd", **change.get("obj", {})}
    )
    doc.update({"id": eid, "created": int(time.time())}, **{k: v for k, v in change.items() if k != "obj"})
    body = json.dumps(doc).encode()  # orjson refuses integers beyond 64 bits; Stripe's sender would not
    r = _post(tower, body, _header(body, [SECRET], int(time.time())))
    assert r.status_code == 400 and reason in r.json()["error"], r.text
    assert _stored_rows(tower, eid, timeout=0.5) == 0


def test_a_user_identified_by_an_address_is_measured_until_billing_names_it(tmp_path: Path) -> None:
    """customer_synced never measured a profile change of a user whose id is an address: the CDP's event carried
    no customer key, and billing's metadata.cdp_user_id was the raw address. Both now carry its pseudonym."""
    email, write_key = "ivy.sync@example.com", "wk_sla_source"
    server = TowerServer(
        tmp_path,
        TOWER_ADMIN_TOKEN=ADMIN,
        TOWER_STRIPE_WEBHOOK_SECRETS=orjson.dumps([SECRET]).decode(),
        TOWER_CDP_WRITE_KEYS=orjson.dumps([write_key]).decode(),
        TOWER_CDP_PII_HMAC_KEY="sla-pii-key",
    )
    auth = {"Authorization": f"Bearer {ADMIN}"}

    def stuck() -> list[dict]:
        r = httpx.get(f"{server.url}/api/sla/stuck", params={"sla": "customer_synced", "region": "QQ"}, headers=auth)
        assert r.status_code == 200, r.text
        assert email not in r.text
        return r.json()["items"]

    def wait_for(done: Callable[[list[dict]], bool]) -> list[dict]:
        deadline = time.monotonic() + 20
        items = stuck()
        while not done(items) and time.monotonic() < deadline:
            time.sleep(0.3)
            items = stuck()
        return items

    now = time.time()
    with server:
        changed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 40 * 60))
        msg = {"type": "identify", "userId": email, "timestamp": changed, "traits": {"region": "QQ"}}
        r = httpx.post(f"{server.url}/v1/batch", auth=(write_key, ""), json={"batch": [msg]})
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        items = wait_for(lambda items: len(items) == 1)
        assert len(items) == 1 and items[0]["key"].startswith("hmac-sha256:")  # measured, under its pseudonym
        cus = {"id": "cus_ivy", "object": "customer", "metadata": {"cdp_user_id": email, "region": "QQ"}}
        body = orjson.dumps({**_event("customer.created", cus, "evt_ivy"), "created": int(now - 20 * 60)})
        assert _post(server, body, _header(body, [SECRET], int(now))).status_code == 200
        assert wait_for(lambda items: not items) == []  # billing named the user: the item ended
