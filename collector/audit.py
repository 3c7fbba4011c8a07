"""Audit of refused API mutations.

Successful mutations are audited where they happen (the reconciler's queue and actions, runs, SLA
evaluations, token administration) with before/after. This ASGI middleware adds the other half: a mutating
``/api/`` request by a known principal that ends in 4xx/5xx (403 for a viewer, 409 on a stale bulk count, 422
on a missing note...) is written as ``api.denied`` / ``api.rejected`` / ``api.error`` with the status and the
API's message. Requests without a valid token (401) are not written: anyone could fill the log with them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tower_core.store import Store
from tower_core.store import reconcile as q

log = logging.getLogger("tower.api.audit")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_BODY_CAP = 4096


def outcome_of(status: int) -> tuple[str, str]:
    """(action, outcome) of a refused request by its HTTP status."""
    if status in (401, 403):
        return "api.denied", "denied"
    if status < 500:
        return "api.rejected", "rejected"
    return "api.error", "error"


def detail_of(body: bytes) -> str:
    """The API's message (``detail``) of an error body, short."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:300].decode(errors="replace")
    detail = doc.get("detail", doc) if isinstance(doc, dict) else doc
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    return text[:1000]


class AuditRefusals:
    """Pure ASGI middleware (no body buffering for successful responses)."""

    def __init__(self, app: ASGIApp, store: Callable[[], Store]) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500
        body = bytearray()
        audited = False

        async def audit() -> None:
            nonlocal audited
            principal = state.get("principal")
            if status >= 400 and principal is not None and not audited:
                audited = True
                await self._write(principal.name, scope["method"], scope["path"], status, bytes(body))

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                if len(body) < _BODY_CAP:
                    body.extend(message.get("body", b"")[: _BODY_CAP - len(body)])
                if not message.get("more_body", False):
                    await audit()  # before the answer ends: a client that reads the audit next finds the refusal
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            await audit()  # a request that ended without an answer

    async def _write(self, actor: str, method: str, path: str, status: int, body: bytes) -> None:
        action, outcome = outcome_of(status)
        after = {"status": status}
        record = q.audit_record(actor, action, "api", f"{method} {path}", None, after, detail_of(body), outcome)
        try:
            await run_in_threadpool(q.write_audit, self.store(), [record])
        except Exception:  # the store being down must not turn a 4xx into a 500
            log.warning("could not audit refused %s %s by %s (%s)", method, path, actor, status)
