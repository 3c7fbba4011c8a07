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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from reconciler import classify as c

Decision = Literal["auto", "operator", "approval", "manual"]

# class -> the ErpConnector operation that repairs it (with the billing record as the source of truth)
OPERATIONS: dict[str, str] = {
    c.MISSING_IN_ERP: "post_invoice",
    c.PAYMENT_UNAPPLIED: "apply_payment",
    c.REFUND_UNPOSTED: "post_credit_memo",
    c.UNDER_APPLIED: "apply_payment",
    c.AMOUNT_MISMATCH: "adjust_invoice",
    c.DUPLICATE_POSTING: "reverse_duplicate",
    c.CURRENCY_MISMATCH: "repost_invoice",
}
# Business-rule operations the ErpConnector contract cannot express yet (no reversal or amendment call):
# approving them records the decision and fails the action with this message, for a person to finish in the ERP.
UNSUPPORTED = {
    "adjust_invoice": "the ERP connector has no invoice amendment; correct the amount in the ERP, then acknowledge",
    "reverse_duplicate": "the ERP connector has no reversal; cancel the duplicate posting in the ERP, then acknowledge",
    "repost_invoice": "the ERP connector has no cancel-and-repost; repost in the ERP's currency, then acknowledge",
}
TARGET_SYSTEM = "erp"


def decision(cls: str, auto_enabled: bool) -> Decision:
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
class RetryPolicy:
    """Backoff for transient errors inside one execution, and the budget across executions."""

    attempts_per_execution: int = 4
    initial_s: float = 0.2
    max_s: float = 10.0
    max_total_attempts: int = 20


def after_transient_failure(total_attempts: int, policy: RetryPolicy) -> str:
    """What becomes of an action whose execution ended on transient errors: retried later, or dead-lettered."""
    return "dead_letter" if total_attempts >= policy.max_total_attempts else "pending"
