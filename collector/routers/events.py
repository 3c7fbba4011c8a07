"""CloudEvents business-event receiver."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from collector import otlp
from collector.deps import get_ingest, read_body
from collector.ingest import IngestService

router = APIRouter(tags=["ingest"])


@router.post("/v1/events", summary="Business events as CloudEvents 1.0 (structured or batch JSON)")
async def post_events(
    request: Request,
    ingest: Annotated[IngestService, Depends(get_ingest)],
    content_type: Annotated[str | None, Header()] = None,
    content_encoding: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    if refused := ingest.refusal(authorization, request.client.host if request.client else None):
        return Response(
            orjson.dumps({"error": refused}), 401, {"WWW-Authenticate": "Bearer"}, media_type="application/json"
        )
    try:
        body = await read_body(request, ingest.settings.max_body_bytes)
    except otlp.OtlpError as exc:
        status = ingest.count_refusal(exc.status)
        return Response(orjson.dumps({"error": exc.message}), status, media_type="application/json")
    reply = await run_in_threadpool(ingest.events, body, content_type, content_encoding)
    return Response(reply.body, reply.status, reply.headers, media_type=reply.media_type)
