"""Corrective-sync policy (DOMAIN.md §4): which classes may be repaired, how, and by whose decision. Pure.

- technical classes (missing_in_erp, payment_unapplied, refund_unposted): an operator may start the sync,
  and the reconciler starts it on its own when ``TOWER_RECONCILE_AUTO_CORRECT`` is on;
- business-rule classes (amount / currency mismatch, duplicate posting): a sync waits for a person's
  explicit approval through the API (it changes what the ERP books, not just delivers what is missing);
- the other classes have no connector operation: people work them in the exception queue.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from reconciler import classify as c
from tower_core.models import Invoice, LedgerEntry

Decision = Literal["auto", "operator", "approval", "manual"]

# class -> the ErpConnector operation that repairs it (with the billing record as the source of truth)
OPERATIONS: dict[str, str] = {
    c.MISSING_IN_ERP: "post_invoice",
    c.PAYMENT_UNAPPLIED: "apply_payment",
    c.REFUND_UNPOSTED: "post_credit_memo",
    c.UNDER_APPLIED: "apply_payment",
    c.AMOUNT_MISMATCH: "repost_invoice",  # cancel the wrong posting, post the billing invoice again
    c.CURRENCY_MISMATCH: "repost_invoice",
    c.DUPLICATE_POSTING: "reverse_duplicate",  # cancel every posting but one
}
# Business-rule operations planned by ``correction``: they cancel postings and may post again.
CORRECTIONS = frozenset({"repost_invoice", "reverse_duplicate"})
# the order automatic corrections start in: what the others build on first (an application needs its invoice)
AUTO_ORDER = (c.MISSING_IN_ERP, c.PAYMENT_UNAPPLIED, c.REFUND_UNPOSTED)


def auto_rank(cls: str) -> int:
    """Where an item of ``cls`` comes in AUTO_ORDER (other classes last)."""
    return AUTO_ORDER.index(cls) if cls in AUTO_ORDER else len(AUTO_ORDER)


# (class, reason) whose correction is a choice the tower does not make: why, for the operator
NOT_CORRECTED: dict[tuple[str, str], str] = {
    (c.PAYMENT_UNAPPLIED, "matched_not_applied"): (
        "the payment has no allocation in billing (it matched the customer's open invoices by amount only); "
        "allocate it in billing, and the next run applies or flags it"
    ),
    (c.PAYMENT_UNAPPLIED, "booked_unapplied"): (
        "the ERP holds the payment's cash unapplied, and a new application would book it twice; apply the booked "
        "payment to its invoice in the ERP, and the next run checks it"
    ),
    # the repost corrections rewrite invoice postings; a wrong credit memo or application is fixed in the ERP
    (c.AMOUNT_MISMATCH, "credit_memo_differs"): (
        "the tower reposts invoices, not credit memos; cancel and re-enter the credit memo in the ERP, and the "
        "next run checks it"
    ),
    (c.CURRENCY_MISMATCH, "credit_memo_currency"): (
        "the tower reposts invoices, not credit memos; re-enter the credit memo in the refund's currency in the ERP"
    ),
    (c.AMOUNT_MISMATCH, "application_differs"): (
        "the tower does not reverse payment applications; correct the payment's application in the ERP, or allocate "
        "the payment in billing"
    ),
    (c.CURRENCY_MISMATCH, "application_currency"): (
        "the tower does not reverse payment applications; re-apply the payment in its billing currency in the ERP"
    ),
}
# Actions stored under an operation's former name run as the operation that replaced it.
ALIASES = {"adjust_invoice": "repost_invoice"}


def operation(stored: str) -> str:
    """The operation an action stored as ``stored`` runs."""
    return ALIASES.get(stored, stored)


TARGET_SYSTEM = "erp"


def decision(cls: str, auto_enabled: bool, reason: str = "") -> Decision:
    """Who corrects an item of this class (and reason code): "manual" when the tower does not (NOT_CORRECTED)."""
    if (cls, reason) in NOT_CORRECTED:
        return "manual"
    if cls in c.TECHNICAL:
        return "auto" if auto_enabled else "operator"
    if cls in c.BUSINESS or cls in OPERATIONS:
        return "approval"
    return "manual"


def target_ref(cls: str, keys: Mapping[str, str]) -> str:
    """The billing id the ERP record carries as its external reference (the idempotency anchor)."""
    if cls in (c.PAYMENT_UNAPPLIED, c.REFUND_UNPOSTED):
        return keys.get("payment_id", "")
    return keys.get("invoice_id", "") or keys.get("payment_id", "")


def idempotency_key(cls: str, keys: Mapping[str, str], target: str) -> str:
    """Stable key of (class, keys, target): the same correction requested twice is one action."""
    doc = json.dumps({"class": cls, "keys": {k: v for k, v in sorted(keys.items()) if v}, "target": target})
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Correction:
    """What a business-rule correction writes to the ERP: postings to cancel, then whether to post again."""

    cancel: tuple[str, ...]
    post: bool
    keep: str  # the posting that stays ('' if none)


def source_moved_on(op: str, invoice: tuple[str, str | None] | None, payment: tuple[str, str | None] | None) -> str:
    """Why ``op`` must not write any more because billing, the source of truth, moved on since it was requested:
    an invoice no longer open, paid or uncollectible (voided, back to draft, deleted), a payment or refund no longer
    succeeded. ``invoice`` / ``payment``: (id, billing status now, None when billing no longer has it), or None
    when the action does not write from it. Empty when it still applies. Reversing a duplicate writes nothing
    new from the invoice, so a void does not stop it."""
    if invoice is not None and op != "reverse_duplicate":
        invoice_id, status = invoice
        if status is None:
            return f"billing no longer has invoice {invoice_id}"
        if status not in c.INVOICE_FINAL_STATUSES:
            return f"billing now has invoice {invoice_id} as {status}"
    if payment is not None:
        payment_id, status = payment
        if status is None:
            return f"billing no longer has payment {payment_id}"
        if status != "succeeded":
            return f"billing now has payment {payment_id} as {status}"
    return ""


def correction(op: str, live: Sequence[LedgerEntry], invoice: Invoice) -> Correction:
    """Plan ``repost_invoice`` / ``reverse_duplicate`` from the invoice's live postings (read just before).

    Billing is the source of truth: the posting to keep is the first that matches the billing invoice's amount
    and currency (a duplicate keeps the earliest one when none matches; its amount is then an item of its own).
    Cancelling first and posting last makes a repeat safe: after a crash between the two, the next attempt finds
    no live posting and only posts.
    """
    ordered = sorted(live, key=lambda e: (e.posted_at, e.entry_id))
    matching = [e for e in ordered if e.amount_minor == invoice.total_minor and e.currency == invoice.currency]
    if op == "reverse_duplicate":
        keep = (matching or ordered)[:1]
    elif op == "repost_invoice":
        keep = matching[:1]
    else:
        raise ValueError(f"{op} is not a business-rule correction (one of {sorted(CORRECTIONS)})")
    kept = keep[0].entry_id if keep else ""
    cancel = tuple(e.entry_id for e in ordered if e.entry_id != kept)
    return Correction(cancel, op == "repost_invoice" and not kept, kept)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient errors inside one execution, and the budget across executions."""

    attempts_per_execution: int = 4
    initial_s: float = 0.2
    max_s: float = 10.0
    max_total_attempts: int = 20


def after_transient_failure(total_attempts: int, policy: RetryPolicy) -> str:
    """What becomes of an action whose execution ended on transient errors: retried later, or dead-lettered."""
    return "dead_letter" if total_attempts >= policy.max_total_attempts else "pending"
