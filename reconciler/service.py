"""The reconciler as the API process (or ``tower reconciler``) holds it: runs, the queue, actions, jobs.

One run at a time per process; the queue merge of a run and a person's acknowledge/ignore take the same
lock, so neither overwrites the other's state change.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from connectors.segment.tracking import policy_from_settings
from reconciler import classify as c
from reconciler import run_owner
from reconciler.actions import ActionError, ActionService, Breakers
from reconciler.connectors import Connectors
from reconciler.connectors import build as build_connectors
from reconciler.policy import RetryPolicy
from reconciler.retention import StatementRetention
from reconciler.runner import STAGES, Reconciler, RunFailed, RunResult, rules_fingerprint
from tower_core.errors import StoreError
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store import reconcile as q

log = logging.getLogger("tower.reconciler")


# The job process renews what it compares by this often; an API on another host takes an announcement older than
# ANNOUNCED_STALE_S for one of a process that is gone (on this host, the process itself is looked at).
ANNOUNCE_EVERY_S = 600.0
ANNOUNCED_STALE_S = 3600.0

# A graceful stop waits this long for the run in progress to reach its next stage (a stage of a full run at 10M
# invoices takes up to ~7 s here); past it the process exits and its next start closes the run as interrupted.
RUN_STOP_WAIT_S = 25.0


class SettingsDiffer(Exception):
    """This process would compare by other settings than the process that runs the reconciler's jobs."""


class RunBusy(Exception):
    """A run is in progress in this process."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} is in progress")
        self.run_id = run_id


class ReconcilerService:
    def __init__(self, settings: Settings, store: Store, connectors: Connectors | None = None) -> None:
        self.settings = settings
        self.store = store
        self.rules = c.Rules.from_settings(settings)
        self.queue_lock = threading.RLock()
        self._run_lock = threading.Lock()
        self._progress: dict[str, dict[str, Any]] = {}
        self._failed: dict[str, str] = {}  # run id -> error, of runs that failed in this process
        self._current: str | None = None
        self._current_scope: tuple[bool, str] | None = None  # (full, region) of the run in progress
        self._stopping = threading.Event()
        self._announced_at = 0.0
        self.connectors = connectors if connectors is not None else build_connectors(settings)
        self.reconciler = Reconciler(
            store,
            self.rules,
            queue_lock=self.queue_lock,
            pii=policy_from_settings(settings),
            retention=StatementRetention(
                settings.reconcile_statement_keep_runs, settings.reconcile_statement_keep_days
            ),
        )  # None: PII dropped
        self.reconciler.should_stop = self._stopping.is_set
        self.actions = ActionService(
            store,
            None,
            retry=RetryPolicy(
                attempts_per_execution=settings.reconcile_action_attempts,
                initial_s=settings.reconcile_action_backoff_s,
                max_s=settings.reconcile_action_backoff_max_s,
                max_total_attempts=settings.reconcile_action_max_attempts,
            ),
            breakers=Breakers(settings.reconcile_breaker_failures, settings.reconcile_breaker_reset_s),
            auto_enabled=settings.reconcile_auto_correct,
            # on the embedded store no other process can open the data: this one is the only executor
            executes=settings.reconcile_scheduler or not settings.clickhouse_url,
        )
        self.set_connectors(self.connectors)

    def set_connectors(self, connectors: Connectors) -> None:
        """Swap the connectors (tests wire an in-memory estate; the demo its HTTP client)."""
        self.connectors = connectors
        self.reconciler.billing = connectors.billing
        self.reconciler.erp = connectors.erp
        self.reconciler.cdp = connectors.cdp
        self.actions.erp = connectors.erp

    # --- lifecycle
    def start(self, scheduler: Any = None) -> None:
        """Close runs a crash interrupted (not those another live process is running), recover in-progress
        actions, schedule the jobs.

        ``scheduler``: an APScheduler scheduler to add the jobs to (the app's); None = no jobs here.
        """
        host, now = socket.gethostname(), dt.datetime.now(dt.UTC)
        for run in q.interrupted_runs(self.store):
            if not run_owner.abandoned(run["owner"], now - c.aware(run["started_at"]), host):
                continue  # another process is running it right now
            run_record = {
                "RunId": run["run_id"],
                "Mode": run["mode"],
                "Region": run["region"],
                "Trigger": run["trigger"],
                "RequestedBy": run["requested_by"],
                "State": "failed",
                "Stage": run["stage"],
                "AsOf": run["as_of"],
                "Watermark": run["watermark"],
                "StartedAt": run["started_at"],
                "FinishedAt": dt.datetime.now(dt.UTC),
                "Pulled": run["pulled"],
                "KeysCompared": run["keys_compared"],
                "DriftOpen": run["drift_open"],
                "DriftNew": run["drift_new"],
                "DriftResolved": run["drift_resolved"],
                "ResidualMinor": run["residual_minor"],
                "Error": "interrupted (the process stopped during the run)",
                "Owner": run["owner"],
                "Rules": run["rules"],
            }
            q.audit_changes_not_applied(self.store, run["run_id"])
            q.write_run(self.store, run_record)
        if self.actions.erp is not None and self.actions.executes:  # another process's actions are its own
            try:
                self.actions.recover()
            except Exception:
                log.exception("recovery of in-progress actions failed; the actions job tries again")
        if scheduler is not None and self.settings.reconcile_scheduler:
            from reconciler.jobs import schedule

            self.announce(force=True)  # what API-started runs beside it must match
            schedule(self, scheduler, self.settings)

    # --- runs
    def run(
        self,
        *,
        full: bool = False,
        region: str = "",
        as_of: dt.datetime | None = None,
        trigger: str = "api",
        requested_by: str = "",
        run_id: str | None = None,
        wait_s: float = 0.0,
        lock_held: bool = False,
    ) -> RunResult:
        """Run now in this thread (scheduler jobs, CLI beside a server); RunBusy if one is running (and, with
        ``wait_s``, still is that many seconds later). ``lock_held``: the caller took the run slot for it
        (start_run), and this run releases it."""
        run_id = run_id or uuid.uuid4().hex[:16]
        if not lock_held and not (
            self._run_lock.acquire(timeout=wait_s) if wait_s > 0 else self._run_lock.acquire(blocking=False)
        ):
            raise RunBusy(self._current or "?")
        if self._stopping.is_set():  # a turn that waited for the run a stop ended: no new run, no record of one
            self._run_lock.release()
            self._failed[run_id] = "not started: the process is shutting down"  # an accepted one says so
            raise RunFailed(self._failed[run_id])
        try:
            self._current, self._current_scope = run_id, (full, region)
            self._progress[run_id] = {"stage": "starting", "done": 0, "total": len(STAGES)}

            def progress(stage: str, done: int, total: int) -> None:
                self._progress[run_id] = {"stage": stage, "done": done, "total": total}

            try:
                result = self.reconciler.run(
                    full=full,
                    region=region,
                    as_of=as_of,
                    trigger=trigger,
                    requested_by=requested_by,
                    run_id=run_id,
                    progress=progress,
                )
            except RunFailed as exc:
                self._failed[run_id] = str(exc)  # said by run_status even if the store refused the record
                raise
        finally:
            self._current = self._current_scope = None
            self._run_lock.release()
        try:
            self.actions.auto_correct(result.run_id)
        except Exception:
            log.exception("automatic corrections after run %s failed", result.run_id)
        return result

    def start_run(self, **kwargs: Any) -> str:
        """Start a run in a background thread and return its id at once (the API's POST /api/runs). The run slot
        is taken here, before the answer: taken in the thread, a scheduled run could take it first, and the
        accepted run stayed 'queued' for good (and `tower reconcile` waited an hour for it)."""
        if not self._run_lock.acquire(blocking=False):
            raise RunBusy(self._current or "?")
        run_id = uuid.uuid4().hex[:16]
        self._progress[run_id] = {"stage": "queued", "done": 0, "total": len(STAGES)}

        def target() -> None:
            try:
                self.run(run_id=run_id, lock_held=True, **kwargs)
            except RunFailed as exc:
                log.warning("run %s failed: %s", run_id, exc)
            except Exception:  # a thread's error would otherwise leave the run 'queued' with no word of why
                self._failed[run_id] = "unexpected error starting the run (see the log)"
                log.exception("run %s could not run", run_id)

        try:
            threading.Thread(target=target, name=f"reconcile-{run_id}", daemon=True).start()
        except BaseException:
            self._run_lock.release()
            raise
        return run_id

    def run_status(self, run_id: str) -> dict[str, Any] | None:
        doc = q.get_run(self.store, run_id)
        progress = self._progress.get(run_id)
        if doc is None and progress is None:
            return None
        doc = doc or {"run_id": run_id, "state": "queued"}
        if run_id in self._failed and doc.get("state") in ("queued", "running"):  # its failure was not stored
            reached = (progress or {}).get("stage") or doc.get("stage", "")
            doc.update(state="failed", error=doc.get("error") or self._failed[run_id], stage=reached)
            progress = None
        if progress:
            doc["progress"] = progress
        else:
            stage = doc.get("stage", "")
            # a failed run got as far as its stage (the stages before it are done), a succeeded one through all
            done = len(STAGES) if doc.get("state") == "succeeded" else 0
            if doc.get("state") == "failed":  # one that failed before any stage did none
                done = STAGES.index(stage) if stage in STAGES else 0
            doc["progress"] = {"stage": stage, "done": done, "total": len(STAGES)}
        return doc

    @property
    def current_run(self) -> str | None:
        return self._current

    def settings_identity(self) -> str:
        """What decides a run's findings besides the data: the rules (code and settings), the connectors it pulls
        through and whether it corrects automatically."""
        rules = rules_fingerprint(self.reconciler.rule_params(dt.datetime.now(dt.UTC)))
        return f"rules {rules}, connectors {self.settings.reconcile_connectors}, auto-correct " + (
            "on" if self.settings.reconcile_auto_correct else "off"
        )

    def announce(self, *, force: bool = False) -> None:
        """The process running the jobs says what it compares by, who it is and when (again every
        ANNOUNCE_EVERY_S from its jobs, so an API on another host can tell it is still there)."""
        if not self.settings.reconcile_scheduler or self._stopping.is_set():
            return
        now = time.time()
        if not force and now - self._announced_at < ANNOUNCE_EVERY_S:
            return
        doc = {"identity": self.settings_identity(), "owner": run_owner.this_process(), "at": now}
        try:
            q.set_cursor(self.store, *q.JOB_SETTINGS, json.dumps(doc))
        except StoreError as exc:  # said again at the next turn
            log.warning("could not announce this job process's settings: %s", exc)
            return
        self._announced_at = now

    def _job_process_settings(self) -> str | None:
        """What the live job process announced, or None: no announcement, one withdrawn at its stop, one of a
        process of this host that is gone, or one of another host not renewed for ANNOUNCED_STALE_S."""
        raw = q.get_cursor(self.store, *q.JOB_SETTINGS)
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            return None
        if not isinstance(doc, dict) or not doc.get("identity"):
            return None
        age = dt.timedelta(seconds=max(0.0, time.time() - float(doc.get("at") or 0)))
        if age > dt.timedelta(seconds=ANNOUNCED_STALE_S) or run_owner.abandoned(
            str(doc.get("owner") or ""), age, socket.gethostname()
        ):
            return None
        return str(doc["identity"])

    def check_settings_agree(self) -> None:
        """A run started here, beside a process that runs the jobs (`tower reconciler`), must compare as that one
        does: by other settings, each API-started run flipped the items the other's runs had found back and forth,
        and acknowledgements were lost with each flip. SettingsDiffer names both."""
        if self.settings.reconcile_scheduler or not self.settings.clickhouse_url:
            return  # this process runs the jobs, or no other can (the embedded store is one process's)
        theirs = self._job_process_settings()
        mine = self.settings_identity()
        if theirs and theirs != mine:
            raise SettingsDiffer(
                f"this API compares by {mine}, the process running the reconciler's jobs by {theirs}: set the same "
                "TOWER_RECONCILE_* settings (and release) on both, or start runs there"
            )

    @property
    def current_scope(self) -> tuple[bool, str] | None:
        """(full, region) of the run in progress here, or None."""
        return self._current_scope

    def stop(self, timeout_s: float) -> bool:
        """A graceful stop: the run in progress ends at its next stage (recorded as failed, saying why; nothing
        half-classified), and no run starts any more. Waits up to ``timeout_s``; True if no run is left. A stop
        that abandoned the run left it 'running' until the next start closed it as interrupted."""
        self._stopping.set()
        if self._announced_at:  # withdrawn: a retired job process must not hold API runs to its settings
            try:
                q.set_cursor(self.store, *q.JOB_SETTINGS, "")
            except StoreError as exc:
                log.warning("could not withdraw this job process's settings (they go stale in time): %s", exc)
        if not self._run_lock.acquire(timeout=max(timeout_s, 0.0)):
            log.warning("run %s still in progress after %.0f s of stopping; left to the next start", self._current,
                        timeout_s)  # fmt: skip
            return False
        self._run_lock.release()
        return True

    # --- queue
    def transition(self, drift_id: str, target: str, note: str, who: str) -> dict[str, Any]:
        """Acknowledge or ignore an item; audited with who, when, why and before/after."""
        outcome = self.transitions([drift_id], target, note, who)[drift_id]
        if isinstance(outcome, ActionError):
            raise outcome
        return outcome

    def transitions(
        self, drift_ids: Sequence[str], target: str, note: str, who: str
    ) -> dict[str, dict[str, Any] | ActionError]:
        """Acknowledge or ignore several items (a bulk action) in one read and two writes: each item, or why it
        was refused. Item by item, 500 took ~35 s (three store round trips each), past any client's patience."""
        with self.queue_lock:
            found = q.get_drifts(self.store, drift_ids)
            out: dict[str, dict[str, Any] | ActionError] = {}
            audits = []
            now = dt.datetime.now(dt.UTC)
            for drift_id in dict.fromkeys(drift_ids):
                item = found.get(drift_id)
                if item is None:
                    out[drift_id] = ActionError(404, f"drift item {drift_id} not found")
                    continue
                try:
                    state = c.manual_transition(item["State"], target, note)
                except c.TransitionError as exc:
                    status = 409 if "already" in str(exc) or "resolved" in str(exc) else 422
                    out[drift_id] = ActionError(status, str(exc))
                    continue
                before = {"state": item["State"], "note": item["StateNote"]}
                item.update(State=state, StateNote=note, UpdatedAt=now)
                audits.append(
                    q.audit_record(
                        who, f"drift.{state}", "drift_item", drift_id, before, {"state": state, "note": note}, note
                    )
                )
                out[drift_id] = item
            changed = [i for i in out.values() if not isinstance(i, ActionError)]
            if changed:
                q.write_items(self.store, changed)
                q.write_audit(self.store, audits)
            return out
