"""OTLP/HTTP trace receiver."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from collector import otlp
from collector.deps import get_ingest, read_body
from collector.ingest import IngestService

router = APIRouter(tags=["ingest"])


@router.post("/v1/traces", summary="OTLP/HTTP trace export (protobuf or JSON, optionally gzip)")
async def export_traces(
    request: Request,
    ingest: Annotated[IngestService, Depends(get_ingest)],
    content_type: Annotated[str | None, Header()] = None,
    content_encoding: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    if refused := ingest.refusal(authorization, request.client.host if request.client else None):
        mt = otlp.JSON if "json" in (content_type or "") else otlp.PROTOBUF
        body = otlp.status_body(mt, 401, refused)
        return Response(body, 401, {"WWW-Authenticate": "Bearer"}, media_type=mt)
    try:
        body = await read_body(request, ingest.settings.max_body_bytes)
    except otlp.OtlpError as exc:
        mt = otlp.JSON if "json" in (content_type or "") else otlp.PROTOBUF
        return Response(otlp.status_body(mt, exc.status, exc.message), ingest.count_refusal(exc.status), media_type=mt)
    reply = await run_in_threadpool(ingest.traces, body, content_type, content_encoding)
    return Response(reply.body, reply.status, reply.headers, media_type=reply.media_type)
