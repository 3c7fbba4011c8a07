"""Prometheus scrape endpoint."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from collector.deps import get_ingest
from collector.ingest import IngestService

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics")
def metrics(ingest: Annotated[IngestService, Depends(get_ingest)]) -> Response:
    ingest.metrics.buffer_bytes.set(ingest.wal.pending_bytes)
    return Response(generate_latest(ingest.metrics.registry), media_type=CONTENT_TYPE_LATEST)
