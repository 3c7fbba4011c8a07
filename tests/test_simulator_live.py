"""Demo pace against a real ``tower serve``: the estate process (``tower simulate run``) exports real OTLP and
CloudEvents; the collector must hold spans of all three systems and give complete CDP -> billing -> ERP
timelines for invoices whose trace context was lost at the billing -> ERP hop. Then ``tower demo`` itself:
it starts everything, prints the URLs, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from connectors.simulator.client import SimBillingClient
from tests.conftest import free_port
from tests.server import TowerServer
from tests.sim_reference import pull_all

TOWER = [sys.executable, "-m", "tower_core.cli"]
RUN_S = 90  # the estate plays at most this long; at 300 invoices/min enough flows complete in ~30 s


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOWER_", "OTEL_"))}
    env.update(extra)
    return env


@pytest.mark.slow
def test_demo_pace_estate_correlates_across_broken_trace_context(tmp_path: Path) -> None:
    with TowerServer(tmp_path / "tower") as server:
        port = free_port()
        estate = subprocess.Popen(
            [*TOWER, "simulate", "run", "--api-url", server.url, "--port", str(port), "--rate", "300",
             "--minutes", "10", "--customers", "60", "--context-loss", "0.5", "--seed", "11"],
            env=clean_env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                assert estate.poll() is None, estate.stdout.read() if estate.stdout else ""
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the estate did not start"
                time.sleep(0.2)
            # until ten fault-free completed flows lost their context and one kept it (a fixed 45 s before)
            deadline = time.monotonic() + RUN_S
            while True:
                flows = httpx.get(f"http://127.0.0.1:{port}/flows", timeout=10).json()
                done = [f for f in flows if f["done"] and f["fault"] is None]
                if sum(f["context_lost"] for f in done) >= 10 and any(not f["context_lost"] for f in done):
                    break
                assert time.monotonic() < deadline, f"{len(done)} fault-free flows done after {RUN_S} s"
                time.sleep(1)
            # the tower's reconciler would pull these through the HTTP connector; so can we
            pulled = pull_all(SimBillingClient(f"http://127.0.0.1:{port}").pull_invoices)
            assert {i.invoice_id for i in pulled} >= {f["invoice_id"] for f in flows}
        finally:
            estate.send_signal(signal.SIGINT)
            out, _ = estate.communicate(timeout=30)
        assert estate.returncode == 0, out
        assert "injected faults" in out
        time.sleep(1.5)  # the collector flushes every 0.2 s; the estate flushed its last batches at exit
        broken = [f for f in flows if f["done"] and f["context_lost"] and f["fault"] is None]
        assert len(broken) >= 10, f"only {len(broken)} completed flows with lost context"
        checked = 0
        services: set[str] = set()
        for flow in broken[:6]:
            r = httpx.get(
                f"{server.url}/api/transactions",
                headers=server.auth,
                params={"invoice_id": flow["invoice_id"]},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["systems_seen"] == ["billing", "cdp", "erp"] and doc["missing_systems"] == []
            steps = {s["step"]: s for s in doc["steps"]}
            assert {"cdp_to_billing", "invoice_to_ledger"} <= set(steps), steps
            assert all(s["complete"] and not s["missing_systems"] for s in steps.values()), steps
            # the ERP posting really is in another trace than the billing invoice: joined by the invoice key
            billing = {s["trace_id"] for s in doc["spans"] if s["name"] == "invoice.finalize"}
            erp = {s["trace_id"] for s in doc["spans"] if s["name"] == "erp.invoice.post"}
            assert billing and erp and not billing & erp
            services |= {s["service"] for s in doc["spans"]}
            # the business events (CloudEvents) of both sides are in the transaction too
            assert {"billing", "erp"} <= {e["system"] for e in doc["events"]}, doc["events"]
            checked += 1
        assert checked == 6
        assert services == {"sim-cdp", "sim-billing", "sim-erp"}
        # a flow that kept its context is one trace from billing to ERP
        kept = next(f for f in flows if f["done"] and not f["context_lost"] and f["fault"] is None)
        doc = httpx.get(
            f"{server.url}/api/transactions", headers=server.auth, params={"invoice_id": kept["invoice_id"]}
        ).json()
        billing = {s["trace_id"] for s in doc["spans"] if s["name"] == "invoice.finalize"}
        erp = {s["trace_id"] for s in doc["spans"] if s["name"] == "erp.invoice.post"}
        assert billing == erp


def children_of(pid: int) -> set[int]:
    """Every live process whose session or parent chain leads to ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        nxt = {p for p, pp in parents.items() if pp in frontier} - found
        found |= nxt
        frontier = nxt
    return found


@pytest.mark.slow
def test_tower_demo_starts_everything_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    api, dash, sim = free_port(), free_port(), free_port()
    env = clean_env(
        TOWER_PORT=str(api),
        TOWER_API_URL=f"http://127.0.0.1:{api}",
        TOWER_DASHBOARD_PORT=str(dash),
        TOWER_SIMULATOR_PORT=str(sim),
        TOWER_RECONCILE_INTERVAL_S="0",
        TOWER_ADMIN_TOKEN="demo-test-admin",
    )
    auth = {"Authorization": "Bearer demo-test-admin"}

    def start(sigint_ignored: bool = False) -> tuple[subprocess.Popen, str, set[int]]:
        # a script's background job starts with SIGINT ignored (POSIX shells do that); Ctrl-C must still work
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        proc = subprocess.Popen(
            [*TOWER, "demo"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=ignore,
        )
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(lines)
        assert f"API:       http://127.0.0.1:{api}" in text, text[-3000:]
        assert f"Dashboard: http://127.0.0.1:{dash}" in text and f"Estate:    http://127.0.0.1:{sim}" in text
        kids = children_of(proc.pid)
        assert len(kids) >= 3
        return proc, text, kids

    proc, text, kids = start()
    try:
        assert httpx.get(f"http://127.0.0.1:{api}/readyz", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{sim}/healthz", timeout=5).json()["ok"]
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{dash}/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the dashboard did not answer"
            time.sleep(0.5)
        deadline = time.monotonic() + 60  # the estate's first invoices reach the store
        while True:
            got = httpx.get(
                f"http://127.0.0.1:{api}/api/transactions", params={"invoice_id": "in_0000000001"}, headers=auth
            )
            if got.status_code == 200:
                break
            assert got.status_code == 404 and time.monotonic() < deadline, got.text
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    assert proc.returncode == 0
    time.sleep(0.5)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()], "orphaned processes"
    # data kept: the second run starts a fresh invoice range on the same store, and the first run's data is there
    proc, text, kids = start(sigint_ignored=True)
    try:
        assert "run 1" in text
        old = httpx.get(
            f"http://127.0.0.1:{api}/api/transactions", params={"invoice_id": "in_0000000001"}, headers=auth, timeout=20
        )
        assert old.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    assert proc.returncode == 0
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]
