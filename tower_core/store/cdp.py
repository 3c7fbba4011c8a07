"""Reads of CDP events (what the tower kept of a CDP user's profile changes, PII already hashed)."""

from __future__ import annotations

from typing import Any

from tower_core.store.base import Store


def events_for_user(store: Store, cdp_user_id: str, limit: int = 100) -> list[dict[str, Any]]:
    rows = store.query_rows(
        "SELECT EventId AS event_id, Type AS type, toUnixTimestamp64Nano(Time) AS time_ns, Region AS region, "
        "Step AS step, CustomerId AS customer_id, Attributes AS attributes, Data AS data "
        "FROM $db.business_events FINAL "
        "WHERE Source = 'cdp' AND Attributes['revops.cdp.user_id'] = {user:String} "
        "ORDER BY Time LIMIT {limit:UInt32}",
        {"user": cdp_user_id, "limit": limit},
    )
    for r in rows:
        r["attributes"] = dict(r["attributes"])
        r["time_ns"] = int(r["time_ns"])
    return rows
