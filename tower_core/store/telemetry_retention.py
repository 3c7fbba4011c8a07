"""How long spans, business events and what is derived from them are kept: ClickHouse TTLs set from
TOWER_TELEMETRY_RETENTION_DAYS at `tower serve` start.

They grow with the traffic (~1.9 KB per invoice flow of the simulator, spans, events and their link rows together)
and nothing else deletes them. The state tables, drift items, actions and the audit log are not telemetry and keep
their own rules. A row is kept from its own time (a span's start, an event's time, a link's last sighting), so
data sent late is kept as long as data sent on time; otel_traces, partitioned by day with ttl_only_drop_parts,
drops whole days. Unset, the tables' TTLs are left as they are (an operator's own included).
"""

from __future__ import annotations

import logging

from tower_core.store.base import Store

log = logging.getLogger("tower.store")

# Times are clamped before the TTL reads them: DateTime holds 1970-2106, and a span stamped in 2150 (a bad clock)
# wrapped to 2013, expiring at once the index and key-link rows its trace's real spans share with it (their
# LastSeen is the trace's latest); one before 1970 wrapped to 2105 and never expired.
_EARLIEST = "toDateTime64('1970-01-02 00:00:00', 9, 'UTC')"
_LATEST = "toDateTime64('2090-01-01 00:00:00', 9, 'UTC')"  # + the longest retention (3,650 days) stays < 2106


def _clamped(column: str) -> str:
    return f"toDateTime(least(greatest({column}, {_EARLIEST}), {_LATEST}))"


# table -> the time its rows are kept from
TTL_FROM = {
    "otel_traces": _clamped("Timestamp"),
    "otel_traces_trace_id_ts": _clamped("End"),
    "business_key_links": _clamped("LastSeen"),
    "trace_key_links": _clamped("LastSeen"),
    "business_events": _clamped("Time"),
    # by the item's own time, not its Day: a row of day D went at midnight of D + N, up to a day before its item
    # left an N-day SLA period
    "step_activity": _clamped("FirstSeen"),
}


def ttl_clauses(store: Store, days: int) -> dict[str, str]:
    """Per table, the TTL as ClickHouse renders it in system.tables.engine_full ('TTL <expression>'); '' for none.
    ClickHouse renders all of them in one query."""
    if days <= 0:
        return dict.fromkeys(TTL_FROM, "")
    tables = list(TTL_FROM)
    params = {f"q{i}": f"SELECT {TTL_FROM[t]} + toIntervalDay({int(days)})" for i, t in enumerate(tables)}
    columns = ", ".join(f"formatQuerySingleLine({{q{i}:String}}) AS q{i}" for i in range(len(tables)))
    rendered = store.query_rows(f"SELECT {columns}", params)[0]  # only placeholders are spliced in
    return {t: "TTL " + str(rendered[f"q{i}"]).removeprefix("SELECT ") for i, t in enumerate(tables)}


def _current_ttl(engine: str) -> str:
    """The TTL clause of an engine_full ('' for none)."""
    start = engine.find(" TTL ")
    if start < 0:
        return ""
    end = engine.find(" SETTINGS ", start)
    return engine[start + 1 : end if end >= 0 else len(engine)]


def apply_telemetry_retention(store: Store, days: int | None) -> list[str]:
    """Set (``days`` > 0) or remove (0) the telemetry tables' TTL where it differs; None leaves them alone.
    Returns the tables changed. A change rewrites each table's TTL information once (ClickHouse's
    materialize_ttl_after_modify), so an unchanged setting costs nothing at the next start."""
    if days is None:
        return []
    rows = store.query_rows(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String} AND name IN {names:Array(String)}",
        {"db": store.database, "names": list(TTL_FROM)},
    )
    current = {r["name"]: _current_ttl(r["engine_full"]) for r in rows}
    changed = []
    for table, want in ttl_clauses(store, days).items():
        have = current.get(table, "")
        if want == have:
            continue
        if have:  # an operator's own rule (a move TO VOLUME included) is replaced whole: say what it was
            log.warning("%s: replacing its TTL (%s) by TOWER_TELEMETRY_RETENTION_DAYS=%d", table, have, days)
        # the table name comes from TTL_FROM and days is an int: nothing from outside is spliced in
        sql = f"ALTER TABLE $db.`{table}` MODIFY {want}" if want else f"ALTER TABLE $db.`{table}` REMOVE TTL"
        store.command(sql)
        changed.append(table)
    return changed
