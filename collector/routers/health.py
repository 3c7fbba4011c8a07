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
    """Ready when the store answers and ingest can be counted on: not while the write-ahead buffer is nearly
    full or the store has refused its writes for a while (every ingest request is about to get 503)."""
    state = request.app.state
    why = [] if state.store.ping() else ["store unavailable"]
    if state.bring_up is not None and state.bring_up.pending:  # `tower serve` started before the store answered
        why.append(f"store not reached since start, retrying ({state.bring_up.last_error}); ingest is buffered")
    why += state.ingest.not_ready()
    body = {"status": "; ".join(why) or "ready", "backend": state.store.backend}
    return JSONResponse(body, status_code=503 if why else 200)
