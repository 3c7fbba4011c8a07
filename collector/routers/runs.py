"""Reconciliation runs: start one (operator, audited), list them, follow one's progress."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import StoreTime, get_store
from collector.routers.drift import get_service
from reconciler.runner import unknown_region
from reconciler.service import ReconcilerService, RunBusy, SettingsDiffer
from tower_core.store import Store
from tower_core.store import reconcile as q

router = APIRouter(prefix="/api/runs", tags=["runs"])


class RunRequest(BaseModel):
    full: bool = Field(False, description="Compare everything (default: keys changed since the last run).")
    region: str = Field("", pattern=r"^[A-Za-z0-9_-]{0,16}$", description="Only this region (e.g. EU).")
    as_of: StoreTime | None = Field(
        None, description="Reconcile as of this time (default now; not before the last run's); grace and aging."
    )

    @field_validator("as_of")
    @classmethod
    def _not_in_the_future(cls, value: dt.datetime | None) -> dt.datetime | None:
        """Items first seen in the future would hide from the queue (negative age) until that date."""
        if value is None:
            return None
        if value > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5):
            raise ValueError("as_of is in the future; a run reconciles as of now or an earlier time")
        return value


@router.post("", status_code=202, summary="Start a reconciliation run")
async def start(
    body: RunRequest,
    store: Annotated[Store, Depends(get_store)],
    service: Annotated[ReconcilerService, Depends(get_service)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    as_of = body.as_of
    latest = await run_in_threadpool(q.latest_as_of, store)
    if as_of is not None and latest is not None and as_of < latest:
        # the queue already reflects that later time: going back would resolve what is still wrong, open stale
        # items dated then, and re-age acknowledged ones (their notes lost when the next run re-opens them)
        raise HTTPException(
            422, f"as_of {as_of.isoformat()} is before the last run's ({latest.isoformat()}); runs go forward in time"
        )
    rec = service.reconciler
    if body.region and rec.billing is None and rec.erp is None and rec.cdp is None:
        # no connector to pull from: the stored data is all a run compares (with connectors, the run checks the
        # region after its pull, which may bring the region's first records)
        regions = await run_in_threadpool(q.regions_with_data, store)
        if body.region not in regions:
            raise HTTPException(422, unknown_region(body.region, regions))
    try:
        await run_in_threadpool(service.check_settings_agree)
    except SettingsDiffer as exc:
        raise HTTPException(409, str(exc)) from None
    try:
        run_id = service.start_run(
            full=body.full, region=body.region, as_of=as_of, trigger="api", requested_by=operator.name
        )
    except RunBusy as exc:
        raise HTTPException(409, f"a run is already in progress: {exc.run_id}") from None
    after = {"full": body.full, "region": body.region, "as_of": as_of}
    await run_in_threadpool(
        q.write_audit, store, [q.audit_record(operator.name, "run.start", "run", run_id, None, after)]
    )
    return {"run_id": run_id, "status_url": f"/api/runs/{run_id}"}


@router.get("", summary="Runs, newest first")
async def list_runs(
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    state: Annotated[str, Query(pattern="^(|running|succeeded|failed)$")] = "",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    rows, total = await run_in_threadpool(q.list_runs, store, limit, offset, state)
    return {"items": rows, "total": total, "limit": limit, "offset": offset}


@router.get("/{run_id}", summary="One run with its progress")
async def one(
    run_id: str,
    service: Annotated[ReconcilerService, Depends(get_service)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
) -> dict[str, Any]:
    doc = await run_in_threadpool(service.run_status, run_id)
    if doc is None:
        raise HTTPException(404, f"run {run_id} not found")
    return doc
