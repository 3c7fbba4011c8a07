"""Bulk mode into the real store (chDB): determinism of the stored contents, equality with the in-memory
estate, the CLI's behaviour, and a 1M-invoice load."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.simulator import Estate, EstateConfig, FaultRates, Manifest
from connectors.simulator.bulk import bulk_load
from tests.conftest import migrated, new_database
from tests.server import TowerServer
from tests.sim_reference import pull_all
from tower_core.errors import ConfigError
from tower_core.settings import Settings
from tower_core.store import Store, open_store
from tower_core.store import simulator as sim_store

AS_OF = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
TOWER = [sys.executable, "-m", "tower_core.cli"]


def config(seed: int, invoices: int = 12_000) -> EstateConfig:
    # small chunks, so that several chunks (and the producer/consumer hand-over) are exercised
    return EstateConfig(
        seed=seed,
        customers=600,
        invoices=invoices,
        start=AS_OF - dt.timedelta(days=40),
        as_of=AS_OF,
        fault_rates=FaultRates.default(),
        chunk_invoices=5_000,
    )


@pytest.fixture
def stores(chdb_data_dir: Path) -> Iterator[list[Store]]:
    made = [open_store(Settings(data_dir=chdb_data_dir, database=new_database(), clickhouse_url=None)) for _ in "abc"]
    for st in made:
        migrated(st)
    yield made
    for st in made:
        st.command("DROP DATABASE IF EXISTS $db")


def test_same_seed_twice_gives_identical_store_contents_and_manifest(stores: list[Store], tmp_path: Path) -> None:
    a, b, c = stores
    seen: list[int] = []
    ra = bulk_load(a, config(1), manifest_path=tmp_path / "a.json", progress=lambda t, n, done: seen.append(done))
    rb = bulk_load(b, config(1), manifest_path=tmp_path / "b.json")
    rc = bulk_load(c, config(2))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert ra.rows == rb.rows and seen[-1] == 12_000 and seen == sorted(seen)
    sums_a, sums_b, sums_c = sim_store.checksums(a), sim_store.checksums(b), sim_store.checksums(c)
    assert sums_a == sums_b
    assert all(sums_a[t] != sums_c[t] for t in ("billing_invoices", "billing_payments", "erp_ledger_entries"))
    assert Manifest.from_json((tmp_path / "a.json").read_text()).to_json() == ra.manifest.to_json()
    assert ra.manifest.to_json() != rc.manifest.to_json()
    # a second load of the same seed over the first changes nothing (fresh=True empties the tables first)
    bulk_load(a, config(1))
    assert sim_store.checksums(a) == sums_a


def test_bulk_rows_are_the_in_memory_estate(stores: list[Store]) -> None:
    st = stores[0]
    cfg = config(3, invoices=3_000)
    result = bulk_load(st, cfg)
    estate = Estate.generate(cfg)
    assert result.manifest.to_json() == estate.manifest.to_json()
    final = sim_store.counts_final(st)
    assert final["billing_invoices"] == len(estate.billing.invoices) == 3_000
    assert final["billing_payments"] == len(estate.billing.payments)
    assert final["erp_ledger_entries"] == len(estate.erp.entries)
    assert final["billing_customers"] == len(estate.billing.customers)
    assert final["cdp_profiles"] == len(estate.cdp.profiles)
    # duplicate_webhook rows are stored twice and collapse under FINAL
    dups = len(estate.manifest.of("duplicate_webhook"))
    assert result.rows["billing_invoices"] == 3_000 + dups
    rows = st.query_rows(
        "SELECT InvoiceId, TotalMinor, Status, AmountPaidMinor, toUnixTimestamp64Milli(UpdatedAt) AS u "
        "FROM $db.billing_invoices FINAL ORDER BY InvoiceId"
    )
    memory = sorted(pull_all(estate.billing.pull_invoices), key=lambda i: i.invoice_id)
    memory = [i for k, i in enumerate(memory) if k == 0 or memory[k - 1].invoice_id != i.invoice_id]
    assert [(r["InvoiceId"], r["TotalMinor"], r["Status"], r["AmountPaidMinor"]) for r in rows] == [
        (i.invoice_id, i.total_minor, i.status, i.amount_paid_minor) for i in memory
    ]
    assert [r["u"] for r in rows] == [int(i.updated_at.timestamp() * 1000) for i in memory]


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    return subprocess.run(TOWER + args, cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=timeout)


def test_after_a_fresh_load_the_next_run_compares_the_new_estate_whole(stores: list[Store]) -> None:
    """A fresh load over a reconciled estate, then the default run: it was incremental, compared only the keys
    changed since, and left the replaced estate's open items open for good."""
    from reconciler.classify import Rules
    from reconciler.runner import Reconciler
    from tower_core.store import reconcile as q

    store = stores[0]
    rec = Reconciler(store, Rules.from_settings(Settings(reconcile_grace_s={"*": 7200})))

    def open_items() -> set[tuple[str, str]]:
        return {(i["class"], i["primary_key"]) for i in q.all_open_items(store)}

    first = bulk_load(store, config(1, invoices=3_000))
    assert rec.run(full=True, as_of=AS_OF, pull_sources=False).mode == "full"
    assert open_items() == first.manifest.expected()
    assert rec.run(as_of=AS_OF, pull_sources=False).mode == "incremental"  # nothing replaced since
    second = bulk_load(store, config(2, invoices=3_000))
    run = rec.run(as_of=AS_OF, pull_sources=False)
    assert run.mode == "full" and open_items() == second.manifest.expected() != first.manifest.expected()
    assert rec.run(as_of=AS_OF, pull_sources=False).mode == "incremental"


def test_bulk_cli_refuses_a_path_the_api_owns(tmp_path: Path) -> None:
    with TowerServer(tmp_path / "api") as server:
        assert server.proc is not None
        owned = str(tmp_path / "api" / "data")
        proc = run_cli(["simulate", "bulk", "--invoices", "1000"], tmp_path, TOWER_DATA_DIR=owned)
        # `tower demo --reset` on the same dirs deleted the running tower's data and buffer
        from tower_core.demo import prepare_run

        with pytest.raises(ConfigError, match="owned by PID"):
            prepare_run(Settings(data_dir=Path(owned), wal_dir=tmp_path / "api" / "wal"), reset=True)
        with pytest.raises(ConfigError, match="in use by another tower process"):
            prepare_run(Settings(data_dir=tmp_path / "free", wal_dir=tmp_path / "api" / "wal"), reset=True)
        assert (Path(owned) / "status").exists() and any((tmp_path / "api" / "wal").iterdir())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tower: error: ") and "owned by PID" in lines[0]
    bad = run_cli(["simulate", "bulk", "--invoices", "1000", "--faults", "wild"], tmp_path)
    assert bad.returncode == 2 and "tower: error: --faults" in bad.stderr


def test_simulate_manifest_is_the_manifest_bulk_writes_with_the_same_options(tmp_path: Path) -> None:
    """`manifest` used other defaults (200 customers against bulk's invoices/20) and had no window options."""
    opts = ["--invoices", "5000", "--seed", "9", "--days", "45", "--as-of", "2025-06-01"]
    written = tmp_path / "bulk.json"
    bulk = run_cli(["simulate", "bulk", *opts, "--manifest", str(written)], tmp_path)
    assert bulk.returncode == 0, bulk.stderr[-2000:]
    printed = run_cli(["simulate", "manifest", *opts], tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    doc = json.loads(printed.stdout)
    assert doc == json.loads(written.read_text()) and doc["config"]["customers"] == 250 and doc["faults"]


@pytest.mark.slow
def test_bulk_one_million_invoices_through_the_cli(tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    proc = run_cli(
        ["simulate", "bulk", "--invoices", "1000000", "--seed", "5", "--manifest", str(manifest)],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "billing_invoices: 1,0" in proc.stdout and "done in" in proc.stdout
    doc = json.loads(manifest.read_text())
    assert doc["config"]["invoices"] == 1_000_000 and len(doc["faults"]) > 30_000
    status = run_cli(["status"], tmp_path)
    assert status.returncode == 0
    counts = {}
    for line in status.stdout.splitlines():
        parts = line.replace("│", " ").split()
        if len(parts) == 2 and parts[1].replace(",", "").isdigit():
            counts[parts[0]] = int(parts[1].replace(",", ""))
    assert counts["billing_invoices"] >= 1_000_000
    assert counts["billing_payments"] > 900_000 and counts["erp_ledger_entries"] > 1_900_000


def test_simulate_run_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(["simulate", "run", "--port", str(port), "--minutes", "5"], tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"tower: error: the simulator API cannot listen on 127.0.0.1:{port}: Address already in use"]
    # an --api-url no request can go to ran for good, failing every export; a --manifest that cannot be written
    # ended the run with a traceback
    for bad, said in (
        (["--api-url", "http://ops:pw@127.0.0.1:abc"], "--api-url is not a valid URL"),
        (["--manifest", str(tmp_path)], "is a directory"),
    ):
        proc = run_cli(["simulate", "run", "--port", str(port), "--minutes", "5", *bad], tmp_path, timeout=60)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and said in lines[0] and "pw" not in lines[0], proc.stderr


def test_demo_runs_get_fresh_invoice_ranges_and_reset_starts_over(tmp_path: Path) -> None:
    from tower_core.demo import prepare_run

    s = Settings(data_dir=tmp_path / ".tower" / "data", wal_dir=tmp_path / ".tower" / "wal")
    s.data_dir.mkdir(parents=True)
    s.wal_dir.mkdir(parents=True)
    (s.data_dir / "kept").write_text("x")
    assert [prepare_run(s, reset=False) for _ in range(3)] == [0, 1, 2]
    assert (s.data_dir / "kept").exists()  # data kept between runs
    assert prepare_run(s, reset=True) == 0
    assert not s.data_dir.exists() and not s.wal_dir.exists()
