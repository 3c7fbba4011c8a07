"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency checked)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Ready when the store answers and the schema is migrated."""
    state = request.app.state
    ok = state.store.ping()
    body = {"status": "ready" if ok else "store unavailable", "backend": state.store.backend}
    return JSONResponse(body, status_code=200 if ok else 503)
