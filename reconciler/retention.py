"""Which runs' reconciliation statements are kept. Pure: the runner reads the runs and deletes the rest.

Every run writes the statement of its whole scope (per region, currency and day), so keeping them all grew the
table by a copy of the estate's history every few minutes, and every statement read and run with it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

DROP_AT_LEAST = 5  # runs past the policy before a delete is worth its mutation (a run every 5 min by default)


@dataclass(frozen=True)
class StatementRetention:
    keep_runs: int = 20  # the latest runs' statements, whatever their scope
    keep_days: int = 90  # and the last run of each UTC day per scope for this many days (0: none)


@dataclass(frozen=True)
class StatementRun:
    run_id: str
    region: str  # the run's scope: '' for the whole estate
    created_at: dt.datetime  # when its statement was written (UTC)


def statements_to_drop(runs: Iterable[StatementRun], now: dt.datetime, policy: StatementRetention) -> set[str]:
    """The runs whose statements the policy no longer keeps. Always kept: the latest ``keep_runs``, the latest
    of each scope (the default statement is the latest estate-wide run's, whatever region runs came after),
    and each scope's last run of every day of the last ``keep_days`` days."""
    ordered = sorted(runs, key=lambda r: (r.created_at, r.run_id), reverse=True)
    keep = {r.run_id for r in ordered[: policy.keep_runs]}
    latest: dict[str, str] = {}
    daily: dict[tuple[str, dt.date], str] = {}
    first_day = (now - dt.timedelta(days=policy.keep_days)).date()
    for r in ordered:
        latest.setdefault(r.region, r.run_id)
        day = r.created_at.astimezone(dt.UTC).date()
        if policy.keep_days > 0 and day > first_day:
            daily.setdefault((r.region, day), r.run_id)
    keep |= set(latest.values()) | set(daily.values())
    return {r.run_id for r in ordered} - keep
