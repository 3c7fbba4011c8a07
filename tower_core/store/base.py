"""The storage seam: one Protocol, two backends (embedded chDB, ClickHouse server) running the same SQL.

SQL text uses ``$db`` for the tower's database and ``{name:Type}`` placeholders for every value; the
backends substitute the (validated) database name and bind the values server-side, never by string
building.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from tower_core.errors import StoreError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def check_identifier(name: str) -> str:
    """Identifiers cannot be bound as parameters, so they are whitelisted instead."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name):  # fullmatch: ``$`` would let a final newline in
        raise ValueError(f"not a safe identifier: {name!r}")
    return name


def check_column(name: str) -> str:
    """Column names may carry one dot (Nested sub-columns such as ``Events.Name``)."""
    if not isinstance(name, str) or not _COLUMN.fullmatch(name):
        raise ValueError(f"not a safe column name: {name!r}")
    return name


_INPUT = re.compile(r"\binput\(")
_FORMAT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


_LITERAL = str.maketrans({"\\": "\\\\", "'": "\\'"})


def file_source(path: str, fmt: str) -> str:
    """``file('<path>', '<fmt>')``: a spooled batch as a table function (embedded backend). The path is the
    tower's own spool file, quoted as a string literal (a data dir may hold a quote or a backslash)."""
    if not _FORMAT_NAME.fullmatch(fmt):
        raise ValueError(f"unsafe format name {fmt!r}")
    return f"file('{path.translate(_LITERAL)}', '{fmt}')"


def input_from_file(sql: str, path: str, fmt: str) -> str:
    """Rewrite ``input('<structure>')`` into ``file('<path>', '<fmt>', '<structure>')`` (embedded backend)."""
    if len(_INPUT.findall(sql)) != 1:
        raise ValueError("the statement must read input() exactly once")
    return _INPUT.sub(file_source(path, fmt)[:-1] + ", ", sql)


# Every connection's settings, on both backends:
# - times are bound and read as UTC, whatever the process's or server's time zone (params.py);
# - an insert may span any number of partitions: one acknowledged OTLP request (or CloudEvents batch) backfilling
#   more than 100 days (months) of history was refused by ClickHouse's default on every retry, and the buffer
#   behind it never drained.
SESSION_SETTINGS: dict[str, str | int] = {"session_timezone": "UTC", "max_partitions_per_insert_block": 0}

# Past {limit} rows numbered n of total: the earliest half and the latest half (the first say how something
# began, the last what happens now).
EARLIEST_AND_LATEST = "WHERE n <= intDiv({limit:UInt32} + 1, 2) OR n > total - intDiv({limit:UInt32}, 2) "


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts; a stored value Python cannot hold (a date before year 1 in UTC) is a store error."""
    try:
        return table.to_pylist()
    except (OverflowError, ValueError) as exc:
        raise StoreError(f"a stored value cannot be read: {exc}") from None


def qualify(sql: str, database: str) -> str:
    """Replace ``$db`` with the quoted database name."""
    return sql.replace("$db", f"`{check_identifier(database)}`")


@runtime_checkable
class Store(Protocol):
    """What every component may ask of ClickHouse."""

    backend: str
    database: str

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run DDL or a statement with no result."""

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a SELECT and return an Arrow table."""

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a SELECT and return rows as dicts (small results only)."""

    def insert_arrow(self, table: str, data: pa.Table, *, dedup_token: str | None = None) -> int:
        """Insert columnar data into ``$db.table``; a retry with the same token inserts nothing twice."""

    def insert_select(self, sql: str, data: bytes, fmt: str, params: Mapping[str, Any] | None = None) -> None:
        """Run ``INSERT ... SELECT ... FROM input('<structure>')`` with ``data`` (in format ``fmt``) as the
        input: ClickHouse parses and reshapes the data itself, no Python per row."""

    def ping(self) -> bool:
        """True when the backend answers a trivial query."""

    def connect(self) -> None:
        """Reach the backend and make the database (StoreUnreachable while a server does not answer)."""

    def close(self) -> None:
        """Release the backend."""
