"""SLA API: definitions, compliance per region and step, current and past breaches, stuck items, and an
on-demand evaluation (operator; audited)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import StoreTime, get_store
from reconciler.sla.evaluate import Breach
from reconciler.sla.service import SlaService
from tower_core.store import Store
from tower_core.store import sla as sla_store

router = APIRouter(prefix="/api/sla", tags=["sla"])
Name = Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
SlaName = Annotated[str | None, Query(alias="sla", min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]


def get_sla(request: Request) -> SlaService:
    return request.app.state.sla


SlaDep = Annotated[SlaService, Depends(get_sla)]
Viewer = Annotated[Principal, Depends(require("viewer"))]


@router.get("/definitions", summary="The SLA definitions in force")
def definitions(service: SlaDep, viewer: Viewer) -> dict[str, Any]:
    return service.definitions.to_json()


@router.get("/compliance", summary="Compliance, burn rates, latency percentiles and stuck items per region/step")
async def compliance(
    service: SlaDep, viewer: Viewer, name: SlaName = None, step: Name = None, region: Name = None
) -> dict[str, Any]:
    result = await run_in_threadpool(service.compliance)
    rows = [
        s.to_json()
        for s in result.statuses
        if (name is None or s.sla == name)
        and (step is None or s.step == step)
        and (region is None or s.region == region)
    ]
    return {
        "evaluated_at": result.to_json()["evaluated_at"],
        "objectives": rows,
        "thresholds": {
            rule: [r for r in rows_ if region is None or r["region"] == region]
            for rule, rows_ in result.thresholds.items()
            if name is None or rule == name
        },
    }


@router.get("/breaches", summary="Current (firing) and past (resolved) breaches, newest first")
async def breaches(
    store: Annotated[Store, Depends(get_store)],
    viewer: Viewer,
    status: Literal["firing", "resolved", "merged", "all"] = "all",
    name: SlaName = None,
    step: Name = None,
    region: Name = None,
    since: Annotated[StoreTime | None, Query(description="Resolved breaches ended at or after this time")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    rows = await run_in_threadpool(
        sla_store.list_breaches,
        store,
        status=None if status == "all" else status,
        region=region,
        step=step,
        sla=name,
        since_ms=int(since.timestamp() * 1000) if since else 0,
        limit=limit,
    )
    items = [Breach.from_row(r).to_json() for r in rows]
    return {"breaches": items, "firing": sum(1 for b in items if b["status"] == "firing")}


@router.get("/stuck", summary="Items of an objective in flight past their threshold, oldest first")
async def stuck(
    service: SlaDep,
    viewer: Viewer,
    name: Annotated[str, Query(alias="sla", min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")],
    region: Name = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    at: Annotated[StoreTime | None, Query(description="As of this instant (default now)")] = None,
) -> dict[str, Any]:
    now_ns = int(at.timestamp() * 1_000_000) * 1000 if at else None
    try:
        rows = await run_in_threadpool(service.stuck, name, region, limit, now_ns)
    except KeyError:
        raise HTTPException(404, f"no objective named {name!r}") from None
    return {
        "sla": name,
        "items": [
            {"key": r["key"], "region": r["region"], "started_ns": int(r["start_ns"]), "age_s": int(r["age_ns"]) / 1e9}
            for r in rows
        ],
    }


class EvaluateRequest(BaseModel):
    now: StoreTime | None = Field(
        None, description="Evaluate as of this instant (back-fills, tests); default now. Not in the future."
    )


@router.post("/evaluate", summary="Evaluate every SLA now, record breaches and deliver alerts")
async def evaluate(
    service: SlaDep,
    store: Annotated[Store, Depends(get_store)],
    principal: Annotated[Principal, Depends(require("operator"))],
    body: EvaluateRequest | None = None,
) -> dict[str, Any]:
    now_ns = None
    if body is not None and body.now is not None:
        if body.now > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5):
            raise HTTPException(400, "now must not be in the future")
        now_ns = int(body.now.timestamp() * 1_000_000) * 1000
    started = time.time_ns()
    result = await run_in_threadpool(service.evaluate, now_ns)
    doc = result.to_json()
    summary = {
        "evaluated_at": doc["evaluated_at"],
        "firing": len(doc["firing"]),
        "started": len(doc["started"]),
        "resolved": len(doc["resolved"]),
    }
    await run_in_threadpool(
        sla_store.audit,
        store,
        principal.name,
        "sla.evaluate",
        f"evaluation@{started}",
        orjson.dumps(summary).decode(),
    )
    return doc
