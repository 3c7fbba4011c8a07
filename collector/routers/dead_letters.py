"""Ingest records the store refused for good (collector/dead_letter.py): listed, downloaded and sent back into
the buffer by an operator once the cause is fixed. Operator role: payloads are the estate's raw data."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.dead_letter import payload_file
from collector.deps import get_ingest, get_store
from collector.ingest import IngestService, Refused
from tower_core.store import Store
from tower_core.store import reconcile as audit_log

router = APIRouter(prefix="/api/ingest/dead-letters", tags=["ingest"])
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,200}$", description="A name from the list.")]


@router.get("", summary="Records set aside because the store refuses them, oldest first, with the reason")
async def list_letters(
    ingest: Annotated[IngestService, Depends(get_ingest)],
    operator: Annotated[Principal, Depends(require("operator"))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    entries = await run_in_threadpool(ingest.dead_letters.entries)
    return {"items": entries[offset : offset + limit], "total": len(entries), "limit": limit, "offset": offset}


@router.get("/{name}/payload", summary="The record as it was buffered: an OTLP protobuf request or events JSON")
async def payload(
    name: Name,
    ingest: Annotated[IngestService, Depends(get_ingest)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> Response:
    found = await run_in_threadpool(ingest.dead_letters.get, name)
    if found is None:
        raise HTTPException(404, f"no dead letter named {name!r}")
    _, record = found
    filename, media = payload_file(record, name)
    disposition = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return Response(record.payload, media_type=media, headers=disposition)


@router.post("/{name}/requeue", summary="Send the record back into the write-ahead buffer (audited)")
async def requeue(
    name: Name,
    ingest: Annotated[IngestService, Depends(get_ingest)],
    store: Annotated[Store, Depends(get_store)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    try:
        done = await run_in_threadpool(ingest.requeue_dead_letter, name)
    except Refused as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
    if done is None:
        raise HTTPException(404, f"no dead letter named {name!r}")
    record = audit_log.audit_record(operator.name, "ingest.requeue", "dead_letter", name, done, {"requeued": True})
    await run_in_threadpool(audit_log.write_audit, store, [record])
    return {**done, "requeued": True}
