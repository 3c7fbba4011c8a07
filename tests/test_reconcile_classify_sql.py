"""The SQL classification (tower_core/store/reconcile.py) agrees with the pure rules (reconciler/classify.py)
on thousands of generated fact rows: same class, reason, amount, primary key, drift id and field-level diff."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest

from reconciler import classify as c
from reconciler.runner import Reconciler
from tests.conftest import migrated
from tower_core.store import Store
from tower_core.store import reconcile as q

AS_OF = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
RULES = c.Rules(
    tolerances={"USD": c.Tolerance(2, 0), "EUR": c.Tolerance(0, 50)},
    default_tolerance=c.Tolerance(1, 0),
    grace_s={"payment_unapplied": 86_400, "missing_in_erp": 3_600},
    default_grace_s=7_200,
)
CURRENCIES = ("USD", "EUR", "JPY", "GBP")


def pick(rnd: random.Random, *options: Any) -> Any:
    return rnd.choice(options)


def moment(rnd: random.Random) -> dt.datetime:
    """Around the grace periods' edges, long ago, or unset."""
    offset = pick(rnd, 10, 30 * 60, 59 * 60, 61 * 60, 2 * 3600 - 1, 2 * 3600 + 1, 86_399, 86_401, 40 * 86_400)
    return pick(rnd, AS_OF - dt.timedelta(seconds=offset), AS_OF - dt.timedelta(seconds=offset), EPOCH)


def invoice_row(rnd: random.Random, i: int) -> dict[str, Any]:
    total = pick(rnd, 0, 1, 999, 12_000, 1_000_000)
    tax = pick(rnd, 0, 2_000, 10)
    cur = pick(rnd, *CURRENCIES)
    issued = moment(rnd)
    issued = issued if issued != EPOCH else AS_OF - dt.timedelta(days=3)
    e_n = pick(rnd, 0, 1, 1, 1, 2)
    e_amount = pick(rnd, total, total, total + 1, total + 2, total - 3, total - tax, total * 2, total + 51)
    alloc = pick(rnd, 0, 0, total, total // 2)
    return {
        "RunId": "eq",
        "key": f"in_{i:06d}",
        "b_n": pick(rnd, 1, 1, 1, 0),
        "b_customer": pick(rnd, "cus_1", ""),
        "b_region": pick(rnd, "EU", "NA"),
        "b_currency": cur,
        "b_total": total,
        "b_tax": tax,
        "b_subtotal": pick(rnd, total - tax, total),
        "b_status": pick(rnd, "open", "paid", "paid", "void", "draft", "uncollectible"),
        "b_issued": issued,
        "b_finalized": pick(rnd, issued, moment(rnd), EPOCH),
        "b_day": issued.date(),
        "e_n": e_n,
        "e_currency": pick(rnd, cur, cur, cur, "EUR", "") if e_n else "",
        "e_amount": e_amount if e_n else 0,
        "e_sum": (e_amount * e_n) if e_n else 0,
        "e_status": pick(rnd, "open", "paid") if e_n else "",
        "e_entry": f"le_{i:06d}" if e_n else pick(rnd, "", f"le_d{i}"),
        "e_region": pick(rnd, "EU", "NA", "") if e_n else "",  # "": an ERP that records no region
        "e_party": pick(rnd, "cus_1", "cus_2", ""),
        "e_day": issued.date(),
        "rejected": pick(rnd, "", "", "", "period 2025-12 is closed"),
        "e_applied": pick(rnd, alloc, alloc, 0, alloc - 1, alloc + 500),
        "b_alloc": alloc,
        "b_alloc_unposted": pick(rnd, 0, 0, 0, alloc),
        "b_credit_unposted": pick(rnd, 0, 0, 0, 1),
    }


def payment_row(rnd: random.Random, i: int) -> dict[str, Any]:
    e_n = pick(rnd, 0, 0, 1, 2)
    amount = pick(rnd, 0, 500, 12_000, -500)
    currency = pick(rnd, *CURRENCIES)
    return {
        "RunId": "eq",
        "key": f"py_{i:06d}",
        "p_n": pick(rnd, 1, 1, 1, 0),
        "p_kind": pick(rnd, "payment", "payment", "refund", "credit_note"),
        "p_status": pick(rnd, "succeeded", "succeeded", "failed", "pending"),
        "p_amount": amount,
        "p_currency": currency,
        "p_region": pick(rnd, "EU", "APAC", ""),
        "p_customer": pick(rnd, "cus_1", ""),
        "p_occurred": moment(rnd),
        "p_alloc_n": pick(rnd, 0, 1, 2),
        "p_alloc_refs": pick(rnd, "", "in_1", "in_1,in_2"),
        "e_n": e_n,
        "e_memo_n": pick(rnd, 0, e_n),
        "e_applied_n": pick(rnd, 0, e_n),
        "e_sum": pick(rnd, 0, 500, 12_000) if e_n else 0,
        # a credit memo of the refund's amount (either sign), off by a tolerated cent, or another amount
        "e_memo_sum": pick(rnd, abs(amount), abs(amount) + 1, abs(amount) + 3, 12_000) if e_n else 0,
        "e_type": pick(rnd, "payment", "credit_memo") if e_n else "",
        "e_status": "posted" if e_n else "",
        "e_currency": pick(rnd, "USD", "") if e_n else "",
        "e_currencies": pick(rnd, currency, currency, currency, "USD", f"{currency},USD", "") if e_n else "",
        "e_region": pick(rnd, "EU", "NA", ""),
        "e_party": pick(rnd, "cus_1", ""),
        "e_entry": f"le_p{i:06d}" if e_n else "",
        "e_day": (AS_OF - dt.timedelta(days=2)).date(),
        "e_applied_refs": pick(rnd, "", "in_1") if e_n else "",
        "sum_match": pick(rnd, 0, 1),
    }


@pytest.fixture
def store(embedded_store: Store) -> Store:
    migrated(embedded_store)
    return embedded_store


def compare(sql_rows: list[dict[str, Any]], facts: list[dict[str, Any]], classify: Any) -> int:
    by_key = {r["key"]: r for r in sql_rows}
    flagged = 0
    for f in facts:
        got = by_key[f["key"]]
        want = classify(f, RULES, AS_OF)
        if want is None:
            assert got["cls"] == "", (f, got)
            continue
        flagged += 1
        assert (got["cls"], got["reason"]) == (want.cls, want.reason), (f, got)
        assert got["amount"] == want.amount_minor, (f, got)
        assert got["pk"] == want.primary_key and got["drift_id"] == want.drift_id, (f, got)
        assert dict(got["bv"]) == want.billing and dict(got["ev"]) == want.erp, (f, got)
        assert list(got["diff"]) == want.diff_fields, (f, got)
        assert got["system"] == want.system and got["reg"] == want.region and got["cur"] == want.currency
        assert got["item_day"] == want.day and got["customer"] == want.customer_id
    return flagged


def test_invoice_classification_sql_matches_the_pure_rules(store: Store) -> None:
    rnd = random.Random(5)
    facts = [invoice_row(rnd, i) for i in range(3000)]
    q.insert_facts_rows(store, "invoice", facts)
    params = Reconciler(store, RULES).rule_params(AS_OF)
    rows = q.classified_rows(store, "eq", "invoice", params)
    assert len(rows) == len(facts)
    flagged = compare(rows, facts, c.classify_invoice)
    classes = {r["cls"] for r in rows}
    assert classes >= {
        c.MISSING_IN_ERP,
        c.MISSING_IN_BILLING,
        c.STALE_SYNC,
        c.DUPLICATE_POSTING,
        c.CURRENCY_MISMATCH,
        c.AMOUNT_MISMATCH,
        c.UNDER_APPLIED,
        c.OVER_APPLIED,
        c.STATUS_MISMATCH,
        c.REGION_MISMATCH,
        "",
    }, "the generated facts exercise every invoice class"
    assert 0 < flagged < len(facts)


def test_party_classification_sql_matches_the_pure_rules(store: Store) -> None:
    """customer_unmatched: the SQL's per-customer aggregation of the invoice facts and the pure one agree."""
    rnd = random.Random(7)
    facts = []
    for i in range(2000):
        row = invoice_row(rnd, i)
        row["b_customer"] = pick(rnd, "", *(f"cus_{n}" for n in range(40)))
        row["e_party"] = pick(rnd, row["b_customer"], row["b_customer"], row["b_customer"], "", "SUSPENSE", "cus_0")
        facts.append(row)
    q.insert_facts_rows(store, "invoice", facts)
    params = Reconciler(store, RULES).rule_params(AS_OF)
    rows = q.classified_rows(store, "eq", "party", params)
    customers = c.party_facts(facts)
    assert [r["key"] for r in rows] == [f["key"] for f in customers] and 10 < len(rows) <= 40
    compare(rows, customers, c.classify_party)
    assert {r["cls"] for r in rows} == {c.CUSTOMER_UNMATCHED}
    assert any("," in dict(r["ev"])["customer_id"] for r in rows)  # several parties seen for one customer


def test_payment_classification_sql_matches_the_pure_rules(store: Store) -> None:
    rnd = random.Random(6)
    facts = [payment_row(rnd, i) for i in range(2000)]
    q.insert_facts_rows(store, "payment", facts)
    params = Reconciler(store, RULES).rule_params(AS_OF)
    rows = q.classified_rows(store, "eq", "payment", params)
    compare(rows, facts, c.classify_payment)
    assert {r["cls"] for r in rows} >= {
        c.PAYMENT_UNAPPLIED,
        c.ORPHAN_PAYMENT,
        c.REFUND_UNPOSTED,
        c.STALE_SYNC,
        c.MISSING_IN_BILLING,
        c.CURRENCY_MISMATCH,
        c.AMOUNT_MISMATCH,
        "",
    }
    assert {r["reason"] for r in rows} >= {
        "application_currency",
        "application_differs",
        "booked_unapplied",
        "credit_memo_currency",
        "credit_memo_differs",
        "failed_in_billing",
        "not_in_billing",
    }


def test_amounts_near_the_int64_limit_classify_as_the_pure_rules_do(store: Store) -> None:
    """The relative tolerance multiplies a difference by 10,000 basis points: the SQL does it in Int128, so an
    amount past ~9.2e14 minor units (where Int64 wraps) is judged as the pure rules judge it."""
    rnd = random.Random(8)
    invoices, payments = [], []
    for i in range(600):
        big = pick(rnd, 10**15, 3 * 10**17, 4 * 10**18)
        row = invoice_row(rnd, i)
        row.update(b_currency="EUR", b_total=big, b_tax=0, b_subtotal=big, e_n=1, e_currency="EUR")
        # 50 bp of tolerance: 0.4% off is within it, 0.6% is not
        row["e_amount"] = row["e_sum"] = pick(rnd, big, big - big // 250, big + big // 250, big - big // 160)
        row["b_alloc"] = row["e_applied"] = 0
        invoices.append(row)
        pay = payment_row(rnd, i)
        pay.update(p_kind="refund", p_status="succeeded", p_amount=-big, p_currency="EUR", e_n=1, e_memo_n=1)
        pay.update(e_type="credit_memo", e_currencies="EUR", e_memo_sum=pick(rnd, big, big + big // 250, big // 2))
        payments.append(pay)
    q.insert_facts_rows(store, "invoice", invoices)
    q.insert_facts_rows(store, "payment", payments)
    params = Reconciler(store, RULES).rule_params(AS_OF)
    compare(q.classified_rows(store, "eq", "invoice", params), invoices, c.classify_invoice)
    flagged = compare(q.classified_rows(store, "eq", "payment", params), payments, c.classify_payment)
    assert 0 < flagged < len(payments)
