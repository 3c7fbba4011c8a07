"""Which flow step a pulled ERP record completes (reconciler/sla/ledger_activity.py): pure."""

from __future__ import annotations

import dataclasses
import datetime as dt

from reconciler.sla.ledger_activity import Activity, activity_of
from tower_core.models import LedgerEntry

AT = dt.datetime(2026, 11, 20, 12, 30, 5, tzinfo=dt.UTC)
POSTING = LedgerEntry(
    entry_id="tryton:invoice:1", entry_type="invoice", external_ref="in_1", party_ref="Acme", region="EU",
    currency="EUR", amount_minor=24_900, status="posted", posted_at=dt.datetime(2026, 11, 20, tzinfo=dt.UTC),
    updated_at=AT,
)  # fmt: skip


def test_a_live_posting_payment_application_or_credit_memo_completes_its_step_at_its_last_change() -> None:
    assert activity_of(POSTING) == Activity("invoice_to_ledger", "invoice", "in_1", "EU", AT)
    applied = dataclasses.replace(POSTING, entry_type="payment", external_ref="pi_1", applied_to_ref="in_1")
    assert activity_of(applied) == Activity("payment_to_cash", "payment", "pi_1", "EU", AT)
    memo = dataclasses.replace(POSTING, entry_type="credit_memo", external_ref="re_1", applied_to_ref="in_1")
    assert activity_of(memo) == Activity("refund_to_ledger", "payment", "re_1", "EU", AT)


def test_drafts_cancellations_unapplied_cash_and_records_without_a_billing_id_complete_nothing() -> None:
    for other in (
        dataclasses.replace(POSTING, status="draft"),  # a rejected posting
        dataclasses.replace(POSTING, status="cancelled"),
        dataclasses.replace(POSTING, external_ref=""),  # a manual ERP invoice
        dataclasses.replace(POSTING, entry_type="payment", external_ref="pi_1"),  # cash not applied to an invoice
    ):
        assert activity_of(other) is None, other
