"""Demo pace: the estate happens in real time, with real telemetry.

The same generator as the other modes produces the estate for a window starting now (``Timing.demo``); its
records become a timeline of changes (customer created, invoice finalized, payment, ERP posting...), and
the pacer applies each change when the wall clock reaches it: the simulated systems' state moves (visible
through the connector interface and the loopback API) and the system that made the change emits its span
and business event. Trace context flows CDP -> billing always, billing -> ERP except for the invoices drawn
into ``context_loss_share``; correlation then has to go through the business keys.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from opentelemetry.trace import SpanContext, SpanKind

from connectors.simulator.config import EstateConfig, Timing
from connectors.simulator.estate import (
    Generated,
    customers_from,
    entries_from,
    generate_tables,
    invoices_from,
    payments_from,
    profiles_from,
)
from connectors.simulator.faults import FaultRates
from connectors.simulator.generate import (
    F_STATUS,
    Chunk,
    first_of_month_ms,
    generate_customers,
    generate_outages,
    ms_to_dt,
)
from connectors.simulator.systems import BillingSystem, CdpSystem, ErpSystem
from connectors.simulator.telemetry import Telemetry
from tower_core.models import CdpProfile, Customer, Invoice, LedgerEntry, Payment

log = logging.getLogger("tower.simulator")


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def _demo_timing(horizon_min: float) -> Timing:
    """The settle margin never takes more than a quarter of a short window, so its invoices keep their pace."""
    timing = Timing.demo()
    quarter_ms = int(horizon_min * 60_000 / 4)
    return dataclasses.replace(timing, settle_margin=min(timing.settle_margin, quarter_ms))


def demo_config(
    *,
    seed: int = 7,
    rate_per_min: int = 60,
    horizon_min: float = 240,
    customers: int = 200,
    fault_rates: FaultRates | None = None,
    context_loss_share: float = 0.3,
    start: dt.datetime | None = None,
    id_offset: int = 0,
) -> EstateConfig:
    """An estate whose window starts now (plus a moment) and lasts ``horizon_min`` at demo pace."""
    start = start or dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    start = start.replace(microsecond=start.microsecond // 1000 * 1000)
    return EstateConfig(
        seed=seed,
        customers=customers,
        invoices=max(1, int(rate_per_min * horizon_min)),
        start=start,
        as_of=start + dt.timedelta(minutes=horizon_min),
        fault_rates=fault_rates if fault_rates is not None else FaultRates.default(),
        context_loss_share=context_loss_share,
        timing=_demo_timing(horizon_min),
        id_offset=id_offset,
    )


@dataclass(order=True)
class Change:
    t: int
    seq: int
    kind: str = field(compare=False)
    ref: Any = field(compare=False)


class LiveEstate:
    """The estate as a timeline; ``advance(now_ms)`` applies every change due (thread-safe)."""

    def __init__(
        self,
        config: EstateConfig,
        telemetry: Telemetry | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.telemetry = telemetry
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.lock = threading.RLock()
        self.rand = random.Random(config.seed)
        gen = Generated(config, generate_customers(config), generate_outages(config))
        self.gen = gen
        self.applying: int | None = None  # the time of the change being applied (the ERP's "now" meanwhile)
        self.cdp = CdpSystem()
        self.billing = BillingSystem()
        outages = gen.outages
        self.erp = ErpSystem(
            lambda: ms_to_dt(self.applying if self.applying is not None else self.clock_ms()),
            ms_to_dt(first_of_month_ms(config.start_ms)).date(),
            lambda t: outages.active(_ms(t)),
        )
        chunks: list[Chunk] = []
        parts: dict[str, list[pa.Table]] = {}
        for name, table in generate_tables(config, gen, chunks):
            parts.setdefault(name, []).append(table)
        self.manifest = gen.manifest()
        self.customers: dict[str, Customer] = {c.customer_id: c for c in customers_from(parts["billing_customers"][0])}
        self.profiles: dict[str, CdpProfile] = {p.customer_id: p for p in profiles_from(parts["cdp_profiles"][0])}
        self.invoices: dict[str, Invoice] = {}
        self.duplicated: set[str] = set()
        for inv in invoices_from(pa.concat_tables(parts["billing_invoices"])):
            if inv.invoice_id in self.invoices:
                self.duplicated.add(inv.invoice_id)
            self.invoices[inv.invoice_id] = inv
        self.payments: dict[str, Payment] = {
            p.payment_id: p for p in payments_from(pa.concat_tables(parts["billing_payments"]))
        }
        self.entries: dict[str, LedgerEntry] = {
            e.entry_id: e for e in entries_from(pa.concat_tables(parts["erp_ledger_entries"]))
        }
        self.role: dict[str, int] = {}
        self.ctx_lost: dict[str, bool] = {}
        for ch in chunks:
            for j, role, lost in zip(ch.j.tolist(), ch.role.tolist(), ch.ctx_lost.tolist(), strict=True):
                self.role[f"in_{j:010d}"] = role
                self.ctx_lost[f"in_{j:010d}"] = lost
        self.fault_of: dict[str, str] = {}
        for f in self.manifest.faults:
            for key in ("invoice_id", "payment_id", "customer_id"):
                if key in f.keys:
                    self.fault_of.setdefault(f.keys[key], f.fault)
        self.timeline: list[Change] = []
        self.last_event: dict[str, int] = {}
        self._build_timeline()
        self.pos = 0
        # runtime state
        self.paid: dict[str, int] = {}
        self.credited: dict[str, int] = {}
        self.cdp_ctx: dict[str, SpanContext] = {}
        self.inv_ctx: dict[str, SpanContext] = {}
        self.pay_ctx: dict[str, SpanContext] = {}
        self.last_invoice_event: dict[str, dict[str, Any]] = {}
        self.applied = 0
        self.counts: dict[str, int] = {}

    # ---- timeline
    def _add(self, t: int, kind: str, ref: Any) -> None:
        self.timeline.append(Change(int(t), len(self.timeline), kind, ref))

    def _touch(self, invoice_id: str, t: int) -> None:
        if invoice_id:
            self.last_event[invoice_id] = max(self.last_event.get(invoice_id, 0), t)

    def _build_timeline(self) -> None:
        c = self.gen.customers
        for i in range(c.n):
            cid = f"cus_{i:08d}"
            self._add(c.cdp_created[i], "cdp_profile", (cid, 0))
            if i < c.n_billing:
                self._add(c.billing_created[i], "billing_customer", (cid, 0))
        version: dict[int, int] = {}
        for ci, tc, tb in zip(c.upd_customer.tolist(), c.upd_cdp_at.tolist(), c.upd_billing_at.tolist(), strict=True):
            version[ci] = version.get(ci, 0) + 1
            self._add(tc, "cdp_profile", (f"cus_{ci:08d}", version[ci]))
            self._add(tb, "billing_customer", (f"cus_{ci:08d}", version[ci]))
        for inv in self.invoices.values():
            t = _ms(inv.finalized_at or inv.issued_at)
            self._add(t, "invoice_finalized", inv.invoice_id)
            self._touch(inv.invoice_id, t)
            if inv.invoice_id in self.duplicated:
                self._add(_ms(inv.updated_at) + 1, "duplicate_webhook", inv.invoice_id)
        for p in self.payments.values():
            t = _ms(p.occurred_at)
            self._add(t, "payment", p.payment_id)
            for inv_id in p.allocations or {self._invoice_of(p.payment_id): 0}:
                self._touch(inv_id, t)
        for e in self.entries.values():
            t = _ms(e.posted_at)
            self._add(t, "erp_entry", e.entry_id)
            self._touch(e.applied_to_ref or e.external_ref, t)
        self.timeline.sort()

    def _invoice_of(self, payment_id: str) -> str:
        """Failed attempts and orphans carry no allocation; the id says which invoice it was for (if any)."""
        n = int(payment_id[3:])
        inv = f"in_{n // 4:010d}"
        return inv if inv in self.invoices and n % 4 != 3 else ""

    def next_time(self) -> int | None:
        with self.lock:
            return self.timeline[self.pos].t if self.pos < len(self.timeline) else None

    def advance(self, now_ms: int) -> int:
        """Apply every change due by ``now_ms``; returns how many were applied."""
        done = 0
        with self.lock:
            while self.pos < len(self.timeline) and self.timeline[self.pos].t <= now_ms:
                ch = self.timeline[self.pos]
                self.pos += 1
                self.applying = ch.t
                try:
                    getattr(self, f"_on_{ch.kind}")(ch.t, ch.ref)
                finally:
                    self.applying = None
                self.counts[ch.kind] = self.counts.get(ch.kind, 0) + 1
                done += 1
        self.applied += done
        return done

    # ---- telemetry helpers
    def _dur(self) -> int:
        return self.rand.randint(5, 80)

    def _span(self, system: str, name: str, t: int, attrs: dict[str, Any], parent: SpanContext | None = None,
              error: str | None = None, kind: SpanKind = SpanKind.INTERNAL) -> SpanContext | None:  # fmt: skip
        if self.telemetry is None:
            return None
        return self.telemetry.span(system, name, t, self._dur(), attrs, parent, error=error, kind=kind)

    def _event(self, system: str, etype: str, eid: str, t: int, data: dict[str, Any], ctx: SpanContext | None,
               subject: str = "") -> dict[str, Any] | None:  # fmt: skip
        if self.telemetry is None:
            return None
        return self.telemetry.event(system, etype, eid, t, data, ctx, subject)

    # ---- change handlers
    def _email(self, cid: str, version: int) -> str:
        return f"ap{version}+{cid}@example.com"

    def _on_cdp_profile(self, t: int, ref: tuple[str, int]) -> None:
        cid, version = ref
        final = self.profiles[cid]
        profile = dataclasses.replace(final, email=self._email(cid, version), updated_at=ms_to_dt(t))
        self.cdp.profiles.put(profile)
        attrs = {
            "revops.region": profile.region,
            "revops.step": "cdp_to_billing",
            "revops.cdp.user_id": profile.cdp_user_id,
            "revops.customer.id": cid,
        }
        ctx = self._span("cdp", "identify", t, attrs, kind=SpanKind.PRODUCER)
        if ctx is not None:
            self.cdp_ctx[cid] = ctx
        self._event("cdp", "cdp.identify", f"cdp-identify-{cid}-{version}", t, attrs, ctx, cid)

    def _on_billing_customer(self, t: int, ref: tuple[str, int]) -> None:
        cid, version = ref
        final = self.customers[cid]
        customer = dataclasses.replace(final, email=self._email(cid, version), updated_at=ms_to_dt(t))
        self.billing.customers.put(customer)
        attrs = {"revops.region": customer.region, "revops.step": "cdp_to_billing", "revops.customer.id": cid}
        name = "customer.created" if version == 0 else "customer.updated"
        ctx = self._span("billing", name, t, attrs, self.cdp_ctx.get(cid), kind=SpanKind.CONSUMER)
        self._event("billing", name, f"billing-{name}-{cid}-{version}", t, attrs, ctx, cid)

    def _invoice_version(self, invoice_id: str, t: int) -> Invoice:
        final = self.invoices[invoice_id]
        paid, credited = self.paid.get(invoice_id, 0), self.credited.get(invoice_id, 0)
        settled = paid + credited >= final.total_minor
        return dataclasses.replace(
            final,
            status="paid" if settled else "open",
            amount_paid_minor=paid,
            amount_credited_minor=credited,
            paid_at=ms_to_dt(t) if settled else None,
            updated_at=ms_to_dt(t),
        )

    def _invoice_attrs(self, inv: Invoice, step: str) -> dict[str, Any]:
        return {
            "revops.region": inv.region,
            "revops.step": step,
            "revops.customer.id": inv.customer_id,
            "revops.invoice.id": inv.invoice_id,
            "revops.amount_minor": inv.total_minor,
            "revops.currency": inv.currency,
        }

    def _on_invoice_finalized(self, t: int, invoice_id: str) -> None:
        inv = self._invoice_version(invoice_id, t)
        self.billing.invoices.put(inv)
        attrs = self._invoice_attrs(inv, "invoice_to_ledger")
        ctx = self._span("billing", "invoice.finalize", t, attrs, kind=SpanKind.PRODUCER)
        if ctx is not None:
            self.inv_ctx[invoice_id] = ctx
        doc = self._event("billing", "invoice.finalized", f"billing-invoice.finalized-{invoice_id}", t, attrs, ctx)
        if doc is not None:
            self.last_invoice_event[invoice_id] = doc

    def _on_payment(self, t: int, payment_id: str) -> None:
        p = self.payments[payment_id]
        self.billing.payments.put(p)
        invoices = list(p.allocations)
        step = "payment_to_cash" if p.kind == "payment" else "refund_to_ledger"
        attrs: dict[str, Any] = {
            "revops.region": p.region,
            "revops.step": step,
            "revops.customer.id": p.customer_id,
            "revops.payment.id": payment_id,
            "revops.amount_minor": p.amount_minor,
            "revops.currency": p.currency,
            "payment.method": p.method,
        }
        related = invoices or ([self._invoice_of(payment_id)] if self._invoice_of(payment_id) else [])
        if related:
            attrs["revops.invoice.id"] = related[0] if len(related) == 1 else related
        failed = p.status != "succeeded"
        name = {"payment": "payment.failed" if failed else "payment.succeeded", "refund": "charge.refund"}.get(
            p.kind, "credit_note.create"
        )
        ctx = self._span("billing", name, t, attrs, error="card_declined" if failed else None, kind=SpanKind.PRODUCER)
        if ctx is not None:
            self.pay_ctx[payment_id] = ctx
        etype = {
            "payment": "payment_intent.payment_failed" if failed else "payment_intent.succeeded",
            "refund": "charge.refunded",
        }.get(p.kind, "credit_note.created")
        data = {k: v for k, v in attrs.items() if k != "revops.invoice.id"}
        if related:
            data["revops.invoice.id"] = related
        self._event("billing", etype, f"billing-{etype}-{payment_id}", t, data, ctx)
        if failed or p.kind == "refund":
            return
        for inv_id, amount in p.allocations.items():
            if inv_id not in self.invoices:
                continue
            bucket = self.paid if p.kind == "payment" else self.credited
            bucket[inv_id] = bucket.get(inv_id, 0) + amount
            inv = self._invoice_version(inv_id, t)
            self.billing.invoices.put(inv)
            if inv.status == "paid":
                iattrs = self._invoice_attrs(inv, step)
                iattrs["revops.payment.id"] = payment_id
                doc = self._event("billing", "invoice.paid", f"billing-invoice.paid-{inv_id}", t, iattrs, ctx)
                if doc is not None:
                    self.last_invoice_event[inv_id] = doc

    def _on_duplicate_webhook(self, t: int, invoice_id: str) -> None:
        self.billing.invoices.redeliver(invoice_id)
        doc = self.last_invoice_event.get(invoice_id)
        if doc is not None and self.telemetry is not None:
            self.telemetry.send(dict(doc))  # the same CloudEvent id again: the collector must absorb it

    def _on_erp_entry(self, t: int, entry_id: str) -> None:
        e = self.entries[entry_id]
        invoice_id = e.applied_to_ref or e.external_ref
        lost = self.ctx_lost.get(invoice_id, False)
        attrs: dict[str, Any] = {
            "revops.region": e.region,
            "revops.invoice.id": invoice_id,
            "revops.ledger.entry.id": entry_id,
            "revops.amount_minor": e.amount_minor,
            "revops.currency": e.currency,
        }
        if e.party_ref:  # an ERP with no party for the customer (erp_party_unmapped) does not know its id
            attrs["revops.customer.id"] = e.party_ref
        if e.entry_type == "invoice":
            duplicate = entry_id.endswith("1")
            with self.erp.lock:  # check and store as one step: a corrective sync over HTTP may post meanwhile
                if not duplicate and self.erp.invoice_entry(e.external_ref) is not None:
                    return  # posted already (a corrective sync got there first)
                self.erp.store(
                    dataclasses.replace(e, status="draft" if e.status == "draft" else "open", updated_at=e.posted_at)
                )
            attrs["revops.step"] = "invoice_to_ledger"
            parent = None if lost else self.inv_ctx.get(invoice_id)
            error = e.attributes.get("rejection") if e.status == "draft" else None
            ctx = self._span("erp", "erp.invoice.post", t, attrs, parent, error=error, kind=SpanKind.CONSUMER)
            etype = "erp.invoice.rejected" if error else "erp.invoice.posted"
            self._event("erp", etype, f"erp-{etype}-{entry_id}", t, attrs, ctx)
            return
        with self.erp.lock:
            already = any(x.entry_type == e.entry_type and x.applied_to_ref == e.applied_to_ref
                          for x in self.erp.refs(e.external_ref))  # fmt: skip
            if already:
                return
            self.erp.store(e)
        attrs["revops.payment.id"] = e.external_ref
        step = "payment_to_cash" if e.entry_type == "payment" else "refund_to_ledger"
        attrs["revops.step"] = step
        parent = None if lost else self.pay_ctx.get(e.external_ref)
        name = "erp.payment.apply" if e.entry_type == "payment" else "erp.credit_memo.post"
        ctx = self._span("erp", name, t, attrs, parent, kind=SpanKind.CONSUMER)
        etype = "erp.payment.applied" if e.entry_type == "payment" else "erp.credit_memo.posted"
        self._event("erp", etype, f"erp-{etype}-{entry_id}", t, attrs, ctx)
        if self.role.get(e.applied_to_ref) != F_STATUS:
            self.erp.refresh_status(e.applied_to_ref)

    # ---- what the loopback API shows besides the systems
    def manifest_json(self) -> str:
        return self.manifest.to_json()

    def flows(self) -> list[dict[str, Any]]:
        now = self.clock_ms()
        with self.lock:
            applied_until = self.timeline[self.pos - 1].t if self.pos else 0
            out = []
            for inv_id, inv in self.invoices.items():
                if _ms(inv.finalized_at or inv.issued_at) > applied_until:
                    continue
                last = self.last_event.get(inv_id, 0)
                current = self.billing.invoices.get(inv_id)
                out.append(
                    {
                        "invoice_id": inv_id,
                        "customer_id": inv.customer_id,
                        "region": inv.region,
                        "context_lost": self.ctx_lost.get(inv_id, False),
                        "fault": self.fault_of.get(inv_id),
                        "status": current.status if current else "",
                        "last_event_at": ms_to_dt(last).isoformat(),
                        "done": last <= applied_until and last <= now,
                    }
                )
            return out


def write_manifest(estate: LiveEstate, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(estate.manifest_json())


def run_live(
    config: EstateConfig,
    api_url: str,
    *,
    port: int,
    stop: threading.Event,
    manifest_path: Path | None = None,
    say: Callable[[str], None] = print,
    report_every_s: float = 15.0,
) -> LiveEstate:
    """Serve the estate on 127.0.0.1:``port`` and play its timeline until ``stop`` is set."""
    from connectors.simulator.server import SimServer

    telemetry = Telemetry(api_url)
    estate = LiveEstate(config, telemetry)
    server = SimServer(estate, port=port)
    server.start()
    if manifest_path is not None:
        write_manifest(estate, manifest_path)
    say(
        f"estate: seed {config.seed}, {config.customers} customers, {config.invoices} invoices over "
        f"{(config.as_of - config.start).total_seconds() / 60:.0f} min, {len(estate.manifest)} injected faults; "
        f"billing/ERP/CDP API at {server.url}"
    )
    last_report = time.monotonic()
    finished = False
    try:
        while not stop.is_set():
            now = estate.clock_ms()
            estate.advance(now)
            nxt = estate.next_time()
            if nxt is None and not finished:
                finished = True
                say("estate: end of the generated window; still serving its state (Ctrl-C stops)")
            if time.monotonic() - last_report >= report_every_s:
                last_report = time.monotonic()
                c = estate.counts
                say(
                    f"estate: {c.get('invoice_finalized', 0)} invoices, {c.get('payment', 0)} payments, "
                    f"{c.get('erp_entry', 0)} ERP postings so far" + (" (ERP outage)" if estate.erp.in_outage() else "")
                )
            wait = 0.25 if nxt is None else min(0.25, max(0.0, (nxt - estate.clock_ms()) / 1000))
            stop.wait(wait)
    finally:
        server.stop()
        telemetry.flush(5)
        telemetry.shutdown()
    return estate
