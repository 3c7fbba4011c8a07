"""The estate's loopback HTTP API and the HTTP connectors the tower uses to reach it (real uvicorn, real
httpx, on 127.0.0.1): same pages as in memory, writes go through, errors keep the connector contract."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import httpx
import pytest

from connectors.base import BillingConnector, BusinessRuleError, ErpConnector, TransientError
from connectors.simulator import Estate, EstateConfig, codec
from connectors.simulator.client import SimBillingClient, SimCdpClient, SimErpClient, connectors_from_settings
from connectors.simulator.server import SimServer
from tests.conftest import free_port
from tests.sim_reference import pull_all
from tower_core.settings import Settings

AS_OF = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Estate, str]]:
    estate = Estate.generate(
        EstateConfig(seed=11, customers=80, invoices=600, start=AS_OF - dt.timedelta(days=40), as_of=AS_OF)
    )
    server = SimServer(estate, port=free_port()).start()
    try:
        yield estate, server.url
    finally:
        server.stop()


def test_pulls_over_http_equal_the_in_memory_pulls(served: tuple[Estate, str]) -> None:
    estate, url = served
    billing, erp, cdp = SimBillingClient(url), SimErpClient(url), SimCdpClient(url)
    assert isinstance(billing, BillingConnector) and isinstance(erp, ErpConnector)
    for remote, local in (
        (billing.pull_invoices, estate.billing.pull_invoices),
        (billing.pull_payments, estate.billing.pull_payments),
        (billing.pull_customers, estate.billing.pull_customers),
        (cdp.pull_profiles, estate.cdp.pull_profiles),
    ):
        assert pull_all(remote) == pull_all(local)
    first = erp.pull_ledger_entries(None, 50)
    assert len(first.items) == 50 and not first.done
    assert billing.health().ok and erp.health().ok and cdp.health().ok
    manifest = httpx.get(f"{url}/manifest").text
    assert manifest == estate.manifest.to_json()
    assert len(httpx.get(f"{url}/flows").json()) == len(estate.billing.invoices)


def test_writes_and_errors_keep_the_connector_contract(served: tuple[Estate, str]) -> None:
    estate, url = served
    erp = SimErpClient(url)
    missing = estate.billing.get_invoice(estate.manifest.of("erp_posting_missing")[0].keys["invoice_id"])
    first = erp.post_invoice(missing)
    assert not first.already_done and erp.post_invoice(missing).already_done
    assert [e.entry_id for e in erp.find_by_external_ref(missing.invoice_id)] == [first.target_ref]
    refund = estate.billing.get_payment(estate.manifest.of("refund_not_posted")[0].keys["payment_id"])
    assert not erp.post_credit_memo(refund).already_done
    rejected = estate.billing.get_invoice(estate.manifest.of("erp_business_rejection")[0].keys["invoice_id"])
    with pytest.raises(BusinessRuleError, match="is closed"):
        erp.post_invoice(rejected)
    with pytest.raises(BusinessRuleError, match="cursor"):
        erp.pull_ledger_entries("bogus")
    dup = estate.manifest.of("duplicate_erp_posting")[0].keys["ledger_entry_id"]
    assert not erp.cancel_entry(dup, "duplicate").already_done and erp.cancel_entry(dup, "again").already_done
    assert estate.erp.entries.get(dup).status == "cancelled"
    with pytest.raises(BusinessRuleError, match="does not exist"):
        erp.cancel_entry("le_nope", "x")
    with pytest.raises(BusinessRuleError):  # quoted into one path segment: no other route is reached
        erp.cancel_entry("le_x/../../manifest", "x")
    r = httpx.post(f"{url}/erp/invoices", json={"invoice_id": "x", "surprise": 1})
    assert r.status_code == 422 and "surprise" in r.json()["detail"]
    good = codec.to_json(missing)
    for path, doc, field in [  # wrong types answered 500 (and a string amount was even stored)
        ("/erp/invoices", {**good, "invoice_id": "in_typed", "issued_at": None}, "issued_at"),
        ("/erp/invoices", {**good, "invoice_id": "in_typed", "total_minor": "abc"}, "total_minor"),
        ("/erp/credit-memos", {**codec.to_json(refund), "allocations": None}, "allocations"),
    ]:
        r = httpx.post(f"{url}{path}", json=doc)
        assert r.status_code == 422 and field in r.json()["detail"], (path, r.status_code, r.text)
    assert erp.find_by_external_ref("in_typed") == []
    estate.erp.begin_outage()
    try:
        with pytest.raises(TransientError, match="503"):
            erp.post_invoice(missing)
        assert not erp.health().ok
    finally:
        estate.erp.end_outage()


def test_unreachable_estate_is_transient() -> None:
    port = free_port()
    settings = Settings(simulator_url=f"http://127.0.0.1:{port}", simulator_timeout_s=1)
    billing, erp, cdp = connectors_from_settings(settings)
    with pytest.raises(TransientError, match="unreachable"):
        billing.pull_invoices(None)
    assert not erp.health().ok and not cdp.health().ok


def test_a_malformed_record_is_passed_over_with_its_id_and_reason() -> None:
    """The estate's HTTP API hands out a posting whose amount is not an integer number of minor units: the
    connector keeps the rest of the page and lists that one as skipped (the pull goes on)."""
    import dataclasses

    estate = Estate.generate(EstateConfig(seed=4, customers=5, invoices=12, as_of=AS_OF))
    good = next(iter(estate.erp.entries.values()))
    bad = dataclasses.replace(good, entry_id="erp_bad_1", amount_minor="12.50")  # type: ignore[arg-type]
    estate.erp.entries.put(bad)
    server = SimServer(estate, port=free_port()).start()
    try:
        erp = SimErpClient(server.url)
        items, skipped, cursor = [], [], None
        while True:
            page = erp.pull_ledger_entries(cursor, 5)
            items += page.items
            skipped += page.skipped
            cursor = page.next_cursor
            if page.done:
                break
        erp.http.close()
    finally:
        server.stop()
    assert [s.ref for s in skipped] == ["erp_bad_1"] and "amount_minor" in skipped[0].reason
    assert {e.entry_id for e in items} == {e.entry_id for e in estate.erp.entries.values()} - {"erp_bad_1"}


def test_the_estate_api_starts_again_on_its_port_while_the_last_ones_connections_linger() -> None:
    """`tower demo` stopped and started again at once refused to start: the port's closed connections linger in
    TIME_WAIT for a minute, and the check before listening bound without SO_REUSEADDR (uvicorn itself sets it)."""
    estate = Estate.generate(EstateConfig(seed=4, customers=5, invoices=12, as_of=AS_OF))
    port = free_port()
    first = SimServer(estate, port=port).start()
    with httpx.Client() as client:  # keep-alive: the server closes it at its stop, and that side lingers
        assert client.get(f"{first.url}/flows").status_code == 200
        first.stop()
    again = SimServer(estate, port=port).start()
    try:
        assert httpx.get(f"{again.url}/flows").status_code == 200
    finally:
        again.stop()
