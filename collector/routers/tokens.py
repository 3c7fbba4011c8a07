"""API token administration (admin role, audited) and the caller's own identity (any role)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from collector.auth import ROLES, TOKEN_NAME, TOKEN_NAME_MAX, Principal, create_token, require
from collector.deps import get_store
from tower_core.store import Store
from tower_core.store import reconcile as audit_log
from tower_core.store import tokens as token_store

router = APIRouter(prefix="/api/tokens", tags=["tokens"])


class TokenRequest(BaseModel):
    name: str = Field(min_length=1, max_length=TOKEN_NAME_MAX, pattern=TOKEN_NAME)
    role: str = Field(pattern="^(" + "|".join(ROLES) + ")$")


@router.post("", status_code=201, summary="Create a token (shown once)")
async def create(
    body: TokenRequest,
    store: Annotated[Store, Depends(get_store)],
    admin: Annotated[Principal, Depends(require("admin"))],
) -> dict[str, str]:
    token_id, token = await run_in_threadpool(create_token, store, body.name, body.role)
    record = audit_log.audit_record(admin.name, "token.create", "token", token_id, None, body.model_dump())
    await run_in_threadpool(audit_log.write_audit, store, [record])
    return {"token_id": token_id, "name": body.name, "role": body.role, "token": token}


@router.get("/me", summary="Who the presented token belongs to, and its role")
async def me(viewer: Annotated[Principal, Depends(require("viewer"))]) -> dict[str, str]:
    return {"name": viewer.name, "role": viewer.role}


@router.get("", summary="List tokens (no secrets)")
async def list_all(
    store: Annotated[Store, Depends(get_store)], admin: Annotated[Principal, Depends(require("admin"))]
) -> list[dict[str, Any]]:
    return await run_in_threadpool(token_store.list_tokens, store)


@router.delete("/{token_id}", summary="Revoke a token")
async def revoke(
    token_id: str,
    request: Request,
    store: Annotated[Store, Depends(get_store)],
    admin: Annotated[Principal, Depends(require("admin"))],
) -> dict[str, str]:
    if not await run_in_threadpool(token_store.revoke, store, token_id):
        raise HTTPException(404, f"token {token_id} not found")
    request.app.state.verifier.forget()
    record = audit_log.audit_record(admin.name, "token.revoke", "token", token_id, None, {"revoked": True})
    await run_in_threadpool(audit_log.write_audit, store, [record])
    return {"token_id": token_id, "status": "revoked"}
