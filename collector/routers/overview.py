"""Aggregates for the dashboard's overview that no other resource offers (viewer and up; read-only)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import get_store
from reconciler import classify as c
from tower_core.store import Store
from tower_core.store import audit as audit_store

router = APIRouter(prefix="/api/overview", tags=["overview"])


@router.get("/aging", summary="Unresolved drift items per class, aging bucket, currency and region")
async def aging(
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    region: Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{0,16}$")] = "",
) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    rows = await run_in_threadpool(audit_store.drift_aging, store, now, region)
    for r in rows:
        r["items"], r["amount_minor"] = int(r["items"]), int(r["amount_minor"])
    return {
        "as_of": now,
        "buckets": list(c.AGE_BUCKETS),
        "groups": rows,
        "open": sum(r["items"] for r in rows),
    }
