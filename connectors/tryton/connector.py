"""TrytonErp: the ErpConnector on a real Tryton (account_invoice) through JSON-RPC.

Every write looks the target up first by its reference (the billing id), so a repeated corrective sync never
posts twice; an invoice found in draft (a crash between create and post) is posted rather than duplicated.
An invoice this call created whose posting Tryton refuses is deleted again, so a business-rule rejection
leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connectors.base import ActionOutcome, BusinessRuleError, ConnectorError, Health, TransientError
from connectors.tryton import mapping as m
from connectors.tryton.rpc import AmbiguousWriteError, TrytonRpc
from tower_core.models import Invoice, LedgerEntry, Page, Payment, Skipped
from tower_core.settings import Settings

INVOICE = "account.invoice"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


_PARTY_LOCK = threading.Lock()  # one per process: every connector of it writes the same Tryton parties


class TrytonErp:
    name = "tryton"

    def __init__(
        self,
        rpc: TrytonRpc,
        *,
        payment_method: str = "Cash",
        region: str = "",
        recheck_attempts: int = 4,
        recheck_wait_s: float = 0.5,
    ) -> None:
        self.rpc = rpc
        self.recheck_attempts, self.recheck_wait_s = recheck_attempts, recheck_wait_s
        self.payment_method = payment_method
        self.region = region
        self._refs: dict[str, int] | None = None
        self._zone: dt.tzinfo | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TrytonErp:
        if settings.tryton_password is None:
            raise BusinessRuleError("TOWER_TRYTON_PASSWORD is not set")
        rpc = TrytonRpc(
            settings.tryton_url,
            settings.tryton_database,
            settings.tryton_user,
            settings.tryton_password.get_secret_value(),
            timeout_s=settings.tryton_timeout_s,
        )
        return cls(rpc, payment_method=settings.tryton_payment_method)

    # ------------------------------------------------------------ setup lookups

    def _one(self, model: str, domain: list[Any], what: str) -> int:
        rows = self.rpc.search_read(model, domain, ["id"], limit=1, order=[["id", "ASC"]])
        if not rows:
            raise BusinessRuleError(f"Tryton has no {what}; configure it first")
        return int(rows[0]["id"])

    def refs(self) -> dict[str, int]:
        """Ids every invoice needs (company, accounts, journal, payment term), read once."""
        if self._refs is None:
            ctx = self.rpc.context
            self._refs = {
                "company": int(ctx.get("company") or self._one("company.company", [], "company")),
                "receivable": self._one(
                    "account.account", [["type.receivable", "=", True], ["closed", "!=", True]], "receivable account"
                ),
                "revenue": self._one(
                    "account.account", [["type.revenue", "=", True], ["closed", "!=", True]], "revenue account"
                ),
                "journal": self._one("account.journal", [["type", "=", "revenue"]], "revenue journal"),
                "payment_term": self._one(
                    "account.invoice.payment_term", [["name", "=", "Direct"]], "payment term named Direct"
                ),
            }
        return self._refs

    def zone(self) -> dt.tzinfo:
        """The company's time zone, read once: Tryton dates a document, and checks it against its "today", in it.
        Dated by the UTC calendar, a posting made while the company's day differed from UTC's was refused as
        dated in the future (west of UTC) or with a payment date in the past (east of it), and left nobody to
        confirm Tryton's warning: the correction was dead-lettered."""
        if self._zone is None:
            rows = self.rpc.search_read("company.company", [["id", "=", self.refs()["company"]]], ["timezone"])
            name = rows[0].get("timezone") if rows else None
            try:
                self._zone = ZoneInfo(name) if name else dt.UTC
            except (ZoneInfoNotFoundError, ValueError):  # a zone this machine does not know: Tryton's own default
                self._zone = dt.UTC
        return self._zone

    def _day(self, at: dt.datetime) -> dt.date:
        """The company's calendar day of an instant."""
        return at.astimezone(self.zone()).date()

    def _currency(self, code: str) -> int:
        return self._one("currency.currency", [["code", "=", code]], f"currency {code}")

    def _party(self, name: str) -> tuple[int, int]:
        """The party named after the billing customer id (created on first use) and its address. Looked up and
        created under a lock: corrective syncs run side by side (the API's, the dashboard's, the retry job's),
        and two of one new customer's invoices each created a party, splitting its receivables, or failed on
        Tryton's unique party code."""
        with _PARTY_LOCK:
            return self._find_or_create_party(name)

    def _find_or_create_party(self, name: str) -> tuple[int, int]:
        rows = self.rpc.search_read("party.party", [["name", "=", name]], ["addresses"], limit=1, order=[["id", "ASC"]])
        if not rows:
            (party,) = self.rpc.model(
                "party.party", "create", [{"name": name, "addresses": [["create", [{}]]]}],
                attributes={"revops.customer.id": name},
            )  # fmt: skip
            return int(party), self._address(int(party))
        party = int(rows[0]["id"])
        if rows[0]["addresses"]:
            return party, int(rows[0]["addresses"][0])
        (address,) = self.rpc.model("party.address", "create", [{"party": party}])
        return party, int(address)

    def _address(self, party: int) -> int:
        (rec,) = self.rpc.model("party.party", "read", [party], ["addresses"])
        return int(rec["addresses"][0])

    # ------------------------------------------------------------ reads

    def _invoices(self, domain: list[Any], attrs: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return self.rpc.search_read(
            INVOICE, [["type", "=", "out"], *domain], m.INVOICE_FIELDS, order=[["id", "ASC"]], attributes=attrs
        )

    def _payment_lines(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        rows = self.rpc.search_read("account.move.line", [["id", "in", ids]], m.LINE_FIELDS)
        return {int(r["id"]): r for r in rows}

    def _entries(self, invoices: list[dict[str, Any]]) -> tuple[list[LedgerEntry], list[Skipped]]:
        """Each invoice with its payment lines; an invoice that cannot be mapped exactly (a currency without an
        ISO 4217 exponent, more decimals than its currency) is skipped whole, with the reason."""
        lines = self._payment_lines([i for inv in invoices for i in inv.get("payment_lines") or []])
        out: list[LedgerEntry] = []
        skipped: list[Skipped] = []
        for inv in invoices:
            try:
                entries = [m.invoice_entry(inv, self.region)]
                for line_id in inv.get("payment_lines") or []:
                    if line_id in lines:
                        entries.append(m.payment_entry(lines[line_id], inv, self.region))
            except m.MappingError as exc:
                ref = f"tryton:invoice:{inv['id']}"
                skipped.append(Skipped(ref, f"Tryton invoice {inv.get('number') or inv['id']}: {exc}"))
                continue
            out += entries
        return out, skipped

    def pull_ledger_entries(self, cursor: str | None, limit: int = 1000) -> Page[LedgerEntry]:
        """Customer invoices and credit notes changed since the cursor, each with its payment lines (adding a
        payment rewrites the invoice, so new payments come with it)."""
        cur = m.Cursor.decode(cursor)
        since = cur.t if cur else EPOCH
        changed = self._invoices(
            [["OR", [["write_date", ">=", since]], [["write_date", "=", None], ["create_date", ">=", since]]]],
            {"tryton.since": since.isoformat()},
        )
        page, nxt, done = m.next_page(changed, cur, limit)
        entries, skipped = self._entries(page)
        unread = {s.ref for s in skipped}
        entries += self._withdrawn([inv for inv in page if f"tryton:invoice:{inv['id']}" not in unread])
        return Page(entries, nxt.encode() if nxt else (cursor or ""), done, tuple(skipped))

    def _withdrawn(self, invoices: list[dict[str, Any]]) -> list[LedgerEntry]:
        """The payment lines Tryton's pay wizard made for these invoices that no invoice holds any more (someone
        removed them from its payments), each as a cancelled application: the stored one would otherwise count
        for good. A line moved to another invoice is left to that invoice's own pull (writing its payments made
        it change too). Lines of other moves (a statement's, a manual one) are not found this way."""
        by_origin = {f"{INVOICE},{inv['id']}": inv for inv in invoices if inv.get("move")}
        if not by_origin:
            return []
        lines = self.rpc.search_read(
            "account.move.line", [["move_origin", "in", list(by_origin)]],
            [*m.LINE_FIELDS, "move", "move_origin", "account"],
        )  # fmt: skip
        loose = []
        for line in lines:
            inv = by_origin.get(str(line.get("move_origin") or ""))
            if (
                inv is not None
                and line["move"] not in (inv["move"], inv.get("cancel_move"))  # the invoice's own, its reversal
                and line["account"] == inv.get("account")  # the receivable side of a payment, not the cash side
                and line["id"] not in (inv.get("payment_lines") or [])
            ):
                loose.append((line, inv))
        if not loose:
            return []
        ids = [line["id"] for line, _ in loose]
        held = self.rpc.search_read(INVOICE, [["payment_lines", "in", ids]], ["payment_lines"])
        elsewhere = {i for r in held for i in r.get("payment_lines") or []}
        out = []
        for line, inv in loose:
            if line["id"] in elsewhere:
                continue
            try:
                out.append(m.withdrawn_entry(line, inv, self.region))
            except m.MappingError:
                continue  # its invoice maps (it was read above); a line that does not was never stored either
        return out

    def _readable(self, invoices: list[dict[str, Any]], reference: str) -> list[LedgerEntry]:
        """Entries of a lookup that decides a write: a posting that exists but cannot be read must stop the
        write (not look absent and be posted a second time)."""
        entries, skipped = self._entries(invoices)
        if skipped:
            raise BusinessRuleError(f"{reference} has a posting the tower cannot read: {skipped[0].reason}")
        return entries

    def find_by_external_ref(self, external_ref: str) -> list[LedgerEntry]:
        invoices = self._invoices([["reference", "=", external_ref]], {"revops.invoice.id": external_ref})
        entries = [e for e in self._readable(invoices, external_ref) if e.external_ref == external_ref]
        lines = self.rpc.search_read(
            "account.move.line",
            [["move.description", "=", external_ref], ["credit", ">", 0], ["move_origin", "like", f"{INVOICE},%"]],
            ["id"],
            attributes={"revops.payment.id": external_ref},
        )
        known = {e.entry_id for e in entries}
        for line in lines:
            if f"tryton:line:{line['id']}" not in known:
                inv = self._invoices([["payment_lines", "in", [line["id"]]]])
                entries += [e for e in self._readable(inv, external_ref) if e.entry_id == f"tryton:line:{line['id']}"]
        return entries

    # ------------------------------------------------------------ acts

    def _post_document(self, doc: Invoice | Payment, reference: str, credit_for: str = "") -> ActionOutcome:
        attrs = {"revops.invoice.id": reference} if isinstance(doc, Invoice) else {"revops.payment.id": reference}
        existing = [r for r in self._invoices([["reference", "=", reference]], attrs) if r["state"] != "cancelled"]
        done = [r for r in existing if r["state"] in ("posted", "paid")]
        if done:
            first = done[0]
            return ActionOutcome(f"tryton:invoice:{first['id']}", True, "already posted", {"number": first["number"]})
        created = False
        if existing:  # created earlier but never posted (crash between the two calls): finish it
            invoice_id = int(existing[0]["id"])
        else:
            refs = self.refs()
            customer = doc.customer_id or "unknown customer"
            party, address = self._party(customer)
            values = m.invoice_values(
                doc, reference=reference, party=party, address=address, currency=self._currency(doc.currency),
                receivable=refs["receivable"], revenue=refs["revenue"], journal=refs["journal"],
                payment_term=refs["payment_term"], company=refs["company"], credit_for=credit_for, zone=self.zone(),
            )  # fmt: skip
            # a late posting (every missing_in_erp item is past its grace period) keeps billing's date, and its
            # payment term runs from today: from the billing date, Tryton stops the post with a warning that
            # the payment date is in the past, which nobody is there to confirm
            today = dt.datetime.now(self.zone()).date()
            if values["invoice_date"] < today:
                values["payment_term_date"] = today
            (invoice_id,) = self.rpc.model(INVOICE, "create", [values], attributes=attrs)
            created = True
        try:
            self.rpc.model(INVOICE, "post", [invoice_id], attributes=attrs)
        except BusinessRuleError:
            if created:
                self.rpc.model(INVOICE, "delete", [invoice_id], attributes=attrs)
            raise
        (rec,) = self.rpc.model(INVOICE, "read", [invoice_id], ["number", "state"], attributes=attrs)
        number = str(rec["number"])
        return ActionOutcome(f"tryton:invoice:{invoice_id}", False, f"posted as {number}", {"number": number})

    def _rechecked(self, act: Callable[[], ActionOutcome]) -> ActionOutcome:
        """Run an act; when a write's answer was lost, wait, look at the target again and finish from there
        (every act starts with that lookup, so nothing is written twice)."""
        for attempt in range(1, self.recheck_attempts + 1):
            try:
                return act()
            except AmbiguousWriteError:
                if attempt == self.recheck_attempts:
                    raise
                time.sleep(self.recheck_wait_s * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def post_invoice(self, invoice: Invoice) -> ActionOutcome:
        return self._rechecked(lambda: self._post_document(invoice, invoice.invoice_id))

    def post_credit_memo(self, refund: Payment) -> ActionOutcome:
        applied = next(iter(refund.allocations), "")
        return self._rechecked(lambda: self._post_document(refund, refund.payment_id, credit_for=applied))

    def apply_payment(self, payment: Payment, invoice_id: str, amount_minor: int) -> ActionOutcome:
        return self._rechecked(lambda: self._apply_payment(payment, invoice_id, amount_minor))

    def cancel_entry(self, entry_id: str, reason: str) -> ActionOutcome:
        """Tryton's cancel of a posted customer invoice (a cancel move reverses it). The company must allow it
        (``cancel_invoice_out``); otherwise, or once the invoice is paid, Tryton's refusal is the error. A posted
        invoice takes no free text, so the reason stays in the tower's action and audit log."""
        return self._rechecked(lambda: self._cancel_entry(entry_id))

    def check_postable(self, invoice: Invoice) -> None:
        """Would Tryton post ``invoice`` as billing has it? Asked before a repost cancels the wrong posting, so
        a replacement Tryton refuses never leaves the invoice with no posting at all. Its rules that the date
        decides: an open period for it, and no invoice dated later in the sequence that would number it (Tryton
        numbers a sequence in date order; a credit note of a sequence of its own does not count, a supplier
        invoice sharing the customer invoices' sequence does)."""
        day = self._day(invoice.issued_at)
        attrs = {"revops.invoice.id": invoice.invoice_id}
        years = self.rpc.search_read(
            "account.fiscalyear", [["start_date", "<=", day], ["end_date", ">=", day]], ["id"], attributes=attrs,
        )  # fmt: skip
        if not years:
            raise BusinessRuleError(f"Tryton has no fiscal year for {day}, the date of {invoice.invoice_id}")
        periods = self.rpc.search_read(
            "account.period",
            [["fiscalyear", "=", years[0]["id"]], ["start_date", "<=", day], ["end_date", ">=", day]],
            ["name", "state", "type"], attributes=attrs,
        )  # fmt: skip
        closed = [p for p in periods if p["state"] != "open"]
        if closed:
            raise BusinessRuleError(f"Tryton's period {closed[0]['name']} of {day} is closed")
        period = next((int(p["id"]) for p in periods if p.get("type") == "standard"), None)
        company = self.refs()["company"]
        sequence = next(
            (
                int(r[field])
                for r in self.rpc.search_read(
                    "account.fiscalyear.invoice_sequence",
                    [["fiscalyear", "=", years[0]["id"]]],
                    ["company", "period", "out_invoice_sequence", "out_credit_note_sequence"],
                    attributes=attrs,
                )  # fmt: skip
                if r.get("company") in (None, company)
                and r.get("period") in (None, period)
                and r.get(field := "out_invoice_sequence" if invoice.total_minor >= 0 else "out_credit_note_sequence")
            ),
            None,
        )
        if sequence is None:
            raise BusinessRuleError(f"Tryton's fiscal year of {day} has no customer invoice sequence for that date")
        later = self.rpc.search_read(
            INVOICE, [["sequence", "=", sequence], ["invoice_date", ">", day]],
            ["number", "invoice_date"], order=[["invoice_date", "DESC"]], limit=1, attributes=attrs,
        )  # fmt: skip
        if later:
            raise BusinessRuleError(
                f"Tryton numbers invoices of a sequence in date order and has numbered {later[0]['number']} on "
                f"{later[0]['invoice_date']}: a posting of {invoice.invoice_id} dated {day} would be refused"
            )

    def _cancel_entry(self, entry_id: str) -> ActionOutcome:
        kind, _, rid = entry_id.removeprefix("tryton:").partition(":")
        if kind != "invoice" or not rid.isdigit():
            raise BusinessRuleError(f"{entry_id} is not a Tryton invoice posting")
        found = self._invoices([["id", "=", int(rid)]], {"revops.ledger.entry.id": entry_id})
        if not found:
            raise BusinessRuleError(f"Tryton has no customer invoice {rid}")
        rec = found[0]
        number = str(rec.get("number") or "")
        if rec["state"] == "cancelled":
            return ActionOutcome(entry_id, True, "already cancelled", {"number": number})
        if rec.get("payment_lines"):  # Tryton would cancel it and detach them: the customer's payment unapplied
            raise BusinessRuleError(f"Tryton invoice {number} has payments applied; unapply them first")
        invoice_ref = {"revops.invoice.id": str(rec.get("reference") or "")}
        self.rpc.model(INVOICE, "cancel", [int(rid)], attributes=invoice_ref)
        return ActionOutcome(entry_id, False, f"cancelled {number}", {"number": number})

    def _apply_payment(self, payment: Payment, invoice_id: str, amount_minor: int) -> ActionOutcome:
        attrs = {"revops.payment.id": payment.payment_id, "revops.invoice.id": invoice_id}
        found = self._invoices([["reference", "=", invoice_id]], attrs)
        invoices = [r for r in found if r["state"] in ("posted", "paid")]
        if not invoices:
            raise BusinessRuleError(f"Tryton has no posted invoice with reference {invoice_id}")
        inv = invoices[0]
        currency = m._rel(inv, "currency", "code")
        if currency != payment.currency:  # the pay wizard would book the amount in the invoice's currency
            raise BusinessRuleError(
                f"payment {payment.payment_id} is in {payment.currency}, Tryton invoice {inv['number']} "
                f"({invoice_id}) in {currency}"
            )
        entries = self._readable([inv], invoice_id)  # one it cannot read must not look unpaid
        mine = [e for e in entries if e.entry_type == "payment" and e.external_ref == payment.payment_id]
        applied = sum(e.amount_minor for e in mine)
        if mine and applied >= amount_minor:
            return ActionOutcome(mine[0].entry_id, True, "payment already applied")
        if inv["state"] == "paid":
            raise BusinessRuleError(f"Tryton invoice {inv['number']} ({invoice_id}) is already paid in full")
        method = self._one(
            "account.invoice.payment.method", [["name", "=", self.payment_method]],
            f"invoice payment method named {self.payment_method}",
        )  # fmt: skip
        amount = m.from_minor(amount_minor - applied, payment.currency)  # what the ERP has not applied yet
        self._pay(int(inv["id"]), amount, payment, method, attrs)
        after = self._payment_lines(
            self.rpc.model(INVOICE, "read", [inv["id"]], ["payment_lines"], attributes=attrs)[0]["payment_lines"]
        )
        known = {e.entry_id for e in mine}
        for line in after.values():
            if m._rel(line, "move", "description") == payment.payment_id and f"tryton:line:{line['id']}" not in known:
                return ActionOutcome(f"tryton:line:{line['id']}", False, f"applied {amount} {payment.currency}")
        raise ConnectorError(f"Tryton accepted the payment {payment.payment_id} but shows no payment line for it")

    def _pay(self, invoice: int, amount: Decimal, payment: Payment, method: int, attrs: dict[str, str]) -> None:
        """Run Tryton's own pay wizard (start -> choice [-> ask, partial payment] -> pay)."""
        ctx = dict(self.rpc.context, active_model=INVOICE, active_id=invoice, active_ids=[invoice])
        wizard = "wizard.account.invoice.pay"
        session, start, _end = self.rpc.call(f"{wizard}.create", ctx, attributes=attrs)
        try:
            view = self.rpc.call(f"{wizard}.execute", session, {}, start, ctx, attributes=attrs)
            start_values = {k: v for k, v in view["view"]["defaults"].items() if not k.endswith(".")}
            start_values.update(
                amount=amount,
                description=payment.payment_id,
                payment_method=method,
                date=self._day(payment.occurred_at),
            )
            data: dict[str, Any] = {"start": start_values}
            result = self.rpc.call(f"{wizard}.execute", session, data, "choice", ctx, attributes=attrs)
            if isinstance(result, dict) and "view" in result:  # partial payment: Tryton asks what to do
                ask = {k: v for k, v in result["view"]["defaults"].items() if not k.endswith(".")}
                ask["type"] = "partial"
                data["ask"] = ask
                self.rpc.call(f"{wizard}.execute", session, data, "pay", ctx, attributes=attrs)
        finally:
            try:
                self.rpc.call(f"{wizard}.delete", session, ctx)
            except (TransientError, BusinessRuleError):
                pass  # the wizard session expires by itself

    def health(self) -> Health:
        try:
            self.refs()
        except (TransientError, BusinessRuleError) as exc:
            return Health(False, str(exc))
        return Health(True, "tryton reachable, company and chart of accounts present")
