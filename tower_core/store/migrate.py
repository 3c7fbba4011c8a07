"""Versioned schema migrations: numbered ``migrations/NNNN_name.sql`` files, applied once each, in order.

Statements use ``IF NOT EXISTS`` so a migration interrupted half-way can simply run again; the
``schema_migrations`` table records what was applied (dedup: replace on Version).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

from tower_core.store.base import Store

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

MIGRATIONS_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS $db.schema_migrations
(
    Version UInt32,
    Name String,
    Checksum String,
    AppliedAt DateTime64(3)
)
ENGINE = ReplacingMergeTree(AppliedAt)
ORDER BY Version
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        """Split on ``;`` at line ends; comments are dropped."""
        body = "\n".join(ln for ln in self.sql.splitlines() if not ln.lstrip().startswith("--"))
        return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def available() -> list[Migration]:
    files = resources.files("tower_core.store").joinpath("migrations")
    found = []
    for f in files.iterdir():
        m = _NAME.match(f.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), f.read_text()))
    return sorted(found, key=lambda m: m.version)


def applied_versions(store: Store) -> set[int]:
    store.command(MIGRATIONS_TABLE_DDL)
    rows = store.query_rows("SELECT DISTINCT Version FROM $db.schema_migrations")
    return {int(r["Version"]) for r in rows}


def schema_version(store: Store) -> int:
    versions = applied_versions(store)
    return max(versions) if versions else 0


def migrate(store: Store) -> list[Migration]:
    """Apply pending migrations; return those applied (empty when up to date)."""
    done = applied_versions(store)
    applied = []
    for mig in available():
        if mig.version in done:
            continue
        for stmt in mig.statements():
            store.command(stmt)
        store.command(
            "INSERT INTO $db.schema_migrations VALUES ({v:UInt32}, {n:String}, {c:String}, {t:DateTime64(3)})",
            {"v": mig.version, "n": mig.name, "c": mig.checksum, "t": datetime.now(UTC)},
        )
        applied.append(mig)
    return applied
