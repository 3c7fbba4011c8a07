"""Versioned schema migrations: numbered ``migrations/NNNN_name.sql`` files, applied once each, in order.

Statements use ``IF NOT EXISTS`` so a migration interrupted half-way can simply run again; the
``schema_migrations`` table records what was applied (dedup: replace on Version) and its checksum. A migration
is never edited once released (tests/test_migration_checksums.py holds them to their recorded checksums): a
database that applied another text of one is refused with a line saying so, where it crashed on whatever the
edit had added (a table its version never created).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

from tower_core.errors import ConfigError
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
    return set(applied_checksums(store))


def applied_checksums(store: Store) -> dict[int, str]:
    """Version -> the checksum of the text it was applied from (the latest record of it)."""
    store.command(MIGRATIONS_TABLE_DDL)
    rows = store.query_rows(
        "SELECT Version AS v, argMax(Checksum, AppliedAt) AS c FROM $db.schema_migrations GROUP BY Version"
    )
    return {int(r["v"]): str(r["c"]) for r in rows}


def edited_after_applying(applied: dict[int, str], migrations: list[Migration]) -> list[Migration]:
    """The migrations this database applied from another text than this release's."""
    return [m for m in migrations if m.version in applied and applied[m.version] != m.checksum]


def schema_version(store: Store) -> int:
    versions = applied_versions(store)
    return max(versions) if versions else 0


def migrate(store: Store) -> list[Migration]:
    """Apply pending migrations; return those applied (empty when up to date). ConfigError when the database
    applied another text of a migration than this release holds, or migrations newer than it holds."""
    done = applied_checksums(store)
    migrations = available()
    newest = max((m.version for m in migrations), default=0)
    if done and max(done) > newest:  # a rollback: this code reads columns and tables its schema no longer has
        ahead = sorted(v for v in done if v > newest)
        raise ConfigError(
            f"this database is at schema version {max(done)} (migrations {', '.join(f'{v:04d}' for v in ahead)} "
            f"applied by a newer release); this release knows up to {newest:04d}: run that release or a newer one"
        )
    edited = edited_after_applying(done, migrations)
    if edited:
        names = ", ".join(f"{m.version:04d}_{m.name} (applied {done[m.version]}, now {m.checksum})" for m in edited)
        raise ConfigError(
            f"this database applied migration {names} from another text than this release holds: it was made by a "
            "development build, and its schema cannot be upgraded in place; start from a new data dir or database"
        )
    applied = []
    for mig in migrations:
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
