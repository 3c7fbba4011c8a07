"""Child processes the CLI starts (the demo's API, estate and dashboard; `tower dashboard`'s Streamlit)."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from typing import Any


def die_with_parent() -> None:
    """Child setup (Linux): SIGTERM when the parent dies, even by SIGKILL, so nothing is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_forwarding_sigterm(args: list[str], **popen: Any) -> int:
    """Run a child to its end, passing SIGTERM on: `docker stop` (SIGTERM to a container's PID 1, which has no
    default action for it) and a service manager's stop reach it, and it is not left running after its parent."""
    proc = subprocess.Popen(args, preexec_fn=die_with_parent, **popen)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the terminal's Ctrl-C reached the child too: wait for it to stop
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
