"""Canonical records <-> JSON for the simulator's loopback HTTP API (datetimes as RFC 3339, dates ISO)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from functools import cache
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from connectors.base import ActionOutcome
from tower_core.models import CdpProfile, Customer, Invoice, LedgerEntry, Payment

T = TypeVar("T")
RECORD_TYPES: dict[str, type] = {
    "invoice": Invoice,
    "payment": Payment,
    "ledger_entry": LedgerEntry,
    "customer": Customer,
    "cdp_profile": CdpProfile,
}


def to_json(record: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        v = getattr(record, f.name)
        if isinstance(v, dt.datetime):
            v = v.astimezone(dt.UTC).isoformat()
        elif isinstance(v, dt.date):
            v = v.isoformat()
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


@cache
def _adapter(cls: type[T]) -> TypeAdapter[T]:
    return TypeAdapter(cls)


def from_json(cls: type[T], doc: dict[str, Any]) -> T:
    """Build a record, every field checked against its type (a string where an amount belongs, a null where a
    date does): a ValueError, so a bad request gets a clear 422 and never reaches the systems."""
    if not isinstance(doc, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    unknown = set(doc) - {f.name for f in fields}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    try:
        record = _adapter(cls).validate_python(doc, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or cls.__name__
        raise ValueError(f"invalid {cls.__name__}: {where}: {first['msg']}") from None
    for f in fields:
        value = getattr(record, f.name)
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            raise ValueError(f"{f.name} must carry a timezone")
    return record


def outcome_json(o: ActionOutcome) -> dict[str, Any]:
    return {"target_ref": o.target_ref, "already_done": o.already_done, "detail": o.detail, "data": dict(o.data)}


def outcome_from(doc: dict[str, Any]) -> ActionOutcome:
    return ActionOutcome(doc["target_ref"], bool(doc["already_done"]), doc.get("detail", ""), doc.get("data", {}))
