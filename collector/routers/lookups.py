"""Read APIs: one trace, one business transaction (viewer and up: they show the estate's business keys)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from starlette.concurrency import run_in_threadpool

from collector import correlation as corr
from collector.auth import Principal, require
from collector.deps import get_settings, get_store
from collector.lookups import TRACE_ID, get_trace, get_transaction
from tower_core.settings import Settings
from tower_core.store import Store

router = APIRouter(prefix="/api", tags=["lookups"])
KeyParam = Annotated[str | None, Query(min_length=1, max_length=corr.MAX_KEY_VALUE_LEN)]


@router.get("/traces/{trace_id}", summary="All spans of one trace")
async def trace(
    trace_id: str,
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
) -> dict[str, Any]:
    tid = trace_id.lower()
    if not TRACE_ID.fullmatch(tid):
        raise HTTPException(400, "trace_id must be 32 hex characters")
    doc = await run_in_threadpool(get_trace, store, tid)
    if doc is None:
        raise HTTPException(404, f"trace {tid} not found")
    return doc


@router.get("/transactions", summary="The business transaction of an invoice, customer, payment, ledger entry or trace")
async def transaction(
    store: Annotated[Store, Depends(get_store)],
    settings: Annotated[Settings, Depends(get_settings)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    invoice_id: KeyParam = None,
    customer_id: KeyParam = None,
    payment_id: KeyParam = None,
    trace_id: KeyParam = None,
    ledger_entry_id: KeyParam = None,
) -> dict[str, Any]:
    try:
        seed = corr.seed_key(
            {
                "invoice_id": invoice_id,
                "customer_id": customer_id,
                "payment_id": payment_id,
                "trace_id": trace_id,
                "ledger_entry_id": ledger_entry_id,  # the key of missing_in_billing items
            }
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    if seed[0] == "trace":
        seed = ("trace", seed[1].lower())
        if not TRACE_ID.fullmatch(seed[1]):
            raise HTTPException(400, "trace_id must be 32 hex characters")
    doc = await run_in_threadpool(get_transaction, store, seed, int(settings.sla_clock_skew_s * 1e9))
    if doc is None:
        raise HTTPException(404, f"nothing is known of {seed[0]} {seed[1]}")
    return doc
