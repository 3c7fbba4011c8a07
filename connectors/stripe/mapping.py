"""Stripe objects and events -> the tower's canonical records and business events. Pure, no IO.

Webhook events become ``BusinessEvent``s with DOMAIN.md §2 attributes; pulled objects become ``Invoice`` and
``Payment`` (minor units as int, ISO currency upper-case). Only ids, amounts, states and times are kept:
Stripe customers carry e-mail, name and address, which never reach the event's data.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from collector.events import BusinessEvent
from tower_core.models import Invoice, Payment, amount_error, currency_exponent

SOURCE = "stripe"
SYSTEM = "billing"
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")

# Stripe event type -> (canonical business event type, flow step).
EVENT_TYPES: dict[str, tuple[str, str]] = {
    "customer.created": ("billing.customer.created", "cdp_to_billing"),
    "customer.updated": ("billing.customer.updated", "cdp_to_billing"),
    "customer.deleted": ("billing.customer.deleted", "cdp_to_billing"),
    "invoice.finalized": ("billing.invoice.finalized", "invoice_to_ledger"),
    "invoice.paid": ("billing.invoice.paid", "payment_to_cash"),
    # Older API versions (and localstripe) name invoice.paid this way.
    "invoice.payment_succeeded": ("billing.invoice.paid", "payment_to_cash"),
    "invoice.payment_failed": ("billing.invoice.payment_failed", "payment_to_cash"),
    "invoice.voided": ("billing.invoice.voided", "invoice_to_ledger"),
    "payment_intent.succeeded": ("billing.payment.succeeded", "payment_to_cash"),
    "charge.refunded": ("billing.refund.created", "refund_to_ledger"),
    # The Refund object itself (since API 2022-11-15 a Charge no longer embeds its refunds).
    "refund.created": ("billing.refund.created", "refund_to_ledger"),
    "refund.updated": ("billing.refund.updated", "refund_to_ledger"),
    "charge.refund.updated": ("billing.refund.updated", "refund_to_ledger"),
    "credit_note.created": ("billing.credit_note.created", "refund_to_ledger"),
}


class MappingError(ValueError):
    """The payload is not a Stripe event we can read; the message says which field."""


def _bounded(n: int, field: str) -> int:
    if (why := amount_error(n)) is not None:
        raise MappingError(f"{field}: {why}")
    return n


def _minor(value: Any, field: str) -> str:
    """An amount in minor units as Stripe sends it (an integer); anything else would be stored as 0 or wrap."""
    if isinstance(value, float) or isinstance(value, bool):
        raise MappingError(f"{field} is not an amount in minor units: {value!r}")
    try:
        n = int(value or 0)
    except (TypeError, ValueError):
        raise MappingError(f"{field} is not an amount in minor units: {str(value)[:40]!r}") from None
    return str(_bounded(n, field))


# Stripe's amounts are integers in Stripe's own minor units, which are ISO 4217's except for a few currencies
# (docs.stripe.com/currencies): its zero-decimal and three-decimal lists, and ISK, which ISO gives no decimals
# but Stripe two ("an ISK amount of 100 represents 1 króna"; MGA is the other way round). The tower keeps ISO
# minor units, which the ERP connectors post: read as ISO, a 500 ISK invoice posted as 50,000 ISK.
STRIPE_ZERO_DECIMAL = frozenset("BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF XOF XPF".split())
STRIPE_THREE_DECIMAL = frozenset("BHD JOD KWD OMR TND".split())


def stripe_exponent(currency: str) -> int:
    code = currency.upper()
    return 0 if code in STRIPE_ZERO_DECIMAL else 3 if code in STRIPE_THREE_DECIMAL else 2


def iso_minor(value: Any, field: str, currency: Any) -> int:
    """A Stripe amount (an integer, as ``_minor`` checks) in the ISO 4217 minor units of its currency. A currency
    ISO does not know keeps Stripe's figure: the ERP connectors refuse to post it anyway."""
    n = int(_minor(value, field))
    code = str(currency or "").upper()
    try:
        shift = currency_exponent(code) - stripe_exponent(code)
    except ValueError:
        return n
    if shift >= 0:
        n *= 10**shift
    else:
        n, rest = divmod(n, 10**-shift)
        if rest:
            raise MappingError(f"{field} {value} {code} is not a whole number of {code} (Stripe counts hundredths)")
    return _bounded(n, field)


def _id(value: Any) -> str:
    """Stripe references are ids, or whole objects when expanded."""
    if isinstance(value, Mapping):
        return str(value.get("id") or "")
    return str(value or "")


def _region(obj: Mapping[str, Any], default_region: str) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get("region") or meta.get("revops.region") or default_region)


def _trace(obj: Mapping[str, Any]) -> tuple[str, str]:
    """A W3C traceparent that the sender put in the object's metadata (it survives Stripe)."""
    tp = str((obj.get("metadata") or {}).get("traceparent") or "").strip().lower()
    m = _TRACEPARENT.match(tp)
    return (m.group(1), m.group(2)) if m else ("", "")


def _ts(seconds: Any) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC) if isinstance(seconds, int) and seconds > 0 else None


def _invoice_tax(obj: Mapping[str, Any]) -> int:
    """``tax`` (old API), ``total_tax_amounts`` (until 2025-03-31.basil), ``total_taxes`` (basil and later)."""
    cur = obj.get("currency")
    if isinstance(obj.get("tax"), int):
        return iso_minor(obj["tax"], "tax", cur)
    taxes = obj.get("total_taxes")
    if taxes is None:
        taxes = obj.get("total_tax_amounts")
    return sum(iso_minor(t.get("amount"), "tax amount", cur) for t in taxes or [] if isinstance(t, Mapping))


def _pi_invoice(pi: Mapping[str, Any]) -> str:
    """The invoice a PaymentIntent pays, where it still says so (before basil; localstripe): newer API versions
    drop ``invoice`` from it (the connector then asks the InvoicePayments API)."""
    return _id(pi.get("invoice")) or str((pi.get("metadata") or {}).get("invoice") or "")


def invoice_payment_intent(obj: Mapping[str, Any]) -> str:
    """The PaymentIntent that paid an invoice: ``payment_intent`` before basil, else its ``payments`` list
    (InvoicePayments): a paid one first, the default one among equals."""
    if obj.get("payment_intent"):
        return _id(obj.get("payment_intent"))
    payments = obj.get("payments")
    data = payments.get("data") if isinstance(payments, Mapping) else None
    rows = [p for p in data or [] if isinstance(p, Mapping) and isinstance(p.get("payment"), Mapping)]
    rows.sort(key=lambda p: (p.get("status") != "paid", not p.get("is_default")))
    for p in rows:
        pi = _id(p["payment"].get("payment_intent"))
        if pi:
            return pi
    return ""


def invoice_allocations(invoice_payments: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Invoice id -> amount paid, from the InvoicePayments of one PaymentIntent (basil+): only paid ones count,
    and a PaymentIntent may pay several invoices."""
    out: dict[str, int] = {}
    for p in invoice_payments:
        inv = _id(p.get("invoice"))
        if inv and p.get("status") == "paid":
            out[inv] = out.get(inv, 0) + iso_minor(p.get("amount_paid"), "amount_paid", p.get("currency"))
    return out


def without_address(value: str) -> str:
    """A CDP user id as kept when no PII policy is at hand: one that may be an e-mail address is dropped."""
    return "" if "@" in value else value


def event_attributes(
    etype: str, obj: Mapping[str, Any], default_region: str, cdp_user: Callable[[str], str] = without_address
) -> dict[str, str]:
    """DOMAIN.md §2 attributes of one Stripe event's object. ``cdp_user``: the CDP's PII policy for user ids
    (``PiiPolicy.identifier``), so an address in ``metadata.cdp_user_id`` becomes the pseudonym the CDP's own
    events carry for it."""
    kind = "refund" if etype.startswith(("refund.", "charge.refund.")) else etype.split(".", 1)[0]
    attrs: dict[str, str] = {"revops.system": SYSTEM, "stripe.event_type": etype}
    currency = str(obj.get("currency") or "").upper()

    def amount(value: Any, field: str) -> str:
        return str(iso_minor(value, field, currency))

    region = _region(obj, default_region)
    if region:
        attrs["revops.region"] = region
    if kind == "customer":
        attrs["revops.customer.id"] = _id(obj.get("id"))
        cdp = (obj.get("metadata") or {}).get("cdp_user_id")
        if cdp and (user := cdp_user(str(cdp))):
            attrs["revops.cdp.user_id"] = user
    elif kind == "invoice":
        attrs["revops.invoice.id"] = _id(obj.get("id"))
        attrs["revops.customer.id"] = _id(obj.get("customer"))
        paid = etype in ("invoice.paid", "invoice.payment_succeeded")
        attrs["revops.amount_minor"] = amount(
            obj.get("amount_paid" if paid else "total"), "amount_paid" if paid else "total"
        )
        attrs["stripe.invoice.status"] = str(obj.get("status") or "")
        pi = invoice_payment_intent(obj)
        if pi and paid:
            attrs["revops.payment.id"] = pi
    elif kind == "payment_intent":
        attrs["revops.payment.id"] = _id(obj.get("id"))
        attrs["revops.customer.id"] = _id(obj.get("customer"))
        attrs["revops.amount_minor"] = amount(obj.get("amount_received") or obj.get("amount"), "amount")
        inv = _pi_invoice(obj)
        if inv:
            attrs["revops.invoice.id"] = inv
    elif kind == "refund":  # a Refund object: its own id and amount
        attrs["revops.payment.id"] = _id(obj.get("id"))
        attrs["revops.amount_minor"] = amount(obj.get("amount"), "amount")
        attrs["revops.related_payment.id"] = _id(obj.get("payment_intent")) or _id(obj.get("charge"))
        attrs["stripe.charge.id"] = _id(obj.get("charge"))
        attrs["stripe.refund.status"] = str(obj.get("status") or "")
    elif kind == "charge":
        refunds = obj.get("refunds")
        data = refunds.get("data") if isinstance(refunds, Mapping) else None
        listed = [r for r in data or [] if isinstance(r, Mapping) and r.get("id")]
        latest = max(listed, key=lambda r: (int(r.get("created") or 0), str(r.get("id")))) if listed else None
        if latest is not None:  # API versions before 2022-11-15 embed the refunds: the newest is this one
            attrs["revops.payment.id"] = _id(latest.get("id"))
            if latest.get("amount") is not None:
                attrs["revops.amount_minor"] = amount(latest.get("amount"), "amount")
        # Without the list no refund id or per-refund amount can be known (refund.* events carry them):
        # only the charge's running total, named as such.
        attrs["stripe.charge.id"] = _id(obj.get("id"))
        attrs["stripe.charge.amount_refunded"] = amount(obj.get("amount_refunded"), "amount_refunded")
        attrs["revops.customer.id"] = _id(obj.get("customer"))
        attrs["revops.related_payment.id"] = _id(obj.get("payment_intent")) or _id(obj.get("id"))
        inv = _id(obj.get("invoice"))
        if inv:
            attrs["revops.invoice.id"] = inv
    elif kind == "credit_note":
        attrs["revops.payment.id"] = _id(obj.get("id"))
        attrs["revops.customer.id"] = _id(obj.get("customer"))
        attrs["revops.invoice.id"] = _id(obj.get("invoice"))
        attrs["revops.amount_minor"] = amount(obj.get("total") or obj.get("amount"), "total")
    if currency and kind != "customer":
        attrs["revops.currency"] = currency
    return {k: v for k, v in attrs.items() if v != ""}


def to_business_event(
    event: Mapping[str, Any], default_region: str, cdp_user: Callable[[str], str] = without_address
) -> BusinessEvent | None:
    """One Stripe event -> one business event; None for event types the tower does not track."""
    if not isinstance(event, Mapping) or event.get("object") != "event":
        raise MappingError("the body is not a Stripe event object")
    event_id, etype, created = event.get("id"), event.get("type"), event.get("created")
    if not isinstance(event_id, str) or not event_id:
        raise MappingError("the event has no id")
    if not isinstance(etype, str) or not isinstance(created, int) or isinstance(created, bool):
        raise MappingError("the event has no type or created time")
    if not 0 < created < 10**10:  # seconds; beyond year 2286 the nanosecond time does not fit
        raise MappingError(f"created {created} is not a Unix time in seconds")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(obj, Mapping):
        raise MappingError("the event has no data.object")
    if etype not in EVENT_TYPES:
        return None
    canonical, step = EVENT_TYPES[etype]
    try:
        attrs = event_attributes(etype, obj, default_region, cdp_user)
        trace_id, span_id = _trace(obj)
    except MappingError:
        raise
    except (AttributeError, TypeError, ValueError) as exc:  # a field of another shape than Stripe's (a list for a map)
        raise MappingError(f"{etype}: data.object has a field of an unexpected shape ({exc})") from None
    attrs["revops.step"] = step
    data = {
        "stripe_event": etype,
        "object": str(obj.get("object") or ""),
        "id": _id(obj.get("id")),
        "status": str(obj.get("status") or ""),
        "livemode": bool(event.get("livemode")),
    }
    return BusinessEvent(
        event_id=event_id,
        source=SOURCE,
        type=canonical,
        subject=_id(obj.get("id")),
        time_ns=created * 1_000_000_000,
        trace_id=trace_id,
        span_id=span_id,
        attributes=attrs,
        data=orjson.dumps(data).decode(),
    )


# ---------------------------------------------------------------- pulled objects -> canonical records


def to_invoice(obj: Mapping[str, Any], updated_at: dt.datetime, default_region: str) -> Invoice:
    transitions = obj.get("status_transitions") or {}
    created = _ts(obj.get("created")) or updated_at
    cur = str(obj.get("currency") or "").upper()
    credited = iso_minor(obj.get("post_payment_credit_notes_amount"), "post_payment_credit_notes_amount", cur)
    credited += iso_minor(obj.get("pre_payment_credit_notes_amount"), "pre_payment_credit_notes_amount", cur)
    status = str(obj.get("status") or "draft")
    if status not in ("draft", "open", "paid", "void", "uncollectible"):
        status = "open"
    pi = invoice_payment_intent(obj)
    attrs = {"stripe.payment_intent": pi} if pi else {}
    return Invoice(
        invoice_id=_id(obj.get("id")),
        customer_id=_id(obj.get("customer")),
        region=_region(obj, default_region),
        currency=cur,
        subtotal_minor=iso_minor(obj.get("subtotal"), "subtotal", cur),
        tax_minor=_invoice_tax(obj),
        total_minor=iso_minor(obj.get("total"), "total", cur),
        status=status,  # type: ignore[arg-type]
        issued_at=_ts(transitions.get("finalized_at")) or created,
        updated_at=updated_at,
        amount_paid_minor=iso_minor(obj.get("amount_paid"), "amount_paid", cur),
        amount_credited_minor=credited,
        due_at=_ts(obj.get("due_date")),
        finalized_at=_ts(transitions.get("finalized_at")),
        paid_at=_ts(transitions.get("paid_at")),
        source_system=SOURCE,
        attributes=attrs,
    )


def _payment_status(status: str) -> str:
    if status == "succeeded":
        return "succeeded"
    if status in ("canceled", "requires_payment_method", "failed"):
        return "failed"
    return "pending"


def _refund_status(status: str) -> str:
    """Stripe refund states: only ``failed`` and ``canceled`` are final failures; ``pending`` and
    ``requires_action`` (and any state Stripe adds) are still in progress."""
    if status == "succeeded":
        return "succeeded"
    if status in ("failed", "canceled"):
        return "failed"
    return "pending"


def _succeeded_at(pi: Mapping[str, Any], event_at: int | None) -> dt.datetime | None:
    """When a PaymentIntent succeeded: its ``payment_intent.succeeded`` event, else its latest succeeded charge
    (embedded by older API versions or an expand). An invoice's PaymentIntent is created when the invoice is
    finalized and may succeed days later (retries, net terms, bank debits): its ``created`` started the
    reconciler's grace period that long ago, so a payment confirmed a second before a run was already a break."""
    if event_at:
        return _ts(event_at)
    charges = pi.get("charges")
    listed = charges.get("data") if isinstance(charges, Mapping) else None
    candidates = [pi.get("latest_charge"), *(listed if isinstance(listed, list) else [])]
    times = [
        c["created"]
        for c in candidates
        if isinstance(c, Mapping) and c.get("status") == "succeeded" and isinstance(c.get("created"), int)
    ]
    return _ts(max(times)) if times else None


def payment_from_intent(
    pi: Mapping[str, Any],
    updated_at: dt.datetime,
    default_region: str,
    paid_invoices: Mapping[str, int] | None = None,
    succeeded_event_at: int | None = None,
) -> Payment:
    """A payment; ``paid_invoices`` (invoice id -> amount, from the InvoicePayments API) allocates it when the
    PaymentIntent itself names no invoice (API 2025-03-31.basil and later). A succeeded payment occurred when it
    succeeded (``succeeded_event_at``: the time of its ``payment_intent.succeeded`` event, when the pull saw
    it), not when its intent was created."""
    status = _payment_status(str(pi.get("status") or ""))
    cur = str(pi.get("currency") or "").upper()
    asked = iso_minor(pi.get("amount"), "amount", cur)
    amount = iso_minor(pi.get("amount_received"), "amount_received", cur) if status == "succeeded" else asked
    amount = amount or asked
    inv = _pi_invoice(pi)
    allocations = {inv: amount} if inv else dict(paid_invoices or {})
    methods = pi.get("payment_method_types") or []
    return Payment(
        payment_id=_id(pi.get("id")),
        kind="payment",
        customer_id=_id(pi.get("customer")),
        region=_region(pi, default_region),
        currency=cur,
        amount_minor=amount,
        status=status,
        occurred_at=(status == "succeeded" and _succeeded_at(pi, succeeded_event_at))
        or _ts(pi.get("created"))
        or updated_at,
        updated_at=updated_at,
        method=str(methods[0]) if methods else "card",
        allocations=allocations if status == "succeeded" else {},
        source_system=SOURCE,
    )


def payment_from_refund(
    refund: Mapping[str, Any],
    paid: Mapping[str, Any] | None,
    updated_at: dt.datetime,
    default_region: str,
    paid_invoices: Mapping[str, int] | None = None,
) -> Payment:
    """A refund; ``paid`` is the payment intent it refunds (for customer, invoice and region), if known, and
    ``paid_invoices`` the invoices it paid (InvoicePayments API) when it names none itself. A refund of a
    payment that paid several invoices is not split among them by guess: it stays unallocated."""
    paid = paid or {}
    cur = str(refund.get("currency") or paid.get("currency") or "").upper()
    amount = iso_minor(refund.get("amount"), "amount", cur)
    inv = _pi_invoice(paid) or (next(iter(paid_invoices)) if paid_invoices and len(paid_invoices) == 1 else "")
    return Payment(
        payment_id=_id(refund.get("id")),
        kind="refund",
        customer_id=_id(paid.get("customer")),
        region=_region(refund, "") or _region(paid, default_region),
        currency=cur,
        amount_minor=amount,
        status=_refund_status(str(refund.get("status") or "succeeded")),
        occurred_at=_ts(refund.get("created")) or updated_at,
        updated_at=updated_at,
        allocations={inv: amount} if inv else {},
        related_payment_id=_id(refund.get("payment_intent")) or _id(paid.get("id")) or _id(refund.get("charge")),
        source_system=SOURCE,
    )


def payment_from_credit_note(cn: Mapping[str, Any], updated_at: dt.datetime, default_region: str) -> Payment:
    cur = str(cn.get("currency") or "").upper()
    amount = iso_minor(cn.get("total") or cn.get("amount"), "total", cur)
    inv = _id(cn.get("invoice"))
    return Payment(
        payment_id=_id(cn.get("id")),
        kind="credit_note",
        customer_id=_id(cn.get("customer")),
        region=_region(cn, default_region),
        currency=cur,
        amount_minor=amount,
        status="failed" if cn.get("status") == "void" else "succeeded",
        occurred_at=_ts(cn.get("created")) or updated_at,
        updated_at=updated_at,
        allocations={inv: amount} if inv else {},
        source_system=SOURCE,
    )


# ---------------------------------------------------------------- cursors


@dataclass(frozen=True)
class Cursor:
    """Changes at or after ``t`` (unix seconds) except the ids already returned at exactly ``t``.

    Stripe times have one-second resolution, so the ids seen in the last second are kept: a change that
    lands later in that same second is still returned, and none is returned twice.
    """

    t: int
    seen: frozenset[str] = frozenset()

    def encode(self) -> str:
        return orjson.dumps({"t": self.t, "seen": sorted(self.seen)}).decode()

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        if not text:
            return None
        try:
            doc = orjson.loads(text)
            return cls(int(doc["t"]), frozenset(str(s) for s in doc.get("seen", [])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise MappingError(f"not a Stripe cursor: {text[:60]!r}") from None


@dataclass(frozen=True)
class Change:
    """One changed object: (time, change id) orders them; ``key`` identifies the object."""

    t: int
    change_id: str
    kind: str
    key: str


def select_changes(changes: list[Change], cursor: Cursor | None, limit: int) -> tuple[list[Change], Cursor, bool]:
    """The next page: oldest change first, one entry per object (its latest change in the page), the new
    cursor, and whether nothing is left."""
    fresh = [
        c for c in changes if cursor is None or c.t > cursor.t or (c.t == cursor.t and c.change_id not in cursor.seen)
    ]
    fresh.sort(key=lambda c: (c.t, c.change_id))
    fresh_all = list(fresh)
    taken: list[Change] = []
    keys: set[str] = set()
    rest = False
    for i, c in enumerate(fresh):
        if c.key not in keys and len(keys) >= limit:
            # Never split one second across pages without remembering what was taken: stop here.
            rest = True
            fresh = fresh[:i]
            break
        keys.add(c.key)
        taken.append(c)
    if not taken:
        return [], cursor or Cursor(0), True
    last_t = taken[-1].t
    keys_taken = {c.key for c in taken}
    # Objects are read back in their current state, so their other changes in the same second are covered too.
    seen = {c.change_id for c in fresh_all if c.t == last_t and c.key in keys_taken}
    if cursor is not None and cursor.t == last_t:
        seen |= cursor.seen
    latest: dict[str, Change] = {}
    for c in taken:
        latest[c.key] = c
    ordered = sorted(latest.values(), key=lambda c: (c.t, c.change_id))
    return ordered, Cursor(last_t, frozenset(seen)), not rest
