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


def open_store(settings: Settings) -> Store:
    if settings.clickhouse_url:
        from tower_core.store.server import ServerStore, parse_url

        # the database: TOWER_DATABASE when set, else the one the URL names (…:8123/db), else the default
        named = parse_url(settings.clickhouse_url)["database"]
        explicit = "database" in settings.model_fields_set
        if explicit and named and named != settings.database:
            raise ConfigError(
                f"TOWER_DATABASE ({settings.database}) and TOWER_CLICKHOUSE_URL (/{named}) name different databases"
            )
        database = settings.database if explicit or not named else named
        return ServerStore(settings.clickhouse_url, database, settings.clickhouse_connect_timeout_s)
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
