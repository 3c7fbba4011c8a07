"""Segment HTTP Tracking API (also RudderStack's): ``POST /v1/batch``, ``/v1/identify``, ``/v1/track``, ``/v1/group``.

The write key is the basic-auth user name (Segment's SDK also puts it in the body as ``writeKey``); an unknown
key is a 401. PII is hashed or dropped by the pure parser before anything reaches the buffer.
``GET /api/cdp/events`` shows what the tower kept for a CDP user (viewer role).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from collector import otlp
from collector.auth import Principal, require
from collector.deps import get_ingest, get_settings, get_store, read_body
from collector.ingest import RETRY_AFTER_S, IngestService, Refused
from connectors.segment import tracking as tr
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store import cdp as q

router = APIRouter(tags=["cdp"])


def pii_policy(settings: Settings) -> tr.PiiPolicy:
    """The policy of CDP ingest, which needs a write key: settings then require the PII key in hash mode."""
    policy = tr.policy_from_settings(settings)
    assert policy is not None, "settings require TOWER_CDP_PII_HMAC_KEY once write keys are set"
    return policy


async def _ingest(
    request: Request, ingest: IngestService, path_type: str | None, authorization: str | None, encoding: str | None
) -> JSONResponse:
    settings = ingest.settings
    keys = [k.get_secret_value() for k in settings.cdp_write_keys]
    try:
        raw = await read_body(request, settings.max_body_bytes)
        body = otlp.decompress(raw, encoding, settings.max_body_bytes)
    except otlp.OtlpError as exc:
        return JSONResponse({"success": False, "error": exc.message}, exc.status)
    doc: Any = None
    malformed = ""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        malformed = f"malformed JSON: {exc}"
    write_key = tr.write_key_from_basic(authorization)
    if write_key is None and isinstance(doc, dict) and isinstance(doc.get("writeKey"), str):
        write_key = doc["writeKey"]
    if not tr.known_write_key(write_key, keys):
        return JSONResponse(
            {"success": False, "error": "unknown or missing write key (basic-auth user name)"},
            401,
            {"WWW-Authenticate": 'Basic realm="cdp"'},
        )
    if malformed:
        return JSONResponse({"success": False, "error": malformed}, 400)
    received_ns = time.time_ns()
    try:
        parsed = tr.parse_request(
            doc,
            path_type,
            received_ns,
            pii_policy(settings),
            settings.cdp_customer_id_traits,
            settings.cdp_default_region,
        )
    except tr.TrackingError as exc:
        return JSONResponse({"success": False, "error": str(exc)}, 400)
    if parsed.rejected and not parsed.events and not parsed.ignored:
        return JSONResponse({"success": False, "error": "no valid message", "rejected": parsed.rejected}, 400)
    if parsed.events:
        try:
            await run_in_threadpool(ingest.append_events, parsed.events, received_ns)
        except Refused as exc:
            return JSONResponse({"success": False, "error": str(exc)}, 503, {"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse(
        {"success": True, "accepted": len(parsed.events), "ignored": parsed.ignored, "rejected": parsed.rejected}
    )


Auth = Annotated[str | None, Header()]
Encoding = Annotated[str | None, Header(alias="content-encoding")]
Ingest = Annotated[IngestService, Depends(get_ingest)]


@router.post("/v1/batch", summary="Segment/RudderStack batch (HTTP Tracking API)")
async def batch(request: Request, ingest: Ingest, authorization: Auth = None, enc: Encoding = None) -> JSONResponse:
    return await _ingest(request, ingest, None, authorization, enc)


@router.post("/v1/identify", summary="Segment identify: a profile change")
async def identify(request: Request, ingest: Ingest, authorization: Auth = None, enc: Encoding = None) -> JSONResponse:
    return await _ingest(request, ingest, "identify", authorization, enc)


@router.post("/v1/track", summary="Segment track: a usage event")
async def track(request: Request, ingest: Ingest, authorization: Auth = None, enc: Encoding = None) -> JSONResponse:
    return await _ingest(request, ingest, "track", authorization, enc)


@router.post("/v1/group", summary="Segment group: an account change")
async def group(request: Request, ingest: Ingest, authorization: Auth = None, enc: Encoding = None) -> JSONResponse:
    return await _ingest(request, ingest, "group", authorization, enc)


@router.get("/api/cdp/events", summary="The CDP events the tower kept for a user (PII already hashed)")
async def cdp_events(
    store: Annotated[Store, Depends(get_store)],
    settings: Annotated[Settings, Depends(get_settings)],
    _: Annotated[Principal, Depends(require("viewer"))],
    user_id: Annotated[str, Query(min_length=1, max_length=tr.MAX_ID)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """A user id that is an e-mail address was stored as its pseudonym: it is looked up (and answered) as such."""
    # an address is pseudonymized trimmed and lower-cased (PiiPolicy.digest); other ids are kept as sent, and
    # without a policy (no key: no CDP ingest is configured) nothing was pseudonymized
    policy = tr.policy_from_settings(settings)
    stored_as = policy.identifier(user_id) if policy is not None and "@" in user_id else user_id
    rows = await run_in_threadpool(q.events_for_user, store, stored_as, limit) if stored_as else []
    if not rows:
        raise HTTPException(404, f"no CDP event for user {stored_as or '(an e-mail address, dropped)'}")
    return {"user_id": stored_as, "events": rows}
