"""Source records a pull passed over because they could not be mapped (see migration 0016)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

from tower_core.models import Skipped
from tower_core.store.base import Store

_RECORD = """
INSERT INTO $db.source_skips (Connector, Stream, Ref, Reason, FirstSkippedAt, LastSkippedAt, Times, Cleared,
    ClearedAt, Version)
SELECT {connector:String}, {stream:String}, n.ref, n.reason, if(p.Ref = '' OR p.Cleared = 1, {now:DateTime64(3)},
        p.FirstSkippedAt), {now:DateTime64(3)}, if(p.Cleared = 1, 1, p.Times + 1), 0, toDateTime64(0, 3), {v:UInt64}
FROM (
    SELECT s.1 AS ref, s.2 AS reason
    FROM (SELECT arrayJoin(arrayZip({refs:Array(String)}, {reasons:Array(String)})) AS s)
) AS n
LEFT JOIN (
    SELECT Ref, FirstSkippedAt, Times, Cleared FROM $db.source_skips FINAL
    WHERE Connector = {connector:String} AND Stream = {stream:String} AND Ref IN {refs:Array(String)}
) AS p ON p.Ref = n.ref
SETTINGS join_use_nulls = 0
"""
_CLEAR = """
INSERT INTO $db.source_skips (Connector, Stream, Ref, Reason, FirstSkippedAt, LastSkippedAt, Times, Cleared,
    ClearedAt, Version)
SELECT Connector, Stream, Ref, Reason, FirstSkippedAt, LastSkippedAt, Times, 1, {now:DateTime64(3)}, {v:UInt64}
FROM $db.source_skips FINAL
WHERE Connector = {connector:String} AND Stream = {stream:String} AND Cleared = 0 AND Ref IN {refs:Array(String)}
"""


def record_skips(store: Store, connector: str, stream: str, skipped: Sequence[Skipped]) -> None:
    """Open (or re-open) one row per skipped record; a record skipped again keeps its first time and counts."""
    if not skipped:
        return
    latest = {s.ref: s.reason for s in skipped}
    store.command(
        _RECORD,
        {
            "connector": connector,
            "stream": stream,
            "refs": list(latest),
            "reasons": list(latest.values()),
            "now": dt.datetime.now(dt.UTC),
            "v": time.time_ns(),
        },
    )


def clear_skips(store: Store, connector: str, stream: str, refs: Sequence[str]) -> None:
    """Records that mapped this time: their open skips are closed."""
    if refs:
        params = {"connector": connector, "stream": stream, "refs": list(refs)}
        store.command(_CLEAR, {**params, "now": dt.datetime.now(dt.UTC), "v": time.time_ns()})


def list_skips(store: Store, *, include_cleared: bool = False, limit: int = 500) -> list[dict[str, Any]]:
    """Skipped records, open ones (or all), most recently skipped first."""
    return store.query_rows(
        "SELECT Connector AS connector, Stream AS stream, Ref AS ref, Reason AS reason, "
        "FirstSkippedAt AS first_skipped_at, LastSkippedAt AS last_skipped_at, Times AS times, "
        "Cleared = 1 AS cleared, if(Cleared = 1, ClearedAt, NULL) AS cleared_at FROM $db.source_skips FINAL "
        "WHERE {all:UInt8} = 1 OR Cleared = 0 ORDER BY LastSkippedAt DESC, Ref LIMIT {limit:UInt32}",
        {"all": int(include_cleared), "limit": limit},
    )


def open_skip_count(store: Store, connector: str = "", stream: str = "") -> int:
    """Open skips, of one connector's stream when given."""
    rows = store.query_rows(
        "SELECT count() AS n FROM $db.source_skips FINAL WHERE Cleared = 0 "
        "AND ({connector:String} = '' OR Connector = {connector:String}) "
        "AND ({stream:String} = '' OR Stream = {stream:String})",
        {"connector": connector, "stream": stream},
    )
    return int(rows[0]["n"]) if rows else 0


def open_skip(store: Store, connector: str, stream: str, ref: str) -> dict[str, Any] | None:
    rows = store.query_rows(
        "SELECT Connector AS connector, Stream AS stream, Ref AS ref, Reason AS reason, Times AS times "
        "FROM $db.source_skips FINAL WHERE Connector = {connector:String} AND Stream = {stream:String} "
        "AND Ref = {ref:String} AND Cleared = 0",
        {"connector": connector, "stream": stream, "ref": ref},
    )
    return rows[0] if rows else None
