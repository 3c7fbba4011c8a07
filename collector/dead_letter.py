"""Records the store refuses for good: found by writing a refused chunk record by record, kept on disk.

An acknowledged record that the store can never take (protobuf that Python parsed but ClickHouse's reader
rejects, a value outside a column's range, a conversion bug) would otherwise be retried forever: the flusher
drains oldest first, so everything behind it would wait and ingest would answer 503 once the buffer is full.
Such a record is moved to ``<wal dir>/dead-letter/`` (its payload and a JSON line saying why), counted and
logged, and the drain goes on. Nothing acknowledged is dropped: an operator can inspect it and send it again.

A record is blamed only when the evidence points at it: it fails alone while other records of the same chunk
are written, or it fails with an error about its data. When every record fails with anything else, the store is
the likely cause and the chunk is retried as a whole.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collector.wal import KIND_EVENTS, KIND_SPANS, Record, fsync_dir, write_synced
from tower_core.errors import StoreError
from tower_core.paths import private_dir

# ClickHouse error codes about the data being inserted (parse, type, range), not about the server's state
DATA_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        33,  # CANNOT_READ_ALL_DATA
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        444,  # protobuf messages corrupted or not matching the schema
    }
)
# ClickHouse error codes that describe the server's state (busy, restarting, out of disk), not the data
STORE_SIDE_CODES = frozenset(
    {
        159,  # TIMEOUT_EXCEEDED
        164,  # READONLY
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        236,  # ABORTED
        242,  # TABLE_IS_READ_ONLY
        243,  # NOT_ENOUGH_SPACE
        252,  # TOO_MANY_PARTS
        319,  # UNKNOWN_STATUS_OF_INSERT
        394,  # QUERY_WAS_CANCELLED
        999,  # KEEPER_EXCEPTION
    }
)
_CODE = re.compile(r"\bCode: (\d+)\b")
# per kind of record: its name, and its payload file's suffix and media type (what the API serves it as)
KIND_NAMES = {KIND_SPANS: "spans", KIND_EVENTS: "events"}
_FILES = {KIND_SPANS: ("otlp.pb", "application/x-protobuf"), KIND_EVENTS: ("events.json", "application/json")}


def data_error(exc: BaseException) -> bool:
    """Does this failure say the record itself is bad? Any error raised before the store (decoding, converting)
    does; a store error does when its ClickHouse code is about the data."""
    if not isinstance(exc, StoreError):
        return True
    m = _CODE.search(str(exc))
    return m is not None and int(m.group(1)) in DATA_ERROR_CODES


def store_side(exc: BaseException) -> bool:
    """Does this failure say the store is busy or unreachable (retry later), whatever the record?"""
    if not isinstance(exc, StoreError) or data_error(exc):
        return False
    m = _CODE.search(str(exc))
    return m is None or int(m.group(1)) in STORE_SIDE_CODES


def blame(outcomes: Sequence[BaseException | None]) -> list[int] | None:
    """Given each record's outcome written alone (None = written), the records to set aside, or None when the
    failures point at the store rather than at records (retry the chunk)."""
    failed = [i for i, o in enumerate(outcomes) if o is not None]
    if any(store_side(outcomes[i]) for i in failed):  # type: ignore[arg-type]
        return None  # busy or unreachable for some: no record is to blame yet
    if len(failed) < len(outcomes):
        return failed  # the store took others of the same chunk: what it refused, it refuses for the data
    if all(data_error(o) for o in outcomes if o is not None):
        return failed
    return None


class DeadLetterBox:
    """``<dir>/<name>.{otlp.pb|events.json}`` with ``<name>.error.json`` beside it, both fsync'd before the
    buffer forgets the segment. Writing the same name again (a replay after a crash) overwrites it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def put(self, name: str, record: Record, error: BaseException) -> Path:
        private_dir(self.dir)
        payload = self.dir / f"{name}.{_FILES[record.kind][0]}"
        why = {
            "record": payload.name,
            "kind": KIND_NAMES[record.kind],
            "rows": record.rows,
            "error": f"{type(error).__name__}: {error}"[:2000],
            "set_aside_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_durably(payload, record.payload)
        _write_durably(self.dir / f"{name}.error.json", json.dumps(why).encode() + b"\n")
        fsync_dir(self.dir)
        return payload

    def names(self) -> list[str]:
        return sorted(p.name.removesuffix(".error.json") for p in self.dir.glob("*.error.json"))

    def entries(self) -> list[dict[str, Any]]:
        """What each set-aside record is and why, oldest first (names start with the segment's epoch and
        sequence). A reason file that cannot be read is listed with its name and the read error."""
        return [self._why(name) for name in self.names()]

    def _why(self, name: str) -> dict[str, Any]:
        try:
            why = json.loads((self.dir / f"{name}.error.json").read_bytes())
            if not isinstance(why, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            why = {"error": f"unreadable reason file: {exc}"}
        return {"name": name, **why}

    def get(self, name: str) -> tuple[dict[str, Any], Record] | None:
        """One set-aside record (its reason and the payload as buffered), or None when the box has no such
        name. Names are matched against the box's own listing, so a path never leaves the box."""
        if name not in self.names():
            return None
        why = self._why(name)
        for kind, (suffix, _) in _FILES.items():
            path = self.dir / f"{name}.{suffix}"
            if path.exists():
                rows = why.get("rows")
                return why, Record(kind, rows if isinstance(rows, int) and rows > 0 else 1, path.read_bytes())
        return None

    def remove(self, name: str) -> None:
        """Forget one record (after it went back into the buffer): payload first, then its reason."""
        for suffix in (*(f[0] for f in _FILES.values()), "error.json"):
            (self.dir / f"{name}.{suffix}").unlink(missing_ok=True)
        fsync_dir(self.dir)


def payload_file(record: Record, name: str) -> tuple[str, str]:
    """The file name and media type a record is served as."""
    suffix, media = _FILES[record.kind]
    return f"{name}.{suffix}", media


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_synced(fd, data)
    finally:
        os.close(fd)
