"""Shared fixtures: one chDB data path for the whole pytest process (chDB allows one per process), one
database per test, and the ClickHouse-HTTP test fixture in its own process for the server backend."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from tower_core.settings import Settings
from tower_core.store import Store, open_store
from tower_core.store.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
# Real third-party servers (localstripe, trytond) as session fixtures.
pytest_plugins = ["tests.fixtures.external"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def chdb_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb-data")


def new_database() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def clickhouse_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the ClickHouse-HTTP test fixture (chDB behind ClickHouse's HTTP interface)."""
    port = free_port()
    data = tmp_path_factory.mktemp("ch-http-fixture")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.clickhouse_http_fixture", "--data", str(data), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"http://default:@127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _new_store(backend: str, request: pytest.FixtureRequest, chdb_data_dir: Path) -> Store:
    db = new_database()
    if backend == "chdb":
        return open_store(Settings(data_dir=chdb_data_dir, database=db, clickhouse_url=None))
    url = request.getfixturevalue("clickhouse_http")
    return open_store(Settings(clickhouse_url=f"{url}/{db}", database=db))


@pytest.fixture(params=["chdb", "clickhouse-http"])
def store(request: pytest.FixtureRequest, chdb_data_dir: Path) -> Iterator[Store]:
    """A fresh database on each backend: the store contract suite runs once per parameter id."""
    st = _new_store(request.param, request, chdb_data_dir)
    yield st
    st.command("DROP DATABASE IF EXISTS $db")
    st.close()


@pytest.fixture
def sibling_store(store: Store, request: pytest.FixtureRequest, chdb_data_dir: Path) -> Iterator[Store]:
    """Another fresh database on the backend of ``store``."""
    st = _new_store(request.node.callspec.params["store"], request, chdb_data_dir)
    yield st
    st.command("DROP DATABASE IF EXISTS $db")
    st.close()


@pytest.fixture
def embedded_store(chdb_data_dir: Path) -> Iterator[Store]:
    st = open_store(Settings(data_dir=chdb_data_dir, database=new_database(), clickhouse_url=None))
    yield st
    st.command("DROP DATABASE IF EXISTS $db")


# Per backend (store class), what migrate() built on this worker's first database: the DDL of every table and
# view, qualified with $db, and the schema_migrations rows.
_MIGRATED_SCHEMA: dict[type, tuple[list[str], pa.Table]] = {}


def schema_record(store: Store) -> tuple[list[str], pa.Table]:
    """The DDL of every table and view of ``store``'s database (tables first), qualified with $db, and its
    migration records."""
    objects = store.query_rows(
        "SELECT create_table_query AS ddl FROM system.tables WHERE database = {db:String} "
        "ORDER BY engine = 'MaterializedView', name",
        {"db": store.database},
    )
    own = re.compile(rf"\b{re.escape(store.database)}\.")
    return [own.sub("$db.", row["ddl"]) for row in objects], store.query_arrow(
        "SELECT * FROM $db.schema_migrations ORDER BY Version"
    )


def migrated(store: Store) -> Store:
    """Give ``store``'s new database the schema migrate() builds, in a fifth of the time (~0.35 s, not ~1.7 s:
    ~170 tests start from it). The first database of each backend in a worker is migrated for real and
    recorded; later ones are created from the record: tables, then the materialized views reading them, then
    the migration records, so migrate() finds nothing to do. test_store_contract checks both give the same
    schema; the migration tests call migrate() themselves."""
    schema = _MIGRATED_SCHEMA.get(type(store))
    if schema is None:
        migrate(store)
        _MIGRATED_SCHEMA[type(store)] = schema_record(store)
        return store
    ddl, records = schema
    for statement in ddl:
        store.command(statement)
    store.insert_arrow("schema_migrations", records)
    return store


@pytest.fixture(autouse=True)
def _no_ambient_tower_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; a developer's TOWER_* variables must not leak in."""
    for key in list(os.environ):
        if key.startswith("TOWER_"):
            monkeypatch.delenv(key)


# The longest files (minutes each on the 2-core machine), started first.
LONGEST_FILES = ("test_dashboard_browser.py", "test_faults.py", "test_simulator_live.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files, then the other files holding slow tests, then the rest. `make test` runs xdist with
    `--dist loadfile --no-loadscope-reorder`, which hands files to workers in this order: the longest start at
    once and the short files fill in behind them (xdist's own order, by test count, started the one-test
    Chromium tour last). The wall time is the busiest worker's. The order within a file is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        if item.path.name in LONGEST_FILES:
            return LONGEST_FILES.index(item.path.name)
        return len(LONGEST_FILES) + (item.path not in slow_files)

    items.sort(key=rank)
