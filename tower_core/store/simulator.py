"""Store access of the simulator's bulk mode: clearing the state tables it writes and content checksums."""

from __future__ import annotations

import pyarrow as pa

from tower_core.errors import StoreError
from tower_core.store.base import Store, check_column, check_identifier, qualify

# Tables the bulk loader writes, with the columns that carry content (IngestedAt is set by the server).
BULK_TABLES: dict[str, tuple[str, ...]] = {
    "billing_customers": (
        "CustomerId", "CdpUserId", "ParentCustomerId", "Name", "Email", "Region", "Currency", "Plan",
        "TaxRateBp", "CreatedAt", "UpdatedAt", "SourceSystem", "Attributes", "Version", "IsDeleted",
    ),
    "cdp_profiles": (
        "CdpUserId", "CustomerId", "ParentCustomerId", "Name", "Email", "Region", "UpdatedAt", "SourceSystem",
        "Traits", "Version", "IsDeleted",
    ),
    "billing_invoices": (
        "InvoiceId", "CustomerId", "Region", "Currency", "SubtotalMinor", "TaxMinor", "TotalMinor",
        "AmountPaidMinor", "AmountCreditedMinor", "Status", "IssuedAt", "DueAt", "FinalizedAt", "PaidAt",
        "UpdatedAt", "SourceSystem", "Attributes", "Version", "IsDeleted",
    ),
    "billing_payments": (
        "PaymentId", "Kind", "CustomerId", "Region", "Currency", "AmountMinor", "Method", "Status", "Allocations",
        "RelatedPaymentId", "OccurredAt", "UpdatedAt", "SourceSystem", "Attributes", "Version", "IsDeleted",
    ),
    "erp_ledger_entries": (
        "EntryId", "EntryType", "ExternalRef", "PartyRef", "Region", "Currency", "AmountMinor", "Status",
        "AppliedToRef", "PostedAt", "PeriodDate", "UpdatedAt", "SourceSystem", "Attributes", "Version", "IsDeleted",
    ),
}  # fmt: skip


def truncate(store: Store, tables: tuple[str, ...] = tuple(BULK_TABLES)) -> None:
    """Empty the state tables before a fresh bulk load."""
    for name in tables:
        if name not in BULK_TABLES:
            raise ValueError(f"{name} is not a table the simulator writes")
        store.command(f"TRUNCATE TABLE IF EXISTS $db.`{check_identifier(name)}`")


def checksums(store: Store) -> dict[str, tuple[int, int]]:
    """(rows, order-independent content hash) per bulk table: equal contents <=> equal pairs (w.h.p.)."""
    out = {}
    for name, cols in BULK_TABLES.items():
        col_list = ", ".join(f"`{check_identifier(c)}`" for c in cols)
        rows = store.query_rows(
            f"SELECT count() AS n, groupBitXor(cityHash64({col_list})) AS h, "  # noqa: S608 (whitelisted names)
            f"sum(cityHash64({col_list}) % 1000000007) AS s FROM $db.`{check_identifier(name)}`"
        )
        out[name] = (int(rows[0]["n"]), int(rows[0]["h"]) ^ int(rows[0]["s"]))
    return out


def counts_final(store: Store) -> dict[str, int]:
    """Rows per bulk table after deduplication (FINAL), i.e. the distinct records."""
    out = {}
    for name in BULK_TABLES:
        rows = store.query_rows(f"SELECT count() AS n FROM $db.`{check_identifier(name)}` FINAL")  # noqa: S608
        out[name] = int(rows[0]["n"])
    return out


class BulkWriter:
    """Inserts large Arrow tables, one writer connection per table so tables load in parallel.

    On the embedded backend chDB reads each Arrow table in place through its ``Python()`` table function
    (about 40% less CPU than serializing an Arrow stream), over extra connections to the same data path
    this process already owns. Elsewhere it is the seam's ``insert_arrow``.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.embedded = store.backend == "embedded" and hasattr(store, "data_dir")
        self._conns: dict[str, object] = {}

    def _conn(self, table: str) -> object:
        if table not in self._conns:
            import chdb

            self._conns[table] = chdb.connect(str(self.store.data_dir.resolve()))  # type: ignore[attr-defined]
        return self._conns[table]

    def insert(self, table: str, data: pa.Table) -> int:
        if data.num_rows == 0:
            return 0
        if table not in BULK_TABLES:
            raise ValueError(f"{table} is not a table the simulator writes")
        if not self.embedded:
            return self.store.insert_arrow(table, data)
        cols = ", ".join(f"`{check_column(c)}`" for c in data.column_names)
        tower_bulk_arrow = data  # noqa: F841 (read by name by chDB's Python() table function)
        sql = qualify(
            f"INSERT INTO $db.`{check_identifier(table)}` ({cols}) SELECT * FROM Python(tower_bulk_arrow) "  # noqa: S608
            "SETTINGS insert_deduplicate = 0",
            self.store.database,
        )
        try:
            cursor = self._conn(table).cursor()  # type: ignore[attr-defined]
            cursor.execute(sql)
            cursor.close()
        except Exception as exc:
            raise StoreError(str(exc).strip()) from None
        return data.num_rows

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()  # type: ignore[attr-defined]
        self._conns.clear()
