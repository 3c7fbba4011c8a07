"""Tryton records <-> the tower's canonical records. Pure, no IO.

A customer invoice (``account.invoice``, type out) is a ledger entry of type ``invoice`` whose
``ExternalRef`` is its ``reference`` (the billing invoice id); a credit note (negative total) is a
``credit_memo`` whose reference is the refund / credit note id. A payment is a receivable move line in the
invoice's ``payment_lines``; its move description holds the billing payment id.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import orjson

from tower_core.models import Invoice, LedgerEntry, Payment, amount_error, currency_exponent

SOURCE = "tryton"
INVOICE_FIELDS = [
    "reference", "number", "state", "type", "total_amount", "invoice_date", "comment", "description",
    "write_date", "create_date", "currency.code", "party.name", "payment_lines", "move", "cancel_move", "account",
]  # fmt: skip
LINE_FIELDS = [
    "credit", "debit", "date", "move.description", "move.post_date", "write_date", "create_date", "state",
    "currency.code", "second_currency.code", "amount_second_currency",
]  # fmt: skip
STATUS = {"draft": "draft", "validated": "draft", "posted": "open", "paid": "paid", "cancelled": "cancelled"}


class MappingError(ValueError):
    """A value cannot be represented exactly (e.g. more decimals than the currency has)."""


def _exponent(currency: str) -> int:
    try:
        return currency_exponent(currency)
    except ValueError as exc:
        raise MappingError(str(exc)) from None


def to_minor(amount: Decimal, currency: str) -> int:
    scaled = amount.scaleb(_exponent(currency))
    if scaled != scaled.to_integral_value():
        raise MappingError(f"{amount} {currency} has more decimals than the currency")
    n = int(scaled)
    if (why := amount_error(n)) is not None:
        raise MappingError(f"{amount} {currency}: {why}")
    return n


def from_minor(amount_minor: int, currency: str) -> Decimal:
    return Decimal(amount_minor).scaleb(-_exponent(currency))


def _changed(rec: dict[str, Any]) -> dt.datetime:
    return rec.get("write_date") or rec["create_date"]


def _rel(rec: dict[str, Any], name: str, field: str) -> str:
    """A dotted read (``party.name``) comes back as ``{"party.": {"name": ...}}``."""
    sub = rec.get(f"{name}.") or {}
    return str(sub.get(field) or "") if isinstance(sub, dict) else ""


def applied_to(comment: str | None) -> str:
    """The billing invoice a credit memo applies to (kept as JSON in the Tryton comment)."""
    if not comment:
        return ""
    try:
        doc = orjson.loads(comment)
    except orjson.JSONDecodeError:
        return ""
    return str(doc.get("applied_to") or "") if isinstance(doc, dict) else ""


def invoice_entry(rec: dict[str, Any], region: str = "") -> LedgerEntry:
    currency = _rel(rec, "currency", "code")
    total = rec.get("total_amount") or Decimal(0)
    credit = total < 0
    when = _changed(rec)
    period = rec.get("invoice_date")
    posted = dt.datetime.combine(period, dt.time(), dt.UTC) if period else when
    return LedgerEntry(
        entry_id=f"tryton:invoice:{rec['id']}",
        entry_type="credit_memo" if credit else "invoice",
        external_ref=str(rec.get("reference") or ""),
        party_ref=_rel(rec, "party", "name"),
        region=region,
        currency=currency,
        amount_minor=to_minor(abs(total), currency),
        status=STATUS.get(str(rec.get("state")), str(rec.get("state"))),
        posted_at=posted,
        updated_at=when,
        applied_to_ref=applied_to(rec.get("comment")) if credit else "",
        period_date=period,
        source_system=SOURCE,
        attributes={"tryton.number": str(rec.get("number") or ""), "tryton.state": str(rec.get("state"))},
    )


def _line_amount(line: dict[str, Any], invoice_currency: str) -> tuple[Decimal, str]:
    """A payment line's amount and currency. Debit and credit are in the company currency; a payment of an
    invoice in another currency carries that amount in ``amount_second_currency``, signed like debit - credit
    (negative for a customer's payment, which credits the receivable)."""
    if _rel(line, "second_currency", "code") == invoice_currency and line.get("amount_second_currency") is not None:
        return -line["amount_second_currency"], invoice_currency
    amount = (line.get("credit") or Decimal(0)) - (line.get("debit") or Decimal(0))
    return amount, _rel(line, "currency", "code") or invoice_currency


def payment_entry(line: dict[str, Any], invoice: dict[str, Any], region: str = "") -> LedgerEntry:
    amount, currency = _line_amount(line, _rel(invoice, "currency", "code"))
    day = line.get("date")
    # adding a line to an invoice's payments (or removing it) rewrites the invoice, not the line: the application
    # changed when either did, so a line attached again after it was withdrawn reads as newer than the withdrawal
    when = max(_changed(line), _changed(invoice))
    return LedgerEntry(
        entry_id=f"tryton:line:{line['id']}",
        entry_type="payment",
        external_ref=_rel(line, "move", "description"),
        party_ref=_rel(invoice, "party", "name"),
        region=region,
        currency=currency,
        amount_minor=to_minor(amount, currency),
        status="posted",
        posted_at=dt.datetime.combine(day, dt.time(), dt.UTC) if day else when,
        updated_at=when,
        applied_to_ref=str(invoice.get("reference") or ""),
        period_date=day,
        source_system=SOURCE,
        attributes={"tryton.invoice": str(invoice["id"])},
    )


def withdrawn_entry(line: dict[str, Any], invoice: dict[str, Any], region: str = "") -> LedgerEntry:
    """A payment line removed from ``invoice``'s payments that no invoice holds now: the application it was, in
    a cancelled version, so the stored one stops counting and the payment reads unapplied."""
    return replace(payment_entry(line, invoice, region), status="cancelled")


def invoice_values(
    invoice: Invoice | Payment,
    *,
    reference: str,
    party: int,
    address: int,
    currency: int,
    receivable: int,
    revenue: int,
    journal: int,
    payment_term: int,
    company: int,
    credit_for: str = "",
    zone: dt.tzinfo = dt.UTC,
) -> dict[str, Any]:
    """``account.invoice.create`` values: one line for the billing total (credit notes: a negative line), dated
    by the company's calendar (``zone``)."""
    if isinstance(invoice, Invoice):
        amount, cur, day, text = invoice.total_minor, invoice.currency, invoice.issued_at, invoice.invoice_id
        quantity = 1.0
    else:
        amount, cur, day, text = invoice.amount_minor, invoice.currency, invoice.occurred_at, invoice.payment_id
        quantity = -1.0
    values: dict[str, Any] = {
        "type": "out",
        "company": company,
        "party": party,
        "invoice_address": address,
        "currency": currency,
        "account": receivable,
        "journal": journal,
        "payment_term": payment_term,
        "invoice_date": day.astimezone(zone).date(),
        "reference": reference,
        "description": f"billing {text}",
        "lines": [
            [
                "create",
                [
                    {
                        "type": "line",
                        "invoice_type": "out",
                        "company": company,
                        "currency": currency,
                        "party": party,
                        "account": revenue,
                        "description": f"billing {text}",
                        "quantity": quantity,
                        "unit_price": from_minor(amount, cur),
                    }
                ],
            ]
        ],
    }
    if credit_for:
        values["comment"] = orjson.dumps({"applied_to": credit_for}).decode()
    return values


@dataclass(frozen=True)
class Cursor:
    """Invoices changed at or after ``t``; ``after_id`` skips those already returned at exactly ``t``."""

    t: dt.datetime
    after_id: int = 0

    def encode(self) -> str:
        return orjson.dumps({"t": self.t.isoformat(), "id": self.after_id}).decode()

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        if not text:
            return None
        try:
            doc = orjson.loads(text)
            return cls(dt.datetime.fromisoformat(doc["t"]), int(doc["id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise MappingError(f"not a Tryton cursor: {text[:60]!r}") from None


def next_page(
    records: list[dict[str, Any]], cursor: Cursor | None, limit: int
) -> tuple[list[dict[str, Any]], Cursor | None, bool]:
    """Oldest change first, (change time, id) strictly after the cursor, at most ``limit``."""
    fresh = sorted(
        (r for r in records if cursor is None or (_changed(r), r["id"]) > (cursor.t, cursor.after_id)),
        key=lambda r: (_changed(r), r["id"]),
    )
    page = fresh[:limit]
    if not page:
        return [], cursor, True
    last = page[-1]
    return page, Cursor(_changed(last), last["id"]), len(fresh) <= limit
