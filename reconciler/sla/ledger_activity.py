"""What a pulled ERP record says about the flow steps (DOMAIN.md §1): a live invoice posting ends its invoice's
invoice_to_ledger item, a payment applied to an invoice ends the payment's payment_to_cash item, a credit memo
ends its refund's refund_to_ledger item. Pure, no IO.

An ERP whose client exports no spans into the tower (Tryton: its RPC spans go to the operator's own collector)
is otherwise seen by the SLA only through events, and every item it completed stayed "stuck" and paged. The
time is the record's last change in the ERP (its posting date is a day, not an instant)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from tower_core.models import LedgerEntry

ERP = "erp"


@dataclass(frozen=True)
class Activity:
    step: str
    key_type: str
    key: str
    region: str
    at: dt.datetime


def activity_of(entry: LedgerEntry) -> Activity | None:
    if not entry.live or not entry.external_ref:
        return None
    if entry.entry_type == "invoice":
        step = "invoice_to_ledger"
    elif entry.entry_type == "payment" and entry.applied_to_ref:
        step = "payment_to_cash"
    elif entry.entry_type == "credit_memo":
        step = "refund_to_ledger"
    else:
        return None
    key_type = "invoice" if step == "invoice_to_ledger" else "payment"
    return Activity(step, key_type, entry.external_ref, entry.region, entry.updated_at)
