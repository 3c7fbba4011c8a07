"""Canonical records <-> JSON for the simulator's loopback HTTP API (datetimes as RFC 3339, dates ISO)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing
from functools import cache
from typing import Any, TypeVar

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
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_json(cls: type[T], doc: dict[str, Any]) -> T:
    """Build a record; unknown fields are an error (ValueError), so a bad request gets a clear 422."""
    if not isinstance(doc, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(doc) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in doc.items():
        hint = str(hints[name])
        if value is not None and "datetime.datetime" in hint:
            value = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            if value.tzinfo is None:
                raise ValueError(f"{name} must carry a timezone")
        elif value is not None and "date" in hint:
            value = dt.date.fromisoformat(str(value))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"invalid {cls.__name__}: {exc}") from None


def outcome_json(o: ActionOutcome) -> dict[str, Any]:
    return {"target_ref": o.target_ref, "already_done": o.already_done, "detail": o.detail, "data": dict(o.data)}


def outcome_from(doc: dict[str, Any]) -> ActionOutcome:
    return ActionOutcome(doc["target_ref"], bool(doc["already_done"]), doc.get("detail", ""), doc.get("data", {}))
