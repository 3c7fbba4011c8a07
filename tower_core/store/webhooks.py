"""Lookups for webhook and CDP ingest: has an event (Source, EventId) already been stored?"""

from __future__ import annotations

from tower_core.store.base import Store


def stored_event_ids(store: Store, source: str, event_ids: list[str]) -> set[str]:
    """The ids among ``event_ids`` that business_events already holds for ``source`` (its primary key)."""
    if not event_ids:
        return set()
    rows = store.query_rows(
        "SELECT DISTINCT EventId AS id FROM $db.business_events "
        "WHERE Source = {source:String} AND EventId IN {ids:Array(String)}",
        {"source": source, "ids": event_ids},
    )
    return {r["id"] for r in rows}


def count_events(store: Store, source: str, event_id: str) -> int:
    """Rows a query sees for one event (FINAL collapses redeliveries): 1 when deduplicated."""
    rows = store.query_rows(
        "SELECT count() AS n FROM $db.business_events FINAL WHERE Source = {source:String} AND EventId = {id:String}",
        {"source": source, "id": event_id},
    )
    return int(rows[0]["n"]) if rows else 0
