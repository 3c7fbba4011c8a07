"""The reconciler's API over the real app and chDB (TestClient), and ``tower reconcile`` as a user runs it:
a real ``tower serve`` subprocess pulling from the simulated estate's HTTP API on loopback."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from collector.app import create_app
from collector.auth import create_token
from connectors.simulator import Estate, EstateConfig, FaultRates
from connectors.simulator.server import create_sim_app
from reconciler.connectors import Connectors
from tests.conftest import free_port, migrated, wait_for_port
from tests.server import TowerServer
from tests.test_reconcile_simulator import paying
from tower_core.models import Invoice
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store import reconcile as q

ADMIN = "reconcile-api-admin"
RATES = FaultRates.only(
    erp_posting_missing=0.02,
    amount_mismatch=0.01,
    orphan_payment=0.01,
    payment_not_applied=0.01,
    erp_business_rejection=0.01,
)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_settings(store: Store, tmp_path: Path, **over: Any) -> Settings:
    """An in-process API on ``store`` with no scheduled jobs (runs start through the API)."""
    migrated(store)
    return Settings(  # type: ignore[call-arg]
        database=store.database,
        wal_dir=tmp_path / "wal",
        admin_token=ADMIN,
        sla_eval_interval_s=0,
        reconcile_scheduler=False,
        **over,
    )


@pytest.fixture
def api(embedded_store: Store, tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = api_settings(embedded_store, tmp_path, reconcile_grace_s={"*": 7200}, reconcile_action_backoff_s=0.01)
    estate = Estate.generate(EstateConfig(seed=21, customers=60, invoices=600, fault_rates=RATES))
    with TestClient(create_app(settings, embedded_store)) as client:
        client.app.state.reconciler.set_connectors(Connectors(estate.billing, estate.erp, estate.cdp))  # type: ignore[attr-defined]
        _, viewer = create_token(embedded_store, "vera", "viewer")
        _, operator = create_token(embedded_store, "otto", "operator")
        yield {"c": client, "store": embedded_store, "estate": estate, "viewer": viewer, "operator": operator}


def test_a_region_run_without_connectors_is_refused_for_a_region_no_data_names(
    embedded_store: Store, tmp_path: Path
) -> None:
    """Without a connector to pull from, the stored data is all a run compares: 'eu' for 'EU' compared nothing and
    reported a clean reconciliation."""
    t0 = dt.datetime(2026, 1, 10, tzinfo=dt.UTC)
    with TestClient(create_app(api_settings(embedded_store, tmp_path), embedded_store)) as client:
        q.write_invoices(embedded_store, [Invoice("in_1", "cus_1", "EU", "USD", 1_000, 0, 1_000, "open", t0, t0)])
        _, operator = create_token(embedded_store, "otto", "operator")
        refused = client.post("/api/runs", json={"full": True, "region": "eu"}, headers=auth(operator))
        assert refused.status_code == 422 and refused.json()["detail"].endswith("case-sensitive): EU"), refused.text
        assert run_and_wait(client, operator, {"full": True, "region": "EU"})["state"] == "succeeded"


def run_and_wait(c: TestClient, token: str, body: dict[str, Any]) -> dict[str, Any]:
    started = c.post("/api/runs", json=body, headers=auth(token))
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        doc = c.get(f"/api/runs/{run_id}", headers=auth(token)).json()
        if doc.get("state") in ("succeeded", "failed"):
            return doc
        time.sleep(0.05)
    raise AssertionError("run did not finish")


def as_of(api: dict[str, Any]) -> str:
    return api["estate"].config.as_of.isoformat()


def test_reads_need_a_viewer_and_mutations_an_operator(api: dict[str, Any]) -> None:
    c, viewer = api["c"], api["viewer"]
    for path in ("/api/drift", "/api/drift/summary", "/api/actions", "/api/runs", "/api/actions/dead-letters"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers=auth(viewer)).status_code == 200, path
    assert c.get("/api/statements", headers=auth(viewer)).status_code == 404  # no run yet
    assert c.post("/api/runs", json={}, headers=auth(viewer)).status_code == 403
    for verb in ("acknowledge", "ignore", "sync"):
        r = c.post(f"/api/drift/x/{verb}", json={"note": "n"}, headers=auth(viewer))
        assert r.status_code == 403 and "operator" in r.json()["detail"]
    assert c.post("/api/actions/x/replay", headers=auth(viewer)).status_code == 403


def test_run_then_list_filter_sort_paginate_and_statement(api: dict[str, Any]) -> None:
    c, op, estate = api["c"], api["operator"], api["estate"]
    run = run_and_wait(c, op, {"full": True, "as_of": as_of(api)})
    assert run["state"] == "succeeded" and run["mode"] == "full" and run["requested_by"] == "otto"
    assert run["progress"]["done"] == run["progress"]["total"] and run["residual_minor"] == 0
    expected = estate.manifest.expected()
    listed = c.get("/api/drift", params={"limit": 1000}, headers=auth(op)).json()
    assert {(i["class"], i["primary_key"]) for i in listed["items"]} == expected
    assert listed["total"] == len(expected)
    one_class = c.get("/api/drift", params={"class": "missing_in_erp"}, headers=auth(op)).json()
    assert one_class["total"] == sum(1 for cls, _ in expected if cls == "missing_in_erp")
    assert {i["class"] for i in one_class["items"]} == {"missing_in_erp"}
    page = c.get("/api/drift", params={"limit": 3, "offset": 2, "sort": "amount", "order": "asc"}, headers=auth(op))
    items = page.json()["items"]
    assert len(items) == 3 and page.json()["total"] == len(expected)
    amounts = [abs(i["amount_minor"]) for i in items]
    assert amounts == sorted(amounts)
    # estate faults are >= 3 days old at as_of, but aging counts from first seen (= the run's as_of)
    aged = c.get("/api/drift", params={"age": ">30d"}, headers=auth(op)).json()
    assert aged["total"] == len(expected) and aged["items"][0]["age_bucket"] == ">30d"
    assert c.get("/api/drift", params={"age": "0-1d"}, headers=auth(op)).json()["total"] == 0
    assert c.get("/api/drift", params={"system": "billing"}, headers=auth(op)).json()["items"][0]["class"] == (
        "orphan_payment"
    )
    for bad in ({"class": "nope"}, {"sort": "evil;DROP"}, {"region": "E U"}, {"age": "9d"}, {"limit": 0}):
        r = c.get("/api/drift", params=bad, headers=auth(op))
        assert r.status_code == 422, bad
    statement = c.get("/api/statements", headers=auth(op)).json()
    assert statement["run_id"] == run["run_id"] and statement["residual_minor"] == 0
    assert statement["items"] and all(row["residual_minor"] == 0 for row in statement["items"])
    explained = {k for t in statement["totals"] for k in t["explained"]}
    assert {"missing_in_erp", "amount_mismatch"} <= explained
    by_id = c.get("/api/statements", params={"run_id": run["run_id"]}, headers=auth(op)).json()
    assert by_id["totals"] == statement["totals"]
    # no such run: a 404, not an empty statement with a zero residual that reads as a clean reconciliation
    unknown = c.get("/api/statements", params={"run_id": "nope"}, headers=auth(op))
    assert unknown.status_code == 404 and "no reconciliation run nope" in unknown.json()["detail"]
    summary = c.get("/api/drift/summary", headers=auth(op)).json()
    assert summary["open"] == len(expected)
    runs = c.get("/api/runs", headers=auth(op)).json()
    assert runs["items"][0]["run_id"] == run["run_id"]
    # items first seen in the future would hide from the queue: refused; so is an offset past any page
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    r = c.post("/api/runs", json={"as_of": future}, headers=auth(op))
    assert r.status_code == 422 and "future" in r.text
    assert c.get("/api/runs", params={"offset": 2**64}, headers=auth(op)).status_code == 422
    # a run back in time would resolve what is still wrong and re-age the queue; a time without a zone is refused
    # like every other time the API takes
    earlier = (estate.config.as_of - dt.timedelta(days=1)).isoformat()
    back = c.post("/api/runs", json={"full": True, "as_of": earlier}, headers=auth(op))
    assert back.status_code == 422 and "runs go forward in time" in back.text
    naive = c.post("/api/runs", json={"as_of": "2026-01-01T00:00:00"}, headers=auth(op))
    assert naive.status_code == 422 and "timezone" in naive.text
    assert c.get("/api/runs", headers=auth(op)).json()["total"] == 1
    assert c.get("/api/drift/summary", headers=auth(op)).json()["open"] == len(expected)


def test_an_item_the_tower_does_not_correct_says_so_in_its_policy(api: dict[str, Any]) -> None:
    """A payment billing allocated nowhere that matches an open invoice by amount: the tower answers a sync with
    422 (allocate it in billing); the item's policy said "operator", and the dashboard offered the sync."""
    cl, op, estate = api["c"], api["operator"], api["estate"]
    inv = next(
        i
        for i in sorted(estate.billing.invoices.values(), key=lambda i: i.invoice_id)
        if i.status == "open" and estate.erp.refs(i.invoice_id) and i.amount_paid_minor == 0
        and estate.config.as_of - i.issued_at < dt.timedelta(days=20)
    )  # fmt: skip
    at = inv.issued_at + dt.timedelta(days=2)
    estate.billing.payments.put(paying(inv, "py_unalloc", at, "bank_transfer", allocate=False))
    run_and_wait(cl, op, {"full": True, "as_of": as_of(api)})
    item = cl.get("/api/drift", params={"key": "py_unalloc"}, headers=auth(op)).json()["items"][0]
    detail = cl.get(f"/api/drift/{item['drift_id']}", headers=auth(op)).json()
    assert (detail["reason_code"], detail["policy"]) == ("matched_not_applied", "manual")
    assert "allocate it in billing" in detail["policy_note"]
    assert cl.post(f"/api/drift/{item['drift_id']}/sync", json={}, headers=auth(op)).status_code == 422


def test_item_detail_diff_history_transaction_and_audited_transitions(api: dict[str, Any]) -> None:
    cl, op, store = api["c"], api["operator"], api["store"]
    run_and_wait(cl, op, {"full": True, "as_of": as_of(api)})
    item = cl.get("/api/drift", params={"class": "amount_mismatch"}, headers=auth(op)).json()["items"][0]
    invoice_id = item["invoice_id"]
    store.command(
        "INSERT INTO $db.business_key_links (KeyType, KeyValue, TraceId, System, Region, FirstSeen, LastSeen) VALUES "
        "('invoice', {inv:String}, '0af7651916cd43dd8448eb211c80319c', 'billing', 'EU', now64(9), now64(9))",
        {"inv": invoice_id},
    )
    detail = cl.get(f"/api/drift/{item['drift_id']}", headers=auth(op)).json()
    total = next(d for d in detail["diff"] if d["field"] == "total_minor")
    assert total["differs"] and total["billing"] != total["erp"]
    assert detail["policy"] == "approval" and detail["reason"]
    assert [h["action"] for h in detail["history"]] == ["drift.new"]
    assert detail["transaction"] is not None
    assert detail["keys"]["invoice_id"] == invoice_id
    assert cl.get("/api/drift/nope", headers=auth(op)).status_code == 404

    url = f"/api/drift/{item['drift_id']}"
    r = cl.post(f"{url}/ignore", json={"note": " "}, headers=auth(op))
    assert r.status_code == 422 and "note" in r.json()["detail"]
    r = cl.post(f"{url}/acknowledge", json={"note": "looking into the FX rate"}, headers=auth(op))
    assert r.status_code == 200 and r.json()["state"] == "acknowledged"
    assert cl.post(f"{url}/acknowledge", json={}, headers=auth(op)).status_code == 409
    r = cl.post(f"{url}/ignore", json={"note": "FX rounding agreed with finance"}, headers=auth(op))
    assert r.status_code == 200 and r.json()["state"] == "ignored"
    history = cl.get(url, headers=auth(op)).json()["history"]
    assert [(h["actor"], h["action"]) for h in history] == [
        ("reconciler", "drift.new"),
        ("otto", "drift.acknowledged"),
        ("otto", "drift.ignored"),
    ]
    assert history[2]["note"] == "FX rounding agreed with finance"
    assert history[2]["before"] == {"state": "acknowledged", "note": "looking into the FX rate"}
    # the next run re-detects the drift but keeps the person's decision
    run_and_wait(cl, op, {"as_of": as_of(api)})
    assert cl.get(url, headers=auth(op)).json()["state"] == "ignored"
    ignored = cl.get("/api/drift", params={"state": "ignored"}, headers=auth(op)).json()
    assert [i["drift_id"] for i in ignored["items"]] == [item["drift_id"]]


def test_corrective_sync_approval_replay_and_dead_letters(api: dict[str, Any]) -> None:
    cl, op, estate = api["c"], api["operator"], api["estate"]
    run_and_wait(cl, op, {"full": True, "as_of": as_of(api)})
    items = cl.get("/api/drift", params={"limit": 1000}, headers=auth(op)).json()["items"]
    missing = next(i for i in items if i["class"] == "missing_in_erp" and i["reason_code"] == "not_posted")
    results: list[dict[str, Any]] = []

    def send() -> None:
        results.append(cl.post(f"/api/drift/{missing['drift_id']}/sync", json={}, headers=auth(op)).json())

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[0]["action_id"] == results[1]["action_id"] and results[0]["state"] == "succeeded"
    postings = [e for e in estate.erp.find_by_external_ref(missing["invoice_id"]) if e.entry_type == "invoice"]
    assert len(postings) == 1

    # business-rule class: waits for approval, then the ERP's posting is cancelled and billing's posted
    amount = next(i for i in items if i["class"] == "amount_mismatch")
    waiting = cl.post(f"/api/drift/{amount['drift_id']}/sync", json={}, headers=auth(op)).json()
    assert waiting["state"] == "pending" and waiting["approved_by"] == ""
    approved = cl.post(f"/api/actions/{waiting['action_id']}/approve", headers=auth(op)).json()
    assert approved["approved_by"] == "otto" and approved["state"] == "succeeded", approved
    assert approved["result"]["detail"].startswith("cancelled; posted")

    orphan = next(i for i in items if i["class"] == "orphan_payment")
    r = cl.post(f"/api/drift/{orphan['drift_id']}/sync", json={}, headers=auth(op))
    assert r.status_code == 422 and "no corrective operation" in r.json()["detail"]

    rejected = next(i for i in items if i["reason_code"] == "erp_rejected")
    failed = cl.post(f"/api/drift/{rejected['drift_id']}/sync", json={}, headers=auth(op)).json()
    assert failed["state"] == "failed" and "closed" in failed["last_error"]
    dead = cl.get("/api/actions/dead-letters", headers=auth(op)).json()
    assert failed["action_id"] in {a["action_id"] for a in dead["items"]}
    replay = cl.post(f"/api/actions/{failed['action_id']}/replay", headers=auth(op)).json()
    assert replay["original_action_id"] == failed["action_id"] and replay["requested_by"] == "otto"
    doc = cl.get(f"/api/actions/{failed['action_id']}", headers=auth(op)).json()
    assert [r["action_id"] for r in doc["replays"]] == [replay["action_id"]]
    assert doc["history"][0]["actor"] == "otto"
    assert cl.post(f"/api/actions/{postings[0].entry_id}/replay", headers=auth(op)).status_code == 404
    ok = cl.post(f"/api/actions/{results[0]['action_id']}/replay", headers=auth(op))
    assert ok.status_code == 409  # only failed actions are replayed
    listed = cl.get("/api/actions", params={"class": "missing_in_erp", "state": "succeeded"}, headers=auth(op))
    assert [a["action_id"] for a in listed.json()["items"]] == [results[0]["action_id"]]
    assert cl.get("/api/actions", params={"state": "weird"}, headers=auth(op)).status_code == 422
    # the actions a page follows, in one request (the dashboard asked for each, one at a time)
    named = [failed["action_id"], replay["action_id"], results[0]["action_id"]]
    some = cl.get("/api/actions", params={"action_id": named, "limit": 10}, headers=auth(op)).json()
    assert sorted(a["action_id"] for a in some["items"]) == sorted(named) and some["total"] == 3
    assert cl.get("/api/actions/breakers", headers=auth(op)).json()["breakers"]["erp"]["state"] == "closed"
    # the next run resolves the corrected items
    run_and_wait(cl, op, {"as_of": as_of(api)})
    assert cl.get(f"/api/drift/{missing['drift_id']}", headers=auth(op)).json()["state"] == "resolved"
    assert cl.get(f"/api/drift/{amount['drift_id']}", headers=auth(op)).json()["state"] == "resolved"


def tower(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    return subprocess.run(
        [sys.executable, "-m", "tower_core.cli", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_tower_reconcile_cli_against_a_served_api_pulling_the_simulated_estate(tmp_path: Path) -> None:
    estate = Estate.generate(EstateConfig(seed=22, customers=80, invoices=1500, fault_rates=FaultRates.default()))
    port = free_port()
    sim = uvicorn.Server(uvicorn.Config(create_sim_app(estate), host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=sim.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        env = {
            "TOWER_ADMIN_TOKEN": ADMIN,
            "TOWER_RECONCILE_SCHEDULER": "false",
            "TOWER_RECONCILE_CONNECTORS": "simulator",
            "TOWER_SIMULATOR_URL": f"http://127.0.0.1:{port}",
            "TOWER_SLA_EVAL_INTERVAL_S": "0",
        }
        with TowerServer(tmp_path / "srv", **env) as server:
            token = httpx.post(
                f"{server.url}/api/tokens", json={"name": "cli", "role": "operator"}, headers=auth(ADMIN)
            ).json()["token"]
            when = estate.config.as_of.isoformat()
            ok = tower(
                ["reconcile", "--full", "--as-of", when], tmp_path, TOWER_API_URL=server.url, TOWER_API_TOKEN=token
            )
            assert ok.returncode == 0, ok.stdout + ok.stderr
            assert "succeeded" in ok.stdout and "unexplained residual: none" in ok.stdout
            items = httpx.get(f"{server.url}/api/drift", params={"limit": 1000}, headers=auth(token)).json()
            assert {(i["class"], i["primary_key"]) for i in items["items"]} == estate.manifest.expected()
            eu = tower(["reconcile", "--region", "EU", "--as-of", when], tmp_path, TOWER_API_URL=server.url,
                       TOWER_API_TOKEN=token)  # fmt: skip
            assert eu.returncode == 0 and "region EU" in eu.stdout, eu.stdout + eu.stderr
            # a region no data names compared nothing, and its empty statement read as a clean reconciliation
            typo = tower(["reconcile", "--region", "eu", "--as-of", when], tmp_path, TOWER_API_URL=server.url,
                         TOWER_API_TOKEN=token)  # fmt: skip
            # (with connectors the run pulls first, which may bring a region's first records: it fails after that)
            said = typo.stdout + typo.stderr
            assert typo.returncode == 1 and "failed: no data names region 'eu'" in typo.stderr, said
            assert len(typo.stderr.strip().splitlines()) == 1 and "EU" in typo.stderr, said
            viewer = httpx.post(
                f"{server.url}/api/tokens", json={"name": "v", "role": "viewer"}, headers=auth(ADMIN)
            ).json()["token"]
            refused = tower(["reconcile"], tmp_path, TOWER_API_URL=server.url, TOWER_API_TOKEN=viewer)
            assert refused.returncode == 2 and refused.stderr.startswith("tower: error: the API refused the token")
            assert len(refused.stderr.strip().splitlines()) == 1
            bad = tower(
                ["reconcile", "--as-of", "yesterday"], tmp_path, TOWER_API_URL=server.url, TOWER_API_TOKEN=token
            )
            assert bad.returncode == 2 and "--as-of" in bad.stderr
    finally:
        sim.should_exit = True
        thread.join(timeout=10)


class UnseenRunApi:
    """A loopback stand-in (a named fake) for two API replicas behind a load balancer: the run is accepted by one,
    and the other, asked first, does not know it for ``unseen`` polls (a replicas review: `tower reconcile` ended
    with 404 while its run went on)."""

    def __init__(self, unseen: int) -> None:
        import http.server
        import json as _json

        polls = {"n": 0}

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                body = _json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(202, {"run_id": "r1", "state": "queued"})

            def do_GET(self) -> None:
                polls["n"] += 1
                if polls["n"] <= unseen:
                    self._answer(404, {"detail": "run r1 not found"})
                else:
                    doc = {"run_id": "r1", "state": "succeeded", "mode": "full", "drift_new": 0, "drift_resolved": 0}
                    doc |= {"drift_open": 0, "residual_minor": 0, "progress": {"stage": "statement", "done": 7}}
                    self._answer(200, doc)

            def log_message(self, *args: object) -> None:
                pass

        self.polls = polls
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_tower_reconcile_follows_a_run_another_replica_does_not_know_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler import cli
    from tower_core.errors import ConfigError

    api = UnseenRunApi(unseen=3)
    try:
        settings = Settings(api_url=api.url, api_token="t")  # type: ignore[call-arg]
        assert cli.reconcile_via_api(settings, full=True) == 0 and api.polls["n"] == 4
    finally:
        api.close()
    monkeypatch.setattr(cli, "NOT_YET_VISIBLE_S", 0.5)  # a run no replica ever knows is still an error
    api = UnseenRunApi(unseen=10**6)
    try:
        with pytest.raises(ConfigError, match="404"):
            cli.reconcile_via_api(Settings(api_url=api.url, api_token="t"), full=True)  # type: ignore[call-arg]
    finally:
        api.close()


def test_tower_reconciler_needs_a_clickhouse_server(tmp_path: Path) -> None:
    proc = tower(["reconciler"], tmp_path)
    assert proc.returncode == 2 and "TOWER_CLICKHOUSE_URL" in proc.stderr
    port = free_port()
    proc = tower(["reconcile"], tmp_path, TOWER_API_URL=f"http://ops:S3cretPW@127.0.0.1:{port}", TOWER_API_TOKEN="x")
    assert proc.returncode == 2 and "cannot reach the API" in proc.stderr
    assert f"http://***@127.0.0.1:{port}" in proc.stderr and "S3cretPW" not in proc.stderr  # a URL's password stays


def test_tower_reconciler_runs_its_jobs_and_owns_the_actions_even_with_the_api_scheduler_setting_off(
    clickhouse_http: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: beside a server the API runs with TOWER_RECONCILE_SCHEDULER=false, an environment often shared
    with `tower reconciler`; the jobs' process must still schedule them and execute the actions."""
    import reconciler.jobs
    from reconciler.cli import run_reconciler

    scheduled: list[Any] = []
    stop, late = threading.Event(), threading.Event()

    def record(service: Any, scheduler: Any, settings: Settings) -> None:
        scheduled.append((service.actions.executes, settings.reconcile_scheduler))
        # a turn its scheduler wakes up to 5 s late for (a paused or busy process) still runs: APScheduler's default
        # grace of 1 s dropped such turns here, the daily full run's included
        scheduler.add_job(late.set, "date", run_date=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5))

    monkeypatch.setattr(reconciler.jobs, "schedule", record)
    db = f"jobs_{os.getpid()}"
    shared = Settings(clickhouse_url=f"{clickhouse_http}/{db}", database=db, reconcile_scheduler=False)
    worker = threading.Thread(target=run_reconciler, args=(shared, stop))
    worker.start()
    ran_late = late.wait(30)
    stop.set()  # ends it either way
    worker.join(timeout=30)
    assert scheduled == [(True, True)] and ran_late


def test_tower_reconciler_waits_for_a_clickhouse_server_that_does_not_answer_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `tower serve` does: a restart during an outage waits (a stop while waiting ends it at once, exit 0);
    once the server answers, it migrates and schedules its jobs (they used to exit at start)."""
    import reconciler.jobs
    from reconciler.cli import run_reconciler
    from tests.test_faults import ClickHouseFixture

    scheduled: list[bool] = []
    monkeypatch.setattr(reconciler.jobs, "schedule", lambda service, scheduler, settings: scheduled.append(True))
    ch = ClickHouseFixture(tmp_path / "clickhouse")  # not started yet
    settings = Settings(clickhouse_url=f"http://default:@127.0.0.1:{ch.port}/jobs", database="jobs")
    results: list[int] = []

    def run(stop: threading.Event) -> threading.Thread:
        worker = threading.Thread(target=lambda: results.append(run_reconciler(settings, stop)))
        worker.start()
        return worker

    stop = threading.Event()
    worker = run(stop)
    time.sleep(1.5)
    stop.set()
    worker.join(timeout=10)
    assert results == [0] and not scheduled  # stopped while waiting

    stop = threading.Event()
    worker = run(stop)
    time.sleep(1.5)
    try:
        ch.start()
        deadline = time.monotonic() + 30
        while not scheduled and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=30)
        ch.stop()
    assert results == [0, 0] and scheduled == [True]
    err = capsys.readouterr().err
    assert "connection refused: waiting for it" in err and "still waiting (attempt 1" in err, err


def test_old_statements_are_deleted_as_runs_go_and_asking_for_one_says_so(
    embedded_store: Store, tmp_path: Path
) -> None:
    """Every run wrote its scope's whole statement and none was ever deleted: 609 runs of a 20k-invoice estate
    made 1.1M statement rows, and a statement page took 1.9 s after two weeks' worth."""
    settings = api_settings(embedded_store, tmp_path, reconcile_statement_keep_runs=2, reconcile_statement_keep_days=0)
    estate = Estate.generate(EstateConfig(seed=21, customers=20, invoices=60, fault_rates=RATES))
    with TestClient(create_app(settings, embedded_store)) as c:
        c.app.state.reconciler.set_connectors(Connectors(estate.billing, estate.erp, estate.cdp))  # type: ignore[attr-defined]
        when = estate.config.as_of.isoformat()
        runs = [run_and_wait(c, ADMIN, {"full": True, "as_of": when}) for _ in range(4)]
        region = run_and_wait(c, ADMIN, {"full": True, "region": "EU", "as_of": when})
        assert all(r["state"] == "succeeded" for r in [*runs, region])
        kept = {r["run_id"] for r in q.statement_runs(embedded_store)}
        assert kept == {r["run_id"] for r in [*runs, region]}  # four past the policy: the delete waits for five
        runs += [run_and_wait(c, ADMIN, {"full": True, "as_of": when}) for _ in range(3)]
        kept = {r["run_id"] for r in q.statement_runs(embedded_store)}
        # the latest two, and the latest of each scope (the EU run is older than both)
        assert kept == {runs[-1]["run_id"], runs[-2]["run_id"], region["run_id"]}
        latest = c.get("/api/statements", headers=auth(ADMIN))
        assert latest.status_code == 200 and latest.json()["run_id"] == runs[-1]["run_id"] and latest.json()["items"]
        gone = c.get("/api/statements", params={"run_id": runs[0]["run_id"]}, headers=auth(ADMIN))
        assert gone.status_code == 404 and "no longer kept" in gone.json()["detail"]
        assert c.get(f"/api/runs/{runs[0]['run_id']}", headers=auth(ADMIN)).json()["statement_dropped"] is True
        eu = c.get("/api/statements", params={"run_id": region["run_id"]}, headers=auth(ADMIN)).json()
        assert eu["items"] and {i["region"] for i in eu["items"]} == {"EU"}


def test_a_run_the_api_starts_beside_the_job_process_must_compare_by_its_settings(
    embedded_store: Store, tmp_path: Path
) -> None:
    """Beside `tower reconciler`, runs started through the API ran in the API's process with the API's reconcile
    settings: with another grace period, each one flipped ~64 items the scheduled runs had found (an acknowledged
    item resolved, then back as new without its note), a server review saw. The API refuses such a run (409)."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from reconciler.service import ReconcilerService

    base = api_settings(embedded_store, tmp_path, reconcile_grace_s={"*": 30})
    jobs_settings = base.model_copy(update={"reconcile_scheduler": True})
    job_process = ReconcilerService(jobs_settings, embedded_store, Connectors(None, None, None))
    job_process.start(BackgroundScheduler(timezone="UTC"))  # publishes what it compares by; never started here
    # the API beside it: on the server backend (the URL only marks it; this test's store is the embedded one it is
    # handed); an embedded API is the only process of its store, with no job process to agree with
    beside = {"clickhouse_url": "http://127.0.0.1:9/tower"}
    for grace, over, expected in (({"*": 7200}, beside, 409), ({"*": 30}, beside, 202), ({"*": 7200}, {}, 202)):
        settings = base.model_copy(update={"reconcile_grace_s": grace, **over})
        with TestClient(create_app(settings, embedded_store)) as c:
            if expected == 409:
                refused = c.post("/api/runs", json={}, headers=auth(ADMIN))
                assert refused.status_code == 409 and "TOWER_RECONCILE_" in refused.json()["detail"], refused.text
            else:
                assert run_and_wait(c, ADMIN, {})["state"] == "succeeded"
    # a job process that is gone holds the API to nothing: one stopped (its announcement withdrawn), or one of this
    # host that died without a word (a diff review: a retired `tower reconciler` blocked API runs for good)
    differing = base.model_copy(update={"reconcile_grace_s": {"*": 7200}, **beside})
    for gone in ("stopped", "died"):
        job_process = ReconcilerService(jobs_settings, embedded_store, Connectors(None, None, None))
        job_process.start(BackgroundScheduler(timezone="UTC"))
        if gone == "stopped":
            assert job_process.stop(timeout_s=5)
        else:
            owner = f"{socket.gethostname()}/999999999/1"  # a pid no process has
            doc = {"identity": job_process.settings_identity(), "owner": owner, "at": time.time()}
            q.set_cursor(embedded_store, *q.JOB_SETTINGS, json.dumps(doc))
        with TestClient(create_app(differing, embedded_store)) as c:
            assert run_and_wait(c, ADMIN, {})["state"] == "succeeded", gone
