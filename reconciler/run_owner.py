"""Which process a reconciliation run belongs to: a starting process closes as interrupted only the runs of a
process that is gone. The decision is pure; reading /proc is the only IO, at the edge."""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable

# A run of a process on another host cannot be checked from here: it is taken for abandoned only this late
# (a full run of 10M invoices takes under a minute).
OTHER_HOST_STALE_AFTER = dt.timedelta(hours=6)


def start_ticks(pid: int) -> str:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22): a pid reused by another
    process has another; empty when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else ""


def this_process() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}/{pid}/{start_ticks(pid)}"


def abandoned(
    owner: str,
    age: dt.timedelta,
    host: str,
    ticks_of: Callable[[int], str] = start_ticks,
) -> bool:
    """Is a run recorded as running by ``owner`` left over from a process that stopped? A run of this host is
    when its process is gone (or its pid now names another process); one of another host only past
    OTHER_HOST_STALE_AFTER; one without an owner (written before migration 0022) always, as before."""
    parts = owner.rsplit("/", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    owner_host, pid, ticks = parts
    if owner_host != host:
        return age > OTHER_HOST_STALE_AFTER
    return not ticks or ticks_of(int(pid)) != ticks
