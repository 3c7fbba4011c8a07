"""FastAPI dependencies and request helpers shared by the routers."""

from __future__ import annotations

from fastapi import Request

from collector.ingest import IngestService
from collector.otlp import OtlpError
from tower_core.settings import Settings
from tower_core.store import Store


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_ingest(request: Request) -> IngestService:
    return request.app.state.ingest


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) anything larger than ``limit`` without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise OtlpError(413, f"request body exceeds {limit} bytes")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise OtlpError(413, f"request body exceeds {limit} bytes")
    return bytes(chunks)
