"""Stripe webhooks: ``POST /webhooks/stripe`` (signed deliveries -> business events in the buffer).

A bad or missing signature is a 400 with the reason and nothing is stored. A redelivered event (same id) is
acknowledged with ``duplicate: true``: the buffer does not take it again when the tower already knows it,
and business_events (ReplacingMergeTree on Source, EventId) keeps one row even if two copies race in.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from collector import otlp
from collector.auth import Principal, require
from collector.deps import get_ingest, get_store, read_body
from collector.ingest import RETRY_AFTER_S, IngestService, Refused
from connectors.stripe.mapping import SOURCE
from connectors.stripe.webhook import DeliveryError, read_delivery
from tower_core.errors import StoreError
from tower_core.store import Store
from tower_core.store import webhooks as q

router = APIRouter(tags=["webhooks"])
_RECENT = 100_000


class RecentEvents:
    """Event ids buffered by this process (they may not be in the store yet); bounded, oldest forgotten."""

    def __init__(self, size: int = _RECENT) -> None:
        self.size = size
        self.ids: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, key: tuple[str, str]) -> None:
        self.ids[key] = None
        while len(self.ids) > self.size:
            self.ids.popitem(last=False)


def recent_events(request: Request) -> RecentEvents:
    state = request.app.state
    if not hasattr(state, "recent_events"):
        state.recent_events = RecentEvents()
    return state.recent_events


def accept_once(ingest: IngestService, store: Store, recent: RecentEvents, delivery: Any, received_ns: int) -> bool:
    """Buffer the delivery's event unless the tower already has it; True when it was a duplicate."""
    key = (SOURCE, delivery.event_id)
    with recent.lock:
        if key in recent.ids:
            return True
        try:
            known = bool(q.stored_event_ids(store, SOURCE, [delivery.event_id]))
        except StoreError:
            known = False  # the store is down: buffer it; the table's dedup absorbs a repeat
        if known:
            recent.add(key)
            return True
        if delivery.event is not None:
            ingest.append_events([delivery.event], received_ns)
        recent.add(key)
        return False


@router.post("/webhooks/stripe", summary="Stripe webhook endpoint (Stripe-Signature verified)")
async def stripe_webhook(
    request: Request,
    ingest: Annotated[IngestService, Depends(get_ingest)],
    store: Annotated[Store, Depends(get_store)],
    recent: Annotated[RecentEvents, Depends(recent_events)],
    stripe_signature: Annotated[str | None, Header()] = None,
) -> Response:
    settings = ingest.settings
    try:
        body = await read_body(request, settings.max_body_bytes)
    except otlp.OtlpError as exc:
        return JSONResponse({"error": exc.message}, exc.status)
    received_ns = time.time_ns()
    try:
        delivery = read_delivery(
            body,
            stripe_signature,
            [s.get_secret_value() for s in settings.stripe_webhook_secrets],
            settings.stripe_webhook_tolerance_s,
            received_ns / 1e9,
            settings.stripe_default_region,
            ingest.cdp_pii.identifier,
        )
    except DeliveryError as exc:
        return JSONResponse({"error": str(exc)}, 400)
    try:
        duplicate = await run_in_threadpool(accept_once, ingest, store, recent, delivery, received_ns)
    except Refused as exc:
        return JSONResponse({"error": str(exc)}, 503, {"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse(
        {
            "received": True,
            "id": delivery.event_id,
            "type": delivery.event_type,
            "tracked": delivery.event is not None,
            "duplicate": duplicate,
        }
    )


@router.get("/webhooks/stripe/events/{event_id}", summary="How many copies of a Stripe event queries see")
async def stripe_event(
    event_id: str,
    store: Annotated[Store, Depends(get_store)],
    _: Annotated[Principal, Depends(require("viewer"))],
) -> dict[str, Any]:
    if not event_id or len(event_id) > 255:
        raise HTTPException(400, "event_id must be 1 to 255 characters")
    n = await run_in_threadpool(q.count_events, store, SOURCE, event_id)
    if n == 0:
        raise HTTPException(404, f"Stripe event {event_id} is not stored")
    return {"id": event_id, "rows": n}
