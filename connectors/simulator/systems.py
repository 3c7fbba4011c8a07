"""The simulated CDP, billing and ERP: in-memory state behind the connector interface (connectors/base.py).

Each system keeps a change log: every write gets the next sequence number, and a pull returns the records
whose latest change is after the cursor (the cursor is that sequence number as text), oldest change first.
A duplicate delivery (duplicate_webhook) is a second log entry for the same version. All methods take one
lock, so the demo's HTTP server and its pacer thread can share the objects.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from connectors.base import ActionOutcome, BusinessRuleError, Health, TransientError
from tower_core.models import CdpProfile, Customer, Invoice, LedgerEntry, Page, Payment

T = TypeVar("T")
Clock = Callable[[], dt.datetime]


def parse_cursor(cursor: str | None, epoch: str) -> int:
    """The sequence number after which to read. A cursor is ``<epoch>:<seq>``; the epoch names the instance of the
    system that issued it, so a cursor kept from an earlier run of the estate (a new process numbers its changes
    from 1 again) reads everything instead of skipping the new run's first changes."""
    if not cursor:
        return 0
    issuer, sep, seq = cursor.rpartition(":")
    if not seq.isdigit() or (sep and not issuer):
        raise BusinessRuleError(f"cursor {cursor[:40]!r} was not issued by this system")
    return int(seq) if issuer == epoch else 0


class ChangeLog(Generic[T]):
    """Records by id plus the order of their changes; not thread-safe on its own (systems hold the lock)."""

    def __init__(self, key: Callable[[T], str]) -> None:
        self.key = key
        self.records: dict[str, T] = {}
        self.latest: dict[str, int] = {}
        self.seqs: list[int] = []
        self.ids: list[str] = []
        self.dups: set[int] = set()
        self.seq = 0
        self.epoch = uuid.uuid4().hex[:12]

    def put(self, record: T, *, duplicate: bool = False) -> int:
        rid = self.key(record)
        self.seq += 1
        self.records[rid] = record
        if duplicate:
            self.dups.add(self.seq)
        else:
            self.latest[rid] = self.seq
        self.seqs.append(self.seq)
        self.ids.append(rid)
        return self.seq

    def redeliver(self, rid: str) -> None:
        """A second delivery of the current version (what a retried webhook does)."""
        self.put(self.records[rid], duplicate=True)

    def get(self, rid: str) -> T | None:
        return self.records.get(rid)

    def pull(self, cursor: str | None, limit: int) -> Page[T]:
        if limit < 1:
            raise BusinessRuleError("limit must be positive")
        after = parse_cursor(cursor, self.epoch)
        i = bisect.bisect_right(self.seqs, after)
        items: list[T] = []
        last = after
        while i < len(self.seqs) and len(items) < limit:
            seq, rid = self.seqs[i], self.ids[i]
            if self.latest.get(rid) == seq or seq in self.dups:
                items.append(self.records[rid])
            last = seq
            i += 1
        return Page(items, f"{self.epoch}:{last}", i >= len(self.seqs))

    def __len__(self) -> int:
        return len(self.records)

    def values(self) -> Iterable[T]:
        return self.records.values()


class CdpSystem:
    """The CDP's profiles (identity and account hierarchy)."""

    name = "sim-cdp"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.profiles: ChangeLog[CdpProfile] = ChangeLog(lambda p: p.cdp_user_id)

    def pull_profiles(self, cursor: str | None, limit: int = 1000) -> Page[CdpProfile]:
        with self.lock:
            return self.profiles.pull(cursor, limit)

    def health(self) -> Health:
        return Health(True, "simulated CDP")


class BillingSystem:
    """Simulated billing: customers, invoices, payments (a BillingConnector, plus ``pull_customers``)."""

    name = "sim-billing"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.customers: ChangeLog[Customer] = ChangeLog(lambda c: c.customer_id)
        self.invoices: ChangeLog[Invoice] = ChangeLog(lambda i: i.invoice_id)
        self.payments: ChangeLog[Payment] = ChangeLog(lambda p: p.payment_id)

    def pull_invoices(self, cursor: str | None, limit: int = 1000) -> Page[Invoice]:
        with self.lock:
            return self.invoices.pull(cursor, limit)

    def pull_payments(self, cursor: str | None, limit: int = 1000) -> Page[Payment]:
        with self.lock:
            return self.payments.pull(cursor, limit)

    def pull_customers(self, cursor: str | None, limit: int = 1000) -> Page[Customer]:
        with self.lock:
            return self.customers.pull(cursor, limit)

    def get_invoice(self, invoice_id: str) -> Invoice | None:
        with self.lock:
            return self.invoices.get(invoice_id)

    def get_payment(self, payment_id: str) -> Payment | None:
        with self.lock:
            return self.payments.get(payment_id)

    def health(self) -> Health:
        return Health(True, "simulated billing")


class ErpSystem:
    """Simulated ERP: ledger entries with external references (an ErpConnector).

    Writes check the external reference first, so a repeated corrective sync never posts twice. Months before
    ``closed_before`` are closed (BusinessRuleError). Outages: ``outage_windows`` (estate time, via the clock),
    ``begin_outage``/``end_outage`` and ``fail_next(n)``; during one every call raises TransientError.
    """

    name = "sim-erp"

    def __init__(
        self,
        clock: Clock,
        closed_before: dt.date,
        outage_windows: Callable[[dt.datetime], bool] | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        self.closed_before = closed_before
        self.outage_windows = outage_windows or (lambda _t: False)
        self.entries: ChangeLog[LedgerEntry] = ChangeLog(lambda e: e.entry_id)
        self.by_ref: dict[str, list[str]] = {}
        self.by_applied: dict[str, list[str]] = {}
        self._forced_outage = False
        self._fail_next = 0
        self._counter = 0
        self.calls = 0

    # --- fault controls (tests, demo)
    def begin_outage(self) -> None:
        with self.lock:
            self._forced_outage = True

    def end_outage(self) -> None:
        with self.lock:
            self._forced_outage = False
            self._fail_next = 0

    def fail_next(self, n: int) -> None:
        """The next ``n`` calls fail with TransientError (a short blip)."""
        with self.lock:
            self._fail_next = n

    def in_outage(self) -> bool:
        return self._forced_outage or self.outage_windows(self.clock())

    def _gate(self) -> None:
        self.calls += 1
        if self._fail_next > 0:
            self._fail_next -= 1
            raise TransientError("ERP timed out (simulated)")
        if self.in_outage():
            raise TransientError("ERP unavailable: HTTP 503 (simulated outage)")

    # --- state
    def store(self, entry: LedgerEntry) -> None:
        """Write an entry (generation, pacer, act methods); indexes its external reference."""
        with self.lock:
            if self.entries.get(entry.entry_id) is None:
                self.by_ref.setdefault(entry.external_ref, []).append(entry.entry_id)
                if entry.applied_to_ref:
                    self.by_applied.setdefault(entry.applied_to_ref, []).append(entry.entry_id)
            self.entries.put(entry)

    def refs(self, external_ref: str) -> list[LedgerEntry]:
        """Entries with this external reference, without the outage gate (for the estate's own use)."""
        return [self.entries.records[i] for i in self.by_ref.get(external_ref, ())]

    def _new_id(self) -> str:
        self._counter += 1
        return f"le_m{self._counter:010d}"

    def _now(self, after: dt.datetime | None = None) -> dt.datetime:
        now = self.clock()
        if after is not None and now <= after:
            now = after + dt.timedelta(milliseconds=1)
        return now

    def invoice_entry(self, invoice_id: str) -> LedgerEntry | None:
        with self.lock:
            return next(
                (e for e in self.refs(invoice_id) if e.entry_type == "invoice" and e.live),
                None,
            )

    def _settlement(self, invoice_id: str) -> int:
        """Applied payments plus credit notes (refunds do not settle an invoice)."""
        total = 0
        for eid in self.by_applied.get(invoice_id, ()):
            e = self.entries.records[eid]
            if not e.live:
                continue
            if e.entry_type == "payment" or (e.entry_type == "credit_memo" and e.external_ref.startswith("cn_")):
                total += e.amount_minor
        return total

    def refresh_status(self, invoice_id: str) -> None:
        """Mark the ERP invoice paid once applied payments and credit notes settle it."""
        inv = self.invoice_entry(invoice_id)
        if inv is None or inv.status != "open":
            return
        if self._settlement(invoice_id) >= inv.amount_minor:
            self.store(dataclasses.replace(inv, status="paid", updated_at=self._now(inv.updated_at)))

    # --- ErpConnector
    def pull_ledger_entries(self, cursor: str | None, limit: int = 1000) -> Page[LedgerEntry]:
        with self.lock:
            self._gate()
            return self.entries.pull(cursor, limit)

    def find_by_external_ref(self, external_ref: str) -> list[LedgerEntry]:
        with self.lock:
            self._gate()
            return list(self.refs(external_ref))

    def post_invoice(self, invoice: Invoice) -> ActionOutcome:
        with self.lock:
            self._gate()
            existing = self.invoice_entry(invoice.invoice_id)
            if existing is not None:
                return ActionOutcome(existing.entry_id, True, "already posted", {"entry_id": existing.entry_id})
            period = invoice.issued_at.astimezone(dt.UTC).date()
            if period < self.closed_before:
                raise BusinessRuleError(f"period {period:%Y-%m} is closed")
            now = self._now()
            entry = LedgerEntry(
                entry_id=self._new_id(),
                entry_type="invoice",
                external_ref=invoice.invoice_id,
                party_ref=invoice.customer_id,
                region=invoice.region,
                currency=invoice.currency,
                amount_minor=invoice.total_minor,
                status="open",
                posted_at=now,
                updated_at=now,
                period_date=period,
                source_system=self.name,
            )
            self.store(entry)
            return ActionOutcome(entry.entry_id, False, "posted", {"entry_id": entry.entry_id})

    def cancel_entry(self, entry_id: str, reason: str) -> ActionOutcome:
        """Like an ERP's cancel button: not in a closed period, not once payments or credit memos are applied."""
        with self.lock:
            self._gate()
            entry = self.entries.get(entry_id)
            if entry is None:
                raise BusinessRuleError(f"ledger entry {entry_id} does not exist")
            if entry.status == "cancelled":
                return ActionOutcome(entry_id, True, "already cancelled", {"entry_id": entry_id})
            if entry.entry_type != "invoice":
                raise BusinessRuleError(f"{entry_id} is a {entry.entry_type} entry, not an invoice posting")
            if entry.period_date is not None and entry.period_date < self.closed_before:
                raise BusinessRuleError(f"period {entry.period_date:%Y-%m} is closed")
            if self._settlement(entry.external_ref) > 0:
                raise BusinessRuleError(f"invoice {entry.external_ref} has payments applied; unapply them first")
            cancelled = dataclasses.replace(
                entry,
                status="cancelled",
                updated_at=self._now(entry.updated_at),
                attributes={**entry.attributes, "cancel_reason": reason},
            )
            self.store(cancelled)
            return ActionOutcome(entry_id, False, "cancelled", {"entry_id": entry_id})

    def apply_payment(self, payment: Payment, invoice_id: str, amount_minor: int) -> ActionOutcome:
        with self.lock:
            self._gate()
            if payment.kind != "payment" or payment.status != "succeeded":
                raise BusinessRuleError(f"{payment.payment_id} is not a succeeded payment")
            if amount_minor <= 0:
                raise BusinessRuleError("the amount to apply must be positive")
            inv = self.invoice_entry(invoice_id)
            if inv is None:
                raise BusinessRuleError(f"invoice {invoice_id} is not posted in the ERP")
            if inv.currency != payment.currency:
                raise BusinessRuleError(f"currency {payment.currency} does not match invoice {invoice_id}")
            applied = sum(
                e.amount_minor
                for e in self.refs(payment.payment_id)
                if e.entry_type == "payment" and e.live and e.applied_to_ref == invoice_id
            )
            if applied >= amount_minor:
                ref = next(
                    e.entry_id for e in self.refs(payment.payment_id) if e.live and e.applied_to_ref == invoice_id
                )
                return ActionOutcome(ref, True, "already applied", {"entry_id": ref})
            now = self._now()
            entry = LedgerEntry(
                entry_id=self._new_id(),
                entry_type="payment",
                external_ref=payment.payment_id,
                party_ref=payment.customer_id,
                region=payment.region,
                currency=payment.currency,
                amount_minor=amount_minor - applied,
                status="posted",
                posted_at=now,
                updated_at=now,
                applied_to_ref=invoice_id,
                period_date=now.date(),
                source_system=self.name,
            )
            self.store(entry)
            self.refresh_status(invoice_id)
            detail = f"applied {amount_minor - applied}"
            return ActionOutcome(entry.entry_id, False, detail, {"entry_id": entry.entry_id})

    def post_credit_memo(self, refund: Payment) -> ActionOutcome:
        with self.lock:
            self._gate()
            if refund.kind not in ("refund", "credit_note"):
                raise BusinessRuleError(f"{refund.payment_id} is not a refund or credit note")
            existing = next((e for e in self.refs(refund.payment_id) if e.entry_type == "credit_memo" and e.live), None)
            if existing is not None:
                return ActionOutcome(existing.entry_id, True, "already posted", {"entry_id": existing.entry_id})
            invoice_id = next(iter(refund.allocations), "")
            if invoice_id and self.invoice_entry(invoice_id) is None:
                raise BusinessRuleError(f"invoice {invoice_id} is not posted in the ERP")
            now = self._now()
            entry = LedgerEntry(
                entry_id=self._new_id(),
                entry_type="credit_memo",
                external_ref=refund.payment_id,
                party_ref=refund.customer_id,
                region=refund.region,
                currency=refund.currency,
                amount_minor=refund.amount_minor,
                status="posted",
                posted_at=now,
                updated_at=now,
                applied_to_ref=invoice_id,
                period_date=now.date(),
                source_system=self.name,
            )
            self.store(entry)
            if invoice_id:
                self.refresh_status(invoice_id)
            return ActionOutcome(entry.entry_id, False, "posted", {"entry_id": entry.entry_id})

    def health(self) -> Health:
        with self.lock:
            down = self.in_outage()
        return Health(not down, "simulated ERP" + (" (outage)" if down else ""))
