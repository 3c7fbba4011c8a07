"""The SLA evaluation job: reads step statistics and drift ages from the store, decides (pure modules), records
breaches and delivers alerts. Runs in ``tower serve``'s scheduler every ``TOWER_SLA_EVAL_INTERVAL_S`` and on
``POST /api/sla/evaluate``.

Evaluation clock: every evaluation is "as of" an instant ``now`` (default: the wall clock). Only activity at or
before ``now`` counts, so evaluating at a past instant gives the answer the tower would have given then; tests
and back-fills pass it explicitly (the API's ``now``). Breaches start and end at evaluation instants.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from reconciler.sla import evaluate as ev
from reconciler.sla.alertmanager import AlertmanagerClient
from reconciler.sla.definitions import Definitions, Objective, load_definitions
from reconciler.sla.payloads import rfc3339
from reconciler.sla.webhook import WebhookNotifier
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store import sla as sla_store

log = logging.getLogger("tower.sla")
RESOLVED_LOOKBACK_MS = 86_400_000  # resolutions older than a day are not announced to webhooks any more


@dataclass
class Evaluation:
    now_ns: int
    statuses: list[ev.ObjectiveStatus]
    thresholds: dict[str, list[dict[str, Any]]]
    alerts: list[ev.Alert]
    transitions: ev.Transitions
    recorded: bool
    duration_s: float = 0.0
    delivery: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "evaluated_at": rfc3339(self.now_ns // 1_000_000),
            "recorded": self.recorded,
            "duration_s": self.duration_s,
            "firing": [b.to_json() for b in self.transitions.firing],
            "started": [b.breach_id for b in self.transitions.started],
            "resolved": [b.to_json() for b in self.transitions.resolved],
            "delivery": self.delivery,
        }


@dataclass
class Counters:
    evaluations: int = 0
    errors: int = 0
    notifications: dict[tuple[str, str], int] = field(default_factory=dict)

    def notified(self, channel: str, outcome: str, n: int = 1) -> None:
        self.notifications[(channel, outcome)] = self.notifications.get((channel, outcome), 0) + n


class SlaService:
    def __init__(self, settings: Settings, store: Store, definitions: Definitions | None = None) -> None:
        self.settings = settings
        self.store = store
        self.definitions = definitions or load_definitions(settings.sla_config)
        dashboard = settings.sla_dashboard_url or f"http://{settings.dashboard_host}:{settings.dashboard_port}"
        self.links = ev.Links(dashboard)
        self.alertmanager = (
            AlertmanagerClient(
                settings.alertmanager_url,
                settings.alertmanager_resend_s,
                eval_interval_s=settings.sla_eval_interval_s,
            )
            if settings.alertmanager_url
            else None
        )
        self.webhook = (
            WebhookNotifier(store, settings.sla_webhook_urls, settings.api_url) if settings.sla_webhook_urls else None
        )
        self.last: Evaluation | None = None
        self.counters = Counters()
        self._lock = threading.Lock()

    def close(self) -> None:
        for client in (self.alertmanager, self.webhook):
            if client is not None:
                client.close()

    # --- reads

    def _objective_statuses(self, obj: Objective, now_ns: int) -> list[ev.ObjectiveStatus]:
        rows = sla_store.step_stats(
            self.store,
            step=obj.step,
            key_type=obj.key_type,
            source=obj.source,
            target=obj.target_system,
            threshold_s=obj.threshold,
            now_ns=now_ns,
            windows_s=ev.query_windows(self.definitions, obj),
            period_s=obj.period,
            bounds_s=ev.bounds_for(obj.threshold),
            regions=obj.regions,
            skew_s=self.settings.sla_clock_skew_s,
        )
        stats = ev.fold_regions([ev.StepStats.from_row(r) for r in rows], self.settings.sla_max_regions)
        return [ev.objective_status(self.definitions, obj, s) for s in stats]

    def _assess(self, now_ns: int) -> tuple[list[ev.ObjectiveStatus], dict[str, list[dict[str, Any]]], list[ev.Alert]]:
        statuses: list[ev.ObjectiveStatus] = []
        alerts: list[ev.Alert] = []
        for obj in self.definitions.objectives:
            for status in self._objective_statuses(obj, now_ns):
                statuses.append(status)
                alerts += ev.objective_alerts(obj, status, self.links)
        thresholds: dict[str, list[dict[str, Any]]] = {}
        for rule in self.definitions.thresholds:
            rows = sla_store.unreconciled_by_region(
                self.store,
                now_ns=now_ns,
                max_age_s=rule.max_age,
                exclude_states=rule.exclude_states,
                classes=rule.classes,
                regions=rule.regions,
            )
            thresholds[rule.name] = rows
            alerts += ev.threshold_alerts(rule, rows, self.links)
        return statuses, thresholds, alerts

    def stuck(self, sla: str, region: str | None, limit: int, now_ns: int | None = None) -> list[dict[str, Any]]:
        obj = next((o for o in self.definitions.objectives if o.name == sla), None)
        if obj is None:
            raise KeyError(sla)
        now_ns = time.time_ns() if now_ns is None else now_ns
        return sla_store.stuck_items(
            self.store,
            step=obj.step,
            key_type=obj.key_type,
            source=obj.source,
            target=obj.target_system,
            threshold_s=obj.threshold,
            now_ns=now_ns,
            lookback_s=obj.period,
            regions=[region] if region else obj.regions,
            limit=limit,
            skew_s=self.settings.sla_clock_skew_s,
        )

    # --- the job

    def evaluate(self, now_ns: int | None = None, *, record: bool = True) -> Evaluation:
        """Assess every definition as of ``now_ns``; when ``record``, store breach transitions and deliver."""
        started = time.perf_counter()
        now_ns = time.time_ns() if now_ns is None else now_ns
        now_ms = now_ns // 1_000_000
        with self._lock:
            statuses, thresholds, alerts = self._assess(now_ns)
            open_breaches = [ev.Breach.from_row(r) for r in sla_store.open_breaches(self.store)]
            # an instant before the last recorded evaluation (a back-fill) is assessed, never recorded: it would
            # close alerts that still fire now, or reopen resolved ones, and announce that to Alertmanager. The
            # stored history knows that instant across a restart (resolved breaches included)
            latest_ms = sla_store.last_evaluated_ms(self.store)  # open breaches are rows of it too
            if self.last is not None and self.last.recorded:
                latest_ms = max(latest_ms, self.last.now_ns // 1_000_000)
            record = record and now_ms >= latest_ms
            trans = ev.transitions(open_breaches, alerts, now_ms)
            result = Evaluation(now_ns, statuses, thresholds, alerts, trans, record)
            if record:
                version = time.time_ns()
                sla_store.write_breaches(self.store, (b.to_row() for b in trans.rows()), version)
                result.delivery = self._deliver(trans, now_ms, version)
                self.counters.evaluations += 1
            result.duration_s = time.perf_counter() - started
            if record:
                self.last = result
        if record and (trans.started or trans.resolved):  # an assessment that records nothing starts nothing
            log.info(
                "SLA evaluation at %s: %d firing, %d started, %d resolved",
                rfc3339(now_ms),
                len(trans.firing),
                len(trans.started),
                len(trans.resolved),
            )
        return result

    def _deliver(self, trans: ev.Transitions, now_ms: int, version: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.alertmanager is not None:
            try:
                n = self.alertmanager.deliver(trans.firing, trans.resolved, {b.fingerprint for b in trans.started})
                out["alertmanager"] = {"sent": n}
                self.counters.notified("alertmanager", "sent", n)
            except httpx.HTTPError as exc:
                error = self.alertmanager.describe(exc)
                log.warning("Alertmanager delivery failed: %s", error)
                out["alertmanager"] = {"error": error}
                self.counters.notified("alertmanager", "failed")
        if self.webhook is not None:
            recent = [
                ev.Breach.from_row(r)
                for r in sla_store.list_breaches(
                    self.store, status="resolved", since_ms=now_ms - RESOLVED_LOOKBACK_MS, limit=1000
                )
            ]
            resolved = {b.breach_id: b for b in [*recent, *trans.resolved]}
            sent, failures = self.webhook.deliver(trans.firing, list(resolved.values()), version)
            out["webhook"] = {
                "sent": [
                    {
                        "receiver": s.receiver,
                        "url": s.url,
                        "group_key": s.group_key,
                        "status": s.status,
                        "alerts": s.alerts,
                    }
                    for s in sent
                ],
                "failures": failures,
            }
            self.counters.notified("webhook", "sent", len(sent))
            if failures:
                self.counters.notified("webhook", "failed", failures)
        return out

    def compliance(self) -> Evaluation:
        """The last recorded evaluation, or a fresh one that records nothing."""
        return self.last or self.evaluate(record=False)

    def job(self) -> None:
        """Scheduler entry point: never raises (a failed evaluation is logged, counted and retried next time)."""
        try:
            self.evaluate()
        except Exception:
            self.counters.errors += 1
            log.exception("SLA evaluation failed")

    def schedule(self, scheduler: Any) -> None:
        """Add the evaluation job to an APScheduler scheduler (no job when the interval is 0)."""
        interval = self.settings.sla_eval_interval_s
        if interval <= 0:
            return
        first = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=min(interval, 10.0))
        scheduler.add_job(
            self.job,
            "interval",
            seconds=interval,
            id="sla-evaluate",
            name="SLA evaluation",
            next_run_time=first,
            replace_existing=True,
        )
