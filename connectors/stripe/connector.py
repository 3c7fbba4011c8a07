"""StripeBilling: pulls invoices, payments, refunds and credit notes changed since a cursor (BillingConnector).

Stripe lists have no "updated since" filter, so changes come from the Events API (``created >= cursor``,
auto-paginated), and the current state of each changed object is read back. Refunds are also listed
directly, newest first until older than the cursor, because not every Stripe (nor localstripe) emits an event
for them. Events are kept 30 days by Stripe: a first pull covers that window.

Every remote call is one OTel span with DOMAIN.md §2 attributes; 429, 5xx and connection failures are retried
with exponential backoff (tenacity), then surface as TransientError; other Stripe errors are
BusinessRuleError with Stripe's message.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import stripe
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from connectors.base import BusinessRuleError, ConnectorError, Health, TransientError
from connectors.stripe import mapping
from connectors.stripe.mapping import Change, Cursor
from tower_core.models import Invoice, Page, Payment
from tower_core.settings import Settings

tracer = trace.get_tracer("tower.connectors.stripe")
T = TypeVar("T")
PAGE = 100
_PAYMENT_EVENTS = ("payment_intent.", "charge.refund", "refund.", "credit_note.")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError):
        return True
    status = exc.http_status or 0 if isinstance(exc, stripe.StripeError) else 0
    return status == 429 or status >= 500


def _unknown_endpoint(exc: BusinessRuleError) -> bool:
    """Stripe's answer to an endpoint or parameter the server does not know: 404 (localstripe: a plain-text
    404; Stripe: "Unrecognized request URL"), or a 400 naming an unknown parameter."""
    cause = exc.__cause__
    if not isinstance(cause, stripe.StripeError):
        return False
    if cause.http_status == 404:
        return True
    text = str(cause.user_message or cause).lower()
    return cause.http_status == 400 and ("unrecognized request url" in text or "unknown parameter" in text)


def _plain(obj: Any) -> dict[str, Any]:
    """SDK objects -> plain dicts (the mapping is pure and SDK-free)."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


@contextmanager
def _answers_of(what: str) -> Iterator[None]:
    """An answer of another shape than Stripe's API (a proxy's, a broken mock's) fails the pull with a line that
    names the pull and the problem: it was a bare ``'data'`` (a KeyError) in the run's record."""
    try:
        yield
    except ConnectorError:
        raise
    except mapping.MappingError as exc:
        raise BusinessRuleError(f"stripe {what}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BusinessRuleError(f"stripe {what}: malformed answer ({type(exc).__name__}: {exc})") from None


def _when(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


class NotFoundError(BusinessRuleError):
    """Stripe has no such object (404): a deleted draft invoice, a deleted customer."""


class StripeBilling:
    name = "stripe"

    def __init__(
        self,
        api_key: str,
        api_base: str = "https://api.stripe.com",
        *,
        default_region: str = "",
        attempts: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 30.0,
    ) -> None:
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            max_network_retries=0,  # tenacity below owns retries, so each attempt is its own span
            http_client=stripe.HTTPXClient(timeout=timeout_s, allow_sync_methods=True),
        )
        self.default_region = default_region
        self.attempts, self.backoff_s = attempts, backoff_s
        self._regions: dict[str, str] = {}
        # Whether the server has the InvoicePayments API (Stripe since 2025-03-31.basil; localstripe has not):
        # None until first asked, False once it answered "unknown", so it is not asked for every payment.
        self._invoice_payments_api: bool | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeBilling:
        if settings.stripe_api_key is None:
            raise BusinessRuleError("TOWER_STRIPE_API_KEY is not set")
        return cls(
            settings.stripe_api_key.get_secret_value(),
            settings.stripe_api_base,
            default_region=settings.stripe_default_region,
        )

    # ------------------------------------------------------------ remote calls

    def _call(self, op: str, fn: Callable[[], T], attributes: dict[str, str] | None = None) -> T:
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential(multiplier=self.backoff_s, max=8),
            stop=stop_after_attempt(self.attempts),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt, tracer.start_as_current_span(f"stripe.{op}", kind=SpanKind.CLIENT) as span:
                    span.set_attribute("revops.system", "billing")
                    span.set_attribute("tower.attempt", attempt.retry_state.attempt_number)
                    for k, v in (attributes or {}).items():
                        span.set_attribute(k, v)
                    try:
                        return fn()
                    except stripe.StripeError as exc:
                        span.set_status(Status(StatusCode.ERROR, str(exc.user_message or exc)[:200]))
                        span.set_attribute("http.response.status_code", exc.http_status or 0)
                        raise
        except stripe.StripeError as exc:
            message = exc.user_message or str(exc)
            if _retryable(exc):
                raise TransientError(f"stripe {op} failed after {self.attempts} attempts: {message}") from exc
            if exc.http_status == 404:
                raise NotFoundError(f"stripe {op}: {message}") from exc
            raise BusinessRuleError(f"stripe {op}: {message}") from exc
        raise TransientError(f"stripe {op}: no attempt made")  # pragma: no cover

    def _events_since(self, since: int) -> list[dict[str, Any]]:
        def fetch() -> list[dict[str, Any]]:
            params: dict[str, Any] = {"limit": PAGE, "created": {"gte": since}}
            return [_plain(e) for e in self.client.v1.events.list(params=params).auto_paging_iter()]

        return self._call("events.list", fetch, {"stripe.created_gte": str(since)})

    def _refunds_since(self, since: int) -> list[dict[str, Any]]:
        """Refunds come newest first: stop at the first older than ``since``."""

        def fetch() -> list[dict[str, Any]]:
            out = []
            for r in self.client.v1.refunds.list(params={"limit": PAGE}).auto_paging_iter():
                refund = _plain(r)
                if int(refund.get("created") or 0) < since:
                    break
                out.append(refund)
            return out

        return self._call("refunds.list", fetch, {"stripe.created_gte": str(since)})

    def _retrieve(self, kind: str, object_id: str) -> dict[str, Any]:
        service = {
            "invoice": self.client.v1.invoices,
            "payment_intent": self.client.v1.payment_intents,
            "refund": self.client.v1.refunds,
            "credit_note": self.client.v1.credit_notes,
            "charge": self.client.v1.charges,
        }[kind]
        key = {
            "invoice": "revops.invoice.id",
            "charge": "stripe.charge.id",
        }.get(kind, "revops.payment.id")
        return self._call(f"{kind}s.retrieve", lambda: _plain(service.retrieve(object_id)), {key: object_id})

    def _region_of(self, obj: dict[str, Any]) -> str:
        """The region a record falls back to when its own metadata has none: its customer's metadata, else the
        configured default (Stripe does not copy customer metadata onto invoices or payments)."""
        customer = mapping._id(obj.get("customer"))
        if not customer:
            return self.default_region
        if customer not in self._regions:
            if len(self._regions) > 10_000:
                self._regions.clear()
            try:
                cus = self._call(
                    "customers.retrieve",
                    lambda: _plain(self.client.v1.customers.retrieve(customer)),
                    {"revops.customer.id": customer},
                )
            except BusinessRuleError:  # deleted customer
                cus = {}
            self._regions[customer] = mapping._region(cus, self.default_region)
        return self._regions[customer]

    # ------------------------------------------------------------ BillingConnector

    def pull_invoices(self, cursor: str | None, limit: int = 1000) -> Page[Invoice]:
        with _answers_of("invoices pull"):
            return self._pull_invoices(cursor, limit)

    def pull_payments(self, cursor: str | None, limit: int = 1000) -> Page[Payment]:
        with _answers_of("payments pull"):
            return self._pull_payments(cursor, limit)

    def _pull_invoices(self, cursor: str | None, limit: int) -> Page[Invoice]:
        cur = Cursor.decode(cursor)
        events = self._events_since(cur.t if cur else 0)
        changes = [
            Change(int(e["created"]), str(e["id"]), "invoice", mapping._id(e["data"]["object"].get("id")))
            for e in events
            if str(e.get("type", "")).startswith("invoice.") and e["data"]["object"].get("id")
        ]
        items: list[Invoice] = []
        while True:  # a page that is not the last is never empty (the runner stops at an empty page)
            page, cur, done = mapping.select_changes(changes, cur, limit)
            for c in page:
                try:
                    obj = self._with_payments(self._retrieve("invoice", c.key))
                except NotFoundError:  # Stripe deletes only drafts: never an invoice, nothing to reconcile
                    continue
                items.append(mapping.to_invoice(obj, _when(c.t), self._region_of(obj)))
            if items or done:
                return Page(items, cur.encode(), done)

    def _pull_payments(self, cursor: str | None, limit: int) -> Page[Payment]:
        cur = Cursor.decode(cursor)
        since = cur.t if cur else 0
        events = self._events_since(since)
        succeeded: dict[str, int] = {}  # payment intent -> when it succeeded (its event), for occurred_at
        for e in events:
            if e.get("type") == "payment_intent.succeeded" and isinstance(e.get("created"), int):
                pi_id = mapping._id(e["data"]["object"].get("id"))
                succeeded[pi_id] = max(succeeded.get(pi_id, 0), e["created"])
        changes = list(self._payment_changes(events))
        changes += [Change(int(r["created"]), str(r["id"]), "refund", str(r["id"])) for r in self._refunds_since(since)]
        page, nxt, done = mapping.select_changes(changes, cur, limit)
        intents: dict[str, dict[str, Any]] = {}
        paid_invoices: dict[str, dict[str, int] | None] = {}
        items: list[Payment] = []
        for c in page:
            when = _when(c.t)
            if c.kind == "payment_intent":
                pi = intents[c.key] = self._retrieve("payment_intent", c.key)
                invoices = self._invoices_paid_by(pi, paid_invoices) if pi.get("status") == "succeeded" else None
                items.append(mapping.payment_from_intent(pi, when, self._region_of(pi), invoices, succeeded.get(c.key)))
            elif c.kind == "credit_note":
                cn = self._retrieve("credit_note", c.key)
                items.append(mapping.payment_from_credit_note(cn, when, self._region_of(cn)))
            else:
                refund = self._retrieve("refund", c.key)
                paid = self._paid_by(refund, intents)
                invoices = self._invoices_paid_by(paid, paid_invoices) if paid else None
                items.append(mapping.payment_from_refund(refund, paid, when, self._region_of(paid or {}), invoices))
        return Page(items, nxt.encode(), done)

    def _invoices_paid_by(self, pi: dict[str, Any], cache: dict[str, dict[str, int] | None]) -> dict[str, int] | None:
        """Invoice id -> amount paid by a PaymentIntent that does not name its invoice (API basil and later),
        from the InvoicePayments API; None when the PaymentIntent names it, or the server lacks that API."""
        pi_id = mapping._id(pi.get("id"))
        if not pi_id or pi.get("object", "payment_intent") != "payment_intent" or mapping._pi_invoice(pi):
            return None
        if pi_id not in cache:
            cache[pi_id] = self._invoice_payments(pi_id)
        return cache[pi_id]

    def _invoice_payments(self, pi_id: str) -> dict[str, int] | None:
        rows = self._invoice_payment_rows(
            {"payment": {"type": "payment_intent", "payment_intent": pi_id}}, {"revops.payment.id": pi_id}
        )
        return None if rows is None else mapping.invoice_allocations(rows)

    def _invoice_payment_rows(self, params: dict[str, Any], attrs: dict[str, str]) -> list[dict[str, Any]] | None:
        """InvoicePayments matching ``params``; None when the server has no such API (asked once)."""
        if self._invoice_payments_api is False:
            return None

        def fetch() -> list[dict[str, Any]]:
            listing = self.client.v1.invoice_payments.list(params={"limit": PAGE, **params})
            return [_plain(p) for p in listing.auto_paging_iter()]

        try:
            rows = self._call("invoice_payments.list", fetch, attrs)
        except BusinessRuleError as exc:
            if not _unknown_endpoint(exc):
                raise
            self._invoice_payments_api = False  # older servers (localstripe): keep the pre-basil behaviour
            return None
        self._invoice_payments_api = True
        return rows

    def _with_payments(self, invoice: dict[str, Any]) -> dict[str, Any]:
        """A paid invoice of API basil and later names its PaymentIntent only in ``payments``, which a plain
        retrieve leaves out: list its InvoicePayments then."""
        if invoice.get("payment_intent") or invoice.get("payments") or not invoice.get("amount_paid"):
            return invoice
        inv_id = mapping._id(invoice.get("id"))
        rows = self._invoice_payment_rows({"invoice": inv_id}, {"revops.invoice.id": inv_id})
        return invoice if rows is None else {**invoice, "payments": {"object": "list", "data": rows}}

    def _payment_changes(self, events: Iterable[dict[str, Any]]) -> Iterable[Change]:
        for e in events:
            etype = str(e.get("type", ""))
            if not etype.startswith(_PAYMENT_EVENTS):
                continue
            obj = e["data"]["object"]
            t, eid = int(e["created"]), str(e["id"])
            if etype.startswith("payment_intent."):
                yield Change(t, eid, "payment_intent", mapping._id(obj.get("id")))
            elif etype.startswith("credit_note."):
                yield Change(t, eid, "credit_note", mapping._id(obj.get("id")))
            elif etype.startswith("refund."):
                yield Change(t, eid, "refund", mapping._id(obj.get("id")))
            elif obj.get("object") == "charge":
                # charge.refunded: API versions before 2022-11-15 embed the refunds; later ones do not, and the
                # refunds listing (and refund.* events) bring them instead.
                refunds = obj.get("refunds")
                data = refunds.get("data") if isinstance(refunds, dict) else None
                for r in data or []:
                    if isinstance(r, dict) and mapping._id(r.get("id")):
                        yield Change(t, f"{eid}:{r.get('id')}", "refund", mapping._id(r.get("id")))
            elif mapping._id(obj.get("id")):  # charge.refund.updated: the object is the refund
                yield Change(t, eid, "refund", mapping._id(obj.get("id")))

    def _paid_by(self, refund: dict[str, Any], intents: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """The payment intent a refund gives back (for its invoice and customer)."""
        pi_id = mapping._id(refund.get("payment_intent"))
        if not pi_id and refund.get("charge"):
            charge = self._retrieve("charge", mapping._id(refund["charge"]))
            pi_id = mapping._id(charge.get("payment_intent"))
            if not pi_id:
                return charge
        if not pi_id:
            return None
        if pi_id not in intents:
            intents[pi_id] = self._retrieve("payment_intent", pi_id)
        return intents[pi_id]

    def health(self) -> Health:
        try:
            self._call("balance.retrieve", lambda: self.client.v1.balance.retrieve())
        except (TransientError, BusinessRuleError) as exc:
            return Health(False, str(exc))
        return Health(True, "stripe reachable")
