"""Corrective actions under failures a review reproduced on the simulated estate and real chDB: a recovery that
cannot read its target is retried by the actions job, approvals waiting do not starve due actions, a store
error cannot leave the breaker's trial out for good, two classes writing one ERP record take turns, an
automatic correction runs again when its drift comes back, and an incremental run follows a CDP profile
re-pointed to another customer. Wrappers that make a system fail on cue are named fakes around the real ones."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.base import ConnectorError
from connectors.simulator import Estate, EstateConfig, FaultRates
from reconciler import classify as c
from reconciler.connectors import Connectors
from reconciler.jobs import STALE_IN_PROGRESS_S, _actions_job
from reconciler.runner import WATERMARK_OVERLAP, Reconciler
from reconciler.service import ReconcilerService
from tower_core.models import CdpProfile, Customer
from tower_core.settings import Settings
from tower_core.store import Store, migrate
from tower_core.store import reconcile as q


def settings(tmp_path: Path, **over: Any) -> Settings:
    base = {
        "wal_dir": tmp_path / "wal",
        "reconcile_scheduler": False,
        "reconcile_grace_s": {"*": 7200},
        "reconcile_action_backoff_s": 0.01,
        "reconcile_action_backoff_max_s": 0.05,
        "reconcile_action_attempts": 2,
        "reconcile_breaker_failures": 3,
        "reconcile_breaker_reset_s": 0.3,
    }
    return Settings(**{**base, **over})


def estate(seed: int, invoices: int, customers: int = 50, **rates: float) -> Estate:
    return Estate.generate(
        EstateConfig(seed=seed, customers=customers, invoices=invoices, fault_rates=FaultRates.only(**rates))
    )


@pytest.fixture
def store(embedded_store: Store) -> Iterator[Store]:
    migrate(embedded_store)
    yield embedded_store


def service(store: Store, tmp_path: Path, e: Estate, erp: Any = None, **over: Any) -> ReconcilerService:
    svc = ReconcilerService(settings(tmp_path, **over), store, Connectors(e.billing, erp or e.erp, e.cdp))
    svc.start()
    return svc


def open_keys(store: Store, cls: str) -> list[str]:
    return sorted(i["primary_key"] for i in q.all_open_items(store) if i["class"] == cls)


def live_postings(e: Estate, invoice_id: str) -> list[str]:
    return [x.entry_id for x in e.erp.find_by_external_ref(invoice_id) if x.entry_type == "invoice" and x.live]


class FlakyLookupErp:
    """The simulated ERP answering its first ``bad`` lookups with an unexpected reply."""

    def __init__(self, erp: Any, bad: int) -> None:
        self._erp, self.name, self.bad = erp, erp.name, bad

    def find_by_external_ref(self, ref: str) -> Any:
        if self.bad:
            self.bad -= 1
            raise ConnectorError("unexpected reply from the ERP")
        return self._erp.find_by_external_ref(ref)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._erp, name)


def test_an_action_left_in_progress_is_recovered_by_the_actions_job_when_start_could_not(
    store: Store, tmp_path: Path
) -> None:
    e = estate(12, 600, erp_posting_missing=0.02)
    svc = service(store, tmp_path, e)
    svc.run(full=True, as_of=e.config.as_of)
    inv = open_keys(store, c.MISSING_IN_ERP)[0]
    created = svc.actions.request(c.drift_id(c.MISSING_IN_ERP, inv), "alice", execute=False)
    row = q.get_action(store, created["action_id"])
    assert row is not None
    row["State"] = "in_progress"  # the process died mid-call, a while ago
    row["UpdatedAt"] = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=STALE_IN_PROGRESS_S + 60)
    q.write_action(store, row)
    restarted = service(store, tmp_path, e, erp=FlakyLookupErp(e.erp, bad=1))  # its recovery cannot look
    assert q.get_action(store, row["ActionId"])["State"] == "in_progress"  # type: ignore[index]
    _actions_job(restarted)  # the scheduler's job: recovers it, then runs what is due
    assert q.get_action(store, row["ActionId"])["State"] == "succeeded"  # type: ignore[index]
    assert len(live_postings(e, inv)) == 1


def test_a_fresh_in_progress_action_is_left_to_its_execution(store: Store, tmp_path: Path) -> None:
    e = estate(12, 300, erp_posting_missing=0.03)
    svc = service(store, tmp_path, e)
    svc.run(full=True, as_of=e.config.as_of)
    inv = open_keys(store, c.MISSING_IN_ERP)[0]
    created = svc.actions.request(c.drift_id(c.MISSING_IN_ERP, inv), "alice", execute=False)
    row = q.get_action(store, created["action_id"])
    assert row is not None
    row["State"] = "in_progress"
    q.write_action(store, row)  # updated just now: another execution may be at work
    assert svc.actions.recover(stale_after_s=STALE_IN_PROGRESS_S) == []
    assert q.get_action(store, row["ActionId"])["State"] == "in_progress"  # type: ignore[index]


def test_actions_awaiting_approval_do_not_starve_a_due_action(store: Store, tmp_path: Path) -> None:
    e = estate(21, 5000, customers=300, amount_mismatch=0.03, erp_posting_missing=0.002)
    svc = service(store, tmp_path, e)
    svc.run(full=True, as_of=e.config.as_of)
    mismatched = open_keys(store, c.AMOUNT_MISMATCH)
    assert len(mismatched) > 100
    for k in mismatched[:110]:  # business corrections waiting for a second person (created first)
        svc.actions.request(c.drift_id(c.AMOUNT_MISMATCH, k), "otto")
    missing = open_keys(store, c.MISSING_IN_ERP)[0]
    e.erp.begin_outage()
    deferred = svc.actions.request(c.drift_id(c.MISSING_IN_ERP, missing), "alice")
    e.erp.end_outage()
    assert deferred["state"] == "pending" and deferred["approved_by"] == "alice"
    time.sleep(0.5)  # past the breaker's reset and the backoff
    assert svc.actions.process_due() == 1
    assert q.get_action(store, deferred["action_id"])["State"] == "succeeded"  # type: ignore[index]
    assert len(live_postings(e, missing)) == 1


def test_a_store_error_at_the_start_of_a_trial_does_not_keep_the_breaker_shut(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = estate(8, 600, erp_posting_missing=0.02)
    svc = service(store, tmp_path, e)
    svc.run(full=True, as_of=e.config.as_of)
    missing = open_keys(store, c.MISSING_IN_ERP)[:4]
    e.erp.begin_outage()
    actions = [svc.actions.request(c.drift_id(c.MISSING_IN_ERP, k), "alice") for k in missing]
    e.erp.end_outage()
    assert svc.actions.breakers.state("erp") == "open"
    time.sleep(0.5)  # half-open: one trial may go
    real = q.write_action
    fails = {"left": 1}

    def write_action(st: Store, row: dict[str, Any]) -> None:  # one store error, on the trial's start
        if row["State"] == "in_progress" and fails["left"]:
            fails["left"] -= 1
            raise RuntimeError("Code: 242. Table is in readonly mode")
        real(st, row)

    monkeypatch.setattr(q, "write_action", write_action)
    with pytest.raises(RuntimeError):
        svc.actions.process_due()
    monkeypatch.setattr(q, "write_action", real)
    for _ in range(3):
        svc.actions.process_due()
    assert [q.get_action(store, a["action_id"])["State"] for a in actions] == ["succeeded"] * 4  # type: ignore[index]


class SlowCountingErp:
    """The simulated ERP, slow to answer lookups (so two corrections overlap), counting apply_payment calls."""

    def __init__(self, erp: Any) -> None:
        self._erp, self.name, self.applied = erp, erp.name, []

    def find_by_external_ref(self, ref: str) -> Any:
        found = self._erp.find_by_external_ref(ref)
        time.sleep(0.3)
        return found

    def apply_payment(self, payment: Any, invoice_id: str, amount: int) -> Any:
        self.applied.append((payment.payment_id, invoice_id, amount))
        return self._erp.apply_payment(payment, invoice_id, amount)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._erp, name)


def test_two_classes_correcting_the_same_erp_record_take_turns(store: Store, tmp_path: Path) -> None:
    """under_applied of an invoice and payment_unapplied of a payment allocated to it both apply that payment:
    approved and requested at the same moment, the payment is applied once."""
    e = estate(17, 800, payment_not_applied=0.01)
    svc = service(store, tmp_path, e)
    svc.run(full=True, as_of=e.config.as_of)
    pid = open_keys(store, c.PAYMENT_UNAPPLIED)[0]
    payment = q.load_payment(store, pid)
    assert payment is not None
    inv = next(iter(payment.allocations))
    other = dataclasses.replace(  # a second payment for the invoice, partly applied: the invoice is under-applied
        payment, payment_id="py_second", amount_minor=100, allocations={inv: 100},
        updated_at=payment.updated_at + dt.timedelta(seconds=1),
    )  # fmt: skip
    q.write_payments(store, [other])
    e.erp.apply_payment(other, inv, 40)
    svc.run(full=True, as_of=e.config.as_of)
    assert inv in open_keys(store, c.UNDER_APPLIED) and pid in open_keys(store, c.PAYMENT_UNAPPLIED)
    erp = SlowCountingErp(e.erp)
    svc.actions.erp = erp
    under = svc.actions.request(c.drift_id(c.UNDER_APPLIED, inv), "otto")  # a business class: waits
    barrier = threading.Barrier(2)
    results: list[dict[str, Any]] = []

    def approve() -> None:
        barrier.wait()
        results.append(svc.actions.approve(under["action_id"], "alice"))

    def request() -> None:
        barrier.wait()
        results.append(svc.actions.request(c.drift_id(c.PAYMENT_UNAPPLIED, pid), "bob"))

    threads = [threading.Thread(target=approve), threading.Thread(target=request)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["state"] for r in results) == ["succeeded", "succeeded"]
    assert [a for a in erp.applied if a[0] == pid] == [(pid, inv, payment.allocations[inv])]


def test_an_automatic_correction_runs_again_when_its_drift_comes_back(store: Store, tmp_path: Path) -> None:
    e = estate(19, 400, erp_posting_missing=0.02)
    svc = service(store, tmp_path, e, reconcile_auto_correct=True)
    svc.run(full=True, as_of=e.config.as_of)
    done = [a for a in q.list_actions(store, limit=100)[0] if a["State"] == "succeeded"]
    assert done
    inv = sorted(a["TargetRef"] for a in done)[0]
    (posting,) = live_postings(e, inv)
    e.erp.cancel_entry(posting, "reversed by someone in finance")
    svc.run(full=True, as_of=e.config.as_of)  # found again; the automatic correction runs after the run
    assert len(live_postings(e, inv)) == 1
    ran = [a["State"] for a in q.list_actions(store, limit=1000)[0] if a["TargetRef"] == inv]
    assert ran == ["succeeded", "succeeded"]


def test_an_incremental_run_follows_a_profile_re_pointed_to_another_customer(store: Store) -> None:
    rec = Reconciler(store, c.Rules())
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    as_of = t0 + dt.timedelta(days=5)
    q.write_customers(store, [Customer("cus_B", "", "", "EU", "EUR", t0, t0)])
    q.write_profiles(store, [CdpProfile("u1", "cus_A", "", "", "EU", t0)])
    time.sleep(WATERMARK_OVERLAP.total_seconds() + 0.5)
    rec.run(full=True, as_of=as_of, pull_sources=False)
    assert open_keys(store, c.CUSTOMER_UNSYNCED) == ["cus_A"]
    time.sleep(WATERMARK_OVERLAP.total_seconds() + 0.5)
    q.write_profiles(store, [CdpProfile("u1", "cus_B", "", "", "EU", t0 + dt.timedelta(hours=1))])  # identity fixed
    run = rec.run(as_of=as_of, pull_sources=False)
    assert run.mode == "incremental" and run.resolved == 1
    assert open_keys(store, c.CUSTOMER_UNSYNCED) == []
