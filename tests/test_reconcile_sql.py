"""The reconciler's SQL on real chDB with hand-built state: classes and diffs, the queue's lifecycle over
runs, incremental scope, region filter, 1:N matching, grace periods and the statement."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from reconciler import classify as c
from reconciler.actions import ActionError, ActionService
from reconciler.runner import Reconciler
from tests.conftest import migrated
from tower_core.models import CdpProfile, Customer, Invoice, LedgerEntry, Payment
from tower_core.store import Store, migrate
from tower_core.store import reconcile as q

T = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)
AS_OF = T + dt.timedelta(days=5)
RULES = c.Rules(grace_s={"*": 7200}, default_grace_s=7200, tolerances={"USD": c.Tolerance(1, 0)})


def inv(iid: str, total: int = 1_100, status: str = "open", region: str = "EU", **kw: object) -> Invoice:
    at = kw.pop("at", T)
    cur = kw.pop("cur", "USD")
    return Invoice(iid, "cus_1", region, cur, total - 100, 100, total, status, at, at, finalized_at=at, **kw)  # type: ignore[arg-type]


def led(eid: str, typ: str, ref: str, amount: int, status: str = "open", applied: str = "", **kw: str) -> LedgerEntry:
    region, cur = kw.get("region", "EU"), kw.get("cur", "USD")
    return LedgerEntry(
        eid,
        typ,
        ref,
        "cus_1",
        region,
        cur,
        amount,
        status,
        T,
        T,
        applied_to_ref=applied,
        period_date=T.date(),  # type: ignore[arg-type]
    )


def pay(
    pid: str, amount: int, alloc: dict[str, int], kind: str = "payment", region: str = "EU", cur: str = "USD"
) -> Payment:
    return Payment(pid, kind, "cus_1", region, cur, amount, "succeeded", T, T, allocations=alloc)  # type: ignore[arg-type]


@pytest.fixture
def store(embedded_store: Store) -> Store:
    migrated(embedded_store)
    return embedded_store


def items(store: Store) -> dict[tuple[str, str], dict]:
    return {(i["class"], i["primary_key"]): i for i in q.all_open_items(store)}


def seed_every_class(store: Store) -> None:
    q.write_invoices(
        store,
        [
            inv("in_ok"),
            inv("in_missing"),
            inv("in_amt"),
            inv("in_tol"),
            inv("in_dup"),
            inv("in_cur"),
            inv("in_status", status="paid", amount_paid_minor=1_100),
            inv("in_unap", status="paid", amount_paid_minor=1_100),
            inv("in_under", amount_paid_minor=600),
            inv("in_void", status="void"),
            inv("in_fresh", at=AS_OF - dt.timedelta(minutes=20)),
        ],
    )
    q.write_ledger(
        store,
        [
            led("le_ok", "invoice", "in_ok", 1_100),
            led("le_amt", "invoice", "in_amt", 1_500),
            led("le_tol", "invoice", "in_tol", 1_101),
            led("le_dup1", "invoice", "in_dup", 1_100),
            led("le_dup2", "invoice", "in_dup", 1_100),
            led("le_cur", "invoice", "in_cur", 1_100, cur="EUR"),
            led("le_status", "invoice", "in_status", 1_100),
            led("le_status_p", "payment", "py_status", 1_100, "posted", "in_status"),
            led("le_unap", "invoice", "in_unap", 1_100),
            led("le_under", "invoice", "in_under", 1_100),
            led("le_under_p", "payment", "py_under", 400, "posted", "in_under"),
            led("le_void", "invoice", "in_void", 1_100),
            led("le_ghost", "invoice", "in_ghost", 700),
        ],
    )
    q.write_payments(
        store,
        [
            pay("py_status", 1_100, {"in_status": 1_100}),
            pay("py_unap", 1_100, {"in_unap": 1_100}),
            pay("py_under", 600, {"in_under": 600}),
            pay("py_orphan", 777, {}),
            pay("re_1", 300, {"in_ok": 300}, kind="refund"),
        ],
    )


EXPECTED = {
    (c.MISSING_IN_ERP, "in_missing"),
    (c.AMOUNT_MISMATCH, "in_amt"),
    (c.DUPLICATE_POSTING, "in_dup"),
    (c.CURRENCY_MISMATCH, "in_cur"),
    (c.STATUS_MISMATCH, "in_status"),
    (c.STATUS_MISMATCH, "in_void"),
    (c.PAYMENT_UNAPPLIED, "py_unap"),
    (c.UNDER_APPLIED, "in_under"),
    (c.ORPHAN_PAYMENT, "py_orphan"),
    (c.REFUND_UNPOSTED, "re_1"),
    (c.MISSING_IN_BILLING, "le_ghost"),
    (c.STALE_SYNC, "in_fresh"),
}


def test_every_class_with_its_diff_and_a_zero_residual(store: Store) -> None:
    seed_every_class(store)
    result = Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == EXPECTED
    assert all(i["state"] == c.NEW for i in found.values())
    assert result.new == len(EXPECTED) and result.residual_minor == 0
    amt = q.get_drift(store, found[(c.AMOUNT_MISMATCH, "in_amt")]["drift_id"])
    assert amt is not None
    assert dict(amt["BillingValues"])["total_minor"] == "1100" and dict(amt["ErpValues"])["total_minor"] == "1500"
    assert list(amt["DiffFields"]) == ["total_minor"] and amt["AmountMinor"] == -400
    assert amt["FirstSeen"].replace(tzinfo=dt.UTC) == AS_OF
    history = q.audit_for(store, "drift_item", amt["DriftId"])
    assert [h["action"] for h in history] == ["drift.new"] and history[0]["after"]["state"] == "new"

    rows, _ = q.list_statements(store, run_id=result.run_id)
    assert {r["day"] for r in rows} == {T.date(), (AS_OF - dt.timedelta(minutes=20)).date()}
    assert all(r["residual_minor"] == 0 for r in rows)
    cells = {(r["region"], r["currency"]): r for r in q.statement_totals(store, result.run_id)}
    usd = cells[("EU", "USD")]
    # billing: 10 USD invoices of 1,100 (the void one excluded); ERP: every live USD posting
    assert usd["billing_total_minor"] == 10 * 1_100
    assert usd["erp_total_minor"] == 1_100 * 7 + 1_500 + 1_101 + 700  # ok, dup x2, status, unap, under, void
    assert usd["explained"] == {
        c.MISSING_IN_ERP: 1_100,
        c.AMOUNT_MISMATCH: -400,
        c.TOLERANCE: -1,
        c.DUPLICATE_POSTING: -1_100,
        c.CURRENCY_MISMATCH: 1_100,
        c.STATUS_MISMATCH: -1_100,
        c.MISSING_IN_BILLING: -700,
        c.STALE_SYNC: 1_100,
    }
    assert usd["residual_minor"] == 0
    assert cells[("EU", "EUR")]["explained"] == {c.CURRENCY_MISMATCH: -1_100}


def test_a_long_audit_trail_keeps_how_it_began_and_how_it_ended(store: Store) -> None:
    """An action deferred through a long outage gathers hundreds of records: the first 200 hid its end."""
    store.command(
        "INSERT INTO $db.audit_log (AuditId, EventTime, Actor, Action, ObjectType, ObjectId, Before, After, Note, "
        "Outcome) SELECT concat('a', toString(number)), toDateTime64('2026-01-01 00:00:00', 3) + toIntervalSecond("
        "number), if(number = 0, 'otto', 'reconciler'), multiIf(number = 0, 'action.request', number = 299, "
        "'action.succeed', 'action.defer'), 'action', 'act_1', '', '', '', 'ok' FROM numbers(300)"
    )
    trail = q.audit_for(store, "action", "act_1")
    assert len(trail) == 200 and set(trail[0]) == {
        "audit_id",
        "at",
        "actor",
        "action",
        "before",
        "after",
        "note",
        "outcome",
    }
    assert (trail[0]["actor"], trail[0]["action"]) == ("otto", "action.request")
    assert trail[-1]["action"] == "action.succeed" and [t["at"] for t in trail] == sorted(t["at"] for t in trail)
    assert len(q.audit_for(store, "action", "act_1", limit=1000)) == 300


def test_unclassified_difference_leaves_a_residual(store: Store) -> None:
    """A difference nothing explains shows up as residual, not as 0: here a posting in EU of an invoice billed in
    NA, which an EU run does not compare (the key is NA's) and no run has classified yet."""
    q.write_invoices(store, [inv("in_1", region="NA")])
    q.write_ledger(store, [led("le_1", "invoice", "in_1", 1_100, region="EU")])
    r = Reconciler(store, RULES)
    result = r.run(full=True, region="EU", as_of=AS_OF)
    assert items(store) == {}
    assert result.residual_minor == 1_100
    rows, _ = q.list_statements(store, run_id=result.run_id, only_residual=True)
    assert {(r["region"], r["residual_minor"]) for r in rows} == {("EU", -1_100)}
    assert r.run(full=True, as_of=AS_OF).residual_minor == 0  # the whole estate's run classifies it
    assert set(items(store)) == {(c.REGION_MISMATCH, "in_1")}


def test_lifecycle_new_persisting_resolved_and_operator_states(store: Store) -> None:
    seed_every_class(store)
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    second = r.run(as_of=AS_OF)
    assert second.mode == "incremental"
    found = items(store)
    assert {i["state"] for i in found.values()} == {c.PERSISTING}
    # a person acknowledges one item; the ERP gets the missing posting of another
    ack = found[(c.AMOUNT_MISMATCH, "in_amt")]
    row = q.get_drift(store, ack["drift_id"])
    assert row is not None
    row["State"] = c.ACKNOWLEDGED
    q.write_items(store, [row])
    q.write_ledger(store, [led("le_missing", "invoice", "in_missing", 1_100)])
    third = r.run(as_of=AS_OF)
    found = items(store)
    assert (c.MISSING_IN_ERP, "in_missing") not in found
    assert found[(c.AMOUNT_MISMATCH, "in_amt")]["state"] == c.ACKNOWLEDGED  # re-detection keeps the person's state
    assert third.resolved == 1 and third.residual_minor == 0
    gone = q.get_drift(store, c.drift_id(c.MISSING_IN_ERP, "in_missing"))
    assert gone is not None and gone["State"] == c.RESOLVED and gone["ResolvedAt"].replace(tzinfo=dt.UTC) == AS_OF
    actions = [h["action"] for h in q.audit_for(store, "drift_item", gone["DriftId"])]
    assert actions == ["drift.new", "drift.persisting", "drift.resolved"]
    # the acknowledged item resolves too once its drift is gone
    q.write_ledger(store, [led("le_amt", "invoice", "in_amt", 1_100)])
    r.run(as_of=AS_OF)
    assert (c.AMOUNT_MISMATCH, "in_amt") not in items(store)
    # and comes back as new if it drifts again
    q.write_ledger(store, [led("le_amt", "invoice", "in_amt", 1_900)])
    r.run(as_of=AS_OF)
    assert items(store)[(c.AMOUNT_MISMATCH, "in_amt")]["state"] == c.NEW


def test_incremental_compares_only_keys_changed_since_the_last_run(store: Store) -> None:
    q.write_invoices(store, [inv("in_1")])
    q.write_ledger(store, [led("le_1", "invoice", "in_1", 1_100)])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    # a drifting invoice whose row claims it was ingested long ago: invisible to an incremental run
    store.command(
        "INSERT INTO $db.billing_invoices (InvoiceId, CustomerId, Region, Currency, TotalMinor, Status, IssuedAt, "
        "FinalizedAt, Version, IngestedAt) VALUES ('in_old', 'cus_1', 'EU', 'USD', 500, 'open', {t:DateTime64(3)}, "
        "{t:DateTime64(3)}, 1, '2020-01-01 00:00:00')",
        {"t": T},
    )
    q.write_invoices(store, [inv("in_new")])  # ingested now
    inc = r.run(as_of=AS_OF)
    # in_new, plus in_1 when it was written inside the watermark's few seconds of overlap
    assert inc.mode == "incremental" and inc.keys_compared in (1, 2)
    assert set(items(store)) == {(c.MISSING_IN_ERP, "in_new")}
    full = r.run(full=True, as_of=AS_OF)
    assert full.mode == "full"
    assert set(items(store)) == {(c.MISSING_IN_ERP, "in_new"), (c.MISSING_IN_ERP, "in_old")}


def ingested_long_ago(store: Store) -> None:
    """Every state row as if ingested in 2020, each table merged to its latest versions: the next incremental run
    sees only what is written after this."""
    for table in ("billing_invoices", "billing_payments", "erp_ledger_entries"):
        store.command(
            f"INSERT INTO $db.{table} SELECT * REPLACE (toDateTime64('2020-01-01 00:00:00', 6) AS IngestedAt) "
            f"FROM $db.{table}"
        )
        store.command(f"OPTIMIZE TABLE $db.{table} FINAL")


def later(row: object, seconds: int = 60) -> object:
    return dataclasses.replace(row, updated_at=row.updated_at + dt.timedelta(seconds=seconds))  # type: ignore[attr-defined,type-var]


@pytest.mark.parametrize("merged", [False, True], ids=["old-version-stored", "old-version-merged-away"])
def test_incremental_compares_the_keys_a_changed_row_left_behind(store: Store, merged: bool) -> None:
    """A change can move a row from one key to another: the old key must be compared again too, whether the
    row's old version is still stored or a merge folded it away (then the other side or an open item names it)."""
    q.write_invoices(store, [inv("in_a", status="paid", amount_paid_minor=1_100), inv("in_b"), inv("in_c")])
    q.write_ledger(
        store,
        [
            led("le_a", "invoice", "in_a", 1_100, "paid"),
            led("le_b", "invoice", "in_b", 1_100),
            led("le_x", "invoice", "in_typo", 1_100),
            led("le_p", "payment", "py_1", 1_100, "posted", "in_a"),
        ],
    )
    q.write_payments(store, [pay("py_1", 1_100, {"in_a": 1_100})])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.MISSING_IN_BILLING, "le_x"), (c.MISSING_IN_ERP, "in_c")}
    ingested_long_ago(store)
    # the ERP fixes a posting's reference (in_typo -> in_c); billing moves the payment from in_a to in_b while
    # the ERP still applies it to in_a
    q.write_ledger(store, [later(led("le_x", "invoice", "in_c", 1_100))])  # type: ignore[list-item]
    q.write_payments(store, [later(pay("py_1", 1_100, {"in_b": 1_100}))])  # type: ignore[list-item]
    if merged:
        for table in ("billing_payments", "erp_ledger_entries"):
            store.command(f"OPTIMIZE TABLE $db.{table} FINAL")
    inc = r.run(as_of=AS_OF)
    assert inc.mode == "incremental"
    found = set(items(store))
    # in_c is posted now and le_x no longer stray; in_a keeps an application billing moved away
    assert (c.OVER_APPLIED, "in_a") in found
    assert not found & {(c.MISSING_IN_BILLING, "le_x"), (c.MISSING_IN_ERP, "in_c")}
    full = r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == found and full.new == 0 and full.resolved == 0
    assert inc.residual_minor == full.residual_minor


def test_incremental_rematches_an_unallocated_payment_when_its_customer_gets_an_invoice(store: Store) -> None:
    """The N:1 match of an unallocated payment depends on its customer's open invoices, not on its own row."""
    q.write_payments(store, [pay("py_x", 1_100, {})])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.ORPHAN_PAYMENT, "py_x")}
    ingested_long_ago(store)
    q.write_invoices(store, [inv("in_new", at=T + dt.timedelta(days=1))])  # the same amount, open
    q.write_ledger(store, [led("le_new", "invoice", "in_new", 1_100)])
    r.run(as_of=AS_OF)
    assert set(items(store)) == {(c.PAYMENT_UNAPPLIED, "py_x")}
    r.run(full=True, as_of=AS_OF)
    item = items(store)[(c.PAYMENT_UNAPPLIED, "py_x")]
    assert item["reason_code"] == "matched_not_applied"
    # the tower does not choose invoices for an unallocated payment: no action that could only fail
    actions = ActionService(store, None, auto_enabled=True)
    with pytest.raises(ActionError) as refused:
        actions.request(item["drift_id"], "alice")
    assert refused.value.status == 422 and "allocate it in billing" in str(refused.value)
    assert actions.auto_correct("run") == 0 and q.list_actions(store)[1] == 0


def test_incremental_finds_the_orphan_left_when_the_invoice_that_matched_a_payment_is_paid_otherwise(
    store: Store,
) -> None:
    """py_1 (unallocated, recorded but not applied by the ERP) is clean while the customer's open in_2 has its
    amount; once another payment pays in_2, py_1 matches nothing: the incremental run must see it as the full
    run does, though py_1 itself did not change and had no open item."""
    q.write_invoices(store, [inv("in_2", 700)])
    q.write_ledger(store, [led("le_2", "invoice", "in_2", 700), led("le_p1", "payment", "py_1", 700, "posted")])
    q.write_payments(store, [pay("py_1", 700, {})])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert items(store) == {}
    ingested_long_ago(store)
    q.write_invoices(store, [later(inv("in_2", 700, status="paid", amount_paid_minor=700))])  # type: ignore[list-item]
    q.write_ledger(
        store,
        [later(led("le_2", "invoice", "in_2", 700, "paid")), led("le_p9", "payment", "py_9", 700, "posted", "in_2")],
    )  # type: ignore[list-item]
    q.write_payments(store, [pay("py_9", 700, {"in_2": 700})])
    r.run(as_of=AS_OF)
    assert set(items(store)) == {(c.ORPHAN_PAYMENT, "py_1")}
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.ORPHAN_PAYMENT, "py_1")}


def test_a_duplicate_posted_on_another_day_is_explained_in_each_day_of_the_statement(store: Store) -> None:
    q.write_invoices(store, [inv("in_dup")])
    next_day = dataclasses.replace(
        led("le_dup2", "invoice", "in_dup", 1_100), period_date=(T + dt.timedelta(days=1)).date()
    )
    q.write_ledger(store, [led("le_dup1", "invoice", "in_dup", 1_100), next_day])
    run = Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.DUPLICATE_POSTING, "in_dup")}
    rows = {r["day"]: r for r in q.list_statements(store, run_id=run.run_id)[0]}
    day1, day2 = T.date(), (T + dt.timedelta(days=1)).date()
    assert (rows[day1]["billing_total_minor"], rows[day1]["erp_total_minor"]) == (1_100, 1_100)
    assert (rows[day2]["billing_total_minor"], rows[day2]["erp_total_minor"]) == (0, 1_100)
    assert dict(rows[day2]["explained"]) == {c.DUPLICATE_POSTING: -1_100}
    assert run.residual_minor == 0 and all(r["residual_minor"] == 0 for r in rows.values())


def test_region_filter(store: Store) -> None:
    q.write_invoices(store, [inv("in_eu"), inv("in_na", region="NA")])
    r = Reconciler(store, RULES)
    run = r.run(full=True, region="NA", as_of=AS_OF)
    assert set(items(store)) == {(c.MISSING_IN_ERP, "in_na")}
    rows, _ = q.list_statements(store, run_id=run.run_id)
    assert {row["region"] for row in rows} == {"NA"}
    r.run(full=True, as_of=AS_OF)
    q.write_ledger(store, [led("le_eu", "invoice", "in_eu", 1_100)])
    r.run(full=True, region="NA", as_of=AS_OF)  # compares NA only: the EU item is not resolved by it
    assert (c.MISSING_IN_ERP, "in_eu") in items(store)
    r.run(full=True, region="EU", as_of=AS_OF)
    assert set(items(store)) == {(c.MISSING_IN_ERP, "in_na")}


def test_one_payment_for_several_invoices_and_matching_by_sums(store: Store) -> None:
    q.write_invoices(
        store,
        [
            inv("in_a", status="paid", amount_paid_minor=1_100),
            inv("in_b", status="paid", amount_paid_minor=1_100),
            inv("in_c", at=T + dt.timedelta(days=1)),
            inv("in_d", at=T + dt.timedelta(days=2)),
        ],
    )
    q.write_ledger(
        store,
        [
            led("le_a", "invoice", "in_a", 1_100, "paid"),
            led("le_b", "invoice", "in_b", 1_100, "paid"),
            led("le_c", "invoice", "in_c", 1_100),
            led("le_d", "invoice", "in_d", 1_100),
            led("le_pa", "payment", "py_ab", 1_100, "posted", "in_a"),  # 1:N by external id
            led("le_pb", "payment", "py_ab", 1_100, "posted", "in_b"),
        ],
    )
    q.write_payments(
        store,
        [
            pay("py_ab", 2_200, {"in_a": 1_100, "in_b": 1_100}),
            pay("py_cd", 2_200, {}),  # unallocated; the customer's open invoices c + d sum to it (N:1)
            pay("py_x", 1_234, {}),  # unallocated, matches nothing: an orphan
            pay("py_c_or_d", 1_100, {}),  # equal to c and to d: which one it pays is not guessed
        ],
    )
    Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == {(c.PAYMENT_UNAPPLIED, "py_cd"), (c.ORPHAN_PAYMENT, "py_x"), (c.ORPHAN_PAYMENT, "py_c_or_d")}
    assert found[(c.PAYMENT_UNAPPLIED, "py_cd")]["reason_code"] == "matched_not_applied"
    assert "several equal it" in c.REASONS[found[(c.ORPHAN_PAYMENT, "py_c_or_d")]["reason_code"]]


def test_grace_period_stale_sync_becomes_missing_in_erp(store: Store) -> None:
    q.write_invoices(store, [inv("in_1", at=AS_OF - dt.timedelta(minutes=30))])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.STALE_SYNC, "in_1")}
    r.run(as_of=AS_OF + dt.timedelta(hours=3))  # nothing changed, but the open item's key is compared again
    assert set(items(store)) == {(c.MISSING_IN_ERP, "in_1")}
    stale = q.get_drift(store, c.drift_id(c.STALE_SYNC, "in_1"))
    assert stale is not None and stale["State"] == c.RESOLVED


def test_customer_missing_in_billing(store: Store) -> None:
    store.command(
        "INSERT INTO $db.cdp_profiles (CdpUserId, CustomerId, Region, UpdatedAt, Version) VALUES "
        "('usr_1', 'cus_1', 'EU', {t:DateTime64(3)}, 1), ('usr_2', 'cus_2', 'EU', {t:DateTime64(3)}, 1)",
        {"t": T},
    )
    store.command(
        "INSERT INTO $db.billing_customers (CustomerId, CdpUserId, Region, UpdatedAt, Version) VALUES "
        "('cus_1', 'usr_1', 'EU', {t:DateTime64(3)}, 1)",
        {"t": T},
    )
    Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.CUSTOMER_UNSYNCED, "cus_2")}


def test_a_payment_the_erp_applied_to_one_of_its_two_invoices_leaves_the_other_under_applied(store: Store) -> None:
    """py_ab pays in_a and in_b (1,100 each); the ERP applied it to in_a only (a corrective sync that failed half
    way, say). The payment is known to the ERP, so its own comparison is clean: in_b is the invoice's to report."""
    q.write_invoices(store, [inv(i, status="paid", amount_paid_minor=1_100) for i in ("in_a", "in_b")] + [inv("in_ok")])
    q.write_payments(store, [pay("py_ab", 2_200, {"in_a": 1_100, "in_b": 1_100})])
    q.write_ledger(
        store,
        [
            led("le_a", "invoice", "in_a", 1_100, "paid"),
            led("le_b", "invoice", "in_b", 1_100),
            led("le_ok", "invoice", "in_ok", 1_100),
            led("le_pa", "payment", "py_ab", 1_100, "posted", "in_a"),
        ],
    )
    r = Reconciler(store, RULES)
    full = r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.UNDER_APPLIED, "in_b")} and full.residual_minor == 0
    item = q.get_drift(store, items(store)[(c.UNDER_APPLIED, "in_b")]["drift_id"])
    assert item is not None and item["AmountMinor"] == 1_100
    # the ERP applies the rest: an incremental run resolves it
    q.write_ledger(
        store,
        [led("le_pb", "payment", "py_ab", 1_100, "posted", "in_b"), led("le_b", "invoice", "in_b", 1_100, "paid")],
    )
    assert r.run(as_of=AS_OF).resolved == 1 and items(store) == {}


def test_erp_invoices_posted_without_a_billing_reference_are_compared_by_incremental_runs_too(store: Store) -> None:
    """Manual ERP invoices (Tryton's without a reference) are one item under the key '' in a full run; an
    incremental run left a new one out, so the statement showed it as an unexplained residual until the next
    full run."""
    q.write_ledger(store, [led("le_man1", "invoice", "", 500), led("le_man2", "invoice", "", 700)])
    r = Reconciler(store, RULES)
    full = r.run(full=True, as_of=AS_OF)
    assert full.residual_minor == 0 and set(items(store)) == {(c.MISSING_IN_BILLING, "le_man1")}
    q.write_ledger(store, [led("le_man3", "invoice", "", 900)])
    inc = r.run(as_of=AS_OF)
    assert inc.mode == "incremental" and inc.residual_minor == 0
    (item,) = items(store).values()
    assert q.get_drift(store, item["drift_id"])["AmountMinor"] == -2_100  # type: ignore[index]
    assert r.run(full=True, as_of=AS_OF).new == 0  # the full run agrees


def test_a_live_erp_posting_of_a_refund_that_failed_or_a_voided_credit_note_is_drift(store: Store) -> None:
    """The ERP credited the receivable for money that was never refunded; the item names the ERP posting."""
    q.write_invoices(store, [inv("in_r")])
    failed = [
        dataclasses.replace(pay("re_failed", 300, {"in_r": 300}, kind="refund"), status="failed"),
        dataclasses.replace(pay("cn_void", 200, {"in_r": 200}, kind="credit_note"), status="failed"),
        dataclasses.replace(pay("re_never", 100, {"in_r": 100}, kind="refund"), status="failed"),  # no memo: clean
    ]
    q.write_payments(store, failed)
    q.write_ledger(
        store,
        [
            led("le_r", "invoice", "in_r", 1_100),
            led("le_m1", "credit_memo", "re_failed", -300, "posted", "in_r"),
            led("le_m2", "credit_memo", "cn_void", -200, "posted", "in_r"),
        ],
    )
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == {(c.MISSING_IN_BILLING, "le_m1"), (c.MISSING_IN_BILLING, "le_m2")}, set(found)
    memo = q.get_drift(store, found[(c.MISSING_IN_BILLING, "le_m1")]["drift_id"])
    assert memo is not None and (memo["ReasonCode"], memo["AmountMinor"], memo["PaymentId"], memo["System"]) == (
        "failed_in_billing",
        300,
        "re_failed",
        "erp",
    )
    # the ERP reverses one memo: an incremental run resolves its item
    q.write_ledger(store, [led("le_m1", "credit_memo", "re_failed", -300, "cancelled", "in_r")])
    assert r.run(as_of=AS_OF).resolved == 1 and set(items(store)) == {(c.MISSING_IN_BILLING, "le_m2")}


def test_which_posting_of_a_double_posted_invoice_names_the_party_does_not_change_between_runs(store: Store) -> None:
    """One posting with the customer's party, one with none: the party compared was whichever the aggregation
    met first, so customer_unmatched opened and resolved between runs where nothing changed for the invoice."""
    q.write_invoices(store, [inv("in_d")])
    q.write_ledger(
        store,
        [
            led("le_d1", "invoice", "in_d", 1_100),
            dataclasses.replace(led("le_d2", "invoice", "in_d", 1_100), party_ref=""),
        ],
    )
    r = Reconciler(store, RULES)
    for n in range(6):
        q.write_ledger(store, [led(f"le_other{n}", "invoice", f"in_other{n}", 500)])  # unrelated rows, new parts
        run = r.run(full=True, as_of=AS_OF)
        assert run.resolved == 0 and (c.CUSTOMER_UNMATCHED, "cus_1") in items(store), n


def test_a_region_run_leaves_a_customer_unmatched_item_to_the_runs_that_see_every_region(store: Store) -> None:
    """The item stands for the customer's invoices of every region; a region run compares only its own, so an
    EU run saw the EU posting mapped and resolved it (and the operator's acknowledgement with it) while the NA
    posting still had no party."""
    theirs = [
        dataclasses.replace(inv(i, region=reg), customer_id="cus_9") for i, reg in (("in_e", "EU"), ("in_n", "NA"))
    ]
    q.write_invoices(store, theirs)
    unmapped = [
        dataclasses.replace(led("le_e", "invoice", "in_e", 1_100), party_ref=""),
        dataclasses.replace(led("le_n", "invoice", "in_n", 1_100, region="NA"), party_ref=""),
    ]
    q.write_ledger(store, unmapped)
    r = Reconciler(store, RULES)
    assert r.run(full=True, as_of=AS_OF).new == 1
    q.write_ledger(store, [dataclasses.replace(unmapped[0], party_ref="cus_9")])
    eu = r.run(full=True, region="EU", as_of=AS_OF)
    assert eu.resolved == 0 and (c.CUSTOMER_UNMATCHED, "cus_9") in items(store)
    drift = c.drift_id(c.CUSTOMER_UNMATCHED, "cus_9")
    written = q.get_drift(store, drift)
    na = r.run(full=True, region="NA", as_of=AS_OF)
    # NA sees one of the customer's invoices: it rewrote the item's region and counts from that one (the EU filter
    # then missed the customer); it leaves the item as the run of every region wrote it
    assert na.new == 0 and q.get_drift(store, drift) == written
    assert written is not None and (written["Region"], dict(written["BillingValues"])["invoices"]) == ("EU", "2")
    q.write_ledger(store, [dataclasses.replace(unmapped[1], party_ref="cus_9")])
    assert r.run(full=True, region="NA", as_of=AS_OF).resolved == 0  # NA alone cannot know EU is clean
    assert r.run(full=True, as_of=AS_OF).resolved == 1 and items(store) == {}
    # a region run still raises one that is not open
    q.write_ledger(store, [dataclasses.replace(unmapped[1], party_ref="")])
    assert r.run(full=True, region="NA", as_of=AS_OF).new == 1 and (c.CUSTOMER_UNMATCHED, "cus_9") in items(store)


def test_customer_unmatched_when_the_erp_books_a_customer_to_no_party(store: Store) -> None:
    """One item per billing customer whose postings carry no or another party; its invoices raise none of
    their own; incremental runs never resolve it (they see only some of its invoices), a full run does."""
    theirs = [dataclasses.replace(inv(i), customer_id="cus_9") for i in ("in_p1", "in_p2")]
    q.write_invoices(store, [*theirs, inv("in_ok")])
    unmapped = [
        dataclasses.replace(led("le_p1", "invoice", "in_p1", 1_100), party_ref=""),
        dataclasses.replace(led("le_p2", "invoice", "in_p2", 1_100), party_ref="SUSPENSE"),
    ]
    q.write_ledger(store, [*unmapped, led("le_ok", "invoice", "in_ok", 1_100)])
    r = Reconciler(store, RULES)
    run = r.run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == {(c.CUSTOMER_UNMATCHED, "cus_9")}
    item = q.get_drift(store, found[(c.CUSTOMER_UNMATCHED, "cus_9")]["drift_id"])
    assert item is not None and item["ReasonCode"] == "no_erp_party" and item["KeyType"] == "customer"
    assert dict(item["BillingValues"]) == {"customer_id": "cus_9", "invoices": "2"}
    assert dict(item["ErpValues"]) == {"customer_id": ",SUSPENSE", "invoices": "2"}  # no party, and another
    assert list(item["DiffFields"]) == ["customer_id"]
    assert (item["InvoiceId"], item["LedgerEntryId"], item["Region"]) == ("in_p1", "le_p1", "EU")
    assert run.residual_minor == 0  # the amounts agree: nothing to explain
    # the ERP maps one posting: an incremental run compares only that invoice and leaves the item open
    q.write_ledger(store, [dataclasses.replace(unmapped[0], party_ref="cus_9")])
    inc = r.run(as_of=AS_OF)
    assert inc.mode == "incremental" and inc.resolved == 0 and inc.new == 0
    assert (c.CUSTOMER_UNMATCHED, "cus_9") in items(store)
    # an incremental run whose changed invoice is still unmapped keeps it as persisting
    q.write_ledger(store, [unmapped[1]])
    r.run(as_of=AS_OF)
    assert items(store)[(c.CUSTOMER_UNMATCHED, "cus_9")]["state"] == c.PERSISTING
    # the last one mapped: the next full run resolves it
    q.write_ledger(store, [dataclasses.replace(unmapped[1], party_ref="cus_9")])
    assert r.run(full=True, as_of=AS_OF).resolved == 1
    assert items(store) == {}


def test_list_filters_sorting_and_pagination(store: Store) -> None:
    seed_every_class(store)
    Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    now = AS_OF + dt.timedelta(days=3)
    rows, total = q.list_drift(store, classes=[c.STATUS_MISMATCH], now=now)
    assert total == 2 and {r["primary_key"] for r in rows} == {"in_status", "in_void"}
    rows, total = q.list_drift(store, system="billing", now=now)
    assert {r["class"] for r in rows} == {c.ORPHAN_PAYMENT, c.MISSING_IN_BILLING}
    rows, total = q.list_drift(store, min_amount=1_000, sort="amount", descending=True, now=now)
    assert all(abs(r["amount_minor"]) >= 1_000 for r in rows) and total == len(rows)
    assert [abs(r["amount_minor"]) for r in rows] == sorted((abs(r["amount_minor"]) for r in rows), reverse=True)
    page1, total = q.list_drift(store, sort="class", descending=False, limit=5, offset=0, now=now)
    page2, _ = q.list_drift(store, sort="class", descending=False, limit=5, offset=5, now=now)
    assert total == len(EXPECTED) and len(page1) == 5
    assert not {r["drift_id"] for r in page1} & {r["drift_id"] for r in page2}
    assert [r["class"] for r in page1 + page2] == sorted(r["class"] for r in page1 + page2)
    assert q.list_drift(store, min_age_days=4, now=now)[1] == 0
    assert q.list_drift(store, min_age_days=2, max_age_days=7, now=now)[1] == len(EXPECTED)
    assert q.list_drift(store, key="in_amt", now=now)[1] == 1
    assert q.list_drift(store, region="NA", now=now)[1] == 0


def test_a_region_run_keeps_the_explanation_of_a_key_billed_in_another_region(store: Store) -> None:
    """Billed in NA, posted (for another amount) in EU: an EU run does not compare the key, so it must not clear
    its explanation; the statement of the runs after it stays explained (residual 0)."""
    q.write_invoices(store, [inv("in_a", 1_000, region="NA"), inv("in_ok", 500)])
    q.write_ledger(store, [led("le_a", "invoice", "in_a", 1_500), led("le_ok", "invoice", "in_ok", 500)])
    ingested_long_ago(store)
    r = Reconciler(store, RULES)
    assert r.run(full=True, as_of=AS_OF).residual_minor == 0
    assert set(items(store)) == {(c.AMOUNT_MISMATCH, "in_a")}
    assert r.run(full=True, region="EU", as_of=AS_OF).residual_minor == 0
    after = r.run(as_of=AS_OF)  # incremental, nothing changed
    assert after.residual_minor == 0
    rows, _ = q.list_statements(store, run_id=after.run_id)
    assert {row["region"]: row["residual_minor"] for row in rows} == {"EU": 0, "NA": 0}


@pytest.mark.parametrize("full", [True, False], ids=["full", "incremental"])
def test_a_region_run_drops_the_explanation_of_a_posting_the_erp_moved_out_of_its_region(
    store: Store, full: bool
) -> None:
    """Billed in EU, posted in NA (region_mismatch); the ERP then re-books the posting in EU: every NA run still
    subtracted the posting that was gone from NA's cell, a residual of 1,100 that no NA run could remove."""
    q.write_invoices(store, [inv("in_x", 1_100), inv("in_na", 1_100, region="NA")])
    booked = [led("le_x", "invoice", "in_x", 1_100, region="NA"), led("le_na", "invoice", "in_na", 1_100, region="NA")]
    q.write_ledger(store, booked)
    r = Reconciler(store, RULES)
    assert r.run(full=True, as_of=AS_OF).residual_minor == 0
    assert set(items(store)) == {(c.REGION_MISMATCH, "in_x")}
    ingested_long_ago(store)
    q.write_ledger(store, [later(led("le_x", "invoice", "in_x", 1_100))])  # type: ignore[list-item]
    na = r.run(full=full, region="NA", as_of=AS_OF)
    rows, _ = q.list_statements(store, run_id=na.run_id)
    cells = [(row["region"], row["billing_total_minor"], row["erp_total_minor"], row["residual_minor"]) for row in rows]
    assert cells == [("NA", 1_100, 1_100, 0)] and na.residual_minor == 0
    # a posting still where its fact has it keeps its explanation (the run of its own region decides)
    assert r.run(full=full, region="EU", as_of=AS_OF).residual_minor == 0


@pytest.mark.parametrize("hours", [23, 26, 47, 48 - 1 / 7200, 49, 191, 193])
def test_every_aging_view_counts_whole_days_elapsed_like_the_item_view(store: Store, hours: float) -> None:
    """26 hours after first seen (noon, then 14:00 two calendar days on) is 0-1d everywhere: the list's filter,
    the queue summary and the overview used to count calendar-day boundaries and said 2-7d (and half a second
    short of two days, counting second boundaries, said 2 days)."""
    from tower_core.store import audit as overview

    first = AS_OF + dt.timedelta(milliseconds=900)  # first seen at 12:00:00.900
    q.write_invoices(store, [inv("in_x")])
    Reconciler(store, RULES).run(full=True, as_of=first)
    now = first + dt.timedelta(hours=hours)
    want = c.age_bucket(first, now)
    assert [s["age_bucket"] for s in q.drift_summary(store, now=now)] == [want]
    assert [a["age_bucket"] for a in overview.drift_aging(store, now)] == [want]
    lo, hi = c.age_bucket_bounds(want)
    listed, total = q.list_drift(store, min_age_days=lo, max_age_days=-1 if hi is None else hi, now=now)
    assert total == 1 and listed[0]["invoice_id"] == "in_x"


def test_a_draft_invoice_the_erp_posted_is_a_status_mismatch_not_a_tolerated_difference(store: Store) -> None:
    """It was no drift item, and the statement called the whole posting within_tolerance (residual 0)."""
    q.write_invoices(store, [inv("in_draft", 1_234_500, status="draft"), inv("in_ok", 500)])
    q.write_ledger(store, [led("le_d", "invoice", "in_draft", 1_234_500), led("le_ok", "invoice", "in_ok", 500)])
    run = Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == {(c.STATUS_MISMATCH, "in_draft")}
    assert found[(c.STATUS_MISMATCH, "in_draft")]["reason_code"] == "draft_but_posted"
    rows, _ = q.list_statements(store, run_id=run.run_id)
    assert run.residual_minor == 0
    assert [r["explained"] for r in rows] == [{c.STATUS_MISMATCH: -1_234_500}]


def test_an_unallocated_payment_matches_open_invoices_of_its_currency_and_their_latest_customer(store: Store) -> None:
    """A 1,000 JPY payment "matched" a 1,000-minor-unit USD invoice; and an invoice moved to another customer
    still matched its former customer's payment until a merge folded the old version away."""
    jpy = Payment("py_jpy", "payment", "cus_1", "EU", "JPY", 1_000, "succeeded", T, T)
    moved_from = Payment("py_mv", "payment", "cus_9", "EU", "USD", 700, "succeeded", T, T)
    q.write_invoices(store, [inv("in_usd", 1_000), dataclasses.replace(inv("in_mv", 700), customer_id="cus_9")])
    q.write_invoices(store, [later(dataclasses.replace(inv("in_mv", 700), customer_id="cus_2"))])  # type: ignore[list-item]
    q.write_ledger(store, [led("le_u", "invoice", "in_usd", 1_000), led("le_m", "invoice", "in_mv", 700)])
    q.write_payments(store, [jpy, moved_from])
    r = Reconciler(store, RULES)
    for merged in (False, True):
        if merged:
            store.command("OPTIMIZE TABLE $db.billing_invoices FINAL")
        r.run(full=True, as_of=AS_OF)
        found = items(store)
        assert {(cls, key) for cls, key in found if key.startswith("py_")} == {
            (c.ORPHAN_PAYMENT, "py_jpy"),
            (c.ORPHAN_PAYMENT, "py_mv"),
        }, merged


def test_a_region_run_does_not_resolve_an_item_whose_invoice_moved_to_another_region(store: Store) -> None:
    """The EU run no longer compares an invoice billing moved to NA: it resolved its open item ("drift gone"), the
    next run opened it again as new, and the acknowledgement, its note and its age were lost."""
    q.write_invoices(store, [inv("in_mv", 1_000)])
    q.write_ledger(store, [led("le_mv", "invoice", "in_mv", 1_500)])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    drift = c.drift_id(c.AMOUNT_MISMATCH, "in_mv")
    store.command(
        "INSERT INTO $db.drift_items SELECT * REPLACE ('acknowledged' AS State, 'FX, FIN-7' AS StateNote, "
        "Version + 1 AS Version) FROM $db.drift_items FINAL WHERE DriftId = {d:String}",
        {"d": drift},
    )
    q.write_invoices(store, [later(inv("in_mv", 1_000, region="NA"))])  # type: ignore[list-item]
    q.write_ledger(store, [later(led("le_mv", "invoice", "in_mv", 1_500, region="NA"))])  # type: ignore[list-item]
    r.run(full=True, region="EU", as_of=AS_OF)
    item = q.get_drift(store, drift)
    assert item is not None and (item["State"], item["StateNote"]) == ("acknowledged", "FX, FIN-7")
    r.run(full=True, region="NA", as_of=AS_OF)
    assert items(store)[(c.AMOUNT_MISMATCH, "in_mv")]["state"] == "acknowledged"


def acknowledge_all(store: Store, note: str) -> None:
    store.command(
        "INSERT INTO $db.drift_items SELECT * REPLACE ('acknowledged' AS State, {n:String} AS StateNote, "
        "Version + 1 AS Version) FROM $db.drift_items FINAL WHERE State != 'resolved'",
        {"n": note},
    )


@pytest.mark.parametrize("full", [True, False], ids=["full", "incremental"])
def test_a_region_run_does_not_resolve_items_whose_erp_posting_or_profile_moved_to_another_region(
    store: Store, full: bool
) -> None:
    """Items of keys billing lacks take the region of the ERP's posting, customer_unsynced that of the CDP profile:
    an EU run resolved them once they moved to NA ("drift gone"), the NA run opened them again as new, and the
    operator's acknowledgement, its note and the items' age were lost."""
    q.write_profiles(store, [CdpProfile("u_1", "cus_x", "", "", "EU", T)])
    ghosts = [led("le_1", "invoice", "in_ghost", 1_100), led("le_p", "payment", "py_ghost", 500, "posted")]
    q.write_ledger(store, ghosts)
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    keys = {(c.CUSTOMER_UNSYNCED, "cus_x"), (c.MISSING_IN_BILLING, "le_1"), (c.MISSING_IN_BILLING, "le_p")}
    assert set(items(store)) == keys
    acknowledge_all(store, "FIN-12")
    q.write_profiles(store, [CdpProfile("u_1", "cus_x", "", "", "NA", T + dt.timedelta(hours=1))])
    q.write_ledger(store, [later(dataclasses.replace(g, region="NA")) for g in ghosts])  # type: ignore[misc]
    eu = r.run(full=full, region="EU", as_of=AS_OF)
    assert eu.mode == ("full" if full else "incremental") and eu.resolved == 0
    na = r.run(full=full, region="NA", as_of=AS_OF)
    assert na.new == 0
    found = items(store)
    assert set(found) == keys
    stored = [q.get_drift(store, i["drift_id"]) or {} for i in found.values()]
    assert {(i["State"], i["StateNote"], i["Region"]) for i in stored} == {("acknowledged", "FIN-12", "NA")}
    # a key that left the region for good (the ERP removed its posting) is still resolved by the region's run
    q.write_ledger(store, [later(dataclasses.replace(ghosts[0], region="NA", status="cancelled"), 120)])  # type: ignore[arg-type]
    assert r.run(full=full, region="NA", as_of=AS_OF).resolved == 1


@pytest.mark.parametrize("full", [True, False], ids=["full", "incremental"])
def test_the_run_of_the_region_a_key_moved_to_resolves_its_item_once_the_drift_is_gone(
    store: Store, full: bool
) -> None:
    """A key that moved to NA while its drift went away: the EU run must leave its EU item (it no longer compares
    the key), and the NA run looked only at items stored as NA's, so the item stayed open, acknowledged, until a
    run of every region."""
    q.write_profiles(store, [CdpProfile("u_1", "cus_x", "", "", "EU", T)])
    posting = led("le_1", "invoice", "in_g", 1_100)
    q.write_ledger(store, [posting])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.CUSTOMER_UNSYNCED, "cus_x"), (c.MISSING_IN_BILLING, "le_1")}
    acknowledge_all(store, "FIN-12")
    ingested_long_ago(store)
    moved = T + dt.timedelta(hours=1)
    q.write_profiles(store, [CdpProfile("u_1", "cus_x", "", "", "NA", moved)])
    q.write_customers(store, [Customer("cus_x", "X", "", "NA", "USD", T, moved, cdp_user_id="u_1")])
    q.write_invoices(store, [inv("in_g", 1_100, region="NA")])
    q.write_ledger(store, [later(dataclasses.replace(posting, region="NA"))])  # type: ignore[list-item]
    eu = r.run(full=full, region="EU", as_of=AS_OF)
    assert eu.resolved == 0 and {i["state"] for i in items(store).values()} == {"acknowledged"}
    na = r.run(full=full, region="NA", as_of=AS_OF)
    assert na.resolved == 2 and items(store) == {}


@pytest.mark.parametrize("full", [True, False], ids=["full", "incremental"])
def test_a_region_run_matches_instalments_paid_from_several_regions(store: Store, full: bool) -> None:
    """An EU invoice paid by two unallocated instalments, one billed in EU and one in NA: a region run saw only its
    own instalment, called it orphan_payment and resolved its payment_unapplied item, and the next run of every
    region flipped them back."""
    q.write_invoices(store, [inv("in_x", 1_100)])
    q.write_ledger(store, [led("le_x", "invoice", "in_x", 1_100)])
    instalments = [pay("py_a", 500, {}), pay("py_b", 600, {}, region="NA")]
    q.write_payments(store, instalments)
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    keys = {(c.PAYMENT_UNAPPLIED, "py_a"), (c.PAYMENT_UNAPPLIED, "py_b")}
    assert set(items(store)) == keys
    ingested_long_ago(store)
    q.write_payments(store, [later(p) for p in instalments])  # type: ignore[misc]
    for region in ("NA", "EU"):
        run = r.run(full=full, region=region, as_of=AS_OF)
        assert (run.new, run.resolved) == (0, 0), region
        assert set(items(store)) == keys, region
    assert {i["reason_code"] for i in items(store).values()} == {"matched_not_applied"}


def test_the_payments_of_an_invoice_are_those_its_latest_payment_versions_allocate_to_it(store: Store) -> None:
    q.write_payments(store, [pay("py_1", 500, {"in_1": 500}), pay("py_2", 300, {"in_1": 300, "in_2": 0})])
    q.write_payments(store, [pay("py_3", 200, {"in_1": 200}), pay("py_4", 100, {"in_1": 100}, kind="refund")])
    assert q.payments_for_invoice(store, "in_1") == ["py_1", "py_2", "py_3"]
    moved = later(pay("py_1", 500, {"in_2": 500}))
    gone = dataclasses.replace(later(pay("py_3", 200, {"in_1": 200})), status="failed")  # type: ignore[type-var]
    q.write_payments(store, [moved, gone])  # type: ignore[list-item]
    assert q.payments_for_invoice(store, "in_1") == ["py_2"]
    assert q.payments_for_invoice(store, "in_2") == ["py_1", "py_2"]


def test_an_action_deferred_again_for_the_same_reason_is_audited_once(store: Store) -> None:
    """Each pass of the actions job (every 15 s) deferred a waiting action again and wrote an audit record, without
    spending an attempt: with no ERP connector, or a breaker open through an outage, ~600k records a day buried
    the operators' own."""
    q.write_invoices(store, [inv("in_m")])
    Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    actions = ActionService(store, None)
    action = actions.request(c.drift_id(c.MISSING_IN_ERP, "in_m"), "ops", approve=True)
    assert action["state"] == "pending" and action["last_error"] == "no ERP connector is configured"
    for _ in range(5):
        assert actions.execute(action["action_id"])["state"] == "pending"
    trail = [h["action"] for h in q.audit_for(store, "action", action["action_id"])]
    assert trail.count("action.defer") == 1, trail


def test_an_unallocated_payment_the_erp_applied_is_not_an_over_application(store: Store) -> None:
    """Billing marked in_1 paid by py_1, which it allocated nowhere; the ERP applied py_1 to in_1. The payment's
    comparison accepts that (the ERP holds the match); the invoice's saw 1,000 applied and 0 allocated."""
    q.write_invoices(store, [inv("in_1", 1_000, status="paid", amount_paid_minor=1_000)])
    q.write_ledger(
        store, [led("le_1", "invoice", "in_1", 1_000, "paid"), led("le_p1", "payment", "py_1", 1_000, "posted", "in_1")]
    )
    q.write_payments(store, [pay("py_1", 1_000, {})])
    Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    assert items(store) == {}
    # an application of a payment billing allocated to another invoice stays a finding
    q.write_invoices(store, [inv("in_2", 500)])
    q.write_ledger(store, [led("le_2", "invoice", "in_2", 500), led("le_p2", "payment", "py_2", 500, "posted", "in_1")])
    q.write_payments(store, [pay("py_2", 500, {"in_2": 500})])
    Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    assert (c.OVER_APPLIED, "in_1") in items(store)


def test_a_payment_the_erp_booked_but_applied_to_no_invoice_is_unapplied(store: Store) -> None:
    """Billing allocated py_c to in_c; the ERP booked py_c's cash unapplied, so in_c is still open there. Before,
    the cash row counted as the payment being in the ERP and nothing was flagged. Applying it in the ERP resolves
    the item in an incremental run; a request to correct it is refused (a new application would book it twice)."""
    q.write_invoices(store, [inv("in_c", status="paid", amount_paid_minor=1_100)])
    q.write_ledger(store, [led("le_c", "invoice", "in_c", 1_100), led("le_pc", "payment", "py_c", 1_100, "posted")])
    q.write_payments(store, [pay("py_c", 1_100, {"in_c": 1_100})])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == {(c.PAYMENT_UNAPPLIED, "py_c")}  # not also in_c's open status: the payment explains it
    item = found[(c.PAYMENT_UNAPPLIED, "py_c")]
    assert item["reason_code"] == "booked_unapplied"
    with pytest.raises(ActionError) as refused:
        ActionService(store, None, auto_enabled=True).request(item["drift_id"], "ops")
    assert refused.value.status == 422 and "book it twice" in str(refused.value)
    ingested_long_ago(store)
    applied = dataclasses.replace(
        led("le_pc", "payment", "py_c", 1_100, "posted", "in_c"), updated_at=T + dt.timedelta(hours=1)
    )
    q.write_ledger(store, [applied, later(led("le_c", "invoice", "in_c", 1_100, "paid"))])  # type: ignore[list-item]
    run = r.run(as_of=AS_OF)
    assert run.resolved == 1 and items(store) == {}


def test_an_unallocated_payment_the_erp_applied_for_another_amount_is_an_amount_mismatch(store: Store) -> None:
    """py_3 (1,000 collected, allocated nowhere) was applied by the ERP as 4,000 to the customer's open invoices;
    py_4's 1,000 went as 600 applied and 400 booked unapplied, which is all of it."""
    q.write_invoices(store, [inv("in_3", 2_000), inv("in_4", 2_000), inv("in_5", 600)])
    q.write_ledger(
        store,
        [
            led("le_3", "invoice", "in_3", 2_000),
            led("le_4", "invoice", "in_4", 2_000),
            led("le_5", "invoice", "in_5", 600),
            led("le_p3", "payment", "py_3", 2_000, "posted", "in_3"),
            led("le_p4", "payment", "py_3", 2_000, "posted", "in_4"),
            led("le_p5", "payment", "py_4", 600, "posted", "in_5"),
            led("le_p6", "payment", "py_4", 400, "posted"),
        ],
    )
    q.write_payments(store, [pay("py_3", 1_000, {}), pay("py_4", 1_000, {})])
    Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == {(c.AMOUNT_MISMATCH, "py_3")}
    item = q.get_drift(store, found[(c.AMOUNT_MISMATCH, "py_3")]["drift_id"])
    assert item is not None and item["ReasonCode"] == "application_differs" and item["AmountMinor"] == -3_000
    assert dict(item["ErpValues"])["allocated_to"] == "in_3,in_4" and item["System"] == "erp"
    # the tower does not rewrite applications: a sync request says what to do instead
    with pytest.raises(ActionError) as refused:
        ActionService(store, None, auto_enabled=True).request(found[(c.AMOUNT_MISMATCH, "py_3")]["drift_id"], "ops")
    assert refused.value.status == 422 and "in the ERP" in str(refused.value)


def test_incremental_finds_the_orphan_an_invoice_moved_to_another_customer_leaves(store: Store) -> None:
    """py_mv was clean while its customer's open in_mv had its amount; in_mv moved to cus_2. The run's scope held
    the payments of the changed rows' (new) customer only, so the orphan waited for the next full run."""
    q.write_invoices(store, [dataclasses.replace(inv("in_mv", 700), customer_id="cus_9")])
    q.write_ledger(store, [led("le_mv", "invoice", "in_mv", 700), led("le_p", "payment", "py_mv", 700, "posted")])
    q.write_payments(store, [Payment("py_mv", "payment", "cus_9", "EU", "USD", 700, "succeeded", T, T)])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert not [k for k in items(store) if k[1] == "py_mv"]
    ingested_long_ago(store)
    q.write_invoices(store, [later(dataclasses.replace(inv("in_mv", 700), customer_id="cus_2"))])  # type: ignore[list-item]
    r.run(as_of=AS_OF)
    assert (c.ORPHAN_PAYMENT, "py_mv") in items(store)


def test_credit_memo_amounts_and_currencies_and_application_currencies_are_compared(store: Store) -> None:
    """A credit memo of another amount or currency, and a payment applied in another currency, looked clean: the
    comparison checked only that the ERP record existed. Memos booked negative (as some ERPs do) match; a memo
    off by less than the tolerance is no drift; an incremental run sees a memo changed later."""
    q.write_invoices(
        store,
        [inv(i, status="paid", amount_paid_minor=1_100) for i in ("in_a", "in_b")] + [inv("in_c"), inv("in_d")],
    )
    q.write_ledger(
        store,
        [
            led("le_a", "invoice", "in_a", 1_100, "paid"),
            led("le_b", "invoice", "in_b", 1_100, "paid"),
            led("le_c", "invoice", "in_c", 1_100),
            led("le_d", "invoice", "in_d", 1_100),
            led("le_pa", "payment", "py_ok", 1_100, "posted", "in_a"),
            led("le_pb", "payment", "py_cur", 1_100, "posted", "in_b", cur="EUR"),
            led("le_m1", "credit_memo", "re_ok", 300, "posted", "in_c"),
            led("le_m2", "credit_memo", "re_neg", -300, "posted", "in_c"),
            led("le_m3", "credit_memo", "re_tol", 301, "posted", "in_c"),
            led("le_m4", "credit_memo", "re_amt", 250, "posted", "in_d"),
            led("le_m5", "credit_memo", "re_cur", 300, "posted", "in_d", cur="EUR"),
            # booked twice: 600 credited for 300 refunded (two memos like the refund looked clean in stage A)
            led("le_m6", "credit_memo", "re_dup", 300, "posted", "in_d"),
            led("le_m7", "credit_memo", "re_dup", 300, "posted", "in_d"),
            # booked 350, reversed, booked again at 300: the net matches
            led("le_m8", "credit_memo", "re_storno", 350, "posted", "in_c"),
            led("le_m9", "credit_memo", "re_storno", -350, "posted", "in_c"),
            led("le_mA", "credit_memo", "re_storno", 300, "posted", "in_c"),
        ],
    )
    q.write_payments(
        store,
        [pay("py_ok", 1_100, {"in_a": 1_100}), pay("py_cur", 1_100, {"in_b": 1_100})]
        + [pay(r, 300, {"in_c": 300}, kind="refund") for r in ("re_ok", "re_neg", "re_tol", "re_storno")]
        + [pay(r, 300, {"in_d": 300}, kind="refund") for r in ("re_amt", "re_cur", "re_dup")],
    )
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == {
        (c.CURRENCY_MISMATCH, "py_cur"),
        (c.AMOUNT_MISMATCH, "re_amt"),
        (c.CURRENCY_MISMATCH, "re_cur"),
        (c.AMOUNT_MISMATCH, "re_dup"),
    }
    assert q.get_drift(store, found[(c.AMOUNT_MISMATCH, "re_dup")]["drift_id"])["AmountMinor"] == -300  # type: ignore[index]
    amt = q.get_drift(store, found[(c.AMOUNT_MISMATCH, "re_amt")]["drift_id"])
    assert amt is not None and amt["ReasonCode"] == "credit_memo_differs" and amt["AmountMinor"] == 50
    assert amt["PaymentId"] == "re_amt" and "amount_minor" in amt["DiffFields"] and "currency" not in amt["DiffFields"]
    cur = q.get_drift(store, found[(c.CURRENCY_MISMATCH, "re_cur")]["drift_id"])
    assert cur is not None and cur["ReasonCode"] == "credit_memo_currency"
    assert dict(cur["ErpValues"])["currency"] == "EUR" and "currency" in cur["DiffFields"]
    app = q.get_drift(store, found[(c.CURRENCY_MISMATCH, "py_cur")]["drift_id"])
    assert app is not None and app["ReasonCode"] == "application_currency"
    # the tower does not rewrite credit memos or applications: a sync says what to do instead
    actions = ActionService(store, None, auto_enabled=True)
    for key in ("re_amt", "re_cur", "py_cur"):
        with pytest.raises(ActionError) as refused:
            actions.request(found[next(k for k in found if k[1] == key)]["drift_id"], "ops")
        assert refused.value.status == 422 and "in the ERP" in str(refused.value)

    ingested_long_ago(store)
    # the ERP corrects one memo and mis-keys another: an incremental run resolves the first and finds the second
    q.write_ledger(store, [later(led("le_m4", "credit_memo", "re_amt", 300, "posted", "in_d"))])  # type: ignore[list-item]
    q.write_ledger(store, [later(led("le_m1", "credit_memo", "re_ok", 30, "posted", "in_c"))])  # type: ignore[list-item]
    inc = r.run(as_of=AS_OF)
    assert inc.mode == "incremental"
    assert set(items(store)) == {
        (c.CURRENCY_MISMATCH, "py_cur"),
        (c.AMOUNT_MISMATCH, "re_ok"),
        (c.CURRENCY_MISMATCH, "re_cur"),
        (c.AMOUNT_MISMATCH, "re_dup"),
    }
    full = r.run(full=True, as_of=AS_OF)
    assert full.new == 0 and full.resolved == 0 and full.residual_minor == 0


def test_migration_0019_compares_the_payment_rows_stored_before_it_and_can_run_twice(embedded_store: Store) -> None:
    from tower_core.store.migrate import available

    store = embedded_store
    for m in available():
        if m.version < 19:
            for statement in m.statements():
                store.command(statement)
    q.write_invoices(store, [inv("in_c")])
    q.write_ledger(
        store,
        [led("le_c", "invoice", "in_c", 1_100), led("le_m", "credit_memo", "re_amt", 250, "posted", "in_c")],
    )
    q.write_payments(store, [pay("re_amt", 300, {"in_c": 300}, kind="refund")])
    (m19,) = [m for m in available() if m.version == 19]
    for _ in range(2):
        for statement in m19.statements():
            store.command(statement)
    migrate(store)
    Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.AMOUNT_MISMATCH, "re_amt")}


def test_a_posting_booked_in_another_region_is_a_region_mismatch_explained_in_both_cells(store: Store) -> None:
    """It had no class: the statement showed +1,100 unexplained in EU and -1,100 in NA. An ERP that records no
    region (one entity) is no drift, and its posting, in the statement's blank region, is explained too (it was
    a residual of +1,100 in EU and -1,100 in the blank region)."""
    q.write_invoices(store, [inv("in_moved"), inv("in_plain")])
    q.write_ledger(
        store,
        [led("le_m", "invoice", "in_moved", 1_100, region="NA"), led("le_p", "invoice", "in_plain", 1_100, region="")],
    )
    run = Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    found = items(store)
    assert set(found) == {(c.REGION_MISMATCH, "in_moved")}
    item = q.get_drift(store, found[(c.REGION_MISMATCH, "in_moved")]["drift_id"])
    assert item is not None and item["ReasonCode"] == "posted_in_other_region" and item["AmountMinor"] == 1_100
    assert dict(item["BillingValues"])["region"] == "EU" and dict(item["ErpValues"])["region"] == "NA"
    assert list(item["DiffFields"]) == ["region"]
    assert run.residual_minor == 0
    cells = {(r["region"], r["currency"]): r for r in q.statement_totals(store, run.run_id)}
    # the posting of an ERP that records no region is in the blank region's row, explained there and in EU
    assert cells[("EU", "USD")]["explained"] == {c.REGION_MISMATCH: 1_100, c.REGION_UNRECORDED: 1_100}
    assert cells[("NA", "USD")]["explained"] == {c.REGION_MISMATCH: -1_100}
    assert cells[("", "USD")]["explained"] == {c.REGION_UNRECORDED: -1_100}
    assert all(cell["residual_minor"] == 0 for cell in cells.values())
    with pytest.raises(ActionError) as refused:  # moving a posting between entities is the ERP team's call
        ActionService(store, None, auto_enabled=True).request(item["DriftId"], "ops")
    assert refused.value.status == 422 and "no corrective operation" in str(refused.value)


def test_several_unallocated_payments_that_together_pay_an_open_invoice_are_matched_not_orphans(store: Store) -> None:
    """Instalments without a reference: 600 + 400 for an open invoice of 1,000 were two orphan payments, since
    the match looked at one payment at a time. A third payment of the customer that would not fit keeps all of
    them unmatched (no subset is guessed); an incremental run re-matches when another instalment arrives."""
    other = "cus_2"
    q.write_invoices(store, [inv("in_i", 1_000), dataclasses.replace(inv("in_j", 1_000), customer_id=other)])
    q.write_ledger(
        store,
        [
            led("le_i", "invoice", "in_i", 1_000),
            dataclasses.replace(led("le_j", "invoice", "in_j", 1_000), party_ref=other),
        ],
    )
    q.write_payments(
        store,
        [pay("py_600", 600, {}), dataclasses.replace(pay("py_j1", 600, {}), customer_id=other)],
    )
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.ORPHAN_PAYMENT, "py_600"), (c.ORPHAN_PAYMENT, "py_j1")}
    ingested_long_ago(store)
    q.write_payments(
        store,
        [
            pay("py_400", 400, {}),
            dataclasses.replace(pay("py_j2", 300, {}), customer_id=other),  # 900 of 1,000: not this invoice
        ],
    )
    inc = r.run(as_of=AS_OF)
    assert inc.mode == "incremental"
    found = items(store)
    assert set(found) == {
        (c.PAYMENT_UNAPPLIED, "py_600"),
        (c.PAYMENT_UNAPPLIED, "py_400"),
        (c.ORPHAN_PAYMENT, "py_j1"),
        (c.ORPHAN_PAYMENT, "py_j2"),
    }
    assert {found[(c.PAYMENT_UNAPPLIED, k)]["reason_code"] for k in ("py_600", "py_400")} == {"matched_not_applied"}
    full = r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == set(found) and full.new == 0 and full.resolved == 0


def test_the_payments_matched_together_change_with_the_erp_applications_and_exclude_non_positive_ones(
    store: Store,
) -> None:
    """An instalment the ERP applied to the invoice still counts for it: the other one is the invoice's remainder
    (it was an orphan). When the ERP reverses the application, an incremental run re-matches both as a full run
    does (it raised an orphan before the scope followed ERP changes). A zero payment beside one that pays the
    invoice does not make up the invoice with it."""
    q.write_invoices(store, [inv("in_i", 1_000), dataclasses.replace(inv("in_z", 1_000), customer_id="cus_3")])
    app = led("le_p400", "payment", "py_400", 400, "posted", "in_i")
    q.write_ledger(
        store,
        [
            led("le_i", "invoice", "in_i", 1_000),
            app,
            dataclasses.replace(led("le_z", "invoice", "in_z", 1_000), party_ref="cus_3"),
        ],
    )
    zero = [dataclasses.replace(pay(p, a, {}), customer_id="cus_3") for p, a in (("py_z1000", 1_000), ("py_z0", 0))]
    q.write_payments(store, [pay("py_600", 600, {}), pay("py_400", 400, {}), *zero])
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {
        (c.PAYMENT_UNAPPLIED, "py_600"),  # the rest of in_i, whose 400 the ERP applied: not applied in the ERP
        (c.PAYMENT_UNAPPLIED, "py_z1000"),  # one payment equal to the invoice
        (c.ORPHAN_PAYMENT, "py_z0"),
    }
    ingested_long_ago(store)
    q.write_ledger(store, [later(dataclasses.replace(app, status="cancelled"))])  # the ERP reverses it
    r.run(as_of=AS_OF)
    expected = {
        (c.PAYMENT_UNAPPLIED, "py_600"),
        (c.PAYMENT_UNAPPLIED, "py_400"),
        (c.PAYMENT_UNAPPLIED, "py_z1000"),
        (c.ORPHAN_PAYMENT, "py_z0"),
    }
    assert set(items(store)) == expected
    full = r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == expected and full.new == 0 and full.resolved == 0


@pytest.mark.parametrize("full", [True, False], ids=["full", "incremental"])
def test_a_region_run_clears_the_explanation_of_a_key_billing_moved_into_its_region(store: Store, full: bool) -> None:
    """Billed EU, posted NA (region_mismatch); billing then corrects the invoice to NA. An NA run compares the key
    and finds it clean, but kept its old explanation (billed EU): the NA statement showed a residual of 1,100."""
    q.write_invoices(store, [inv("in_moved"), inv("in_na", region="NA")])
    q.write_ledger(
        store,
        [led("le_m", "invoice", "in_moved", 1_100, region="NA"), led("le_na", "invoice", "in_na", 1_100, region="NA")],
    )
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.REGION_MISMATCH, "in_moved")}
    ingested_long_ago(store)
    q.write_invoices(store, [later(inv("in_moved", region="NA"))])  # type: ignore[list-item]
    run = r.run(full=full, region="NA", as_of=AS_OF)
    assert run.residual_minor == 0
    cells = {(row["region"], row["currency"]): row for row in q.statement_totals(store, run.run_id)}
    assert cells[("NA", "USD")]["explained"] == {} and cells[("NA", "USD")]["residual_minor"] == 0
    # the item is EU's: only a run of the whole estate resolves it (a region run never resolves another's)
    assert r.run(full=True, as_of=AS_OF).residual_minor == 0 and items(store) == {}


def test_an_instalment_rechecked_as_its_grace_ends_is_matched_with_its_siblings(store: Store) -> None:
    """py_a and py_b (unallocated) together pay in_x. py_b was inside its grace period at the full run; the
    incremental run after it ended compared py_b alone, found no match, and called it an orphan."""
    q.write_invoices(store, [inv("in_x", 1_100)])
    q.write_ledger(store, [led("le_x", "invoice", "in_x", 1_100)])
    recent = AS_OF - dt.timedelta(hours=1)
    q.write_payments(
        store,
        [pay("py_a", 500, {}), dataclasses.replace(pay("py_b", 600, {}), occurred_at=recent, updated_at=recent)],
    )
    r = Reconciler(store, RULES)
    r.run(full=True, as_of=AS_OF)
    assert set(items(store)) == {(c.PAYMENT_UNAPPLIED, "py_a"), (c.STALE_SYNC, "py_b")}
    ingested_long_ago(store)  # nothing changes but the time
    later = AS_OF + dt.timedelta(hours=3)
    assert r.run(as_of=later).mode == "incremental"
    found = items(store)
    assert set(found) == {(c.PAYMENT_UNAPPLIED, "py_a"), (c.PAYMENT_UNAPPLIED, "py_b")}
    assert found[(c.PAYMENT_UNAPPLIED, "py_b")]["reason_code"] == "matched_not_applied"


def test_an_item_of_a_key_posted_twice_keeps_its_values_and_region_runs_leave_it_open(store: Store) -> None:
    """The ERP's two postings of in_ghost (EU in USD, NA in EUR, two inserts): the item's region, currency and
    values came from whichever posting the aggregation met first, so they changed between runs, and a region
    run whose pass picked the other region resolved the item ("drift gone") while both postings were live."""
    q.write_ledger(store, [led("le_1", "invoice", "in_ghost", 1_100)])
    q.write_ledger(store, [led("le_2", "invoice", "in_ghost", 700, "paid", region="NA", cur="EUR")])
    r = Reconciler(store, RULES)
    seen = []
    for region in ("", "EU", "NA", "EU", "NA", ""):
        r.run(full=True, region=region, as_of=AS_OF)
        item = q.get_drift(store, c.drift_id(c.MISSING_IN_BILLING, "le_1"))
        assert item is not None and item["State"] != c.RESOLVED, region
        seen.append((item["Region"], item["Currency"], dict(item["ErpValues"])["status"]))
    assert set(seen) == {("EU", "USD", "open")}  # le_1's, the first posting by entry id, every time
    trail = [a["action"] for a in q.audit_for(store, "drift_item", c.drift_id(c.MISSING_IN_BILLING, "le_1"))]
    assert "drift.resolved" not in trail


def test_postings_in_two_currencies_are_not_added_into_one_amount(store: Store) -> None:
    """An item's amount is in one currency: the ERP's postings of one key in USD and EUR made a missing_in_billing
    item of -1,800 "USD" and a duplicate of -900 "USD" (1,100 + 700 minor units of two currencies). The statement
    still counts each posting in its own currency's cell, so nothing stays unexplained."""
    q.write_ledger(store, [led("le_1", "invoice", "in_ghost", 1_100), led("le_3", "invoice", "in_dup", 1_100)])
    q.write_ledger(
        store,
        [led("le_2", "invoice", "in_ghost", 700, cur="EUR"), led("le_4", "invoice", "in_dup", 700, cur="EUR")],
    )
    q.write_invoices(store, [inv("in_dup", 1_100)])
    run = Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    ghost = q.get_drift(store, c.drift_id(c.MISSING_IN_BILLING, "le_1"))
    assert ghost is not None
    assert (ghost["Currency"], ghost["AmountMinor"], dict(ghost["ErpValues"])["total_minor"]) == ("USD", -1_100, "1100")
    dup = q.get_drift(store, c.drift_id(c.DUPLICATE_POSTING, "in_dup"))
    assert dup is not None
    assert (dup["Currency"], dup["AmountMinor"], dict(dup["ErpValues"])["total_minor"]) == ("USD", 0, "1100")
    assert dict(dup["ErpValues"])["postings"] == "2"
    cells = {(r["region"], r["currency"]): r for r in q.statement_totals(store, run.run_id)}
    assert {k: (r["erp_total_minor"], r["residual_minor"]) for k, r in cells.items()} == {
        ("EU", "USD"): (2_200, 0),
        ("EU", "EUR"): (1_400, 0),
    }


def test_amounts_of_two_currencies_are_never_subtracted_or_added(store: Store) -> None:
    """Minor units of two currencies never subtract or add up (a review found both): a JPY invoice posted in USD
    was a currency_mismatch of 0 JPY, a payment applied in USD one of 50,000 JPY, and the invoice that payment
    paid was also under_applied by the 100,000 "JPY" of the USD application subtracted from its allocation. A
    currency mismatch carries billing's amount; the payment's item, not the invoice's, reports its application."""
    apac = {"region": "APAC", "cur": "JPY"}
    q.write_invoices(store, [inv("in_cur", 150_000, **apac), inv("in_app", 150_000, "paid", **apac)])
    q.write_payments(
        store,
        [
            pay("py_app", 150_000, {"in_app": 150_000}, **apac),
            pay("re_cur", 5_000, {"in_cur": 5_000}, kind="refund", **apac),
        ],
    )
    q.write_ledger(
        store,
        [
            led("le_cur", "invoice", "in_cur", 150_000, region="APAC"),  # in USD
            led("le_app", "invoice", "in_app", 150_000, "paid", **apac),
            led("le_pay", "payment", "py_app", 100_000, "posted", "in_app", region="APAC"),  # applied in USD
            led("le_memo", "credit_memo", "re_cur", 5_000, "posted", "in_cur", region="APAC"),  # in USD
        ],
    )
    q.write_invoices(store, [inv("in_usd", 2_000)])
    run = Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    drift = {k: q.get_drift(store, i["drift_id"]) or {} for k, i in items(store).items()}
    found = {k: (d["ReasonCode"], d["Currency"], d["AmountMinor"]) for k, d in drift.items()}
    assert found == {
        (c.CURRENCY_MISMATCH, "in_cur"): ("currency_differs", "JPY", 150_000),
        (c.CURRENCY_MISMATCH, "py_app"): ("application_currency", "JPY", 150_000),
        (c.CURRENCY_MISMATCH, "re_cur"): ("credit_memo_currency", "JPY", 5_000),
        (c.MISSING_IN_ERP, "in_usd"): ("not_posted", "USD", 2_000),
    }
    assert run.residual_minor == 0
    # the queue's summary sums amounts per currency: it added yen and cents into one figure
    groups = q.drift_summary(store)
    summary = {(s["class"], s["region"], s["currency"]): (s["items"], s["amount_minor"]) for s in groups}
    assert summary == {
        (c.CURRENCY_MISMATCH, "APAC", "JPY"): (3, 305_000),
        (c.MISSING_IN_ERP, "EU", "USD"): (1, 2_000),
    }


def test_sorting_by_age_is_the_reverse_of_first_seen(store: Store) -> None:
    """Ascending age listed the oldest item first (it sorted by first_seen)."""
    for i in range(3):
        q.write_invoices(store, [inv(f"in_{i}")])
        Reconciler(store, RULES).run(full=True, as_of=AS_OF + dt.timedelta(minutes=i))

    def order(sort: str, descending: bool) -> list[str]:
        return [r["invoice_id"] for r in q.list_drift(store, sort=sort, descending=descending)[0]]

    assert order("age", False) == order("first_seen", True) == ["in_2", "in_1", "in_0"]
    assert order("age", True) == order("first_seen", False) == ["in_0", "in_1", "in_2"]


def test_the_default_statement_covers_the_estate_and_its_totals_follow_the_filters(store: Store) -> None:
    """After a region run the default statement was that run's, of one region, so the others read as nothing
    billed; and its totals and residual were the whole run's whatever the filters said."""
    from collector.routers.statements import _statement

    q.write_invoices(store, [inv("in_eu", 1_100), inv("in_na", 2_000, region="NA")])
    q.write_ledger(store, [led("le_eu", "invoice", "in_eu", 1_100)])  # NA's is not posted
    whole = Reconciler(store, RULES).run(full=True, as_of=AS_OF)
    Reconciler(store, RULES).run(full=True, region="EU", as_of=AS_OF + dt.timedelta(minutes=1))
    doc = _statement(store, None)
    assert doc is not None and (doc["run_id"], doc["region"]) == (whole.run_id, "")
    assert {t["region"] for t in doc["totals"]} == {"EU", "NA"}
    na = _statement(store, None, q.StatementScope(region="NA"))
    assert na is not None and {(t["region"], t["billing_total_minor"]) for t in na["totals"]} == {("NA", 2_000)}
    assert [r["region"] for r in na["items"]] == ["NA"] and na["residual_minor"] == 0
    eu = _statement(store, None, q.StatementScope(region="EU"))
    assert eu is not None and [(t["region"], t["erp_total_minor"]) for t in eu["totals"]] == [("EU", 1_100)]


def test_an_unexplained_residual_is_told_per_currency(store: Store) -> None:
    """An EU run sees the EU postings of two NA invoices, in USD and in KWD, but not the invoices: the run and the
    statement said "residual 2200", 11.00 USD and 1.100 KWD added into one number. The statement says it per
    currency; the headline stays a zero-or-not signal."""
    from collector.routers.statements import _statement

    q.write_invoices(store, [inv("in_usd", 1_100, region="NA"), inv("in_kwd", 1_100, region="NA", cur="KWD")])
    q.write_ledger(
        store,
        [
            led("le_usd", "invoice", "in_usd", 1_100, region="EU"),
            led("le_kwd", "invoice", "in_kwd", 1_100, region="EU", cur="KWD"),
        ],
    )
    run = Reconciler(store, RULES).run(full=True, region="EU", as_of=AS_OF)
    doc = _statement(store, run.run_id)
    assert doc is not None and doc["residual_by_currency"] == {"KWD": 1_100, "USD": 1_100}
    assert run.residual_minor == doc["residual_minor"] == 2_200


def test_a_full_run_that_read_older_state_leaves_what_a_later_run_found(store: Store) -> None:
    """Two processes beside one ClickHouse server share no queue lock: a full run that read the state before a
    change, finishing after an incremental run that saw it, resolved that run's item; the watermark had moved
    past the change, so no incremental run compared it again until the next full run."""
    import threading

    q.write_invoices(store, [inv("in_1", 1_100)])
    q.write_ledger(store, [led("le_1", "invoice", "in_1", 1_100)])
    api, scheduler = Reconciler(store, RULES), Reconciler(store, RULES)  # one queue lock each
    scheduler.run(full=True, as_of=AS_OF)
    ingested_long_ago(store)
    facts_read, go_on = threading.Event(), threading.Event()

    def pause(stage: str, done: int, total: int) -> None:
        if stage == "classify":  # both sides' facts are read
            facts_read.set()
            go_on.wait(60)

    full = threading.Thread(target=lambda: api.run(full=True, as_of=AS_OF, progress=pause))
    full.start()
    assert facts_read.wait(60)
    q.write_invoices(store, [later(inv("in_1", 1_500))])  # type: ignore[list-item]  # the ERP's 1,100 is wrong now
    assert scheduler.run(as_of=AS_OF).mode == "incremental"
    assert set(items(store)) == {(c.AMOUNT_MISMATCH, "in_1")}
    go_on.set()
    full.join(60)
    assert set(items(store)) == {(c.AMOUNT_MISMATCH, "in_1")}  # the older read leaves the newer finding
    assert scheduler.run(as_of=AS_OF).mode == "incremental"
    assert set(items(store)) == {(c.AMOUNT_MISMATCH, "in_1")}


class _BillingThatFails:
    """A fake billing connector whose pull raises ``exc`` (a bug's bare KeyError, or a connector's own error)."""

    name = "failing-billing"

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def pull_invoices(self, cursor: str | None, limit: int = 1000) -> object:
        raise self.exc

    def pull_payments(self, cursor: str | None, limit: int = 1000) -> object:
        raise self.exc


def test_a_run_failed_by_an_unexpected_error_names_it(store: Store) -> None:
    """The run's recorded error was a bare ``'data'`` (str of a KeyError): nothing said what kind of failure."""
    from connectors.base import BusinessRuleError
    from reconciler.runner import RunFailed

    for exc, expected in (
        (KeyError("data"), "unexpected KeyError: 'data'"),
        (BusinessRuleError("stripe invoices pull: malformed answer"), "stripe invoices pull: malformed answer"),
    ):
        with pytest.raises(RunFailed):
            Reconciler(store, RULES, billing=_BillingThatFails(exc)).run(full=True, as_of=AS_OF)  # type: ignore[arg-type]
        runs, _ = q.list_runs(store, limit=1, state="failed")
        assert runs[0]["error"] == expected
