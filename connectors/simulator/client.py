"""HTTP connectors for the simulated estate served by ``server.py`` (how ``tower serve`` reaches the demo).

They implement BillingConnector / ErpConnector over httpx and keep the error contract: timeouts, connection
errors, 429 and 5xx -> TransientError; 4xx -> BusinessRuleError with the estate's message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from connectors.base import ActionOutcome, BusinessRuleError, Health, TransientError
from connectors.simulator import codec
from tower_core.models import CdpProfile, Customer, Invoice, LedgerEntry, Page, Payment, Skipped, record_ref
from tower_core.settings import Settings


class _Http:
    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise TransientError(f"{self.base_url}{path} timed out: {exc}") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{self.base_url}{path} unreachable: {exc}") from None
        if r.status_code == 429 or r.status_code >= 500:
            raise TransientError(f"{self.base_url}{path}: HTTP {r.status_code} {_detail(r)}")
        if r.status_code >= 400:
            raise BusinessRuleError(_detail(r))
        return r.json()

    def page(self, path: str, cls: type, cursor: str | None, limit: int) -> Page:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        doc = self.call("GET", path, params=params)
        items, skipped = [], []
        for raw in doc["items"]:
            try:
                items.append(codec.from_json(cls, raw))
            except ValueError as exc:  # one malformed record is listed and passed over, not a failed pull
                skipped.append(Skipped(record_ref(cls, raw), str(exc)))
        return Page(items, doc["next_cursor"], doc["done"], tuple(skipped))

    def close(self) -> None:
        self.client.close()


def _detail(r: httpx.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        return r.text[:500]
    return str(doc.get("detail", doc)) if isinstance(doc, dict) else str(doc)


class SimBillingClient:
    name = "sim-billing"

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.http = _Http(base_url, timeout_s)

    def pull_invoices(self, cursor: str | None, limit: int = 1000) -> Page[Invoice]:
        return self.http.page("/billing/invoices", Invoice, cursor, limit)

    def pull_payments(self, cursor: str | None, limit: int = 1000) -> Page[Payment]:
        return self.http.page("/billing/payments", Payment, cursor, limit)

    def pull_customers(self, cursor: str | None, limit: int = 1000) -> Page[Customer]:
        return self.http.page("/billing/customers", Customer, cursor, limit)

    def health(self) -> Health:
        try:
            doc = self.http.call("GET", "/billing/health")
        except (TransientError, BusinessRuleError) as exc:
            return Health(False, str(exc))
        return Health(bool(doc["ok"]), doc.get("detail", ""))


class SimErpClient:
    name = "sim-erp"

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.http = _Http(base_url, timeout_s)

    def pull_ledger_entries(self, cursor: str | None, limit: int = 1000) -> Page[LedgerEntry]:
        return self.http.page("/erp/ledger-entries", LedgerEntry, cursor, limit)

    def find_by_external_ref(self, external_ref: str) -> list[LedgerEntry]:
        docs = self.http.call("GET", "/erp/ledger-entries/by-ref", params={"external_ref": external_ref})
        return [codec.from_json(LedgerEntry, d) for d in docs]

    def post_invoice(self, invoice: Invoice) -> ActionOutcome:
        return codec.outcome_from(self.http.call("POST", "/erp/invoices", json=codec.to_json(invoice)))

    def apply_payment(self, payment: Payment, invoice_id: str, amount_minor: int) -> ActionOutcome:
        body = {"payment": codec.to_json(payment), "invoice_id": invoice_id, "amount_minor": amount_minor}
        return codec.outcome_from(self.http.call("POST", "/erp/payment-applications", json=body))

    def post_credit_memo(self, refund: Payment) -> ActionOutcome:
        return codec.outcome_from(self.http.call("POST", "/erp/credit-memos", json=codec.to_json(refund)))

    def cancel_entry(self, entry_id: str, reason: str) -> ActionOutcome:
        path = f"/erp/ledger-entries/{quote(entry_id, safe='')}/cancel"
        return codec.outcome_from(self.http.call("POST", path, json={"reason": reason}))

    def health(self) -> Health:
        try:
            doc = self.http.call("GET", "/erp/health")
        except (TransientError, BusinessRuleError) as exc:
            return Health(False, str(exc))
        return Health(bool(doc["ok"]), doc.get("detail", ""))


class SimCdpClient:
    name = "sim-cdp"

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.http = _Http(base_url, timeout_s)

    def pull_profiles(self, cursor: str | None, limit: int = 1000) -> Page[CdpProfile]:
        return self.http.page("/cdp/profiles", CdpProfile, cursor, limit)

    def health(self) -> Health:
        try:
            self.http.call("GET", "/healthz")
        except (TransientError, BusinessRuleError) as exc:
            return Health(False, str(exc))
        return Health(True, "simulated CDP")


def connectors_from_settings(settings: Settings) -> tuple[SimBillingClient, SimErpClient, SimCdpClient]:
    """(billing, erp, cdp) HTTP connectors for the estate at TOWER_SIMULATOR_URL (used by the reconciler)."""
    url, timeout = settings.simulator_url, settings.simulator_timeout_s
    return SimBillingClient(url, timeout), SimErpClient(url, timeout), SimCdpClient(url, timeout)
