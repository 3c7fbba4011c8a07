"""Reconciliation statements: per region, currency and day, billing total, ERP total, the difference
explained per drift class and the unexplained residual (the latest run's, or a given run's)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import get_store
from tower_core.store import Store
from tower_core.store import reconcile as q

router = APIRouter(prefix="/api/statements", tags=["statements"])


def _statement(
    store: Store,
    run_id: str | None,
    scope: q.StatementScope = q.StatementScope(),
    only_residual: bool = False,
    limit: int = 500,
    offset: int = 0,
) -> dict[str, Any] | None:
    run = q.get_run(store, run_id) if run_id else None
    if run_id:  # an empty answer would read as a clean reconciliation: only a finished run has a statement
        if run is None:
            raise HTTPException(404, f"no reconciliation run {run_id}")
        if run["state"] != "succeeded":
            raise HTTPException(404, f"run {run_id} is {run['state']}: it has no statement")
        if run["statement_dropped"]:
            raise HTTPException(
                404,
                f"the statement of run {run_id} is no longer kept (TOWER_RECONCILE_STATEMENT_KEEP_RUNS, "
                "TOWER_RECONCILE_STATEMENT_KEEP_DAYS)",
            )
    else:
        run_id = q.latest_statement_run(store)  # the latest of the whole estate, not of one region
        if run_id is None:
            return None
        run = q.get_run(store, run_id)
    rows, total = q.list_statements(store, run_id=run_id, scope=scope, only_residual=only_residual, limit=limit,
                                    offset=offset)  # fmt: skip
    return {
        "run_id": run_id,
        "region": run["region"] if run else "",  # a region run's statement covers that region only
        "items": rows,
        "total": total,
        # totals and residual over what the filters keep, as the rows (they were the whole run's)
        "totals": q.statement_totals(store, run_id, scope),
        # per region, currency and day, as the run's figure (a residual of +X one day and -X another is two);
        # per currency, since minor units of two currencies never add up
        "residual_by_currency": (by_currency := q.statement_residuals(store, run_id, scope)),
        "residual_minor": sum(by_currency.values()),
    }


@router.get("", summary="The statement of the latest run (or run_id)")
async def statement(
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    run_id: Annotated[str | None, Query(max_length=64)] = None,
    region: Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{0,16}$")] = "",
    currency: Annotated[str, Query(pattern=r"^[A-Z]{0,3}$")] = "",
    day_from: Annotated[dt.date | None, Query(alias="from")] = None,
    day_to: Annotated[dt.date | None, Query(alias="to")] = None,
    residual_only: bool = False,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    doc = await run_in_threadpool(
        _statement, store, run_id, q.StatementScope(region, currency, day_from, day_to), residual_only, limit, offset
    )
    if doc is None:
        raise HTTPException(404, "no statement yet: run a reconciliation first")
    return doc
