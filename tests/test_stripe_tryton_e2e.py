"""End to end on the real systems: a Stripe invoice created and paid in localstripe -> localstripe's signed
webhook -> the collector -> a reconciliation run (pulling Stripe and Tryton) finds it missing in Tryton ->
the corrective sync posts it in Tryton (read back from Tryton) -> the next run finds no drift for it -> the
same corrective sync sent again posts nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from connectors.stripe.connector import StripeBilling
from connectors.tryton.connector import TrytonErp
from connectors.tryton.rpc import TrytonRpc
from tests.fixtures.external import Localstripe, Trytond
from tests.server import TowerServer
from tests.test_stripe_webhooks import paid_subscription_invoice, stripe_client

ADMIN = "admin-token-e2e"
SECRET = "whsec_e2e_secret"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def tower(tmp_path: Path, localstripe: Localstripe, trytond_server: Trytond) -> Iterator[TowerServer]:
    server = TowerServer(
        tmp_path,
        TOWER_ADMIN_TOKEN=ADMIN,
        TOWER_STRIPE_WEBHOOK_SECRETS=orjson.dumps([SECRET]).decode(),
        TOWER_STRIPE_API_KEY="sk_test_e2e",
        TOWER_STRIPE_API_BASE=localstripe.url,
        TOWER_STRIPE_DEFAULT_REGION="NA",
        TOWER_TRYTON_URL=trytond_server.url,
        TOWER_TRYTON_DATABASE=trytond_server.database,
        TOWER_TRYTON_USER=trytond_server.user,
        TOWER_TRYTON_PASSWORD=trytond_server.password,
        TOWER_RECONCILE_CONNECTORS="stripe-tryton",
        TOWER_RECONCILE_SCHEDULER="false",  # runs only when the test asks
        TOWER_RECONCILE_GRACE_S='{"*": 0}',  # missing now = missing (no stale_sync grace)
    )
    with server:
        yield server


def _wait(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def run_reconciliation(tower: TowerServer) -> dict[str, Any]:
    r = httpx.post(f"{tower.url}/api/runs", json={"full": True}, headers=H, timeout=30)
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]

    def finished() -> dict[str, Any] | None:
        doc = httpx.get(f"{tower.url}/api/runs/{run_id}", headers=H, timeout=30).json()
        state = doc.get("state") or doc.get("status")
        return doc if state in ("succeeded", "failed") else None

    doc = _wait(f"run {run_id}", finished, timeout=180)
    assert (doc.get("state") or doc.get("status")) == "succeeded", doc
    return doc


def drift_for(tower: TowerServer, key: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{tower.url}/api/drift", params={"key": key, "limit": 100}, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def tryton_invoices(server: Trytond, reference: str) -> list[dict[str, Any]]:
    rpc = TrytonRpc(server.url, server.database, server.user, server.password)
    try:
        return rpc.search_read("account.invoice", [["reference", "=", reference]], ["state", "total_amount"])
    finally:
        rpc.close()


def sync(tower: TowerServer, drift_id: str) -> httpx.Response:
    return httpx.post(f"{tower.url}/api/drift/{drift_id}/sync", json={}, headers=H, timeout=60)


def wait_action(tower: TowerServer, action_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        doc = httpx.get(f"{tower.url}/api/actions/{action_id}", headers=H, timeout=30).json()
        state = str(doc.get("state") or doc.get("State") or "")
        return doc if state in ("succeeded", "failed", "dead") else None

    return _wait(f"action {action_id}", done, timeout=120)


@pytest.mark.slow
def test_stripe_invoice_missing_in_tryton_is_found_corrected_once_and_stays_clean(
    tower: TowerServer, localstripe: Localstripe, trytond_server: Trytond
) -> None:
    localstripe.register_webhook("tower-e2e", f"{tower.url}/webhooks/stripe", SECRET)
    client = stripe_client(localstripe)
    invoice = paid_subscription_invoice(client, region="EU", amount=24_900)
    assert invoice.status == "paid"

    # 1. localstripe's signed webhook reaches the collector and is stored as a business event
    paid_event = next(
        e["id"]
        for e in (x.to_dict() for x in client.v1.events.list(params={"limit": 100}).auto_paging_iter())
        if e["type"] == "invoice.payment_succeeded" and e["data"]["object"]["id"] == invoice.id
    )
    _wait(
        "the signed webhook",
        lambda: httpx.get(f"{tower.url}/webhooks/stripe/events/{paid_event}", headers=H).status_code == 200,
    )

    # 2. a run pulls Stripe and Tryton and finds the invoice missing in the ERP
    assert tryton_invoices(trytond_server, invoice.id) == []
    run_reconciliation(tower)
    items = drift_for(tower, invoice.id)
    missing = [i for i in items if i["class"] == "missing_in_erp"]
    assert len(missing) == 1, items
    assert missing[0]["amount_minor"] == 24_900 and missing[0]["region"] == "EU"

    # 3. the corrective sync posts it in Tryton (read back from Tryton itself)
    r = sync(tower, missing[0]["drift_id"])
    assert r.status_code in (200, 202), r.text
    action = wait_action(tower, r.json()["action_id"])
    assert str(action.get("state") or action.get("State")) == "succeeded", action
    (posted,) = tryton_invoices(trytond_server, invoice.id)
    assert posted["state"] == "posted" and str(posted["total_amount"]) == "249.00"

    # the payment Stripe collected is the next gap (paid in billing, open in the ERP): sync it too
    run_reconciliation(tower)
    for item in drift_for(tower, invoice.id) + drift_for(tower, str(invoice.payment_intent)):
        if item["state"] != "resolved":
            r = sync(tower, item["drift_id"])
            assert r.status_code in (200, 202), r.text
            assert str(wait_action(tower, r.json()["action_id"]).get("state")) == "succeeded"
    assert tryton_invoices(trytond_server, invoice.id)[0]["state"] == "paid"

    # 4. the next run finds no drift for this invoice or its payment
    run_reconciliation(tower)
    assert drift_for(tower, invoice.id) == [] and drift_for(tower, str(invoice.payment_intent)) == []
    # ... and the SLA knows the ERP posted and applied them (Tryton exports no spans into the tower: the pulled
    # records are its activity), so neither is stuck however late one looks
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))
    for sla, key in (("invoice_posted", invoice.id), ("payment_applied", str(invoice.payment_intent))):
        r = httpx.get(f"{tower.url}/api/sla/stuck", params={"sla": sla, "at": later}, headers=H)
        assert r.status_code == 200 and key not in {i["key"] for i in r.json()["items"]}, (sla, r.text)

    # 5. the same corrective sync sent again posts nothing: through the API (the item is resolved) ...
    again = sync(tower, missing[0]["drift_id"])
    assert again.status_code in (200, 409), again.text
    # ... and straight to the connector with Stripe's own record of the invoice
    billing = StripeBilling("sk_test_e2e", localstripe.url)
    stripe_invoice = next(i for i in _all_invoices(billing) if i.invoice_id == invoice.id)
    erp = TrytonErp(TrytonRpc(trytond_server.url, trytond_server.database, trytond_server.user,
                              trytond_server.password))  # fmt: skip
    outcome = erp.post_invoice(stripe_invoice)
    assert outcome.already_done
    assert len(tryton_invoices(trytond_server, invoice.id)) == 1
    erp.rpc.close()


def _all_invoices(billing: StripeBilling) -> list[Any]:
    out: list[Any] = []
    cursor = None
    while True:
        page = billing.pull_invoices(cursor)
        out += page.items
        cursor = page.next_cursor
        if page.done:
            return out
