"""Source records the reconciler's pulls passed over because they could not be mapped: visible until a later
pull maps them (the record fixed at its source)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import get_store
from tower_core.store import Store
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
