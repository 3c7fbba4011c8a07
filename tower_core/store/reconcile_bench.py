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


# The least any full run must read, each part measured alone (bench/reconcile.py --floor): both comparisons by key
# over every live row (sums of the row hashes computed at insert, the cheapest comparison the tables allow), then
# the values of the keys that differ, which a drift item's field-level diff shows (their rows lie in every granule,
# so these columns are read whole; without FINAL, which only adds to it). No classification, queue or statement.
_FLOOR_READS = {
    "invoice keys (what datacompy compares)": """
        SELECT k FROM (
            SELECT KeyHash AS k, MatchSig AS s FROM $db.billing_invoices FINAL WHERE NOT IsDeleted
            UNION ALL
            SELECT LinkHash, bitNot(MatchSig) + 1 FROM $db.erp_ledger_entries FINAL
            WHERE NOT IsDeleted AND EntryType = 'invoice' AND Status NOT IN ('cancelled', 'draft')
        ) GROUP BY k HAVING sum(s) != 0""",
    "payment keys": """
        SELECT k FROM (
            SELECT KeyHash AS k, PaySig AS s FROM $db.billing_payments FINAL WHERE NOT IsDeleted
            UNION ALL
            SELECT RefHash, bitNot(PaySig) + 1 FROM $db.erp_ledger_entries FINAL
            WHERE NOT IsDeleted AND EntryType IN ('payment', 'credit_memo') AND Status NOT IN ('cancelled', 'draft')
        ) GROUP BY k HAVING sum(s) != 0""",
    "ledger values of differing keys": """
        SELECT EntryId, EntryType, ExternalRef, PartyRef, AppliedToRef, Region, Currency, AmountMinor, Status, PostedAt,
            PeriodDate
        FROM $db.erp_ledger_entries
        WHERE LinkHash IN (SELECT Hash FROM $db.reconcile_hashes WHERE RunId = {run:String} AND KeyType = 'invoice')
            OR RefHash IN (SELECT Hash FROM $db.reconcile_hashes WHERE RunId = {run:String} AND KeyType = 'payment')""",
    "billing values of differing keys": """
        SELECT InvoiceId AS id, CustomerId, Region, Currency, TotalMinor, Status, IssuedAt, map() AS allocations
        FROM $db.billing_invoices
        PREWHERE KeyHash IN (SELECT Hash FROM $db.reconcile_hashes WHERE RunId = {run:String} AND KeyType = 'invoice')
        UNION ALL
        SELECT PaymentId, CustomerId, Region, Currency, AmountMinor, Status, OccurredAt, Allocations
        FROM $db.billing_payments
        PREWHERE KeyHash IN (
            SELECT Hash FROM $db.reconcile_hashes WHERE RunId = {run:String} AND KeyType = 'payment')""",
}


def floor_reads(store: Store, run_id: str) -> dict[str, float]:
    """Seconds of each of _FLOOR_READS, run one after the other into a Null table (nothing stored), with the keys
    the full run ``run_id`` found differing."""
    import time

    took = {}
    for n, (what, select) in enumerate(_FLOOR_READS.items()):
        table = f"bench_floor_{n}"
        store.command(f"DROP TABLE IF EXISTS $db.{table}")
        t0 = time.perf_counter()
        store.command(f"CREATE TABLE $db.{table} ENGINE = Null AS {select}", {"run": run_id})
        took[what] = time.perf_counter() - t0
        store.command(f"DROP TABLE $db.{table}")
    return took
