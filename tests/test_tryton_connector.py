"""Tryton ERP connector: pure encoding/mapping, then a real trytond (account_invoice on SQLite) for posting,
payments, credit memos, pulls, business-rule failures and transient faults (through a fault-injecting proxy)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from connectors.base import BusinessRuleError, ErpConnector, TransientError
from connectors.tryton import mapping as m
from connectors.tryton.connector import TrytonErp
from connectors.tryton.rpc import AmbiguousWriteError, TrytonRpc, decode, encode, fault, is_write
from reconciler import classify as c
from reconciler.actions import ActionService
from reconciler.runner import Reconciler
from tests.conftest import migrated
from tests.fixtures.external import Trytond, prepared_database, start_trytond, stop_trytond
from tests.fixtures.fault_proxy import FaultProxy
from tower_core.models import Invoice, Payment
from tower_core.store import Store
from tower_core.store import reconcile as q
from tower_core.store import source_skips as skips

NOW = dt.datetime.now(dt.UTC)


# ------------------------------------------------------------------ pure


def test_values_round_trip_through_trytons_json_forms() -> None:
    value = {"d": Decimal("12.30"), "day": dt.date(2026, 1, 31), "t": dt.datetime(2026, 1, 31, 5, 6, 7, 89, dt.UTC)}
    wire = encode(value)
    assert wire["d"] == {"__class__": "Decimal", "decimal": "12.30"}
    assert wire["day"] == {"__class__": "date", "year": 2026, "month": 1, "day": 31}
    assert decode(wire) == value


def test_faults_map_to_the_connector_error_contract() -> None:
    err = fault(["UserError", ["You must create a period for 01/05/2001.", "Ask your accountant.", None]])
    assert (
        isinstance(err, BusinessRuleError)
        and str(err) == "You must create a period for 01/05/2001. Ask your accountant."
    )
    assert isinstance(fault(["ConcurrencyException", ["Records were modified"]]), TransientError)
    assert is_write("model.account.invoice.post") and is_write("wizard.account.invoice.pay.execute")
    assert not is_write("model.account.invoice.search_read") and not is_write("common.db.login")
    assert isinstance(fault(["KeyError", "res.user"]), BusinessRuleError)
    warning = fault(["UserWarning", ["abc.invoice_date_future", "The invoice date is in the future.", ""]])
    assert str(warning) == "The invoice date is in the future."


def test_minor_units_are_exact() -> None:
    assert m.to_minor(Decimal("123.45"), "USD") == 12345 and m.to_minor(Decimal("500"), "JPY") == 500
    assert m.from_minor(12345, "USD") == Decimal("123.45")
    with pytest.raises(m.MappingError):
        m.to_minor(Decimal("1.005"), "USD")
    # every ISO 4217 exponent, not 2 by default: KRW has none, KWD three, CLF four
    assert m.from_minor(50000, "KRW") == Decimal("50000") and m.to_minor(Decimal("12.345"), "KWD") == 12345
    assert m.from_minor(12340, "KWD") == Decimal("12.340") and m.to_minor(Decimal("1.2345"), "CLF") == 12345
    with pytest.raises(m.MappingError, match="is beyond"):  # sums of such amounts wrapped Int64
        m.to_minor(Decimal(2**62), "JPY")
    for unknown in ("XYZ", "usd", ""):  # never guessed
        with pytest.raises(m.MappingError, match="not an ISO 4217 currency"):
            m.from_minor(100, unknown)


def test_pages_are_oldest_change_first_and_never_repeat() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    recs = [{"id": i, "write_date": None, "create_date": t0 + dt.timedelta(seconds=s)} for i, s in
            [(3, 0), (1, 0), (2, 5), (4, 9)]]  # fmt: skip
    page, cur, done = m.next_page(recs, None, 2)
    assert [r["id"] for r in page] == [1, 3] and not done and cur == m.Cursor(t0, 3)
    assert m.Cursor.decode(cur.encode()) == cur
    page, cur, done = m.next_page(recs, cur, 2)
    assert [r["id"] for r in page] == [2, 4] and done
    assert m.next_page(recs, cur, 2)[0] == []


def test_credit_note_record_maps_to_a_credit_memo_entry() -> None:
    rec = {"id": 7, "reference": "re_1", "number": "12", "state": "posted", "total_amount": Decimal("-25.00"),
           "invoice_date": dt.date(2026, 11, 2), "comment": '{"applied_to": "in_1"}', "write_date": NOW,
           "create_date": NOW, "currency.": {"code": "USD"}, "party.": {"name": "cus_1"}}  # fmt: skip
    e = m.invoice_entry(rec, "EU")
    assert (e.entry_type, e.external_ref, e.applied_to_ref, e.amount_minor, e.status) == (
        "credit_memo",
        "re_1",
        "in_1",
        2500,
        "open",
    )
    assert (e.entry_id, e.party_ref, e.region, e.period_date) == (
        "tryton:invoice:7",
        "cus_1",
        "EU",
        dt.date(2026, 11, 2),
    )


def test_a_payment_line_in_a_second_currency_is_read_in_the_invoice_currency() -> None:
    """Debit/credit are in the company currency (USD); Tryton keeps the invoice-currency amount in
    amount_second_currency, signed like debit - credit (negative on a customer's payment)."""
    invoice = {"id": 3, "reference": "in_1", "currency.": {"code": "JPY"}, "party.": {"name": "cus_1"},
               "write_date": None, "create_date": NOW - dt.timedelta(days=1)}  # fmt: skip
    line = {"id": 9, "credit": Decimal("33.33"), "debit": Decimal(0), "amount_second_currency": Decimal("-5000"),
            "second_currency.": {"code": "JPY"}, "currency.": {"code": "USD"}, "date": dt.date(2026, 11, 2),
            "write_date": None, "create_date": NOW, "move.": {"description": "pi_1"}}  # fmt: skip
    e = m.payment_entry(line, invoice)
    assert (e.amount_minor, e.currency, e.external_ref, e.applied_to_ref) == (5000, "JPY", "pi_1", "in_1")
    # a line without a second currency is in the company currency, and says so
    plain = {**line, "second_currency.": None, "amount_second_currency": None}
    assert (m.payment_entry(plain, invoice).amount_minor, m.payment_entry(plain, invoice).currency) == (3333, "USD")
    # it changed when the line did, or when its invoice's payments did (a line added back after its withdrawal)
    assert e.updated_at == NOW
    later = NOW + dt.timedelta(minutes=5)
    assert m.payment_entry(line, {**invoice, "write_date": later}).updated_at == later
    assert m.withdrawn_entry(line, {**invoice, "write_date": later}).status == "cancelled"


# ------------------------------------------------------------------ real trytond


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans of this process's connector calls (the real OTel SDK, in-memory exporter)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def erp_for(server: Trytond, url: str | None = None, **kw: float) -> TrytonErp:
    rpc = TrytonRpc(url or server.url, server.database, server.user, server.password, **kw)  # type: ignore[arg-type]
    return TrytonErp(rpc)


@pytest.fixture(scope="module")
def erp(trytond_server: Trytond) -> Iterator[TrytonErp]:
    connector = erp_for(trytond_server)
    yield connector
    connector.rpc.close()


def billing_invoice(total: int = 12345, day: dt.datetime = NOW) -> Invoice:
    iid = f"in_{uuid.uuid4().hex[:12]}"
    return Invoice(iid, f"cus_{iid[3:9]}", "NA", "USD", total, 0, total, "paid", day, day)


def tryton_invoices(erp: TrytonErp, reference: str) -> list[dict]:
    """Read Tryton directly (not through the connector's mapping)."""
    return erp.rpc.search_read("account.invoice", [["reference", "=", reference]], ["state", "total_amount", "number"])


def test_is_an_erp_connector_and_healthy(erp: TrytonErp) -> None:
    assert isinstance(erp, ErpConnector)
    assert erp.health().ok


def test_post_invoice_creates_and_posts_once(erp: TrytonErp, spans: InMemorySpanExporter) -> None:
    inv = billing_invoice(12345)
    spans.clear()
    first = erp.post_invoice(inv)
    assert not first.already_done and first.target_ref.startswith("tryton:invoice:")
    (rec,) = tryton_invoices(erp, inv.invoice_id)
    assert rec["state"] == "posted" and rec["total_amount"] == Decimal("123.45")
    again = erp.post_invoice(inv)
    assert again.already_done and again.target_ref == first.target_ref
    assert len(tryton_invoices(erp, inv.invoice_id)) == 1
    (entry,) = erp.find_by_external_ref(inv.invoice_id)
    assert (entry.entry_type, entry.amount_minor, entry.currency, entry.status) == ("invoice", 12345, "USD", "open")
    assert entry.party_ref == inv.customer_id
    done: list[ReadableSpan] = list(spans.get_finished_spans())
    posts = [s for s in done if s.name == "tryton model.account.invoice.post"]
    assert len(posts) == 1 and posts[0].attributes["revops.system"] == "erp"
    assert posts[0].attributes["revops.invoice.id"] == inv.invoice_id


def test_a_draft_left_by_a_crash_is_posted_not_duplicated(erp: TrytonErp) -> None:
    inv = billing_invoice(500)
    refs = erp.refs()
    party, address = erp._party(inv.customer_id)
    values = m.invoice_values(
        inv, reference=inv.invoice_id, party=party, address=address, currency=erp._currency("USD"),
        receivable=refs["receivable"], revenue=refs["revenue"], journal=refs["journal"],
        payment_term=refs["payment_term"], company=refs["company"],
    )  # fmt: skip
    erp.rpc.model("account.invoice", "create", [values])  # created, then "crashed" before posting
    out = erp.post_invoice(inv)
    assert not out.already_done
    assert [r["state"] for r in tryton_invoices(erp, inv.invoice_id)] == ["posted"]


def test_corrective_syncs_of_one_new_customer_side_by_side_make_one_party(erp: TrytonErp) -> None:
    """Three syncs of one new customer's invoices at once (API and dashboard requests run side by side): each
    looked for the party, found none and created one, or failed on Tryton's unique party code."""
    invoices = [billing_invoice(1_000 + n) for n in range(4)]
    customer = f"cus_{uuid.uuid4().hex[:10]}"
    invoices = [dataclasses.replace(inv, customer_id=customer) for inv in invoices]
    start = threading.Barrier(len(invoices))

    def post(inv: Invoice) -> str:
        start.wait(10)
        return erp.post_invoice(inv).target_ref

    with ThreadPoolExecutor(len(invoices)) as pool:
        refs = list(pool.map(post, invoices))
    assert len(set(refs)) == len(invoices)
    parties = erp.rpc.search_read("party.party", [["name", "=", customer]], ["id"])
    assert len(parties) == 1, parties
    for inv in invoices:
        (entry,) = erp.find_by_external_ref(inv.invoice_id)
        assert entry.party_ref == customer


def test_apply_payment_partial_then_rest_idempotent(erp: TrytonErp) -> None:
    inv = billing_invoice(10000)
    erp.post_invoice(inv)
    p1 = Payment(f"pi_{uuid.uuid4().hex[:10]}", "payment", inv.customer_id, "NA", "USD", 4000, "succeeded", NOW, NOW)
    p2 = Payment(f"pi_{uuid.uuid4().hex[:10]}", "payment", inv.customer_id, "NA", "USD", 6000, "succeeded", NOW, NOW)
    a = erp.apply_payment(p1, inv.invoice_id, 4000)
    assert not a.already_done and tryton_invoices(erp, inv.invoice_id)[0]["state"] == "posted"
    assert erp.apply_payment(p1, inv.invoice_id, 4000).already_done
    erp.apply_payment(p2, inv.invoice_id, 6000)
    assert tryton_invoices(erp, inv.invoice_id)[0]["state"] == "paid"
    (pay,) = erp.find_by_external_ref(p2.payment_id)
    assert (pay.entry_type, pay.applied_to_ref, pay.amount_minor) == ("payment", inv.invoice_id, 6000)
    with pytest.raises(BusinessRuleError, match="no posted invoice"):
        erp.apply_payment(p1, "in_does_not_exist", 100)


def test_credit_memo_is_posted_once_against_the_invoice(erp: TrytonErp) -> None:
    inv = billing_invoice(8000)
    erp.post_invoice(inv)
    refund = Payment(f"re_{uuid.uuid4().hex[:10]}", "refund", inv.customer_id, "NA", "USD", 2000, "succeeded", NOW,
                     NOW, allocations={inv.invoice_id: 2000})  # fmt: skip
    assert not erp.post_credit_memo(refund).already_done
    assert erp.post_credit_memo(refund).already_done
    (memo,) = erp.find_by_external_ref(refund.payment_id)
    assert (memo.entry_type, memo.applied_to_ref, memo.amount_minor) == ("credit_memo", inv.invoice_id, 2000)


def test_cancel_entry_reverses_a_posting_once_and_the_invoice_posts_again(erp: TrytonErp) -> None:
    inv = billing_invoice(4200)
    first = erp.post_invoice(inv)
    out = erp.cancel_entry(first.target_ref, "duplicate")
    assert not out.already_done and out.target_ref == first.target_ref
    assert erp.cancel_entry(first.target_ref, "again").already_done
    (entry,) = erp.find_by_external_ref(inv.invoice_id)
    assert (entry.entry_id, entry.status) == (first.target_ref, "cancelled")
    again = erp.post_invoice(inv)  # a cancelled posting does not count as posted
    assert not again.already_done and again.target_ref != first.target_ref
    assert sorted(r["state"] for r in tryton_invoices(erp, inv.invoice_id)) == ["cancelled", "posted"]
    with pytest.raises(BusinessRuleError, match="not a Tryton invoice posting"):
        erp.cancel_entry("tryton:line:1", "x")


def test_cancel_refused_by_the_company_setup_keeps_trytons_message(erp: TrytonErp) -> None:
    company = erp.refs()["company"]
    erp.rpc.model("company.company", "write", [company], {"cancel_invoice_out": False})
    try:
        inv = billing_invoice(300)
        posted = erp.post_invoice(inv)
        with pytest.raises(BusinessRuleError, match='can not call "cancel"'):  # Tryton's own words
            erp.cancel_entry(posted.target_ref, "x")
        assert [r["state"] for r in tryton_invoices(erp, inv.invoice_id)] == ["posted"]
    finally:
        erp.rpc.model("company.company", "write", [company], {"cancel_invoice_out": True})


def test_an_approved_amount_correction_cancels_and_reposts_in_tryton(erp: TrytonErp, embedded_store: Store) -> None:
    """The whole path on the real ERP: a full run finds the mismatch, the action waits for its approval, then
    Tryton's posting is cancelled and billing's posted; asked again it writes nothing; the next run resolves."""
    migrated(embedded_store)
    billing = dataclasses.replace(billing_invoice(7000), status="open")
    erp.post_invoice(dataclasses.replace(billing, subtotal_minor=9000, total_minor=9000))  # booked wrong
    q.write_invoices(embedded_store, [billing])
    reconciler = Reconciler(embedded_store, c.Rules(), erp=erp)
    reconciler.run(full=True)
    drift = c.drift_id(c.AMOUNT_MISMATCH, billing.invoice_id)
    item = q.get_drift(embedded_store, drift)
    assert item is not None and item["State"] == c.NEW
    actions = ActionService(embedded_store, erp)
    waiting = actions.request(drift, "otto")
    assert waiting["state"] == "pending" and len(tryton_invoices(erp, billing.invoice_id)) == 1
    done = actions.approve(waiting["action_id"], "alice")
    assert done["state"] == "succeeded", done
    states = sorted((r["state"], r["total_amount"]) for r in tryton_invoices(erp, billing.invoice_id))
    assert states == [("cancelled", Decimal("90.00")), ("posted", Decimal("70.00"))]
    assert actions.request(drift, "bob", approve=True)["action_id"] == done["action_id"]
    assert len(tryton_invoices(erp, billing.invoice_id)) == 2
    assert reconciler.run(full=True).resolved >= 1
    item = q.get_drift(embedded_store, drift)
    assert item is not None and item["State"] == c.RESOLVED


def test_a_posting_with_a_payment_is_not_cancelled_and_payments_apply_in_their_currency_and_remainder(
    erp: TrytonErp,
) -> None:
    """Tryton cancels a partly paid invoice and detaches its payment (the customer's payment silently unapplied);
    its pay wizard books any amount in the invoice's currency; and a second application of one payment to one
    invoice was "already applied" whatever its amount."""
    inv = billing_invoice(10000)
    posted = erp.post_invoice(inv)
    pay = Payment(f"pi_{uuid.uuid4().hex[:10]}", "payment", inv.customer_id, "NA", "USD", 10000, "succeeded", NOW, NOW)
    erp.apply_payment(pay, inv.invoice_id, 4000)  # the ERP applied 40.00 of the 100.00 allocated
    with pytest.raises(BusinessRuleError, match="has payments applied; unapply them first"):
        erp.cancel_entry(posted.target_ref, "repost")
    assert [r["state"] for r in tryton_invoices(erp, inv.invoice_id)] == ["posted"]
    rest = erp.apply_payment(pay, inv.invoice_id, 10000)  # the allocation: what is not applied yet is added
    assert not rest.already_done and "60.00 USD" in rest.detail
    assert tryton_invoices(erp, inv.invoice_id)[0]["state"] == "paid"
    assert sorted(e.amount_minor for e in erp.find_by_external_ref(pay.payment_id)) == [4000, 6000]
    assert erp.apply_payment(pay, inv.invoice_id, 10000).already_done
    eur = dataclasses.replace(pay, payment_id=f"pi_{uuid.uuid4().hex[:10]}", currency="EUR")
    other = billing_invoice(5000)
    erp.post_invoice(other)
    with pytest.raises(BusinessRuleError, match="is in EUR, Tryton invoice .* in USD"):
        erp.apply_payment(eur, other.invoice_id, 5000)
    assert erp.find_by_external_ref(eur.payment_id) == []


def test_a_payment_line_removed_in_tryton_is_withdrawn_and_the_payment_reads_unapplied(
    erp: TrytonErp, embedded_store: Store
) -> None:
    """Someone in Tryton removes a payment from an invoice's payments: the pull withdraws the stored application
    (it counted for good, so the payment never read unapplied), and adding it back counts again."""
    migrated(embedded_store)
    billing = dataclasses.replace(billing_invoice(10000), status="open")
    pay = Payment(
        f"pi_{uuid.uuid4().hex[:10]}", "payment", billing.customer_id, "NA", "USD", 4000, "succeeded", NOW, NOW,
        allocations={billing.invoice_id: 4000},
    )  # fmt: skip
    q.write_invoices(embedded_store, [billing])
    q.write_payments(embedded_store, [pay])
    erp.post_invoice(billing)
    line = erp.apply_payment(pay, billing.invoice_id, 4000).target_ref
    reconciler = Reconciler(embedded_store, c.Rules(default_grace_s=0), erp=erp)
    unapplied = c.drift_id(c.PAYMENT_UNAPPLIED, pay.payment_id)

    def state() -> str:
        item = q.get_drift(embedded_store, unapplied)
        return "" if item is None else str(item["State"])

    reconciler.run(full=True)
    assert state() == ""
    (rec,) = erp.rpc.search_read("account.invoice", [["reference", "=", billing.invoice_id]], ["payment_lines"])
    line_id = int(line.rsplit(":", 1)[1])
    assert rec["payment_lines"] == [line_id]
    erp.rpc.model("account.invoice", "write", [rec["id"]], {"payment_lines": [["remove", [line_id]]]})
    reconciler.run()
    assert state() == c.NEW
    stored = embedded_store.query_rows(
        "SELECT Status AS s FROM $db.erp_ledger_entries FINAL WHERE EntryId = {e:String}", {"e": line}
    )
    assert [r["s"] for r in stored] == ["cancelled"]
    erp.rpc.model("account.invoice", "write", [rec["id"]], {"payment_lines": [["add", [line_id]]]})
    reconciler.run()
    assert state() == c.RESOLVED


def test_late_postings_post_and_a_repost_tryton_would_refuse_cancels_nothing(
    tmp_path: Path, embedded_store: Store
) -> None:
    """On a fresh Tryton: an invoice billed days ago posts (its payment term runs from today: from the billing
    date Tryton stopped the post with a warning nobody could confirm); a repost of one dated before an invoice
    Tryton numbered since is refused before anything is cancelled (it was cancelled, then the post refused)."""
    server = start_trytond(tmp_path) if prepared_database(tmp_path) else None
    assert server is not None
    erp = erp_for(server)
    try:
        migrated(embedded_store)
        wrong_day = NOW - dt.timedelta(days=3)
        billing = dataclasses.replace(billing_invoice(7000, day=wrong_day), status="open")
        erp.post_invoice(dataclasses.replace(billing, subtotal_minor=9000, total_minor=9000))  # booked wrong
        late = billing_invoice(2500, day=NOW - dt.timedelta(days=1))
        assert not erp.post_invoice(late).already_done
        (rec,) = erp.rpc.search_read(
            "account.invoice", [["reference", "=", late.invoice_id]], ["state", "invoice_date", "payment_term_date"]
        )
        assert (rec["state"], rec["invoice_date"]) == ("posted", late.issued_at.date())
        q.write_invoices(embedded_store, [billing])
        Reconciler(embedded_store, c.Rules(), erp=erp).run(full=True)
        actions = ActionService(embedded_store, erp)
        waiting = actions.request(c.drift_id(c.AMOUNT_MISMATCH, billing.invoice_id), "otto")
        refused = actions.approve(waiting["action_id"], "alice")
        assert refused["state"] == "failed" and "numbers invoices of a sequence in date order" in refused["last_error"]
        assert [(r["state"], r["total_amount"]) for r in tryton_invoices(erp, billing.invoice_id)] == [
            ("posted", Decimal("90.00"))
        ]  # the wrong posting stands: nothing was cancelled
    finally:
        erp.rpc.close()
        stop_trytond(server)


def test_a_credit_note_of_a_sequence_of_its_own_does_not_stop_a_repost(tmp_path: Path, embedded_store: Store) -> None:
    """Tryton numbers each sequence in date order: with customer credit notes in a sequence of their own, a later
    credit note does not stop the repost of an invoice (the check refused it, leaving the wrong posting)."""
    server = start_trytond(tmp_path) if prepared_database(tmp_path) else None
    assert server is not None
    erp = erp_for(server)
    try:
        migrated(embedded_store)
        (kind,) = erp.rpc.search_read("ir.sequence.type", [["name", "=", "Invoice"]], ["id"])
        (own,) = erp.rpc.model("ir.sequence.strict", "create", [{"name": "Credit notes", "sequence_type": kind["id"]}])
        (row,) = erp.rpc.search_read("account.fiscalyear.invoice_sequence", [], ["id"])
        erp.rpc.model("account.fiscalyear.invoice_sequence", "write", [row["id"]], {"out_credit_note_sequence": own})
        other = billing_invoice(2500, day=NOW - dt.timedelta(days=4))
        erp.post_invoice(other)
        billing = dataclasses.replace(billing_invoice(7000, day=NOW - dt.timedelta(days=3)), status="open")
        erp.post_invoice(dataclasses.replace(billing, subtotal_minor=9000, total_minor=9000))  # booked wrong
        refund = Payment(
            f"re_{uuid.uuid4().hex[:10]}", "refund", other.customer_id, "NA", "USD", 500, "succeeded", NOW, NOW,
            allocations={other.invoice_id: 500},
        )  # fmt: skip
        assert not erp.post_credit_memo(refund).already_done  # dated today, numbered in its own sequence
        q.write_invoices(embedded_store, [billing])
        Reconciler(embedded_store, c.Rules(), erp=erp).run(full=True)
        actions = ActionService(embedded_store, erp)
        waiting = actions.request(c.drift_id(c.AMOUNT_MISMATCH, billing.invoice_id), "otto")
        done = actions.approve(waiting["action_id"], "alice")
        assert done["state"] == "succeeded", done["last_error"]
        states = sorted((r["state"], r["total_amount"]) for r in tryton_invoices(erp, billing.invoice_id))
        assert states == [("cancelled", Decimal("90.00")), ("posted", Decimal("70.00"))]
    finally:
        erp.rpc.close()
        stop_trytond(server)


def test_pull_ledger_entries_pages_through_changes(erp: TrytonErp) -> None:
    page = erp.pull_ledger_entries(None, 1000)
    cursor = page.next_cursor
    while not page.done:
        page = erp.pull_ledger_entries(cursor, 1000)
        cursor = page.next_cursor
    invs = [billing_invoice(100 + i) for i in range(3)]
    for inv in invs:
        erp.post_invoice(inv)
    seen: list[str] = []
    for _ in range(10):
        page = erp.pull_ledger_entries(cursor, 2)
        seen += [e.external_ref for e in page.items if e.entry_type == "invoice"]
        cursor = page.next_cursor
        if page.done:
            break
    assert seen == [i.invoice_id for i in invs]  # oldest change first, each once
    assert erp.pull_ledger_entries(cursor, 2).items == []


def unmappable_posting(erp: TrytonErp) -> tuple[str, int]:
    """A posted customer invoice in a currency Tryton has and ISO 4217 does not (XBT, 8 decimals), made through
    Tryton's RPC as another user of the ERP would. Returns (its reference, its Tryton id)."""
    found = erp.rpc.search_read("currency.currency", [["code", "=", "XBT"]], ["id"])
    if found:
        xbt = int(found[0]["id"])
    else:
        rate = {"date": dt.date(2000, 1, 1), "rate": Decimal("1")}
        currency = {"name": "Bitcoin", "code": "XBT", "symbol": "XBT", "digits": 8, "rounding": Decimal("0.00000001")}
        (xbt,) = erp.rpc.model("currency.currency", "create", [{**currency, "rates": [["create", [rate]]]}])
    doc = billing_invoice(5000)
    refs = erp.refs()
    party, address = erp._party(doc.customer_id)
    values = m.invoice_values(
        doc, reference=doc.invoice_id, party=party, address=address, currency=xbt, receivable=refs["receivable"],
        revenue=refs["revenue"], journal=refs["journal"], payment_term=refs["payment_term"], company=refs["company"],
    )  # fmt: skip
    (tryton_id,) = erp.rpc.model("account.invoice", "create", [values])
    erp.rpc.model("account.invoice", "post", [tryton_id])
    return doc.invoice_id, int(tryton_id)


def test_an_unmappable_posting_is_skipped_by_pulls_and_refuses_writes_for_its_reference(
    erp: TrytonErp, embedded_store: Store
) -> None:
    """One record the tower cannot represent exactly used to fail every run at the pull (the cursor never moved):
    it is now passed over and kept visible, the records after it are stored, and the lookup that decides a write
    for its reference refuses instead of reporting the posting absent (post_invoice reads Tryton's raw record
    and finds it posted)."""
    migrated(embedded_store)
    ref, tryton_id = unmappable_posting(erp)
    good = billing_invoice(4200)
    erp.post_invoice(good)
    reconciler = Reconciler(embedded_store, c.Rules(), erp=erp)
    first = reconciler.run(full=True)
    assert first.pulled["ledger_entries_skipped"] >= 1
    (skip,) = [s for s in skips.list_skips(embedded_store) if s["ref"] == f"tryton:invoice:{tryton_id}"]
    assert skip["connector"] == erp.name and skip["stream"] == "ledger_entries" and not skip["cleared"]
    assert "XBT" in skip["reason"] and skip["times"] == 1
    stored = embedded_store.query_rows(
        "SELECT count() AS n FROM $db.erp_ledger_entries WHERE ExternalRef = {r:String}", {"r": good.invoice_id}
    )
    assert stored[0]["n"] == 1  # changed after the bad record, pulled all the same
    second = reconciler.run(full=True)
    assert "ledger_entries_skipped" not in second.pulled  # the cursor moved past it
    with pytest.raises(BusinessRuleError, match="cannot read"):
        erp.find_by_external_ref(ref)
    assert erp.post_invoice(dataclasses.replace(good, invoice_id=ref)).already_done  # reads Tryton's own record
    assert len(tryton_invoices(erp, ref)) == 1


def test_business_rule_failure_keeps_trytons_message_is_not_retried_and_leaves_nothing(
    erp: TrytonErp, spans: InMemorySpanExporter
) -> None:
    inv = billing_invoice(100, day=dt.datetime(2001, 1, 5, tzinfo=dt.UTC))  # no fiscal period there
    spans.clear()
    with pytest.raises(BusinessRuleError, match="create a period for the date"):
        erp.post_invoice(inv)
    posts = [s for s in spans.get_finished_spans() if s.name == "tryton model.account.invoice.post"]
    assert len(posts) == 1  # not retried
    assert tryton_invoices(erp, inv.invoice_id) == []  # the draft it created was removed


def test_closed_period_is_a_business_rule_failure(erp: TrytonErp) -> None:
    """Close the fiscal year's first (empty, past) period and post into it."""
    periods = erp.rpc.search_read("account.period", [["state", "=", "open"]], ["start_date"],
                                  order=[["start_date", "ASC"]], limit=1)  # fmt: skip
    (period,) = periods
    erp.rpc.model("account.period", "close", [period["id"]])
    try:
        day = dt.datetime.combine(period["start_date"], dt.time(12), dt.UTC)
        with pytest.raises(BusinessRuleError) as info:
            erp.post_invoice(billing_invoice(100, day=day))
        assert "you must reopen the period" in str(info.value)  # Tryton's own message
    finally:
        erp.rpc.model("account.period", "reopen", [period["id"]])


@pytest.mark.parametrize("fault_kind", ["503", "500", "429", "drop", "slow"])
def test_transient_faults_on_reads_are_retried(erp: TrytonErp, trytond_server: Trytond, fault_kind: str) -> None:
    inv = billing_invoice(300)
    erp.post_invoice(inv)
    # a timeout a loaded machine's login (a password hash) still fits in; "slow" answers after it
    with FaultProxy(trytond_server.url, slow_s=3.0) as proxy:
        reader = erp_for(trytond_server, proxy.url, timeout_s=2.0, backoff_s=0.05)
        assert reader.health().ok  # logs in through the proxy
        proxy.plan.extend([fault_kind, fault_kind])  # the next read fails twice, then passes
        (entry,) = reader.find_by_external_ref(inv.invoice_id)
        assert entry.amount_minor == 300 and proxy.seen.count(fault_kind) == 2
        reader.rpc.close()


@pytest.mark.parametrize(
    "fault", ["503@account.invoice.post", "500@account.invoice.create", "504@account.invoice.create",
              "504@account.invoice.post"]
)  # fmt: skip
def test_a_5xx_to_a_write_is_rechecked_applied_or_not(trytond_server: Trytond, fault: str) -> None:
    """A 5xx answer to a write is either Tryton's (it rolled back) or a gateway's that gave up after Tryton
    committed (504 here: the proxy forwards, then answers 504). The connector cannot tell them apart, so it looks
    at the target and finishes from there: one posted invoice either way, never a second draft."""
    with FaultProxy(trytond_server.url) as proxy:
        erp = erp_for(trytond_server, proxy.url, timeout_s=5, backoff_s=0.05)
        erp.recheck_wait_s = 0.05
        inv = billing_invoice(301)
        proxy.plan.append(fault)
        erp.post_invoice(inv)
        assert fault.split("@")[0] in proxy.seen
        assert [r["state"] for r in tryton_invoices(erp, inv.invoice_id)] == ["posted"]
        erp.rpc.close()


def test_a_5xx_to_the_payment_wizard_after_tryton_applied_it_pays_once(trytond_server: Trytond) -> None:
    with FaultProxy(trytond_server.url) as proxy:
        erp = erp_for(trytond_server, proxy.url, timeout_s=5, backoff_s=0.05)
        erp.recheck_wait_s = 0.05
        inv = billing_invoice(650)
        pay = Payment(f"pi_{uuid.uuid4().hex[:10]}", "payment", inv.customer_id, "NA", "USD", 650, "succeeded", NOW,
                      NOW)  # fmt: skip
        erp.post_invoice(inv)
        proxy.plan.append("504@account.invoice.pay.execute")
        erp.apply_payment(pay, inv.invoice_id, 650)
        assert "504" in proxy.seen
        (rec,) = tryton_invoices(erp, inv.invoice_id)
        assert rec["state"] == "paid"
        assert len(erp.find_by_external_ref(pay.payment_id)) == 1
        erp.rpc.close()


@pytest.mark.slow
@pytest.mark.parametrize("step", ["account.invoice.create", "account.invoice.post", "account.invoice.pay.execute"])
def test_a_lost_answer_to_a_write_is_rechecked_not_repeated(trytond_server: Trytond, step: str) -> None:
    """The write reaches Tryton but its answer comes too late: the connector looks again and finishes from what
    Tryton holds — one invoice, one payment, never two."""
    with FaultProxy(trytond_server.url, slow_s=4.0) as proxy:
        # Tryton needs up to ~1.5 s to post on this machine: the timeout must exceed a normal write
        erp = erp_for(trytond_server, proxy.url, timeout_s=3.0, backoff_s=0.05)
        erp.recheck_wait_s = 0.2
        inv = billing_invoice(700)
        pay = Payment(f"pi_{uuid.uuid4().hex[:10]}", "payment", inv.customer_id, "NA", "USD", 700, "succeeded", NOW,
                      NOW)  # fmt: skip
        proxy.plan.append(f"slow@{step}")
        erp.post_invoice(inv)
        erp.apply_payment(pay, inv.invoice_id, 700)
        assert "slow" in proxy.seen
        (rec,) = tryton_invoices(erp, inv.invoice_id)
        assert rec["state"] == "paid"
        assert len(erp.find_by_external_ref(pay.payment_id)) == 1
        erp.rpc.close()


def test_a_write_answer_lost_every_time_surfaces_as_ambiguous(trytond_server: Trytond) -> None:
    with FaultProxy(trytond_server.url, slow_s=1.2) as proxy:
        # a timeout the login (a password hash) fits in on a loaded machine: the faults here are dropped answers
        erp = erp_for(trytond_server, proxy.url, timeout_s=5, backoff_s=0.01)
        erp.recheck_attempts, erp.recheck_wait_s = 2, 0.1
        erp.refs()
        proxy.plan.extend(["drop@account.invoice.create"] * 2)
        with pytest.raises(AmbiguousWriteError, match="may have been applied"):
            erp.post_invoice(billing_invoice(5))
        erp.rpc.close()


def test_a_persistent_outage_ends_as_transient_error(trytond_server: Trytond) -> None:
    with FaultProxy(trytond_server.url) as proxy:
        erp = erp_for(trytond_server, proxy.url, timeout_s=5, backoff_s=0.01)
        erp.refs()
        proxy.plan.extend(["503"] * 10)
        with pytest.raises(TransientError, match="HTTP 503"):
            erp.find_by_external_ref("in_whatever")
        assert proxy.seen.count("503") == erp.rpc.attempts
        erp.rpc.close()


def test_wrong_password_is_a_business_rule_error(trytond_server: Trytond) -> None:
    rpc = TrytonRpc(trytond_server.url, trytond_server.database, "admin", "wrong-password", attempts=1)
    erp = TrytonErp(rpc)
    health = erp.health()
    assert not health.ok and "refused" in health.detail


def foreign_currency(erp: TrytonErp, code: str, digits: int, rate: Decimal) -> None:
    """A currency the USD company invoices in, with ``rate`` units per USD (created through Tryton's RPC)."""
    if erp.rpc.search_read("currency.currency", [["code", "=", code]], ["id"]):
        return
    values = {"name": code, "code": code, "symbol": code, "digits": digits, "rounding": Decimal(1).scaleb(-digits),
              "rates": [["create", [{"date": dt.date(2000, 1, 1), "rate": rate}]]]}  # fmt: skip
    erp.rpc.model("currency.currency", "create", [values])


@pytest.mark.parametrize(("currency", "digits", "rate", "total", "paid"), [
    ("EUR", 2, Decimal("0.9"), 10000, 4000),  # 40.00 EUR is 44.44 USD in the company's books
    ("JPY", 0, Decimal("150"), 15000, 5000),  # 5000 JPY is 33.33 USD: not even a JPY amount
])  # fmt: skip
def test_payments_of_a_foreign_currency_invoice_are_read_in_its_currency(
    erp: TrytonErp, currency: str, digits: int, rate: Decimal, total: int, paid: int
) -> None:
    """A payment on an invoice in another currency than the company's (USD) is read in the invoice's currency,
    and the invoice stays readable, so the next payment is applied."""
    foreign_currency(erp, currency, digits, rate)
    inv = dataclasses.replace(billing_invoice(total), currency=currency)
    erp.post_invoice(inv)
    p1 = Payment(f"pi_{uuid.uuid4().hex[:10]}", "payment", inv.customer_id, "NA", currency, paid, "succeeded", NOW,
                 NOW)  # fmt: skip
    erp.apply_payment(p1, inv.invoice_id, paid)
    (line,) = erp.rpc.search_read(
        "account.move.line", [["move.description", "=", p1.payment_id], ["credit", ">", 0]], ["credit"]
    )
    assert m.to_minor(line["credit"], "USD") != paid  # the books hold the company-currency amount
    (pay,) = erp.find_by_external_ref(p1.payment_id)
    assert (pay.entry_type, pay.amount_minor, pay.currency, pay.applied_to_ref) == (
        "payment",
        paid,
        currency,
        inv.invoice_id,
    )
    (entry,) = erp.find_by_external_ref(inv.invoice_id)
    assert (entry.amount_minor, entry.currency) == (total, currency)
    p2 = dataclasses.replace(p1, payment_id=f"pi_{uuid.uuid4().hex[:10]}", amount_minor=total - paid)
    assert not erp.apply_payment(p2, inv.invoice_id, total - paid).already_done
    assert tryton_invoices(erp, inv.invoice_id)[0]["state"] == "paid"
    (rest,) = erp.find_by_external_ref(p2.payment_id)
    assert (rest.amount_minor, rest.currency) == (total - paid, currency)


def test_postings_are_dated_by_the_companys_calendar_at_any_hour(tmp_path: Path) -> None:
    """Tryton dates documents and checks them against "today" in the company's time zone; the connector dated them
    by the UTC calendar. While the company's day differed from UTC's, a posting was refused as dated in the future
    (west of UTC) or with a payment date in the past (east of it), and the correction dead-lettered (a time review
    reproduced both, Los Angeles and Tokyo). The zone is chosen so that its day differs from UTC's right now."""
    from zoneinfo import ZoneInfo

    now = dt.datetime.now(dt.UTC)
    zone = "Pacific/Kiritimati" if now.hour >= 10 else "Pacific/Pago_Pago"  # UTC+14 / UTC-11
    assert now.astimezone(ZoneInfo(zone)).date() != now.date()
    server = start_trytond(tmp_path) if prepared_database(tmp_path) else None
    assert server is not None
    admin = erp_for(server)
    try:
        admin.rpc.model("company.company", "write", [admin.refs()["company"]], {"timezone": zone})
        erp = erp_for(server)  # a connector that reads the company as it is now
        assert erp.zone() == ZoneInfo(zone)
        inv = billing_invoice(4200, day=now)
        erp.check_postable(inv)
        assert not erp.post_invoice(inv).already_done
        (rec,) = erp.rpc.search_read("account.invoice", [["reference", "=", inv.invoice_id]], ["state", "invoice_date"])
        assert (rec["state"], rec["invoice_date"]) == ("posted", now.astimezone(ZoneInfo(zone)).date())
        paid = Payment(f"pi_{uuid.uuid4().hex[:10]}", "payment", inv.customer_id, "NA", "USD", 1200, "succeeded",
                       now, now)  # fmt: skip
        assert not erp.apply_payment(paid, inv.invoice_id, 1200).already_done
        refund = Payment(f"re_{uuid.uuid4().hex[:10]}", "refund", inv.customer_id, "NA", "USD", 500, "succeeded",
                         now, now, allocations={inv.invoice_id: 500})  # fmt: skip
        assert not erp.post_credit_memo(refund).already_done
        kinds = sorted(e.entry_type for e in erp.find_by_external_ref(paid.payment_id))
        assert kinds == ["payment"] and erp.find_by_external_ref(refund.payment_id)
        erp.rpc.close()
    finally:
        admin.rpc.close()
        stop_trytond(server)
