"""The background scheduler of ``tower serve`` (APScheduler): periodic jobs such as SLA evaluation and
reconciliation runs register on ``app.state.scheduler``; the app's lifespan starts and stops it."""

from __future__ import annotations

from apscheduler.schedulers.background import BackgroundScheduler


def create_scheduler() -> BackgroundScheduler:
    """One worker thread pool per app; a job never overlaps itself and missed runs collapse into one."""
    return BackgroundScheduler(
        timezone="UTC",
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60},
    )
