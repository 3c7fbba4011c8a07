"""Embedded backend: the ClickHouse engine in-process through chDB.

chDB allows one data path per process for the process's life, and one process per path (ClickHouse's
``status`` file lock). Both rules are checked up front so the user gets a ConfigError naming the owner
instead of chDB's generic "Error initializing EmbeddedServer".
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from tower_core.errors import ConfigError, StoreError
from tower_core.paths import private_dir
from tower_core.store.base import (
    SESSION_SETTINGS,
    check_column,
    check_identifier,
    file_source,
    input_from_file,
    qualify,
    rows_of,
)
from tower_core.store.params import escape_params

# chDB's jemalloc keeps freed pages for 10 s by default, so a process that inserts steadily holds every
# insert's transient memory at once (1.6 GB RSS under ingest). Returning them after 0.5 s brought the peak to
# 1.2 GB at the same insert rate (bench/ingest.py). Read once, when chDB loads; an operator's own value wins.
os.environ.setdefault("JE_MALLOC_CONF", "dirty_decay_ms:500,muzzy_decay_ms:0")

_lock = threading.Lock()
_local = threading.local()
# Every thread queries and inserts through its own chDB connection (see EmbeddedStore._conn): a connection
# takes one streaming insert at a time and keeps one set of query parameters, so sharing one between the
# flusher, reconciliation runs and request threads mixes them up.
_session: Any = None
_session_path: Path | None = None


def _status_owner(path: Path) -> str | None:
    """Return a description of the process holding ``path/status``, or None if it is free."""
    status = path / "status"
    if not status.exists():
        return None
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = status.read_text(errors="replace")
            pid = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("PID:")), "")
            return f"PID {pid}" if pid else "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def data_dir_owner(path: Path) -> str | None:
    """The process that has ``path`` open as its chDB data dir, described, or None."""
    return _status_owner(Path(path).resolve())


def _check_writable(path: Path) -> None:
    try:
        private_dir(path)
        probe = path / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"data dir {path} is not writable: {exc.strerror or exc}") from None


# file() reads its path as a glob ({a,b}, {1..3}, *, ?, [..]) and the store writes $db into statements: a data
# dir holding any of these would make spooled writes read nothing (silently) or the wrong path
_UNSAFE_PATH = re.compile(r"[{}\[\]*?$]")


def open_session(path: Path) -> Any:
    """The process's single chDB session, opened on first use."""
    global _session, _session_path
    path = path.resolve()
    if _UNSAFE_PATH.search(str(path)):
        raise ConfigError(
            f"data dir {path} holds one of {{ }} [ ] * ? $, which ClickHouse's file() would read as a pattern; "
            "choose another TOWER_DATA_DIR"
        )
    with _lock:
        if _session is not None:
            if path != _session_path:
                raise ConfigError(
                    f"this process already opened chDB at {_session_path}; chDB allows one data path per process"
                )
            return _session
        _check_writable(path)
        owner = _status_owner(path)
        if owner:
            raise ConfigError(
                f"data dir {path} is owned by {owner}; only one process may open a chDB path "
                "(use the API of the process that owns it, or set TOWER_DATA_DIR)"
            )
        from chdb import session as chdb_session

        try:
            _session = chdb_session.Session(str(path))
        except Exception as exc:  # chDB raises RuntimeError with little detail
            owner = _status_owner(path)
            hint = f" (owned by {owner})" if owner else ""
            raise ConfigError(f"cannot open chDB at {path}{hint}: {exc}") from None
        _session_path = path
        _clear_spool(path)
        return _session


SPOOL_DIR = "input_spool"


def _clear_spool(path: Path) -> None:
    """Spool files a killed process left behind (each up to a whole flush chunk; a kill -9 skips the delete on
    close). This process now owns the path, so none of them is being read."""
    for left in (path / SPOOL_DIR).glob("input-*.bin"):
        left.unlink(missing_ok=True)


class EmbeddedStore:
    """Store backed by the process's chDB session."""

    backend = "embedded"

    def __init__(self, data_dir: Path, database: str) -> None:
        self.database = check_identifier(database)
        self.data_dir = data_dir
        self._s = open_session(data_dir)
        self.connect()

    def connect(self) -> None:
        self.command("CREATE DATABASE IF NOT EXISTS $db")

    def _conn(self) -> Any:
        """A chDB connection of this thread: query parameters are per connection, and one connection shared
        by threads binds one thread's values into another's query (or loses them)."""
        conn = getattr(_local, "conn", None)
        if conn is None:
            from chdb.state import sqlitelike

            conn = sqlitelike.Connection(str(_session_path))
            try:
                for name, value in SESSION_SETTINGS.items():
                    conn.query(f"SET {name} = {value!r}", "CSV")
            except Exception as exc:
                raise StoreError(f"cannot set the session's settings: {str(exc).strip()}") from None
            _local.conn = conn
        return conn

    def _run(self, sql: str, fmt: str, params: Mapping[str, Any] | None) -> Any:
        bound = escape_params(params)  # a parameter that cannot be bound is the caller's bug, not the store's
        try:
            return self._conn().query(qualify(sql, self.database), fmt, params=bound)
        except Exception as exc:
            raise StoreError(str(exc).strip()) from None

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._run(sql, "CSV", params)

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        return self._run(sql, "ArrowTable", params)

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return rows_of(self.query_arrow(sql, params))

    def insert_arrow(self, table: str, data: pa.Table, *, dedup_token: str | None = None) -> int:
        """INSERT ... SELECT from the batch spooled as an Arrow stream. Not chDB's streaming insert: with it, the
        materialized views of a table with several views did not all fire, depending on their order (one in
        three fresh databases lost every derived row of otel_traces)."""
        if data.num_rows == 0:
            return 0
        cols = ", ".join(f"`{check_column(c)}`" for c in data.column_names)
        settings = ""
        if dedup_token:  # as on the server backend: an empty token is no token
            settings = f" SETTINGS insert_deduplication_token='{check_identifier(dedup_token)}'"
        head = f"INSERT INTO $db.`{check_identifier(table)}` ({cols}) SELECT * FROM "  # noqa: S608 (checked names)
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, data.schema) as writer:
            writer.write_table(data)
        self._spooled(sink.getvalue(), lambda path: f"{head}{file_source(path, 'ArrowStream')}{settings}", None)
        return data.num_rows

    def insert_select(self, sql: str, data: bytes, fmt: str, params: Mapping[str, Any] | None = None) -> None:
        self._spooled(data, lambda path: input_from_file(sql, path, fmt), params)

    def _spooled(self, data: bytes, statement: Callable[[str], str], params: Mapping[str, Any] | None) -> None:
        """Run the statement ``statement(path)`` reading ``data`` from a spool file under the data dir (a full or
        failing disk is a StoreError like any other failed write)."""
        spool = self.data_dir.resolve() / SPOOL_DIR
        try:
            spool.mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=spool, prefix="input-", suffix=".bin") as f:
                f.write(data)
                f.flush()
                self._run(statement(f.name), "CSV", params)
        except OSError as exc:
            raise StoreError(f"cannot spool the batch under {spool}: {exc.strerror or exc}") from None

    def ping(self) -> bool:
        try:
            self._run("SELECT 1", "CSV", None)
            return True
        except StoreError:
            return False

    def close(self) -> None:
        """The session lives for the process (chDB cannot reopen another path), so nothing to do."""
