"""Directories the tower keeps its data in: private to the user it runs as."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 (missing parents as ``mkdir -p`` makes them: the mode is this directory's),
    and take group and other access off it when it exists and this user owns it. The store holds invoices,
    customers, amounts, the audit log and token hashes, and chDB writes its parts world-readable (0644 under a
    usual umask): any local user could copy it all. The directories inside need no change once this one cannot
    be entered. OSError as mkdir raises it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
