"""Bulk actions on a filtered set of drift items (operator, audited).

The caller states how many items it saw for the filter (``expected_count``) and, optionally, which ones
(``expected_ids``; required to approve business-rule corrections): when the set has changed since (a run resolved
or found items, even as many as it resolved), the API refuses with 409 so a person reviews it again. Each item goes
through the same rules as a single action (transition or corrective sync), so each is audited on its own, plus one
``drift.bulk`` record for the request; acknowledging, ignoring or requesting corrections for the set takes a few
reads and two writes. Corrective syncs are created at once and executed in the background; the response lists
their action ids to follow.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool

from collector.auth import Principal, require
from collector.deps import MAX_MINOR, get_store
from collector.routers.drift import get_service
from reconciler import classify as c
from reconciler.actions import ActionError
from reconciler.service import ReconcilerService
from tower_core.store import Store
from tower_core.store import reconcile as q

router = APIRouter(prefix="/api/drift", tags=["drift"])
log = logging.getLogger("tower.api.bulk")
MAX_BULK = 500


class DriftFilter(BaseModel):
    """The drift list's filters (GET /api/drift), as a body."""

    region: str = Field("", pattern=r"^[A-Za-z0-9_-]{0,16}$")
    classes: list[str] = Field(default_factory=list, alias="class")
    states: list[str] = Field(default_factory=list, alias="state", description="Default: all but resolved.")
    system: str = Field("", pattern=r"^(|billing|erp|cdp)$")
    currency: str = Field("", pattern=r"^[A-Z]{0,3}$")
    reason: str = Field("", max_length=64)
    key: str = Field("", max_length=200)
    age: str = Field("", description="Aging bucket: 0-1d, 2-7d, 8-30d, >30d.")
    min_amount: int = Field(0, ge=0, le=MAX_MINOR)
    max_amount: int | None = Field(None, ge=0, le=MAX_MINOR)

    model_config = {"populate_by_name": True}

    @model_validator(mode="after")
    def _known(self) -> DriftFilter:
        for values, allowed, what in ((self.classes, c.CLASSES, "class"), (self.states, c.STATES, "state")):
            bad = sorted(set(values) - set(allowed))
            if bad:
                raise ValueError(f"unknown {what}: {', '.join(bad)}; one of {', '.join(allowed)}")
        if self.age and self.age not in c.AGE_BUCKETS:
            raise ValueError(f"unknown age bucket {self.age!r}; one of {', '.join(c.AGE_BUCKETS)}")
        return self

    def query(self) -> dict[str, Any]:
        lo, hi = c.age_bucket_bounds(self.age) if self.age else (0, None)
        return {
            "region": self.region,
            "classes": self.classes,
            "states": self.states or list(c.OPEN_STATES),
            "system": self.system,
            "currency": self.currency,
            "reason": self.reason,
            "key": self.key,
            "min_amount": self.min_amount,
            "max_amount": -1 if self.max_amount is None else self.max_amount,
            "min_age_days": lo,
            "max_age_days": -1 if hi is None else hi,
        }


class BulkRequest(BaseModel):
    action: Literal["acknowledge", "ignore", "sync"]
    filter: DriftFilter = Field(default_factory=DriftFilter)
    expected_count: int = Field(ge=1, le=MAX_BULK, description="How many items the caller saw for the filter.")
    note: str = Field("", max_length=2000, description="Why (required to acknowledge or ignore).")
    approve: bool = Field(False, description="Approve business-rule corrections (sync only).")
    expected_ids: list[Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]] | None = Field(
        None,
        max_length=MAX_BULK,
        description="The drift ids the caller reviewed: the filter must still match exactly these. Required to "
        "approve (a set that changed while its count stayed would run corrections nobody saw).",
    )

    @model_validator(mode="after")
    def _note_to_ignore(self) -> BulkRequest:
        if self.action in ("acknowledge", "ignore") and not self.note.strip():
            raise ValueError(f"{self.action.removesuffix('e')}ing items needs a note saying why")
        if self.approve and self.action == "sync" and self.expected_ids is None:
            raise ValueError("approving corrections in bulk needs expected_ids: the drift ids that were reviewed")
        if self.expected_ids is not None and len(set(self.expected_ids)) != self.expected_count:
            raise ValueError(f"expected_ids names {len(set(self.expected_ids))} items, not expected_count's")
        return self


def _apply(
    store: Store, service: ReconcilerService, body: BulkRequest, who: Principal
) -> tuple[dict[str, Any], list[str]]:
    rows, total = q.list_drift(
        store,
        **body.filter.query(),
        sort="first_seen",
        descending=False,
        limit=MAX_BULK + 1,
        offset=0,
        now=dt.datetime.now(dt.UTC),
    )
    if total > MAX_BULK:  # no count the caller could confirm would do: say what would
        raise ActionError(
            409, f"{total} items match the filter: a bulk action takes at most {MAX_BULK}; narrow the filter"
        )
    if total != body.expected_count:
        raise ActionError(
            409, f"{total} items match the filter now, not {body.expected_count}: review the set and confirm again"
        )
    if body.expected_ids is not None and (gone := set(body.expected_ids) - {r["drift_id"] for r in rows}):
        raise ActionError(
            409, f"{len(gone)} of the reviewed items no longer match the filter (others took their place): review "
            "the set and confirm again",
        )  # fmt: skip
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    to_run: list[str] = []
    if body.action == "sync":
        requested = service.actions.request_many([r["drift_id"] for r in rows], who.name, approve=body.approve)
        for drift_id, action in requested.items():
            if isinstance(action, ActionError):
                failed.append({"drift_id": drift_id, "status": action.status, "error": str(action)})
                continue
            action_id, state, approved = action["action_id"], action["state"], bool(action["approved_by"])
            done.append({"drift_id": drift_id, "action_id": action_id, "state": state, "approved": approved})
            if state == "pending" and approved:
                to_run.append(action_id)
    else:
        target = c.ACKNOWLEDGED if body.action == "acknowledge" else c.IGNORED
        outcomes = service.transitions([r["drift_id"] for r in rows], target, body.note, who.name)
        for drift_id, outcome in outcomes.items():
            if isinstance(outcome, ActionError):
                failed.append({"drift_id": drift_id, "status": outcome.status, "error": str(outcome)})
            else:
                done.append({"drift_id": drift_id, "state": outcome["State"]})
    summary = {"action": body.action, "matched": total, "done": len(done), "failed": len(failed)}
    if body.action == "sync":  # of those done: corrections started now, and those left waiting for an approval
        summary["started"] = len(to_run)
        summary["awaiting_approval"] = sum(1 for d in done if d["state"] == "pending" and not d["approved"])
    after = {**summary, "filter": body.filter.model_dump(by_alias=True)}
    outcome = "ok" if not failed else ("error" if not done else "partial")
    record = q.audit_record(who.name, "drift.bulk", "drift_item", "(bulk)", None, after, body.note, outcome)
    q.write_audit(store, [record])
    return {**summary, "items": done, "errors": failed}, to_run


def _run_in_background(service: ReconcilerService, action_ids: list[str]) -> None:
    def work() -> None:
        for action_id in action_ids:
            try:
                service.actions.execute(action_id)
            except Exception:  # the actions job retries what is left pending
                log.exception("bulk corrective sync %s failed to execute", action_id)

    if action_ids:
        threading.Thread(target=work, name="bulk-sync", daemon=True).start()


@router.post("/bulk", summary="Acknowledge, ignore or correct every item of a filtered set (count confirmed)")
async def bulk(
    body: BulkRequest,
    store: Annotated[Store, Depends(get_store)],
    service: Annotated[ReconcilerService, Depends(get_service)],
    operator: Annotated[Principal, Depends(require("operator"))],
) -> dict[str, Any]:
    try:
        result, to_run = await run_in_threadpool(_apply, store, service, body, operator)
    except ActionError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    _run_in_background(service, to_run)
    return result
