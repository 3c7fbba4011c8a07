"""The audit log: who did what, when, with what result (viewer and up; read-only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import StoreTime, get_store
from tower_core.store import Store
from tower_core.store import audit as audit_store

router = APIRouter(prefix="/api/audit", tags=["audit"])
Text = Annotated[str, Query(max_length=200)]


@router.get("", summary="Audit records, newest first, filtered and paginated")
async def list_records(
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    actor: Text = "",
    action: Annotated[
        str, Query(max_length=64, description="An action, or a family by its prefix ending in a dot (`drift.`).")
    ] = "",
    object_type: Annotated[str, Query(max_length=32, description="drift_item, action, run, sla, token, api")] = "",
    object_id: Text = "",
    outcome: Annotated[str, Query(max_length=32, description="ok, error, denied, rejected")] = "",
    since: StoreTime | None = None,
    until: StoreTime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    rows, total = await run_in_threadpool(
        audit_store.list_audit,
        store,
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        outcome=outcome,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return {"items": rows, "total": total, "limit": limit, "offset": offset}


@router.get("/facets", summary="Actors, actions, object types and outcomes of the last 90 days")
async def facets(
    store: Annotated[Store, Depends(get_store)], viewer: Annotated[Principal, Depends(require("viewer"))]
) -> dict[str, list[str]]:
    return await run_in_threadpool(audit_store.audit_facets, store)
