"""Released migrations are never edited: a database that applied one keeps its text's checksum, and a later
edit reached it as a crash on whatever the edit added (a reviewer's database of the first session failed every
start on a table 0004 gained afterwards). Schema changes go into a new migration."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from tower_core.errors import ConfigError
from tower_core.store import Store, migrate
from tower_core.store.migrate import available

ROOT = Path(__file__).resolve().parent.parent

# version -> the checksum of its released text (Migration.checksum). A new migration adds its line here.
RELEASED = {
    1: "004072e77f5890c8",  # base
    2: "f15a4115ee2193df",  # api_tokens
    3: "696b3afd9d653fec",  # simulator
    4: "37ff0781ea4a2485",  # reconcile
    5: "9429f04275cdae0f",  # sla
    8: "2b252411457475ef",  # span_key_links_mv
    9: "43494dc5e7c1121e",  # key_links_mv_lean
    10: "7e80dcc78d1efed1",  # reconcile_row_hashes
    11: "13d8fce053bd103e",  # reconcile_ledger_rows
    12: "254609eef40a54c2",  # span_attributes_lz4
    13: "9ce261fd2f626ce5",  # party_in_match_sig
    14: "f3fc22016c179afa",  # statement_erp_cells
    15: "48312723681f9e79",  # step_activity
    16: "0f387aa5286a4295",  # source_skips
    17: "d3a7fa96915333e8",  # billing_customers_pii
    18: "661462ba43f9454c",  # key_values_as_read
    19: "1216e9b1c7946829",  # payment_signatures
    20: "b059b669d4a799de",  # notification_receivers_hashed
    21: "81819fa86b41039c",  # event_key_refs
    22: "79455591ceb2913f",  # run_owner
    23: "b77e9de6df06c61d",  # step_activity_of_every_event_key
    24: "7b262d3944ff3369",  # customer_sync_by_cdp_user
    25: "8da7dfb2daa106ca",  # statement_dropped
    26: "7bcb4be8cceee661",  # fsync_acknowledged_writes
    27: "3436b2388bcd8b49",  # run_rules
}


def test_released_migrations_keep_their_text() -> None:
    found = {m.version: m.checksum for m in available()}
    edited = {v: c for v, c in found.items() if v in RELEASED and RELEASED[v] != c}
    assert not edited, f"released migrations edited: {sorted(edited)}; put the change in a new migration"
    assert set(found) == set(RELEASED), "record each new migration's checksum in RELEASED (and never edit one)"


def test_a_database_that_applied_another_text_is_refused_with_one_line(embedded_store: Store) -> None:
    migrate(embedded_store)
    assert migrate(embedded_store) == []  # the same texts: nothing to do, nothing refused
    embedded_store.command(
        "INSERT INTO $db.schema_migrations VALUES (4, 'reconcile', 'a1b2c3d4e5f60718', {t:DateTime64(3)})",
        {"t": dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)},
    )
    with pytest.raises(ConfigError, match=r"migration 0004_reconcile \(applied a1b2c3d4e5f60718, now 37ff"):
        migrate(embedded_store)


def _migrated_then_recorded(tmp_path: Path, version: int, name: str, checksum: str) -> dict[str, str]:
    """A data dir migrated by this release, then given a record of ``version`` as another text or release left it
    (in a process of its own: chDB opens one data dir per process). Returns the environment naming it."""
    env = {"TOWER_DATA_DIR": str(tmp_path / "d"), "PATH": "/usr/bin:/bin"}
    script = (
        "import datetime as dt\n"
        "from tower_core.settings import Settings\n"
        "from tower_core.store import open_store, migrate\n"
        f"s = open_store(Settings(data_dir={str(tmp_path / 'd')!r}))\n"
        "migrate(s)\n"
        f"s.command(\"INSERT INTO $db.schema_migrations VALUES ({version}, '{name}', '{checksum}', "
        '{t:DateTime64(3)})",'
        " {'t': dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)})\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=120)
    return env


def test_tower_migrate_on_such_a_database_says_so_in_one_line(tmp_path: Path) -> None:
    env = _migrated_then_recorded(tmp_path, 19, "payment_signatures", "f00d")
    proc = subprocess.run(
        [sys.executable, "-m", "tower_core.cli", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "0019_payment_signatures" in lines[0] and "new data dir" in lines[0]


def test_a_database_a_newer_release_migrated_is_refused_with_one_line(tmp_path: Path) -> None:
    """An older release started on a database a newer one had migrated said nothing: it served, its runs failed on
    columns the newer schema had dropped, and its incremental runs rewrote items under its own rules."""
    newest = max(m.version for m in available())
    env = _migrated_then_recorded(tmp_path, newest + 1, "from_the_future", "beef")
    for command in (["migrate"], ["serve"]):
        proc = subprocess.run(
            [sys.executable, "-m", "tower_core.cli", *command],
            cwd=ROOT,
            env={**env, "TOWER_PORT": "0"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("tower: error:")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert f"schema version {newest + 1}" in lines[0] and f"knows up to {newest:04d}" in lines[0], lines[0]
