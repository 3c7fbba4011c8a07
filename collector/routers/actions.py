"""Corrective actions and replays: list (incl. the dead-letter list), one action with its history, approve
and replay (operator, audited), and the circuit breakers' state."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import get_store
from collector.routers.drift import get_service
from reconciler import classify as c
from reconciler.actions import ActionError, public_action
from reconciler.service import ReconcilerService
from tower_core.store import Store
from tower_core.store import reconcile as q

router = APIRouter(prefix="/api/actions", tags=["actions"])
ACTION_STATES = ("pending", "in_progress", "succeeded", "failed")


def _list(store: Store, **kwargs: Any) -> dict[str, Any]:
    rows, total = q.list_actions(store, **kwargs)
    return {
        "items": [public_action(r) for r in rows],
        "total": total,
        "limit": kwargs["limit"],
        "offset": kwargs["offset"],
    }


@router.get("", summary="Actions, filtered, sorted and paginated")
async def list_actions(
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    state: Annotated[list[str], Query(description="pending, in_progress, succeeded, failed (repeatable)")] = [],  # noqa: B006
    cls: Annotated[str, Query(alias="class")] = "",
    drift_id: Annotated[str, Query(max_length=64)] = "",
    target: Annotated[str, Query(max_length=32)] = "",
    dead_letter: bool | None = None,
    original_action_id: Annotated[str, Query(max_length=64)] = "",
    action_id: Annotated[
        list[str], Query(max_length=1000, description="only these actions (repeatable; up to 1,000)")
    ] = [],  # noqa: B006
    sort: str = "created_at",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    bad = sorted(set(state) - set(ACTION_STATES))
    if bad:
        raise HTTPException(422, f"unknown state: {', '.join(bad)}; one of {', '.join(ACTION_STATES)}")
    if cls and cls not in c.CLASSES:
        raise HTTPException(422, f"unknown class {cls!r}")
    if sort not in q.ACTION_SORT:
        raise HTTPException(422, f"unknown sort key {sort!r}; one of {', '.join(q.ACTION_SORT)}")
    return await run_in_threadpool(
        _list,
        store,
        states=state,
        cls=cls,
        drift_id=drift_id,
        target=target,
        dead_letter=dead_letter,
        original_action_id=original_action_id,
        action_ids=action_id,
        sort=sort,
        descending=order == "desc",
        limit=limit,
        offset=offset,
    )


@router.get("/dead-letters", summary="Failed actions waiting for a person (replay them)")
async def dead_letters(
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    return await run_in_threadpool(
        _list,
        store,
        states=["failed"],
        dead_letter=True,
        sort="updated_at",
        descending=True,
        limit=limit,
        offset=offset,
    )


@router.get("/breakers", summary="Circuit breaker per target system")
async def breakers(
    service: Annotated[ReconcilerService, Depends(get_service)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
) -> dict[str, Any]:
    return await run_in_threadpool(service.actions.breaker_view)


def _one(store: Store, action_id: str) -> dict[str, Any] | None:
    row = q.get_action(store, action_id)
    if row is None:
        return None
    doc = public_action(row)
    doc["history"] = q.audit_for(store, "action", action_id)
    doc["replays"] = [public_action(r) for r in q.list_actions(store, original_action_id=action_id, limit=100)[0]]
    return doc


@router.get("/{action_id}", summary="One action with its audit history and replays")
async def one(
    action_id: str,
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
) -> dict[str, Any]:
    doc = await run_in_threadpool(_one, store, action_id)
    if doc is None:
        raise HTTPException(404, f"action {action_id} not found")
    return doc


@router.post("/{action_id}/approve", summary="Approve a pending business-rule correction and run it")
async def approve(
    action_id: str,
    service: Annotated[ReconcilerService, Depends(get_service)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    try:
        return await run_in_threadpool(service.actions.approve, action_id, operator.name)
    except ActionError as exc:
        raise HTTPException(exc.status, str(exc)) from None


@router.post("/{action_id}/replay", summary="Re-run a failed action (linked by original_action_id)")
async def replay(
    action_id: str,
    service: Annotated[ReconcilerService, Depends(get_service)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    try:
        return await run_in_threadpool(service.actions.replay, action_id, operator.name)
    except ActionError as exc:
        raise HTTPException(exc.status, str(exc)) from None
