"""Corrective syncs and replays: idempotent, retried, guarded by a circuit breaker, audited.

Each action has an idempotency key from (class, keys, target); the ERP record's external reference is the
billing id and is looked up before every write (and before every retry, since a timed-out call may have
written), so a repeated or concurrent action never posts twice. In-process, one lock per idempotency key
serialises concurrent requests for the same correction; across processes the target check does.

States: pending -> in_progress -> succeeded | failed. An action found ``in_progress`` after a restart "may
have written": ``recover()`` checks the target before any retry. Transient errors are retried with
exponential backoff (tenacity) while the target system's breaker allows; an open breaker leaves the action
pending until the breaker lets a trial through. Business-rule errors are not retried: the action fails with
the remote message. Failed actions are the dead-letter list; a replay re-runs one, linked to it by
``OriginalActionId``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from connectors.base import ActionOutcome, BusinessRuleError, ErpConnector, TransientError
from reconciler import classify as c
from reconciler import policy
from reconciler.breaker import Breaker, as_published, published_view
from tower_core.errors import StoreError
from tower_core.models import LedgerEntry
from tower_core.store import Store
from tower_core.store import reconcile as q

log = logging.getLogger("tower.reconciler.actions")

PENDING, IN_PROGRESS, SUCCEEDED, FAILED = "pending", "in_progress", "succeeded", "failed"
ACTIVE = (PENDING, IN_PROGRESS)


@dataclass(frozen=True)
class _Plan:
    """A correctable item's operation, policy decision, keys, target and idempotency key."""

    drift_id: str
    item: dict[str, Any]
    operation: str
    decision: str
    keys: dict[str, str]
    target: str
    key: str


@dataclass(frozen=True)
class _Save:
    """An action row to write, with its audit verb, the row before (None: created) and a note."""

    row: dict[str, Any]
    verb: str
    before: dict[str, Any] | None
    note: str


class ActionError(Exception):
    """A request the API answers with 4xx: ``status`` is the HTTP status to use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UnexpectedError(Exception):
    """An attempt ended in an error that is neither transient nor a business rule (an unexpected answer, a bug)."""


class BreakerOpen(Exception):
    """The target system's breaker refused the call."""


class Mooted(Exception):
    """Between two attempts the correction stopped applying (its item ignored or resolved, billing voided): the
    reason is the message."""


class NotYet(Exception):
    """What the action writes needs something the target does not hold yet (a payment applied to an invoice the
    ERP has not posted, whose own correction may be queued or running): retried later within the action's
    budget, like a transient error, without counting against the target's breaker."""


@dataclass
class Breakers:
    """One breaker per target system, shared by every execution thread."""

    failure_threshold: int
    reset_after_s: float
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._by_system: dict[str, Breaker] = {}

    def _get(self, system: str) -> Breaker:
        return self._by_system.setdefault(system, Breaker(self.failure_threshold, self.reset_after_s))

    def allow(self, system: str) -> bool:
        with self._lock:
            ok, after = self._get(system).allow(self.clock())
            self._by_system[system] = after
            return ok

    def success(self, system: str) -> None:
        with self._lock:
            self._by_system[system] = self._get(system).record_success(self.clock())

    def failure(self, system: str) -> None:
        with self._lock:
            self._by_system[system] = self._get(system).record_failure(self.clock())

    def release(self, system: str) -> None:
        with self._lock:
            self._by_system[system] = self._get(system).release(self.clock())

    def state(self, system: str) -> str:
        with self._lock:
            return self._get(system).current(self.clock())

    def retry_in(self, system: str) -> float:
        with self._lock:
            return self._get(system).retry_in(self.clock())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            now = self.clock()
            return {
                s: {"state": b.current(now), "failures": b.failures, "retry_in_s": round(b.retry_in(now), 3)}
                for s, b in self._by_system.items()
            }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _cancelled(action: dict[str, Any]) -> bool:
    """Ended without a write because its drift item was resolved or ignored before it ran (not a fault)."""
    return action["State"] == FAILED and action["Result"].startswith('{"cancelled"')


def _redetected(action: dict[str, Any], item: dict[str, Any]) -> bool:
    """A succeeded (or cancelled) action whose drift a run found again after it: the target is to be checked and
    written anew (an automatic correction stands otherwise: a failed one waits for a person's replay)."""
    done = action["State"] == SUCCEEDED or _cancelled(action)
    return done and c.aware(item["UpdatedAt"]) > c.aware(action["UpdatedAt"])


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """API view of an action row."""
    out = {
        "action_id": row["ActionId"],
        "idempotency_key": row["IdempotencyKey"],
        "kind": row["Kind"],
        "drift_id": row["DriftId"],
        "class": row["Class"],
        "operation": row["Operation"],
        "target_system": row["TargetSystem"],
        "target_ref": row["TargetRef"],
        "state": row["State"],
        "attempts": int(row["Attempts"]),
        "last_error": row["LastError"],
        "result": json.loads(row["Result"]) if row["Result"] else None,
        "original_action_id": row["OriginalActionId"],
        "requested_by": row["RequestedBy"],
        "approved_by": row["ApprovedBy"],
        "dead_letter": bool(row["DeadLetter"]),
        "params": json.loads(row["Params"] or "{}"),
        "created_at": row["CreatedAt"],
        "updated_at": row["UpdatedAt"],
    }
    nxt = row.get("NextAttemptAt")
    out["next_attempt_at"] = nxt if nxt is not None and nxt.year > 1970 else None
    return out


class ActionService:
    """Creates, executes, recovers and replays corrective actions against the ERP connector."""

    def __init__(
        self,
        store: Store,
        erp: ErpConnector | None,
        *,
        retry: policy.RetryPolicy | None = None,
        breakers: Breakers | None = None,
        auto_enabled: bool = False,
        executes: bool = True,
    ) -> None:
        self.store = store
        self.erp = erp
        # Only the process that runs the actions job writes to the ERP: two processes (the API and `tower
        # reconciler` on one ClickHouse server) share no locks, and an ERP's look-up-then-create is not atomic,
        # so both could find the target empty and post twice. Elsewhere an approved action is queued (due now).
        self.executes = executes
        self.retry = retry or policy.RetryPolicy()
        self.breakers = breakers or Breakers(5, 30.0)
        self.auto_enabled = auto_enabled
        self._locks_guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._published_breakers: dict[str, tuple[Any, Any]] | None = None

    def publish_breakers(self) -> None:
        """The process that executes the actions holds the breakers; an API beside it (which executes none) showed
        its own, always closed, next to actions held back by an open one. Published when they changed."""
        if not self.executes:
            return
        snapshot = self.breakers.snapshot()
        shape = {s: (b["state"], b["failures"]) for s, b in snapshot.items()}
        if shape == self._published_breakers:
            return
        doc = {"at": time.time(), "breakers": as_published(snapshot, time.time())}
        q.set_cursor(self.store, *q.BREAKERS, json.dumps(doc))
        self._published_breakers = shape

    def breaker_view(self) -> dict[str, Any]:
        """The breakers as the process executing the actions has them: this one's, or what that one published."""
        if self.executes:
            return {"breakers": self.breakers.snapshot(), "executed_here": True}
        raw = q.get_cursor(self.store, *q.BREAKERS)
        doc = json.loads(raw) if raw else {}
        at = doc.get("at")
        return {
            "breakers": published_view(doc.get("breakers") or {}, time.time()),
            "executed_here": False,
            "published_at": dt.datetime.fromtimestamp(at, dt.UTC).isoformat() if at else None,
        }

    def _moot(self, row: dict[str, Any]) -> str:
        """Why a queued correction must not write any more: its drift item was resolved (billing voided the
        invoice, someone posted it by hand) or ignored since it was requested. Empty if it still applies."""
        if not row["DriftId"]:
            return ""
        try:
            item = q.get_drift(self.store, row["DriftId"])
        except StoreError:
            return ""  # cannot tell now: the attempt's own reads meet the same store and defer the action
        if item is None:
            return f"drift item {row['DriftId']} no longer exists"
        if item["State"] in c.CLOSED:
            return f"drift item {row['DriftId']} was {item['State']} before the action ran"
        return self._source_moved_on(row)

    def _source_moved_on(self, row: dict[str, Any]) -> str:
        """Billing's state now, not the item's (which only the next run's queue merge updates, and the actions
        job may fire between a run's pull and that merge): a void since the request must stop a posting."""
        op = policy.operation(row["Operation"])
        params = json.loads(row["Params"] or "{}")
        invoice = payment = None
        try:
            if op in ("apply_payment", "post_credit_memo") and params.get("payment_id"):
                found = q.load_payment(self.store, params["payment_id"])
                payment = (params["payment_id"], found.status if found else None)
            elif params.get("invoice_id"):
                found_invoice = q.load_invoice(self.store, params["invoice_id"])
                invoice = (params["invoice_id"], found_invoice.status if found_invoice else None)
        except StoreError:
            return ""  # cannot tell now: the attempt's own reads meet the same store and defer the action
        return policy.source_moved_on(op, invoice, payment)

    # --- locking
    def _lock(self, key: str) -> threading.Lock:
        """One lock per target: a replay's key is its original's plus ``:replay:N``, and a replay and a new
        request for the same item must not both find the target empty and both write."""
        with self._locks_guard:
            return self._locks.setdefault(q.replayed_key(key), threading.Lock())

    @contextmanager
    def _documents_locked(self, row: dict[str, Any]) -> Iterator[None]:
        """Hold the locks of the ERP records an action looks at and writes, in a fixed order, for one attempt.
        Actions of different classes can write the same record (under_applied of an invoice and
        payment_unapplied of a payment allocated to it both apply that payment); one lock per idempotency key
        would let both find it missing and both write."""
        locks = [self._lock(name) for name in sorted(set(self._documents(row)))]
        with ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            yield

    def _documents(self, row: dict[str, Any]) -> list[str]:
        params = json.loads(row["Params"] or "{}")
        op = policy.operation(row["Operation"])
        if op == "apply_payment":
            if "payment_id" in params and row["Class"] == c.PAYMENT_UNAPPLIED:
                return [f"erp-doc:payment:{params['payment_id']}"]
            return [f"erp-doc:payment:{p}" for p in q.payments_for_invoice(self.store, params["invoice_id"])]
        if op == "post_credit_memo":
            return [f"erp-doc:payment:{params['payment_id']}"]
        return [f"erp-doc:invoice:{params['invoice_id']}"] if "invoice_id" in params else []

    # --- persistence helpers
    def _save(self, row: dict[str, Any], actor: str, verb: str, before: dict[str, Any] | None, note: str = "") -> None:
        self._save_many([_Save(row, verb, before, note)], actor)

    def _save_many(self, saves: list[_Save], actor: str) -> None:
        """The rows, then their audit records: two writes however many."""
        if not saves:
            return
        records = []
        for save in saves:
            save.row["UpdatedAt"] = _now()
            after = {k: save.row[k] for k in ("State", "Attempts", "LastError", "DeadLetter", "ApprovedBy")}
            prev = None if save.before is None else {k: save.before[k] for k in after}
            outcome = "error" if save.row["State"] == FAILED else "ok"
            records.append(
                q.audit_record(actor, save.verb, "action", save.row["ActionId"], prev, after, save.note, outcome)
            )
        q.write_actions(self.store, [save.row for save in saves])
        q.write_audit(self.store, records)

    # --- requests
    def _plan(self, drift_id: str, item: dict[str, Any] | None, automatic: bool) -> _Plan:
        """What correcting this item means (or why it cannot be corrected): the checks of a request, no IO."""
        if item is None:
            raise ActionError(404, f"drift item {drift_id} not found")
        cls = item["Class"]
        operation = policy.OPERATIONS.get(cls)
        if operation is None:
            raise ActionError(
                422, f"{cls} has no corrective operation; work it in the queue (acknowledge or ignore once fixed)"
            )
        if item["State"] in c.CLOSED:
            raise ActionError(409, f"drift item {drift_id} is {item['State']}; nothing to correct")
        why = policy.NOT_CORRECTED.get((cls, item["ReasonCode"]))
        if why:
            raise ActionError(422, f"{cls} ({item['ReasonCode']}) is not corrected by the tower: {why}")
        decision = policy.decision(cls, self.auto_enabled)
        if automatic and decision != "auto":
            raise ActionError(409, f"{cls} is not corrected automatically")
        keys = {
            "invoice_id": item["InvoiceId"],
            "payment_id": item["PaymentId"],
            "customer_id": item["CustomerId"],
        }
        target = policy.target_ref(cls, keys)
        key = policy.idempotency_key(cls, keys, f"{policy.TARGET_SYSTEM}:{target}")
        return _Plan(drift_id, item, operation, decision, keys, target, key)

    def _decide(
        self, plan: _Plan, previous: list[dict[str, Any]], requested_by: str, approve: bool, automatic: bool
    ) -> tuple[dict[str, Any], _Save | None]:
        """The action a request stands for, given the key's actions so far (under the key's lock): an existing one
        (approved now, if asked), or a new one; and what to write for it (None: nothing)."""
        item, decision = plan.item, plan.decision
        if automatic and previous and not _redetected(previous[-1], item):
            return previous[-1], None  # a failed automatic correction waits for a person's replay
        # a success stands until a run finds the drift again after it (then the target is checked anew)
        existing = [
            a
            for a in previous
            if a["State"] in ACTIVE
            or (a["State"] == SUCCEEDED and c.aware(item["UpdatedAt"]) <= c.aware(a["UpdatedAt"]))
        ]
        if existing:
            row = existing[-1]
            if row["State"] == PENDING and decision == "approval" and approve and not row["ApprovedBy"]:
                before = dict(row)
                row["ApprovedBy"] = requested_by
                return row, _Save(row, "action.approve", before, "")
            return row, None
        now = _now()
        row = {
            "ActionId": uuid.uuid4().hex,
            "IdempotencyKey": plan.key,
            "Kind": "corrective_sync",
            "DriftId": plan.drift_id,
            "Class": item["Class"],
            "TargetSystem": policy.TARGET_SYSTEM,
            "TargetRef": plan.target,
            "State": PENDING,
            "Attempts": 0,
            "LastError": "",
            "Result": "",
            "OriginalActionId": "",
            "RequestedBy": requested_by,
            "CreatedAt": now,
            "UpdatedAt": now,
            "Operation": plan.operation,
            "Params": json.dumps({k: v for k, v in plan.keys.items() if v}),
            "ApprovedBy": requested_by if (decision != "approval" or approve) else "",
            "NextAttemptAt": q.EPOCH,
            "DeadLetter": 0,
        }
        note = "automatic (policy: technical class)" if automatic else ""
        return row, _Save(row, "action.create", None, note)

    def request(
        self,
        drift_id: str,
        requested_by: str,
        *,
        approve: bool = False,
        execute: bool = True,
        automatic: bool = False,
    ) -> dict[str, Any]:
        """Start (or find) the corrective sync of a drift item. Idempotent on (class, keys, target)."""
        plan = self._plan(drift_id, q.get_drift(self.store, drift_id), automatic)
        with self._lock(plan.key):
            row, save = self._decide(plan, q.actions_by_key(self.store, plan.key), requested_by, approve, automatic)
            if save is not None:
                self._save(save.row, requested_by, save.verb, save.before, save.note)
                if execute and row["ApprovedBy"] and row["State"] == PENDING:
                    return self._execute_locked(row["ActionId"])
            return _public(row)

    def request_many(
        self, drift_ids: list[str], requested_by: str, *, approve: bool = False
    ) -> dict[str, dict[str, Any] | ActionError]:
        """``request(execute=False)`` for many items, in one read of the items, one of their keys' actions and one
        write each of the actions and their audit records (a bulk request of 500 made 2,000 round trips, 22-51 s).
        Per drift id: the action's API view, or the ActionError a single request would have raised."""
        items = q.get_drifts(self.store, drift_ids)
        outcomes: dict[str, dict[str, Any] | ActionError] = {}
        plans: list[_Plan] = []
        for drift_id in dict.fromkeys(drift_ids):
            try:
                plans.append(self._plan(drift_id, items.get(drift_id), automatic=False))
            except ActionError as exc:
                outcomes[drift_id] = exc
        with ExitStack() as stack:
            for name in sorted({q.replayed_key(p.key) for p in plans}):  # one order: no two callers deadlock
                stack.enter_context(self._lock(name))
            previous = q.actions_by_keys(self.store, sorted({p.key for p in plans}))
            saves: list[_Save] = []
            for plan in plans:
                row, save = self._decide(plan, previous.setdefault(plan.key, []), requested_by, approve, False)
                if save is not None:
                    saves.append(save)
                    if save.before is None:  # a second item of the same key finds this one
                        previous[plan.key].append(row)
                outcomes[plan.drift_id] = row
            self._save_many(saves, requested_by)
        ordered = {d: outcomes[d] for d in dict.fromkeys(drift_ids)}  # as asked: the bulk answer keeps the filter's
        return {d: o if isinstance(o, ActionError) else _public(o) for d, o in ordered.items()}

    def approve(self, action_id: str, who: str, execute: bool = True) -> dict[str, Any]:
        row = q.get_action(self.store, action_id)
        if row is None:
            raise ActionError(404, f"action {action_id} not found")
        with self._lock(row["IdempotencyKey"]):
            row = q.get_action(self.store, action_id) or row
            if row["State"] != PENDING:
                raise ActionError(409, f"action {action_id} is {row['State']}; only pending actions are approved")
            if row["ApprovedBy"]:
                raise ActionError(409, f"action {action_id} was already approved by {row['ApprovedBy']}")
            before = dict(row)
            row["ApprovedBy"] = who
            self._save(row, who, "action.approve", before)
            return self._execute_locked(action_id) if execute else _public(row)

    def replay(self, action_id: str, who: str, execute: bool = True) -> dict[str, Any]:
        """Re-run a failed action as a new one linked to it (``original_action_id``)."""
        orig = q.get_action(self.store, action_id)
        if orig is None:
            raise ActionError(404, f"action {action_id} not found")
        if orig["State"] != FAILED:
            raise ActionError(409, f"action {action_id} is {orig['State']}; only failed actions are replayed")
        with self._lock(orig["IdempotencyKey"]):
            replays = q.list_actions(self.store, original_action_id=action_id, limit=1000)[0]
            active = [r for r in replays if r["State"] in (*ACTIVE, SUCCEEDED)]
            if active:
                return _public(active[0])
            now = _now()
            row = dict(orig)
            row.update(
                {
                    "ActionId": uuid.uuid4().hex,
                    "IdempotencyKey": f"{orig['IdempotencyKey']}{q.REPLAY}{len(replays) + 1}",
                    "Kind": "replay",
                    "State": PENDING,
                    "Attempts": 0,
                    "LastError": "",
                    "Result": "",
                    "OriginalActionId": action_id,
                    "RequestedBy": who,
                    "ApprovedBy": who,
                    "CreatedAt": now,
                    "NextAttemptAt": q.EPOCH,
                    "DeadLetter": 0,
                }
            )
            self._save(row, who, "action.replay", None, f"replay of {action_id}")
            before = dict(orig)
            orig["DeadLetter"] = 0
            self._save(orig, who, "action.replayed", before, f"replayed as {row['ActionId']}")
        return self.execute(row["ActionId"]) if execute else _public(row)

    # --- execution
    def execute(self, action_id: str) -> dict[str, Any]:
        row = q.get_action(self.store, action_id)
        if row is None:
            raise ActionError(404, f"action {action_id} not found")
        with self._lock(row["IdempotencyKey"]):
            return self._execute_locked(action_id)

    def _execute_locked(self, action_id: str) -> dict[str, Any]:
        row = q.get_action(self.store, action_id)
        assert row is not None
        if row["State"] in (SUCCEEDED, FAILED):
            return _public(row)
        if not row["ApprovedBy"]:
            return _public(row)  # waits for a person's approval
        if not self.executes:
            return _public(row)  # queued: the actions job of the process that runs the jobs executes it
        moot = self._moot(row)
        if moot:
            before = dict(row)
            row["State"], row["DeadLetter"] = FAILED, 0
            row["LastError"] = f"cancelled: {moot}; nothing written"
            row["Result"] = json.dumps({"cancelled": moot})
            self._save(row, "reconciler", "action.cancel", before, moot)
            return _public(row)
        system = row["TargetSystem"]
        if self.erp is None:
            return self._defer(row, "no ERP connector is configured", 60.0)
        if not self.breakers.allow(system):
            return self._defer(row, f"circuit breaker for {system} is open", self.breakers.retry_in(system))
        before = dict(row)
        row["State"] = IN_PROGRESS
        row["NextAttemptAt"] = q.EPOCH
        try:
            self._save(row, "reconciler", "action.start", before)
        except BaseException:
            self.breakers.release(system)  # no call was made: a half-open trial granted above is not spent
            raise
        attempts_here = 0
        last_transient = ""

        def attempt() -> ActionOutcome:
            nonlocal attempts_here, last_transient
            if attempts_here and (moot := self._moot(row)):  # checked before each retry too, not once: an item
                raise Mooted(moot)  # ignored (or an invoice voided) during the backoff was posted anyway
            if attempts_here and not self.breakers.allow(system):
                raise BreakerOpen(system)
            attempts_here += 1
            try:
                with self._documents_locked(row):
                    outcome = self._perform(row)
            except TransientError as exc:
                self.breakers.failure(system)
                last_transient = str(exc)
                raise
            except BusinessRuleError:
                self.breakers.success(system)  # the system answered: it is up
                raise
            except (ActionError, StoreError, NotYet):
                self.breakers.release(system)  # decided here, or the tower's own store failed: not the system
                raise
            except Exception as exc:  # an unexpected answer or a bug: a failed attempt, never a stuck action
                self.breakers.failure(system)
                raise UnexpectedError(f"{type(exc).__name__}: {exc}") from exc
            self.breakers.success(system)
            return outcome

        retrying = Retrying(
            stop=stop_after_attempt(self.retry.attempts_per_execution),
            wait=wait_exponential(multiplier=self.retry.initial_s, max=self.retry.max_s),
            retry=retry_if_exception_type(TransientError),
            reraise=True,
        )
        before = dict(row)
        try:
            outcome = retrying(attempt)
        except Mooted as exc:
            row["Attempts"] = int(row["Attempts"]) + attempts_here
            row["State"], row["DeadLetter"] = FAILED, 0
            row["LastError"] = f"cancelled before attempt {attempts_here + 1}: {exc}; the attempts before it failed"
            row["Result"] = json.dumps({"cancelled": str(exc)})
            self._save(row, "reconciler", "action.cancel", before, str(exc))
            return _public(row)
        except BreakerOpen:
            # the attempts made before the breaker opened failed transiently: they count against the budget
            # the system's own last words stay on a dead letter, not only in the audit trail
            exhausted = f"transient: {system} kept failing ({last_transient}); its circuit breaker opened"
            reason = f"circuit breaker for {system} opened"
            return self._retry_later(row, before, attempts_here, reason, self.breakers.retry_in(system), exhausted)
        except TransientError as exc:
            wait = max(self.breakers.retry_in(system), self.retry.initial_s)
            return self._retry_later(row, before, attempts_here, f"transient: {exc}", wait)
        except BusinessRuleError as exc:
            return self._fail(
                row, before, attempts_here, f"business rule: {exc}", "rejected by the target; not retried"
            )
        except NotYet as exc:
            wait = max(self.retry.initial_s, 1.0)
            return self._retry_later(row, before, attempts_here, f"waiting: {exc}", wait)
        except ActionError as exc:
            return self._fail(row, before, attempts_here, str(exc), "cannot be performed")
        except StoreError as exc:
            # the tower's store failed around the call (a read before it, the check after): nothing says whether
            # the target was written, so the action waits and its next attempt looks at the target first
            note = "retries exhausted (the tower's store)"
            return self._retry_later(row, before, attempts_here, f"store: {exc}", self.retry.initial_s, note=note)
        except UnexpectedError as exc:
            log.exception("action %s failed unexpectedly", row["ActionId"])
            return self._fail(
                row, before, attempts_here, f"unexpected: {exc}", "unexpected error; not retried, replay it once fixed"
            )
        row["Attempts"] = int(row["Attempts"]) + attempts_here
        row["State"] = SUCCEEDED
        row["LastError"] = ""
        row["Result"] = json.dumps(
            {"target_ref": outcome.target_ref, "already_done": outcome.already_done, "detail": outcome.detail}
        )
        self._save(row, "reconciler", "action.succeed", before, outcome.detail)
        self._settle_dead_letters(row)
        return _public(row)

    def _settle_dead_letters(self, done: dict[str, Any]) -> None:
        """Failures of the same correction (its original, earlier replays, an earlier request) leave the
        dead-letter list once it succeeded: replaying one of them would only run the correction again."""
        base = q.replayed_key(done["IdempotencyKey"])
        for other in q.actions_by_key(self.store, base):
            if other["ActionId"] != done["ActionId"] and other["State"] == FAILED and other["DeadLetter"]:
                before = dict(other)
                other["DeadLetter"] = 0
                self._save(other, "reconciler", "action.settled", before, f"superseded by {done['ActionId']}")

    def _fail(
        self, row: dict[str, Any], before: dict[str, Any], attempts: int, error: str, note: str
    ) -> dict[str, Any]:
        """An attempt that is not retried: the action fails into the dead-letter list, for a replay."""
        row["Attempts"] = int(row["Attempts"]) + attempts
        row["State"] = FAILED
        row["DeadLetter"] = 1
        row["LastError"] = error
        self._save(row, "reconciler", "action.fail", before, note)
        return _public(row)

    def _retry_later(
        self,
        row: dict[str, Any],
        before: dict[str, Any],
        attempts: int,
        reason: str,
        wait_s: float,
        exhausted: str = "",
        note: str = "retries exhausted",
    ) -> dict[str, Any]:
        """A transient end: the action waits for its next attempt, or fails into the dead letters once the attempts
        so far spend its budget (an execution an open breaker refused made none and spends nothing)."""
        total = int(row["Attempts"]) + attempts
        if attempts and policy.after_transient_failure(total, self.retry) == "dead_letter":
            return self._fail(row, before, attempts, exhausted or reason, note)
        row["Attempts"] = total
        return self._defer(row, reason, wait_s, before)

    def _defer(
        self, row: dict[str, Any], reason: str, wait_s: float, before: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        before = before or dict(row)
        row["State"] = PENDING
        row["LastError"] = reason
        row["NextAttemptAt"] = _now() + dt.timedelta(seconds=max(wait_s, 0.05))
        if before["State"] == PENDING and before["LastError"] == reason and before["Attempts"] == row["Attempts"]:
            # deferred again for the same reason, spending no attempt (no ERP connector, a breaker open through an
            # outage): the trail already says so; a record per pass of the actions job buried the operators' own
            row["UpdatedAt"] = _now()
            q.write_action(self.store, row)
        else:
            self._save(row, "reconciler", "action.defer", before, reason)
        return _public(row)

    # --- the operations, each preceded by a look at the target
    def _perform(self, row: dict[str, Any]) -> ActionOutcome:
        assert self.erp is not None
        op = policy.operation(row["Operation"])
        params = json.loads(row["Params"] or "{}")
        if op in policy.CORRECTIONS:
            invoice_id = params["invoice_id"]
            invoice = q.load_invoice(self.store, invoice_id)
            if invoice is None:
                raise ActionError(422, f"invoice {invoice_id} is not in the billing state")
            plan = policy.correction(op, self._live_postings(invoice_id), invoice)
            if plan.post and plan.cancel and (check := getattr(self.erp, "check_postable", None)) is not None:
                check(invoice)  # cancel only what can be replaced: a refused repost left no posting at all
            why = f"{row['Class']} of {invoice_id} (tower action {row['ActionId']})"
            outcomes = [self.erp.cancel_entry(entry_id, why) for entry_id in plan.cancel]
            if plan.post:
                outcomes.append(self.erp.post_invoice(invoice))
            if not outcomes:
                return ActionOutcome(plan.keep, True, "the ERP holds one posting as billing has it (checked first)")
            done = all(o.already_done for o in outcomes)
            return ActionOutcome(outcomes[-1].target_ref, done, "; ".join(o.detail for o in outcomes))
        if op == "post_invoice":
            invoice_id = params["invoice_id"]
            present = self._live_postings(invoice_id)
            if present:
                return ActionOutcome(present[0].entry_id, True, "already in the ERP (checked before writing)")
            invoice = q.load_invoice(self.store, invoice_id)
            if invoice is None:
                raise ActionError(422, f"invoice {invoice_id} is not in the billing state")
            return self.erp.post_invoice(invoice)
        if op == "apply_payment":
            if "payment_id" in params and row["Class"] == c.PAYMENT_UNAPPLIED:
                payments = [params["payment_id"]]
                only_invoice = ""
            else:
                only_invoice = params["invoice_id"]
                payments = q.payments_for_invoice(self.store, only_invoice)
            outcomes = []
            for pid in payments:
                payment = q.load_payment(self.store, pid)
                if payment is None:
                    raise ActionError(422, f"payment {pid} is not in the billing state")
                applied: dict[str, int] = {}
                foreign: dict[str, str] = {}  # minor units of another currency never count towards the amount
                for e in self.erp.find_by_external_ref(pid):
                    if e.entry_type == "payment" and e.live:
                        if e.currency != payment.currency:
                            foreign[e.applied_to_ref] = e.currency
                            continue
                        applied[e.applied_to_ref] = applied.get(e.applied_to_ref, 0) + e.amount_minor
                for invoice_id, amount in sorted(payment.allocations.items()):
                    if only_invoice and invoice_id != only_invoice:
                        continue
                    if invoice_id in foreign:  # applying more would apply the payment's cash twice
                        raise ActionError(
                            422,
                            f"the ERP applied {pid} to {invoice_id} in {foreign[invoice_id]}, not {payment.currency}: "
                            "correct that application in the ERP (the tower does not rewrite one)",
                        )
                    if applied.get(invoice_id, 0) >= amount:
                        outcomes.append(ActionOutcome(pid, True, f"{pid}->{invoice_id} already applied"))
                        continue
                    if not self._live_postings(invoice_id):
                        raise NotYet(f"invoice {invoice_id} is not posted in the ERP yet (its own correction first)")
                    outcomes.append(self.erp.apply_payment(payment, invoice_id, amount))
            if not outcomes:
                raise ActionError(422, "nothing to apply: the payment has no allocations in billing")
            done = all(o.already_done for o in outcomes)
            return ActionOutcome(outcomes[-1].target_ref, done, "; ".join(o.detail for o in outcomes))
        if op == "post_credit_memo":
            pid = params["payment_id"]
            present = [e for e in self.erp.find_by_external_ref(pid) if e.entry_type == "credit_memo" and e.live]
            if present:
                return ActionOutcome(present[0].entry_id, True, "already in the ERP (checked before writing)")
            refund = q.load_payment(self.store, pid)
            if refund is None:
                raise ActionError(422, f"refund {pid} is not in the billing state")
            return self.erp.post_credit_memo(refund)
        raise ActionError(422, f"unknown operation {op}")

    def _live_postings(self, invoice_id: str) -> list[LedgerEntry]:
        assert self.erp is not None
        return [e for e in self.erp.find_by_external_ref(invoice_id) if e.entry_type == "invoice" and e.live]

    def target_holds(self, row: dict[str, Any]) -> bool:
        """Does the target already hold what the action was to write? (restart recovery)"""
        assert self.erp is not None
        params = json.loads(row["Params"] or "{}")
        op = policy.operation(row["Operation"])
        if op in policy.CORRECTIONS:
            invoice = q.load_invoice(self.store, params["invoice_id"])
            if invoice is None:
                return False
            plan = policy.correction(op, self._live_postings(invoice.invoice_id), invoice)
            return not plan.cancel and not plan.post
        if op == "post_invoice":
            return bool(self._live_postings(params["invoice_id"]))
        if op == "post_credit_memo":
            return any(
                e.entry_type == "credit_memo" and e.live for e in self.erp.find_by_external_ref(params["payment_id"])
            )
        if op == "apply_payment" and "payment_id" in params:
            payment = q.load_payment(self.store, params["payment_id"])
            if payment is None:
                return False
            applied: dict[str, int] = {}
            for e in self.erp.find_by_external_ref(payment.payment_id):
                if e.entry_type == "payment" and e.live:
                    applied[e.applied_to_ref] = applied.get(e.applied_to_ref, 0) + e.amount_minor
            return all(applied.get(i, 0) >= a for i, a in payment.allocations.items())
        return False

    def recover(self, stale_after_s: float | None = None) -> list[str]:
        """Actions left in_progress by a crash: look at the target first; done -> succeeded, else pending. At
        start every one (``stale_after_s`` None); from the actions job only those unchanged for
        ``stale_after_s`` and not executing here. An action whose target cannot be read stays in_progress for the
        next pass (one failure does not stop the others)."""
        recovered = []
        cutoff = _now() - dt.timedelta(seconds=stale_after_s or 0)
        for listed in q.actions_in_states(self.store, [IN_PROGRESS]):
            if stale_after_s is not None and c.aware(listed["UpdatedAt"]) > cutoff:
                continue
            lock = self._lock(listed["IdempotencyKey"])
            if not lock.acquire(blocking=stale_after_s is None):
                continue  # executing in this process right now
            try:
                row = q.get_action(self.store, listed["ActionId"])
                if row is None or row["State"] != IN_PROGRESS:
                    continue  # ended meanwhile
                before = dict(row)
                try:
                    holds = self.erp is not None and self.target_holds(row)
                except TransientError as exc:
                    log.warning("recovery of %s: the target is unreachable (%s)", row["ActionId"], exc)
                    holds = False
                except BusinessRuleError as exc:  # the target refuses the look itself: the execution fails it
                    log.warning("recovery of %s: the target refuses the check (%s)", row["ActionId"], exc)
                    holds = False
                except Exception:
                    log.exception("recovery of %s: the target cannot be checked; tried again later", row["ActionId"])
                    continue
                if holds:
                    row["State"] = SUCCEEDED
                    row["Result"] = json.dumps({"target_ref": row["TargetRef"], "already_done": True})
                    self._save(row, "reconciler", "action.recover", before, "found in the target after a restart")
                else:
                    row["State"] = PENDING
                    row["NextAttemptAt"] = q.EPOCH
                    self._save(row, "reconciler", "action.recover", before, "not in the target; will retry")
                recovered.append(row["ActionId"])
            finally:
                lock.release()
        return recovered

    def process_due(self, limit: int = 100) -> int:
        """Execute pending, approved actions whose next attempt is due (the scheduler's job)."""
        done = 0
        for row in q.actions_in_states(self.store, [PENDING], due_before=_now(), approved_only=True, limit=limit):
            self.execute(row["ActionId"])
            done += 1
        return done

    def auto_correct(self, run_id: str) -> int:
        """Start corrective syncs for this run's new items of technical classes (policy: auto)."""
        if not self.auto_enabled:
            return 0
        started = 0
        items, _ = q.list_drift(self.store, classes=sorted(c.TECHNICAL), states=[c.NEW, c.PERSISTING], limit=1000)
        # invoices first: a payment or refund is applied to an invoice the ERP must already hold
        items.sort(key=lambda i: policy.auto_rank(i["class"]))
        for item in items:
            try:
                self.request(item["drift_id"], "reconciler (auto)", automatic=True)
                started += 1
            except ActionError as exc:
                log.info("auto-correct skipped %s: %s", item["drift_id"], exc)
        return started

    def get(self, action_id: str) -> dict[str, Any]:
        row = q.get_action(self.store, action_id)
        if row is None:
            raise ActionError(404, f"action {action_id} not found")
        return _public(row)


public_action = _public
