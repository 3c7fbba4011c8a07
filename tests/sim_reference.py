"""A small, independent reference reconciliation of a simulated estate (test helper, not product code).

It follows docs/simulator.md literally and row by row, so the simulator's own tests can prove that a clean
estate has zero drift and that each injected fault leaves exactly the footprint the manifest promises —
whatever the real reconciler (issue 5) does.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable

from connectors.simulator.estate import Estate
from tower_core.models import Page


def pull_all(fn: Callable[[str | None, int], Page]) -> list:
    items, cursor = [], None
    while True:
        page = fn(cursor, 500)
        items += page.items
        cursor = page.next_cursor
        if page.done:
            return items


def reference_drift(
    estate: Estate, grace: dt.timedelta = dt.timedelta(days=1), sla: dt.timedelta = dt.timedelta(minutes=15)
) -> set[tuple[str, str]]:
    as_of = estate.config.as_of
    invoices = {i.invoice_id: i for i in pull_all(estate.billing.pull_invoices)}
    payments = {p.payment_id: p for p in pull_all(estate.billing.pull_payments)}
    entries = {e.entry_id: e for e in pull_all(estate.erp.pull_ledger_entries)}
    customers = {c.customer_id for c in pull_all(estate.billing.pull_customers)}
    profiles = pull_all(estate.cdp.pull_profiles)
    by_ref: dict[str, list] = defaultdict(list)
    applied: dict[tuple[str, str], int] = defaultdict(int)
    for e in entries.values():
        by_ref[e.external_ref].append(e)
        if e.entry_type == "payment":
            applied[(e.external_ref, e.applied_to_ref)] += e.amount_minor
    out: set[tuple[str, str]] = set()
    for inv in invoices.values():
        refs = by_ref[inv.invoice_id]
        posted = [e for e in refs if e.entry_type == "invoice" and e.status not in ("draft", "cancelled")]
        if any(e.party_ref != inv.customer_id for e in posted):
            out.add(("customer_unmatched", inv.customer_id))  # the ERP booked it to no or another party
        if not posted:
            age = as_of - inv.finalized_at
            if age >= grace:
                out.add(("missing_in_erp", inv.invoice_id))
            elif age >= sla:
                out.add(("stale_sync", inv.invoice_id))
            continue
        if len(posted) > 1:
            out.add(("duplicate_posting", inv.invoice_id))
            continue
        e = posted[0]
        if e.currency != inv.currency:
            out.add(("currency_mismatch", inv.invoice_id))
            continue
        if e.amount_minor != inv.total_minor:
            out.add(("amount_mismatch", inv.invoice_id))
            continue
        explained = False
        for p in payments.values():
            if p.kind != "payment" or p.status != "succeeded" or inv.invoice_id not in p.allocations:
                continue
            got = applied[(p.payment_id, inv.invoice_id)]
            if got == 0:
                out.add(("payment_unapplied", p.payment_id))
                explained = True
            elif got < p.allocations[inv.invoice_id]:
                out.add(("under_applied", inv.invoice_id))
                explained = True
            elif got > p.allocations[inv.invoice_id]:
                out.add(("over_applied", inv.invoice_id))
                explained = True
        if not explained and (inv.status == "paid") != (e.status == "paid"):
            out.add(("status_mismatch", inv.invoice_id))
    for p in payments.values():
        if p.status != "succeeded":
            assert not by_ref[p.payment_id], f"failed payment {p.payment_id} reached the ERP"
            continue
        if p.kind == "payment" and not p.allocations and not by_ref[p.payment_id]:
            out.add(("orphan_payment", p.payment_id))
        if p.kind in ("refund", "credit_note"):
            memos = [e for e in by_ref[p.payment_id] if e.entry_type == "credit_memo"]
            if not memos and as_of - p.occurred_at >= grace:
                out.add(("refund_unposted", p.payment_id))
            for m in memos:
                if m.amount_minor != p.amount_minor:
                    out.add(("amount_mismatch", p.payment_id))
    for e in entries.values():
        known = e.external_ref in invoices or e.external_ref in payments
        if not known:
            out.add(("missing_in_billing", e.external_ref))
    for prof in profiles:
        if prof.customer_id not in customers and as_of - prof.updated_at >= grace:
            out.add(("customer_unsynced", prof.customer_id))
    return out
