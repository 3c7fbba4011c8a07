"""The exception queue: drift items with filters, pagination and sorting; one item with its diff, history,
actions and business transaction; acknowledge, ignore and corrective sync (operator, audited)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import MAX_AGE_DAYS, MAX_MINOR, get_store
from collector.lookups import get_transaction
from reconciler import classify as c
from reconciler import policy
from reconciler.actions import ActionError, public_action
from reconciler.service import ReconcilerService
from tower_core.store import Store
from tower_core.store import reconcile as q

router = APIRouter(prefix="/api/drift", tags=["drift"])

Region = Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{0,16}$", description="Region, e.g. EU.")]
Id = Annotated[str, Query(max_length=200)]


def get_service(request: Request) -> ReconcilerService:
    return request.app.state.reconciler


def _check(values: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise HTTPException(422, f"unknown {what}: {', '.join(bad)}; one of {', '.join(allowed)}")
    return values


def _view(row: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    row = dict(row)
    first = row["first_seen"]
    row["age_bucket"] = c.age_bucket(first if first.tzinfo else first.replace(tzinfo=dt.UTC), now)
    if row.get("resolved_at") is not None and row["resolved_at"].year <= 1970:
        row["resolved_at"] = None
    return row


@router.get("", summary="Drift items, filtered, sorted and paginated server-side")
async def list_items(
    store: Annotated[Store, Depends(get_store)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
    region: Region = "",
    cls: Annotated[list[str], Query(alias="class", description="Drift class (repeatable).")] = [],  # noqa: B006
    state: Annotated[list[str], Query(description="Queue state (repeatable); default: all but resolved.")] = [],  # noqa: B006
    system: Annotated[str, Query(pattern=r"^(|billing|erp|cdp)$")] = "",
    currency: Annotated[str, Query(pattern=r"^[A-Z]{0,3}$")] = "",
    reason: Annotated[str, Query(max_length=64)] = "",
    key: Annotated[
        str, Query(max_length=200, description="Any key: invoice, payment, customer, entry, drift id.")
    ] = "",
    age: Annotated[str, Query(description="Aging bucket: 0-1d, 2-7d, 8-30d, >30d.")] = "",
    min_age_days: Annotated[int, Query(ge=0, le=MAX_AGE_DAYS)] = 0,
    max_age_days: Annotated[int | None, Query(ge=0, le=MAX_AGE_DAYS)] = None,
    min_amount: Annotated[int, Query(ge=0, le=MAX_MINOR, description="Minimum |amount| in minor units.")] = 0,
    max_amount: Annotated[int | None, Query(ge=0, le=MAX_MINOR)] = None,
    sort: Annotated[str, Query(description="Sort key: " + ", ".join(q.DRIFT_SORT))] = "first_seen",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    _check(cls, c.CLASSES, "class")
    states = _check(state, c.STATES, "state") or list(c.OPEN_STATES)
    if sort not in q.DRIFT_SORT:
        raise HTTPException(422, f"unknown sort key {sort!r}; one of {', '.join(q.DRIFT_SORT)}")
    if age:
        if age not in c.AGE_BUCKETS:
            raise HTTPException(422, f"unknown age bucket {age!r}; one of {', '.join(c.AGE_BUCKETS)}")
        lo, hi = c.age_bucket_bounds(age)
        min_age_days = max(min_age_days, lo)
        if hi is not None:
            max_age_days = hi if max_age_days is None else min(max_age_days, hi)
    now = dt.datetime.now(dt.UTC)
    rows, total = await run_in_threadpool(
        q.list_drift,
        store,
        region=region,
        classes=cls,
        states=states,
        system=system,
        currency=currency,
        reason=reason,
        key=key,
        min_amount=min_amount,
        max_amount=-1 if max_amount is None else max_amount,
        min_age_days=min_age_days,
        max_age_days=-1 if max_age_days is None else max_age_days,
        sort=sort,
        descending=order == "desc",
        limit=limit,
        offset=offset,
        now=now,
    )
    return {"items": [_view(r, now) for r in rows], "total": total, "limit": limit, "offset": offset}


@router.get("/summary", summary="Open items per class, region, state, currency and aging bucket")
async def summary(
    store: Annotated[Store, Depends(get_store)], viewer: Annotated[Principal, Depends(require("viewer"))]
) -> dict[str, Any]:
    rows = await run_in_threadpool(q.drift_summary, store)
    return {"groups": rows, "open": sum(int(r["items"]) for r in rows)}


def _detail(store: Store, drift_id: str, auto: bool, skew_ns: int = 0) -> dict[str, Any] | None:
    row = q.get_drift(store, drift_id)
    if row is None:
        return None
    billing, erp = dict(row["BillingValues"]), dict(row["ErpValues"])
    now = dt.datetime.now(dt.UTC)
    first = row["FirstSeen"] if row["FirstSeen"].tzinfo else row["FirstSeen"].replace(tzinfo=dt.UTC)
    seed = (
        ("invoice", row["InvoiceId"])
        if row["InvoiceId"]
        else ("payment", row["PaymentId"])
        if row["PaymentId"]
        else ("customer", row["CustomerId"])
    )
    actions, _ = q.list_actions(store, drift_id=drift_id, limit=100)
    return {
        "drift_id": row["DriftId"],
        "class": row["Class"],
        "reason_code": row["ReasonCode"],
        "reason": c.REASONS.get(row["ReasonCode"], ""),
        "state": row["State"],
        "state_note": row["StateNote"],
        "system": row["System"],
        "region": row["Region"],
        "currency": row["Currency"],
        "keys": {
            "customer_id": row["CustomerId"],
            "invoice_id": row["InvoiceId"],
            "payment_id": row["PaymentId"],
            "ledger_entry_id": row["LedgerEntryId"],
        },
        "primary_key": row["PrimaryKey"],
        "amount_minor": row["AmountMinor"],
        "first_seen": row["FirstSeen"],
        "last_seen": row["LastSeen"],
        "age_bucket": c.age_bucket(first, now),
        "resolved_at": row["ResolvedAt"] if row["ResolvedAt"].year > 1970 else None,
        "run_id": row["RunId"],
        "diff": [
            {"field": f, "billing": billing.get(f), "erp": erp.get(f), "differs": billing.get(f) != erp.get(f)}
            for f in sorted(set(billing) | set(erp))
        ],
        "diff_fields": list(row["DiffFields"]),
        "policy": (decision := policy.decision(row["Class"], auto, row["ReasonCode"])),
        "policy_note": policy.NOT_CORRECTED.get((row["Class"], row["ReasonCode"]), ""),  # why "manual", if so
        "operator_may": c.operator_acts(row["State"], decision),  # sync / acknowledge / ignore
        "history": q.audit_for(store, "drift_item", drift_id),
        "actions": [public_action(a) for a in actions],
        "transaction": get_transaction(store, seed, skew_ns) if seed[1] else None,
    }


@router.get("/{drift_id}", summary="One drift item: field-level diff, history, actions, business transaction")
async def one(
    drift_id: str,
    store: Annotated[Store, Depends(get_store)],
    service: Annotated[ReconcilerService, Depends(get_service)],
    viewer: Annotated[Principal, Depends(require("viewer"))],
) -> dict[str, Any]:
    skew_ns = int(service.settings.sla_clock_skew_s * 1e9)
    doc = await run_in_threadpool(_detail, store, drift_id, service.actions.auto_enabled, skew_ns)
    if doc is None:
        raise HTTPException(404, f"drift item {drift_id} not found")
    return doc


class NoteBody(BaseModel):
    note: str = Field("", max_length=2000, description="Why (required: the audit record says it).")


class SyncBody(BaseModel):
    approve: bool = Field(False, description="Approve a business-rule correction (amount/currency/duplicate).")


async def _transition(service: ReconcilerService, drift_id: str, target: str, note: str, who: Principal) -> Any:
    try:
        item = await run_in_threadpool(service.transition, drift_id, target, note, who.name)
    except ActionError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return {"drift_id": drift_id, "state": item["State"], "note": item["StateNote"]}


@router.post("/{drift_id}/acknowledge", summary="Acknowledge an item (someone is on it; a note says why)")
async def acknowledge(
    drift_id: str,
    body: NoteBody,
    service: Annotated[ReconcilerService, Depends(get_service)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    return await _transition(service, drift_id, c.ACKNOWLEDGED, body.note, operator)


@router.post("/{drift_id}/ignore", summary="Ignore an item (a note saying why is required)")
async def ignore(
    drift_id: str,
    body: NoteBody,
    service: Annotated[ReconcilerService, Depends(get_service)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    return await _transition(service, drift_id, c.IGNORED, body.note, operator)


@router.post("/{drift_id}/sync", summary="Corrective sync of the item (idempotent; business classes need approve)")
async def sync(
    drift_id: str,
    body: SyncBody,
    service: Annotated[ReconcilerService, Depends(get_service)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    try:
        return await run_in_threadpool(service.actions.request, drift_id, operator.name, approve=body.approve)
    except ActionError as exc:
        raise HTTPException(exc.status, str(exc)) from None
