"""Source records the reconciler's pulls passed over because they could not be mapped: visible until a later
pull maps them (the record fixed at its source), or until an operator dismisses one that never will be (a posted
record cancelled at its source is still unmappable, a deleted one is never pulled again)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import get_store
from tower_core.store import Store
from tower_core.store import reconcile as audit_log
from tower_core.store import source_skips as skips

router = APIRouter(prefix="/api/sources", tags=["sources"])


@router.get("/skipped", summary="Source records a pull could not map (open ones, or all)")
async def skipped(
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    include_cleared: Annotated[bool, Query(description="Also those a later pull mapped.")] = False,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> dict[str, Any]:
    items = await run_in_threadpool(skips.list_skips, store, include_cleared=include_cleared, limit=limit)
    return {"items": items, "open": await run_in_threadpool(skips.open_skip_count, store)}


class Dismissal(BaseModel):
    connector: str = Field(min_length=1, max_length=200)
    stream: str = Field(min_length=1, max_length=200)
    ref: str = Field(max_length=2000, description="The record's id as listed ('' for a record without one).")
    note: str = Field(min_length=1, max_length=2000, description="Why (required): what happened at the source.")


@router.post("/skipped/dismiss", summary="Close a skipped record that no pull will map (operator; audited)")
async def dismiss(
    body: Dismissal,
    store: Annotated[Store, Depends(get_store)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    if not body.note.strip():
        raise HTTPException(422, "a note is required: say what happened to the record at its source")
    found = await run_in_threadpool(skips.open_skip, store, body.connector, body.stream, body.ref)
    if found is None:
        raise HTTPException(404, f"no open skipped record {body.connector}/{body.stream}/{body.ref!r}")
    await run_in_threadpool(skips.clear_skips, store, body.connector, body.stream, [body.ref])
    name = f"{body.connector}/{body.stream}/{body.ref}"
    record = audit_log.audit_record(
        operator.name, "source.dismiss", "source_record", name, found, {"cleared": True}, body.note.strip()
    )
    await run_in_threadpool(audit_log.write_audit, store, [record])
    return {**found, "cleared": True}
