"""The ClickHouse store: the only place that holds SQL.

``open_store(settings)`` picks the backend: embedded chDB (default) or a ClickHouse server when
``TOWER_CLICKHOUSE_URL`` is set.
"""

from __future__ import annotations

from tower_core.errors import ConfigError
from tower_core.settings import Settings
from tower_core.store.base import Store
from tower_core.store.migrate import migrate, schema_version

__all__ = ["Store", "migrate", "open_store", "schema_version", "table_counts"]


def open_store(settings: Settings, *, connect: bool = True) -> Store:
    """``connect=False``: a server is not reached yet (the caller calls ``connect()``); chDB opens its path anyway."""
    if settings.clickhouse_url:
        from tower_core.store.base import check_identifier
        from tower_core.store.server import ServerStore, parse_url

        # a database the URL names (…:8123/db) must be TOWER_DATABASE's: neither silently ignored (as it was)
        # nor silently switched to on an upgrade (the history would stay in the other one)
        named = parse_url(settings.clickhouse_url)["database"]
        if named:
            try:
                check_identifier(named)
            except ValueError:
                raise ConfigError(f"TOWER_CLICKHOUSE_URL names database {named!r}, not a plain identifier") from None
            if named != settings.database:
                raise ConfigError(
                    f"TOWER_CLICKHOUSE_URL names database {named!r} but TOWER_DATABASE is {settings.database!r}: "
                    "set TOWER_DATABASE to the database the tower uses, and the URL's path to the same (or none)"
                )
        return ServerStore(
            settings.clickhouse_url,
            settings.database,
            settings.clickhouse_connect_timeout_s,
            settings.clickhouse_query_timeout_s,
            connect=connect,
        )
    from tower_core.store.embedded import EmbeddedStore

    return EmbeddedStore(settings.data_dir, settings.database)


def table_counts(store: Store) -> dict[str, int]:
    """Rows per table of the tower's database (from system.parts, so it is cheap)."""
    tables = store.query_rows(
        "SELECT name FROM system.tables WHERE database = {db:String} AND engine NOT IN ('MaterializedView', 'View') "
        "ORDER BY name",
        {"db": store.database},
    )
    parts = store.query_rows(
        "SELECT table, sum(rows) AS rows FROM system.parts WHERE database = {db:String} AND active GROUP BY table",
        {"db": store.database},
    )
    by_table = {p["table"]: int(p["rows"]) for p in parts}
    return {t["name"]: by_table.get(t["name"], 0) for t in tables}
