"""``Estate.generate(config)``: the whole estate in memory, behind the connector interface.

The data come from the same columnar tables the bulk loader writes (``generate_tables``), turned into
records and loaded into the simulated systems in change order; so the in-memory estate and a bulk load of
the same config hold the same rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from connectors.simulator.config import EstateConfig
from connectors.simulator.faults import FAULTS, InjectedFault, Manifest
from connectors.simulator.generate import (
    Chunk,
    Customers,
    Outages,
    first_of_month_ms,
    generate_chunk,
    generate_customers,
    generate_outages,
    ms_to_dt,
)
from connectors.simulator.systems import BillingSystem, CdpSystem, ErpSystem
from connectors.simulator.tables import customer_tables, invoice_table, ledger_table, payment_table
from tower_core.models import CdpProfile, Customer, Invoice, LedgerEntry, Payment

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DATE = dt.date(1970, 1, 1)


@dataclass
class Generated:
    """What a generation pass produced besides the tables: customers, outages, per-chunk arrays (optional)."""

    config: EstateConfig
    customers: Customers
    outages: Outages
    faults: list[InjectedFault] = field(default_factory=list)
    context_lost: set[str] = field(default_factory=set)

    def manifest(self) -> Manifest:
        return Manifest(
            self.config.seed, sorted(_unique(self.faults), key=InjectedFault.sort_key), self.config.summary()
        )


def _unique(faults: list[InjectedFault]) -> list[InjectedFault]:
    """Customer-level faults are found chunk by chunk (a customer's invoices span chunks): one each."""
    seen: set[tuple[str, str]] = set()
    out = []
    for f in faults:
        if FAULTS[f.fault].rate_of == "customers":
            key = (f.fault, f.keys.get("customer_id", ""))
            if key in seen:
                continue
            seen.add(key)
        out.append(f)
    return out


def generate_tables(
    config: EstateConfig, generated: Generated | None = None, keep_chunks: list[Chunk] | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """Yield (table name, Arrow table) for the whole estate, one chunk at a time; faults go to ``generated``."""
    gen = generated or Generated(config, generate_customers(config), generate_outages(config))
    gen.faults.extend(gen.customers.faults)
    gen.faults.extend(gen.outages.faults)
    customers, profiles = customer_tables(gen.customers)
    yield "billing_customers", customers
    yield "cdp_profiles", profiles
    for k in range(config.chunks):
        chunk = generate_chunk(config, gen.customers, gen.outages, k)
        gen.faults.extend(chunk.faults)
        if keep_chunks is not None:
            keep_chunks.append(chunk)
        yield "billing_invoices", invoice_table(chunk)
        yield "billing_payments", payment_table(chunk)
        yield "erp_ledger_entries", ledger_table(chunk)


def _ms_columns(table: pa.Table) -> dict[str, list[Any]]:
    """Columns as Python lists, timestamps as int ms (cheaper than tz-aware datetimes from to_pylist)."""
    out: dict[str, list[Any]] = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            out[name] = col.cast(pa.int64()).to_pylist()
        elif pa.types.is_date32(col.type):
            out[name] = col.cast(pa.int32()).to_pylist()
        else:
            out[name] = col.to_pylist()
    return out


def _t(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


def _opt(ms: int) -> dt.datetime | None:
    return _t(ms) if ms else None


def _rows(table: pa.Table, order_by: tuple[str, str]) -> list[dict[str, Any]]:
    cols = _ms_columns(table)
    n = table.num_rows
    rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    rows.sort(key=lambda r: (r[order_by[0]], r[order_by[1]]))
    return rows


def invoices_from(table: pa.Table) -> list[Invoice]:
    return [
        Invoice(
            invoice_id=r["InvoiceId"],
            customer_id=r["CustomerId"],
            region=r["Region"],
            currency=r["Currency"],
            subtotal_minor=r["SubtotalMinor"],
            tax_minor=r["TaxMinor"],
            total_minor=r["TotalMinor"],
            status=r["Status"],
            issued_at=_t(r["IssuedAt"]),
            updated_at=_t(r["UpdatedAt"]),
            amount_paid_minor=r["AmountPaidMinor"],
            amount_credited_minor=r["AmountCreditedMinor"],
            due_at=_t(r["DueAt"]),
            finalized_at=_t(r["FinalizedAt"]),
            paid_at=_opt(r["PaidAt"]),
            source_system=r["SourceSystem"],
            attributes=dict(r["Attributes"]),
        )
        for r in _rows(table, ("UpdatedAt", "InvoiceId"))
    ]


def payments_from(table: pa.Table) -> list[Payment]:
    return [
        Payment(
            payment_id=r["PaymentId"],
            kind=r["Kind"],
            customer_id=r["CustomerId"],
            region=r["Region"],
            currency=r["Currency"],
            amount_minor=r["AmountMinor"],
            status=r["Status"],
            occurred_at=_t(r["OccurredAt"]),
            updated_at=_t(r["UpdatedAt"]),
            method=r["Method"],
            allocations=dict(r["Allocations"]),
            related_payment_id=r["RelatedPaymentId"],
            source_system=r["SourceSystem"],
            attributes=dict(r["Attributes"]),
        )
        for r in _rows(table, ("UpdatedAt", "PaymentId"))
    ]


def entries_from(table: pa.Table) -> list[LedgerEntry]:
    return [
        LedgerEntry(
            entry_id=r["EntryId"],
            entry_type=r["EntryType"],
            external_ref=r["ExternalRef"],
            party_ref=r["PartyRef"],
            region=r["Region"],
            currency=r["Currency"],
            amount_minor=r["AmountMinor"],
            status=r["Status"],
            posted_at=_t(r["PostedAt"]),
            updated_at=_t(r["UpdatedAt"]),
            applied_to_ref=r["AppliedToRef"],
            period_date=_EPOCH_DATE + dt.timedelta(days=r["PeriodDate"]),
            source_system=r["SourceSystem"],
            attributes=dict(r["Attributes"]),
        )
        for r in _rows(table, ("UpdatedAt", "EntryId"))
    ]


def customers_from(table: pa.Table) -> list[Customer]:
    return [
        Customer(
            customer_id=r["CustomerId"],
            name=r["Name"],
            email=r["Email"],
            region=r["Region"],
            currency=r["Currency"],
            created_at=_t(r["CreatedAt"]),
            updated_at=_t(r["UpdatedAt"]),
            parent_id=r["ParentCustomerId"],
            cdp_user_id=r["CdpUserId"],
            plan=r["Plan"],
            tax_rate_bp=r["TaxRateBp"],
            source_system=r["SourceSystem"],
            attributes=dict(r["Attributes"]),
        )
        for r in _rows(table, ("UpdatedAt", "CustomerId"))
    ]


def profiles_from(table: pa.Table) -> list[CdpProfile]:
    return [
        CdpProfile(
            cdp_user_id=r["CdpUserId"],
            customer_id=r["CustomerId"],
            name=r["Name"],
            email=r["Email"],
            region=r["Region"],
            updated_at=_t(r["UpdatedAt"]),
            parent_id=r["ParentCustomerId"],
            source_system=r["SourceSystem"],
            traits=dict(r["Traits"]),
        )
        for r in _rows(table, ("UpdatedAt", "CdpUserId"))
    ]


class Estate:
    """A generated estate: ``billing`` (BillingConnector), ``erp`` (ErpConnector), ``cdp`` and the ``manifest``.

    The clock (what "now" is for the ERP's writes and outage windows) is ``as_of`` until ``set_clock``.
    """

    def __init__(self, config: EstateConfig, generated: Generated) -> None:
        self.config = config
        self.generated = generated
        self._clock: Callable[[], dt.datetime] = lambda: config.as_of
        self.cdp = CdpSystem()
        self.billing = BillingSystem()
        closed_before = ms_to_dt(first_of_month_ms(config.start_ms)).date()
        outages = generated.outages
        self.erp = ErpSystem(
            lambda: self._clock(),
            closed_before,
            lambda t: outages.active(int(t.timestamp() * 1000)),
        )
        self.manifest = Manifest(config.seed, [], config.summary())

    @classmethod
    def generate(cls, config: EstateConfig | None = None) -> Estate:
        config = config or EstateConfig()
        gen = Generated(config, generate_customers(config), generate_outages(config))
        estate = cls(config, gen)
        chunks: list[Chunk] = []
        invoices: list[pa.Table] = []
        payments: list[pa.Table] = []
        entries: list[pa.Table] = []
        for name, table in generate_tables(config, gen, chunks):
            if name == "billing_customers":
                for c in customers_from(table):
                    estate.billing.customers.put(c)
            elif name == "cdp_profiles":
                for p in profiles_from(table):
                    estate.cdp.profiles.put(p)
            elif name == "billing_invoices":
                invoices.append(table)
            elif name == "billing_payments":
                payments.append(table)
            else:
                entries.append(table)
        seen: set[str] = set()
        for inv in invoices_from(pa.concat_tables(invoices)):
            if inv.invoice_id in seen:
                estate.billing.invoices.redeliver(inv.invoice_id)
            else:
                seen.add(inv.invoice_id)
                estate.billing.invoices.put(inv)
        for p in payments_from(pa.concat_tables(payments)):
            estate.billing.payments.put(p)
        for e in entries_from(pa.concat_tables(entries)):
            estate.erp.store(e)
        for ch in chunks:
            gen.context_lost.update(f"in_{j:010d}" for j in ch.j[ch.ctx_lost].tolist())
        estate.manifest = gen.manifest()
        return estate

    def set_clock(self, clock: dt.datetime | Callable[[], dt.datetime]) -> None:
        """Fix "now" (a datetime) or make it a function (the demo's wall clock)."""
        self._clock = clock if callable(clock) else (lambda: clock)

    def now(self) -> dt.datetime:
        return self._clock()

    def manifest_json(self) -> str:
        return self.manifest.to_json()

    def flows(self) -> list[dict[str, Any]]:
        """Per invoice: whether its ERP flow lost trace context (all flows of a generated estate are done)."""
        fault_of = {f.keys["invoice_id"]: f.fault for f in self.manifest if "invoice_id" in f.keys}
        return [
            {
                "invoice_id": inv.invoice_id,
                "customer_id": inv.customer_id,
                "region": inv.region,
                "context_lost": inv.invoice_id in self.generated.context_lost,
                "fault": fault_of.get(inv.invoice_id),
                "status": inv.status,
                "done": True,
            }
            for inv in self.billing.invoices.values()
        ]
