"""SQL of bench/reconcile.py: change a sample of invoices (for the incremental run) and read the frames the
datacompy comparison gets. Bench-only; every value is a bound parameter."""

from __future__ import annotations

import pyarrow as pa

from tower_core.store.base import Store

_CHANGE = """
INSERT INTO $db.billing_invoices (InvoiceId, CustomerId, Region, Currency, SubtotalMinor, TaxMinor, TotalMinor,
    AmountPaidMinor, AmountCreditedMinor, Status, IssuedAt, DueAt, FinalizedAt, PaidAt, UpdatedAt, SourceSystem,
    Attributes, Version)
SELECT InvoiceId, CustomerId, Region, Currency, SubtotalMinor, TaxMinor,
    TotalMinor + if(cityHash64(InvoiceId) % 10 = 0, 100, 0), AmountPaidMinor, AmountCreditedMinor, Status, IssuedAt,
    DueAt, FinalizedAt, PaidAt, UpdatedAt + toIntervalSecond(1), SourceSystem, Attributes, Version + 1000000000
FROM $db.billing_invoices FINAL
WHERE NOT IsDeleted
ORDER BY cityHash64(InvoiceId, {seed:UInt64})
LIMIT {n:UInt64}
"""


def change_invoices(store: Store, n: int, seed: int) -> int:
    """A new version of ``n`` invoices (one in ten with a changed total): what an incremental run picks up."""
    store.command(_CHANGE, {"n": n, "seed": seed})
    return n


def invoices_frame(store: Store) -> pa.Table:
    return store.query_arrow(
        "SELECT InvoiceId AS invoice_id, TotalMinor AS amount_minor, CAST(Currency AS String) AS currency, "
        "CAST(Status AS String) AS status, CustomerId AS customer_id, CAST(Region AS String) AS region "
        "FROM $db.billing_invoices FINAL WHERE NOT IsDeleted"
    )


def ledger_invoice_frame(store: Store) -> pa.Table:
    return store.query_arrow(
        "SELECT ExternalRef AS invoice_id, AmountMinor AS amount_minor, CAST(Currency AS String) AS currency, "
        "CAST(Status AS String) AS status, PartyRef AS customer_id, CAST(Region AS String) AS region "
        "FROM $db.erp_ledger_entries FINAL "
        "WHERE NOT IsDeleted AND EntryType = 'invoice' AND Status NOT IN ('cancelled', 'draft')"
    )
