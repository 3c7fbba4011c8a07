"""The collector's write-ahead buffer: what a 200 promised lives here until it is in ClickHouse.

Appends go to the active segment and are fsync'd before the caller acknowledges; concurrent appends share one
write and one fsync (group commit: whoever finds the disk idle writes everyone's queued records). The flusher
seals the active segment and drains sealed segments to the store; a sealed segment never changes, so a flush
retried after a crash sends the same rows in the same order under the same insert_deduplication_token, and
ClickHouse drops the repeat. The total size is bounded: past ``max_bytes`` appends raise BufferFull.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tower_core.paths import private_dir

_HEADER = struct.Struct("<IIBI")  # payload length, crc32, kind, rows
_NAME = re.compile(r"^seg-([0-9a-f]{16})-(\d{12})\.wal$")
KIND_SPANS = 1
KIND_EVENTS = 2


class BufferFull(Exception):
    """The buffer holds max_bytes; callers answer 503 + Retry-After."""


class BufferWriteError(Exception):
    """The disk refused the write (e.g. ENOSPC); nothing was kept, the segment is intact."""


@dataclass(frozen=True)
class Record:
    kind: int
    rows: int
    payload: bytes


@dataclass
class _Pending:
    """One append waiting for its group commit."""

    record: bytes
    rows: int
    done: bool = False
    error: BufferWriteError | None = None


@dataclass
class Segment:
    """``epoch`` names the buffer's life (one per process start): with ``seq`` it makes the segment's id unique
    forever, so a new segment never reuses a flushed one's deduplication token."""

    epoch: str
    seq: int
    path: Path
    size: int = 0
    rows: int = 0

    @property
    def id(self) -> str:
        return f"{self.epoch}_{self.seq}"


@dataclass(frozen=True)
class Damage:
    """Bytes of a segment whose records fail their checksum, skipped by readers (the file keeps them)."""

    segment: str
    offset: int
    length: int
    torn_tail: bool  # the last record, cut short by a crash while it was written (never acknowledged)


def _valid_at(data: bytes, pos: int) -> int:
    """The end of a whole record with a good checksum at ``pos``, or 0."""
    if pos + _HEADER.size > len(data):
        return 0
    length, crc, kind, _n = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if kind not in (KIND_SPANS, KIND_EVENTS) or end > len(data) or zlib.crc32(data[pos + 8 : end]) != crc:
        return 0
    return end


def _walk(data: bytes) -> Iterator[tuple[int, int, bool | None]]:
    """(start, end, torn) of each good record (torn None) and of each damaged range between them (torn: whether
    it is an unfinished last record): after a bad record the walk resumes at the next offset where a whole record
    checks out, so one damaged record does not take the acknowledged records behind it along."""
    pos = 0
    while pos < len(data):
        end = _valid_at(data, pos)
        if end:
            yield pos, end, None
            pos = end
            continue
        nxt = next((o for o in range(pos + 1, len(data) - _HEADER.size + 1) if _valid_at(data, o)), len(data))
        torn = nxt == len(data) and (
            pos + _HEADER.size > len(data) or pos + _HEADER.size + _HEADER.unpack_from(data, pos)[0] > len(data)
        )
        yield pos, nxt, torn
        pos = nxt


def _scan(path: Path) -> tuple[int, list[Damage]]:
    """Rows of a segment's good records, and its damaged ranges."""
    data = path.read_bytes()
    rows, damage = 0, []
    for start, end, torn in _walk(data):
        if torn is None:
            rows += _HEADER.unpack_from(data, start)[3]
        else:
            damage.append(Damage(path.name, start, end - start, torn))
    return rows, damage


def write_synced(fd: int, data: bytes) -> None:
    """Write all of ``data`` and fsync; a short write (a full disk) is an OSError."""
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(28, "short write")
    os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (files created or removed) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_epoch(segments: list[Segment]) -> int:
    return max((int(s.epoch, 16) for s in segments), default=0)


OWNER_FILE = "owner.lock"


def claim(directory: Path) -> int:
    """This process's lock of a buffer dir (the caller closes the descriptor to let it go), ConfigError with one
    line while another process holds it. One process per buffer directory: a second one would take the first
    one's live segments for its own, replay them beside it (rows stored twice) and remove the file it still appends
    to (acknowledged rows lost). A POSIX record lock, which the kernel drops when the process ends, kill -9
    included; held per process, so a process may open its directory again (as tests do to act out a restart)."""
    from tower_core.errors import ConfigError

    path = directory / OWNER_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"write-ahead buffer dir {directory} is not usable: {exc.strerror or exc}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"write-ahead buffer dir {directory} is in use by another tower process ({holder}); "
            "each process needs its own TOWER_WAL_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()}".encode(), 0)
    return fd


class WriteAheadBuffer:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: list[_Pending] = []
        self._queued_bytes = 0  # queued or being written: counted against max_bytes like what is on disk
        self._io_busy = False  # a leader is writing a batch outside the lock; seal/close wait for it
        try:
            private_dir(directory)
        except OSError as exc:
            from tower_core.errors import ConfigError

            raise ConfigError(f"write-ahead buffer dir {directory} is not usable: {exc.strerror or exc}") from None
        self._owner_fd: int | None = claim(directory)  # before any segment is looked at
        self._sealed: list[Segment] = []
        self.damage: list[Damage] = []  # found at start: logged and counted by the collector
        for p in sorted(directory.iterdir()):
            m = _NAME.match(p.name)
            if m:
                rows, damage = _scan(p)
                self.damage += damage
                size = p.stat().st_size
                if size == 0:
                    p.unlink()
                    continue
                if damage and not all(d.torn_tail for d in damage):
                    self._keep_evidence(p, damage)
                self._sealed.append(Segment(m.group(1), int(m.group(2)), p, size, rows))
        self._epoch = f"{max(time.time_ns(), _last_epoch(self._sealed) + 1):016x}"
        self._active = self._open_segment(1)

    def _keep_evidence(self, path: Path, damage: list[Damage]) -> None:
        """A copy of a damaged segment under ``corrupt/``: the segment itself is removed once its good records
        are flushed, and the damaged bytes may be an operator's to inspect (or to recover by hand)."""
        target = self.dir / "corrupt" / path.name
        if target.exists():
            return
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
        fsync_dir(target.parent)

    def _segment(self, seq: int) -> Segment:
        return Segment(self._epoch, seq, self.dir / f"seg-{self._epoch}-{seq:012d}.wal")

    def _open_segment(self, seq: int) -> Segment:
        segment = self._segment(seq)
        self._fd: int | None = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fsync_dir()
        return segment

    def _fsync_dir(self) -> None:
        fsync_dir(self.dir)

    @property
    def epoch(self) -> str:
        """This buffer's life: a segment of another epoch was written by an earlier process (a replay)."""
        return self._epoch

    @property
    def pending_bytes(self) -> int:
        return self._active.size + sum(s.size for s in self._sealed)

    @property
    def pending_rows(self) -> int:
        return self._active.rows + sum(s.rows for s in self._sealed)

    @property
    def active_rows(self) -> int:
        return self._active.rows

    def append(self, kind: int, rows: int, payload: bytes) -> None:
        """Durably append one record (write + fsync) or raise; never leaves a partial record behind."""
        body = struct.pack("<BI", kind, rows) + payload
        record = struct.pack("<II", len(payload), zlib.crc32(body)) + body
        with self._cond:
            if self.pending_bytes + self._queued_bytes + len(record) > self.max_bytes:
                raise BufferFull(f"write-ahead buffer holds {self.pending_bytes} of {self.max_bytes} bytes")
            mine = _Pending(record, rows)
            self._queue.append(mine)
            self._queued_bytes += len(record)
            while not mine.done:
                if self._io_busy:
                    self._cond.wait()
                else:
                    self._lead()
        if mine.error is not None:
            raise mine.error

    def _lead(self) -> None:
        """Write and fsync every queued record at once; called and returns with the lock held. Only the I/O
        runs outside the lock, while ``_io_busy`` keeps seal, close and other leaders off the segment."""
        batch, self._queue = self._queue, []
        size = sum(len(p.record) for p in batch)
        error: BufferWriteError | None = None
        try:
            if self._fd is None:
                self._active = self._open_segment(self._active.seq)
            self._io_busy = True
            self._lock.release()
            try:
                write_synced(self._fd, b"".join(p.record for p in batch))  # type: ignore[arg-type]
            finally:
                self._lock.acquire()
                self._io_busy = False
        except Exception as exc:  # every writer of the batch gets the error; none may wait forever
            self._drop_partial_record()
            error = BufferWriteError(f"cannot write the buffer: {getattr(exc, 'strerror', None) or exc}")
        self._queued_bytes -= size
        if error is None:
            self._active.size += size
            self._active.rows += sum(p.rows for p in batch)
        for p in batch:
            p.done, p.error = True, error
        self._cond.notify_all()

    def _drop_partial_record(self) -> None:
        """After a failed write: cut the segment back to its last good record, or, if even that fails,
        retire the segment (readers and recovery only trust its known good size) and start a new one."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._active.size)
            return
        except OSError:
            pass
        try:
            os.close(self._fd)  # type: ignore[arg-type]
        except OSError:
            pass
        if self._active.size:
            self._sealed.append(self._active)
        else:
            self._active.path.unlink(missing_ok=True)
        self._fd = None  # the next append opens a fresh segment (and fails cleanly while the disk is full)
        self._active = self._segment(self._active.seq + 1)

    def seal(self) -> None:
        """Close the active segment (if it holds anything) for flushing and start a new one."""
        with self._cond:
            self._cond.wait_for(lambda: not self._io_busy)
            if self._active.size == 0:
                return
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None  # closed: never written again, whatever happens next
            self._sealed.append(self._active)
            self._active = self._segment(self._active.seq + 1)
            try:
                self._active = self._open_segment(self._active.seq)
            except OSError:
                pass  # the next append opens it, or fails with the reason (no descriptor, disk full)

    def sealed(self) -> list[Segment]:
        with self._lock:
            return list(self._sealed)

    @staticmethod
    def read(segment: Segment) -> Iterator[Record]:
        """The segment's good records in order (damaged ranges are skipped, see _walk)."""
        with open(segment.path, "rb") as f:
            data = f.read(segment.size)
        for start, end, torn in _walk(data):
            if torn is None:
                _length, _crc, kind, rows = _HEADER.unpack_from(data, start)
                yield Record(kind, rows, data[start + _HEADER.size : end])

    def remove(self, segment: Segment) -> None:
        """Forget a segment once its rows are in the store."""
        with self._lock:
            self._sealed = [s for s in self._sealed if s.id != segment.id]
            segment.path.unlink(missing_ok=True)
            self._fsync_dir()

    def close(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._io_busy)
            if self._fd is not None:
                os.close(self._fd)
            if self._owner_fd is not None:
                os.close(self._owner_fd)  # releases the directory
                self._owner_fd = None
            if self._active.size == 0:
                self._active.path.unlink(missing_ok=True)
