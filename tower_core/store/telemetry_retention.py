"""How long spans, business events and what is derived from them are kept: ClickHouse TTLs set from
TOWER_TELEMETRY_RETENTION_DAYS at `tower serve` start.

They grow with the traffic (~1.9 KB per invoice flow of the simulator, spans, events and their link rows together)
and nothing else deletes them. The state tables, drift items, actions and the audit log are not telemetry and keep
their own rules. A row is kept from its own time (a span's start, an event's time, a link's last sighting), so
data sent late is kept as long as data sent on time; otel_traces, partitioned by day with ttl_only_drop_parts,
drops whole days.
"""

from __future__ import annotations

from tower_core.store.base import Store

# table -> the time its rows are kept from
TTL_FROM = {
    "otel_traces": "toDateTime(Timestamp)",
    "otel_traces_trace_id_ts": "toDateTime(End)",
    "business_key_links": "toDateTime(LastSeen)",
    "trace_key_links": "toDateTime(LastSeen)",
    "business_events": "toDateTime(Time)",
    "step_activity": "Day",
}


def ttl_clause(table: str, days: int) -> str:
    """The TTL as ClickHouse shows it in system.tables.engine_full; '' for none."""
    return f"TTL {TTL_FROM[table]} + toIntervalDay({int(days)})" if days > 0 else ""


def apply_telemetry_retention(store: Store, days: int) -> list[str]:
    """Set (``days`` > 0) or remove (0) the telemetry tables' TTL where it differs; returns the tables changed.
    A change rewrites each table's TTL information once (ClickHouse's materialize_ttl_after_modify), so an
    unchanged setting costs nothing at the next start."""
    rows = store.query_rows(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String} AND name IN {names:Array(String)}",
        {"db": store.database, "names": list(TTL_FROM)},
    )
    current = {r["name"]: r["engine_full"] for r in rows}
    changed = []
    for table in TTL_FROM:
        engine = current.get(table, "")
        want = ttl_clause(table, days)
        has = " TTL " in engine
        if (want and f" {want} " in f"{engine} ") or (not want and not has):
            continue
        # the table name comes from TTL_FROM and days is an int: nothing from outside is spliced in
        sql = f"ALTER TABLE $db.`{table}` MODIFY {want}" if want else f"ALTER TABLE $db.`{table}` REMOVE TTL"
        store.command(sql)
        changed.append(table)
    return changed
