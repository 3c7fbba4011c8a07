"""The connector interface: what the tower asks of a CDP, a billing system and an ERP.

The simulator and the real connectors (Stripe, Segment/RudderStack, Tryton) implement the same Protocols,
so the reconciler and corrective syncs run unchanged against either. Every remote call of a real connector
emits an OTel span with DOMAIN.md §2 attributes.

Error contract (DOMAIN.md §4): ``TransientError`` (timeouts, 5xx, 429, connection) may be retried with
backoff; ``BusinessRuleError`` (validation, closed period, tax) must not be — it carries the remote message
for a person.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tower_core.models import Invoice, LedgerEntry, Page, Payment


class ConnectorError(Exception):
    """Base of connector failures."""


class TransientError(ConnectorError):
    """Worth retrying later: the remote system is slow, overloaded or unreachable."""


class BusinessRuleError(ConnectorError):
    """The remote system refused the operation on its merits; retrying will not help."""


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class ActionOutcome:
    """Result of a corrective operation; ``already_done`` means the target held it before (no write)."""

    target_ref: str
    already_done: bool
    detail: str = ""
    data: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class BillingConnector(Protocol):
    name: str

    def pull_invoices(self, cursor: str | None, limit: int = 1000) -> Page[Invoice]: ...

    def pull_payments(self, cursor: str | None, limit: int = 1000) -> Page[Payment]: ...

    def health(self) -> Health: ...


@runtime_checkable
class ErpConnector(Protocol):
    name: str

    def pull_ledger_entries(self, cursor: str | None, limit: int = 1000) -> Page[LedgerEntry]: ...

    def find_by_external_ref(self, external_ref: str) -> list[LedgerEntry]:
        """Postings whose reference is this billing id: checked before every write."""
        ...

    def post_invoice(self, invoice: Invoice) -> ActionOutcome:
        """Create and post the customer invoice (reference = billing invoice id) unless it exists."""
        ...

    def apply_payment(self, payment: Payment, invoice_id: str, amount_minor: int) -> ActionOutcome: ...

    def post_credit_memo(self, refund: Payment) -> ActionOutcome: ...

    def cancel_entry(self, entry_id: str, reason: str) -> ActionOutcome:
        """Cancel (reverse) one invoice posting, e.g. a duplicate or one to post again from billing; one
        already cancelled is ``already_done``. The ERP's own rules may refuse it (BusinessRuleError). An ERP
        whose rules may refuse a posting it cannot foresee from the invoice alone also offers
        ``check_postable(invoice)``, raising BusinessRuleError: a repost cancels only once it passed."""
        ...

    def health(self) -> Health: ...
