"""APScheduler wiring: incremental and full runs and the retry of due corrective actions, in the background.

Jobs never overlap themselves (max_instances=1, coalesce). An incremental run job that finds another run in
progress skips its turn; a full run job waits for it to end (both jobs count from the same start, so with the
default intervals every daily full turn fell on an incremental turn's second and was skipped), unless that run is
itself a full run of every region.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from apscheduler.schedulers.base import BaseScheduler

from tower_core.settings import Settings

if TYPE_CHECKING:
    from reconciler.service import ReconcilerService

log = logging.getLogger("tower.reconciler.jobs")


# How long a scheduled full run waits for a run in progress to end.
FULL_RUN_WAIT_S = 3600.0


def _run_job(service: ReconcilerService, full: bool) -> None:
    from reconciler.runner import RunFailed
    from reconciler.service import RunBusy

    try:
        service.announce()
        if full and service.current_scope == (True, ""):
            raise RunBusy(f"{service.current_run or '?'} (a full run of every region)")
        service.run(full=full, trigger="schedule", requested_by="scheduler", wait_s=FULL_RUN_WAIT_S if full else 0)
    except RunBusy as exc:
        log.info("scheduled %s run skipped: %s", "full" if full else "incremental", exc)
    except RunFailed as exc:
        log.warning("scheduled run failed: %s", exc)


# An action in_progress this long, and not executing in this process, was left by a crash (or by a recovery at
# start that could not read its target): the actions job looks at its target again.
STALE_IN_PROGRESS_S = 300.0


def _actions_job(service: ReconcilerService) -> None:
    try:
        service.announce()
        if service.actions.erp is not None:
            service.actions.recover(stale_after_s=STALE_IN_PROGRESS_S)
        service.actions.process_due()
        service.actions.publish_breakers()
    except Exception:
        log.exception("retrying due actions failed")


def schedule(service: ReconcilerService, scheduler: BaseScheduler, settings: Settings) -> list[str]:
    """Add the reconciler's interval jobs to a scheduler (the app's shared one, or ``tower reconciler``'s); each
    first runs one interval after the start."""
    jobs = [
        ("reconcile", settings.reconcile_interval_s, _run_job, [service, False]),
        ("reconcile-full", settings.reconcile_full_interval_s, _run_job, [service, True]),
        ("reconcile-actions", settings.reconcile_actions_interval_s, _actions_job, [service]),
    ]
    added = []
    for job_id, interval, fn, args in jobs:
        if interval <= 0:
            continue
        scheduler.add_job(
            fn,
            "interval",
            args=args,
            seconds=interval,
            id=job_id,
            name=job_id,
            replace_existing=True,
        )
        added.append(job_id)
    return added
