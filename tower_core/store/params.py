"""Python values -> ClickHouse query-parameter text (the ``param_*`` wire form).

Both backends bind ``{name:Type}`` placeholders server-side; this module fixes one textual encoding so the
same call binds the same value on chDB and over HTTP. Times are sent as UTC wall-clock text, which ClickHouse
reads in the session's time zone: both backends set ``session_timezone = 'UTC'``. Pure, no IO.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

_ESC = str.maketrans({"\\": "\\\\", "'": "\\'", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


def _quoted(value: Any) -> str:
    """A value nested inside an Array/Map/Tuple literal."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.translate(_ESC) + "'"
    if isinstance(value, dt.datetime | dt.date):
        return "'" + format_param(value) + "'"
    return format_param(value)


def format_param(value: Any) -> str:
    """Unescaped text of a top-level parameter (clickhouse-connect applies the wire escaping itself)."""
    if value is None:
        raise TypeError("NULL parameters are not used by the tower; bind a default instead")
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_quoted(k)}:{_quoted(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "(" + ",".join(_quoted(v) for v in value) + ")"
    if isinstance(value, Sequence):
        return "[" + ",".join(_quoted(v) for v in value) + "]"
    raise TypeError(f"cannot bind a {type(value).__name__} as a ClickHouse parameter")


def _is_composite(value: Any) -> bool:
    return isinstance(value, Mapping | list | tuple)


_LEAVES = (type(None), bool, int, float, str, bytes, dt.datetime, dt.date)


def _plain(value: Any) -> Any:
    """A composite's members as clickhouse-connect formats them the way this module does (it writes a nested
    bool as ``True``, which ClickHouse cannot read as a number); a member neither can bind is a TypeError here,
    as in ``format_param``."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if not isinstance(value, _LEAVES):
        raise TypeError(f"cannot bind a {type(value).__name__} as a ClickHouse parameter")
    return value


def format_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Values for clickhouse-connect: it escapes top-level scalars (given as this module's text) and formats
    composites itself (given with their members as this module would write them). A value that cannot be bound
    fails here, the same way on both backends, before the store is asked."""
    return {k: _plain(v) if _is_composite(v) else format_param(v) for k, v in (params or {}).items()}


_TOP_ESC = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


def escape_params(params: Mapping[str, Any] | None) -> dict[str, str]:
    """Wire form of ``param_*`` values: ClickHouse reads a top-level scalar in its escaped text format, and
    an Array/Map/Tuple as its quoted literal."""
    return {
        k: format_param(v) if _is_composite(v) else format_param(v).translate(_TOP_ESC)
        for k, v in (params or {}).items()
    }
