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


def _statement(store: Store, run_id: str | None, **kwargs: Any) -> dict[str, Any] | None:
    if run_id:  # an empty answer would read as a clean reconciliation: only a finished run has a statement
        run = q.get_run(store, run_id)
        if run is None:
            raise HTTPException(404, f"no reconciliation run {run_id}")
        if run["state"] != "succeeded":
            raise HTTPException(404, f"run {run_id} is {run['state']}: it has no statement")
    run_id = run_id or q.latest_statement_run(store)  # the latest of the whole estate, not of one region
    if run_id is None:
        return None
    run = q.get_run(store, run_id)
    rows, total = q.list_statements(store, run_id=run_id, **kwargs)
    # totals and residual over what the filters keep, as the rows (they were the whole run's)
    scope = q.StatementScope(**{k: kwargs[k] for k in ("region", "currency", "day_from", "day_to") if k in kwargs})
    return {
        "run_id": run_id,
        "region": run["region"] if run else "",  # a region run's statement covers that region only
        "items": rows,
        "total": total,
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
        _statement,
        store,
        run_id,
        region=region,
        currency=currency,
        day_from=day_from,
        day_to=day_to,
        only_residual=residual_only,
        limit=limit,
        offset=offset,
    )
    if doc is None:
        raise HTTPException(404, "no statement yet: run a reconciliation first")
    return doc
