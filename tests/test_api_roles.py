"""Roles and audit over the real app and chDB (TestClient): every mutating route refuses a missing token (401)
and a viewer (403) — enumerated from the app, so a new route without a check fails here; mutations are
audited under the token's name, refused ones too; bulk actions need the confirmed count; and
``tower token`` creates, lists and revokes tokens through the API or, with no API running, in the store."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from collector import auth as auth_module
from collector.app import create_app
from collector.auth import TokenVerifier, create_token
from collector.routers import bulk as bulk_router
from connectors.simulator import Estate, EstateConfig, FaultRates
from reconciler.connectors import Connectors
from tests.conftest import migrated
from tests.server import TowerServer
from tower_core.settings import Settings
from tower_core.store import Store

ADMIN = "roles-admin"
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
OTHER_AUTH = ("/v1/", "/webhooks/")  # ingest authenticates by write key / signature, not by bearer token
ROOT = Path(__file__).resolve().parent.parent


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(embedded_store: Store, tmp_path: Path) -> Iterator[dict[str, Any]]:
    migrated(embedded_store)
    settings = Settings(
        database=embedded_store.database,
        wal_dir=tmp_path / "wal",
        admin_token=ADMIN,
        sla_eval_interval_s=0,
        reconcile_scheduler=False,
        reconcile_action_backoff_s=0.01,
    )
    estate = Estate.generate(
        EstateConfig(seed=5, customers=40, invoices=400, fault_rates=FaultRates.only(erp_posting_missing=0.03))
    )
    with TestClient(create_app(settings, embedded_store)) as client:
        client.app.state.reconciler.set_connectors(Connectors(estate.billing, estate.erp, estate.cdp))  # type: ignore[attr-defined]
        _, viewer = create_token(embedded_store, "vera", "viewer")
        _, operator = create_token(embedded_store, "otto", "operator")
        yield {"c": client, "store": embedded_store, "estate": estate, "viewer": viewer, "operator": operator}


def walk(routes: Any, prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """Every APIRoute of the app, also inside included routers (FastAPI keeps those as router branches)."""
    for r in routes:
        if isinstance(r, APIRoute):
            yield prefix + r.path, r
        elif hasattr(r, "original_router"):
            context = getattr(r, "include_context", None)
            yield from walk(r.original_router.routes, prefix + (getattr(context, "prefix", "") or ""))


def mutating_routes(app: Any) -> list[tuple[str, str]]:
    routes = sorted(
        (method, path)
        for path, r in walk(app.routes)
        if not path.startswith(OTHER_AUTH)
        for method in set(r.methods) & MUTATING
    )
    documented = sorted(
        (method.upper(), path)
        for path, ops in app.openapi()["paths"].items()
        if not path.startswith(OTHER_AUTH)
        for method in ops
        if method.upper() in MUTATING
    )
    assert set(documented) <= set(routes), "the walk over the app's routes missed some"
    return routes


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x0", path)


def unprotected(c: TestClient, viewer_token: str) -> list[tuple[str, str, str]]:
    """Mutating routes that do not answer 401 without (or with a bad) token and 403 to a viewer."""
    found = []
    for method, path in mutating_routes(c.app):
        url = concrete(path)
        for who, headers, want in (
            ("anonymous", {}, 401),
            ("bad token", auth("twr_not-a-token"), 401),
            ("viewer", auth(viewer_token), 403),
        ):
            got = c.request(method, url, json={}, headers=headers).status_code
            if got != want:
                found.append((method, path, f"{who}: {got}"))
    return found


def unguarded_reads(c: TestClient) -> list[tuple[str, str]]:
    """Reads under /api/ that answer anything but 401 without a token or with a bad one (README: every /api/
    read needs a viewer token): business keys, amounts and the server's paths are not for anonymous callers."""
    found = []
    for path, r in walk(c.app.routes):
        if not path.startswith("/api/") or "GET" not in r.methods:
            continue
        for who, headers in (("anonymous", {}), ("bad token", auth("twr_not-a-token"))):
            got = c.get(concrete(path), headers=headers).status_code
            if got != 401:
                found.append((path, f"{who}: {got}"))
    return found


def test_every_api_read_needs_a_token(api: dict[str, Any]) -> None:
    c = api["c"]
    reads = [p for p, r in walk(c.app.routes) if p.startswith("/api/") and "GET" in r.methods]
    assert {"/api/drift", "/api/sla/definitions", "/api/sla/breaches", "/api/transactions"} <= set(reads)
    unguarded = unguarded_reads(c)
    assert unguarded == [], "\n".join(map(str, unguarded))
    assert c.get("/api/sla/definitions", headers=auth(api["viewer"])).status_code == 200


def run(c: TestClient, token: str) -> dict[str, Any]:
    started = c.post("/api/runs", json={"full": True}, headers=auth(token))
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        doc = c.get(f"/api/runs/{started.json()['run_id']}", headers=auth(token)).json()
        if doc.get("state") in ("succeeded", "failed"):
            return doc
        time.sleep(0.05)
    raise AssertionError("run did not finish")


def audit(c: TestClient, **params: Any) -> list[dict[str, Any]]:
    r = c.get("/api/audit", params={"limit": 1000, **params}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_every_mutating_route_refuses_no_token_and_viewers(api: dict[str, Any]) -> None:
    c = api["c"]
    routes = mutating_routes(c.app)
    # the routes this pages drive are among them (the enumeration really sees the app's routes)
    assert {
        ("POST", "/api/drift/{drift_id}/sync"),
        ("POST", "/api/drift/{drift_id}/ignore"),
        ("POST", "/api/drift/bulk"),
        ("POST", "/api/actions/{action_id}/replay"),
        ("POST", "/api/runs"),
        ("POST", "/api/sla/evaluate"),
        ("DELETE", "/api/tokens/{token_id}"),
    } <= set(routes)
    assert unprotected(c, api["viewer"]) == []
    # nothing changed: no run, no action, no token besides the fixture's two
    assert c.get("/api/runs", headers=auth(ADMIN)).json()["total"] == 0
    assert c.get("/api/actions", headers=auth(ADMIN)).json()["total"] == 0
    assert len(c.get("/api/tokens", headers=auth(ADMIN)).json()) == 2


def test_a_new_route_without_a_role_check_is_caught(api: dict[str, Any]) -> None:
    c = api["c"]

    @c.app.post("/api/unchecked/{thing}")
    def unchecked(thing: str) -> dict[str, str]:
        return {"thing": thing}

    assert [(m, p) for m, p, _ in unprotected(c, api["viewer"])] == [("POST", "/api/unchecked/{thing}")] * 3


def test_refused_mutations_are_audited_with_the_principal_anonymous_ones_not(api: dict[str, Any]) -> None:
    c = api["c"]
    assert c.post("/api/runs", json={}).status_code == 401
    assert c.post("/api/runs", json={}, headers=auth(api["viewer"])).status_code == 403
    denied = audit(c, action="api.")
    assert len(denied) == 1
    rec = denied[0]
    assert (rec["actor"], rec["action"], rec["object_id"], rec["outcome"]) == (
        "vera",
        "api.denied",
        "POST /api/runs",
        "denied",
    )
    assert rec["after"] == {"status": 403} and "needs the operator role" in rec["note"]
    # a refused operator request is audited as rejected with the API's message
    assert c.post("/api/drift/nope/ignore", json={"note": "x"}, headers=auth(api["operator"])).status_code == 404
    rejected = audit(c, actor="otto", outcome="rejected")
    assert [r["object_id"] for r in rejected] == ["POST /api/drift/nope/ignore"]
    assert "not found" in rejected[0]["note"]


def test_mutations_are_audited_with_the_tokens_name(api: dict[str, Any]) -> None:
    c, operator = api["c"], api["operator"]
    run(c, operator)
    items = c.get("/api/drift", params={"class": "missing_in_erp", "limit": 100}, headers=auth(operator)).json()
    assert items["total"] >= 3
    first, second, third = (i["drift_id"] for i in items["items"][:3])
    assert c.post(f"/api/drift/{first}/acknowledge", json={}, headers=auth(operator)).status_code == 422  # why?
    assert c.post(f"/api/drift/{first}/acknowledge", json={"note": "on it"}, headers=auth(operator)).status_code == 200
    ignore = c.post(f"/api/drift/{second}/ignore", json={"note": "posted by hand"}, headers=auth(operator))
    assert ignore.status_code == 200
    sync = c.post(f"/api/drift/{third}/sync", json={}, headers=auth(operator))
    assert sync.status_code == 200 and sync.json()["state"] == "succeeded"
    created = c.post("/api/tokens", json={"name": "ann", "role": "viewer"}, headers=auth(ADMIN)).json()
    assert c.delete(f"/api/tokens/{created['token_id']}", headers=auth(ADMIN)).status_code == 200

    by_otto = {(r["action"], r["object_id"]) for r in audit(c, actor="otto")}
    assert ("run.start", c.get("/api/runs", headers=auth(ADMIN)).json()["items"][0]["run_id"]) in by_otto
    assert ("drift.acknowledged", first) in by_otto
    assert ("drift.ignored", second) in by_otto
    assert ("action.create", sync.json()["action_id"]) in by_otto
    ignored = next(r for r in audit(c, actor="otto", action="drift.ignored"))
    assert ignored["note"] == "posted by hand" and ignored["before"]["state"] == "new"
    by_admin = {(r["action"], r["object_id"]) for r in audit(c, actor="admin (bootstrap)")}
    assert {("token.create", created["token_id"]), ("token.revoke", created["token_id"])} <= by_admin
    assert created["token"] not in str(audit(c))  # the secret never reaches the log
    # filters: object type and action prefix
    assert {r["object_type"] for r in audit(c, object_type="token")} == {"token"}
    assert {r["action"] for r in audit(c, action="drift.")} >= {"drift.acknowledged", "drift.ignored", "drift.new"}
    facets = c.get("/api/audit/facets", headers=auth(api["viewer"])).json()
    assert {"otto", "admin (bootstrap)", "reconciler"} <= set(facets["actors"])
    assert c.get("/api/audit", headers=auth("twr_nope")).status_code == 401
    me = c.get("/api/tokens/me", headers=auth(api["viewer"])).json()
    assert me == {"name": "vera", "role": "viewer"}


def test_bulk_needs_the_confirmed_count_and_a_note_to_ignore(api: dict[str, Any]) -> None:
    c, operator = api["c"], api["operator"]
    run(c, operator)
    flt = {"class": ["missing_in_erp"], "region": "EU"}
    total = c.get("/api/drift", params={**flt, "limit": 1}, headers=auth(operator)).json()["total"]
    assert total >= 1
    body = {"action": "acknowledge", "filter": flt, "expected_count": total + 1, "note": "FX rates checked"}
    stale = c.post("/api/drift/bulk", json=body, headers=auth(operator))
    assert stale.status_code == 409 and f"{total} items match the filter now" in stale.json()["detail"]
    for action in ("ignore", "acknowledge"):
        no_note = c.post("/api/drift/bulk", json={**body, "action": action, "expected_count": total, "note": " "},
                         headers=auth(operator))  # fmt: skip
        assert no_note.status_code == 422 and "note" in no_note.text
    bad_class = c.post("/api/drift/bulk", json={**body, "filter": {"class": ["nope"]}}, headers=auth(operator))
    assert bad_class.status_code == 422 and "unknown class" in bad_class.text
    # more items than one bulk action takes: no count could be confirmed, so the answer says to narrow the filter
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bulk_router, "MAX_BULK", total - 1)
        too_many = c.post("/api/drift/bulk", json={**body, "expected_count": total}, headers=auth(operator))
    assert too_many.status_code == 409 and f"at most {total - 1}; narrow the filter" in too_many.json()["detail"]
    # the reviewed items by id: as many as reviewed, but one of them another item, is refused too (a count alone
    # let a set that changed while its count stayed through)
    listed = c.get("/api/drift", params={**flt, "limit": 500}, headers=auth(operator)).json()["items"]
    ids = [i["drift_id"] for i in listed]
    swapped = c.post("/api/drift/bulk", json={**body, "expected_count": total, "expected_ids": [*ids[1:], "0" * 32]},
                     headers=auth(operator))  # fmt: skip
    assert swapped.status_code == 409 and "1 of the reviewed items no longer match" in swapped.json()["detail"]
    uneven = c.post("/api/drift/bulk", json={**body, "expected_count": total, "expected_ids": ids[1:]},
                    headers=auth(operator))  # fmt: skip
    assert uneven.status_code == 422 and "expected_count" in uneven.text
    assert {i["state"] for i in c.get("/api/drift", params={**flt, "limit": 500}, headers=auth(operator)).json()[
        "items"]} != {"acknowledged"}  # fmt: skip
    done = c.post(
        "/api/drift/bulk", json={**body, "expected_count": total, "expected_ids": ids}, headers=auth(operator)
    )
    assert done.status_code == 200, done.text
    assert done.json()["done"] == total and done.json()["failed"] == 0
    states = c.get("/api/drift", params={**flt, "limit": 100}, headers=auth(operator)).json()["items"]
    assert {i["state"] for i in states} == {"acknowledged"}
    bulk = audit(c, action="drift.bulk")
    assert len(bulk) == 1 and bulk[0]["actor"] == "otto" and bulk[0]["after"]["matched"] == total
    assert len(audit(c, actor="otto", action="drift.acknowledged")) == total
    # the sync variant starts the corrective syncs and runs them in the background
    left = c.get("/api/drift", params={"class": "missing_in_erp", "state": "new", "limit": 1},
                 headers=auth(operator)).json()["total"]  # fmt: skip
    sync_body = {"action": "sync", "filter": {"class": ["missing_in_erp"], "state": ["new"]}, "expected_count": left}
    unseen = c.post("/api/drift/bulk", json={**sync_body, "approve": True}, headers=auth(operator))
    assert unseen.status_code == 422 and "needs expected_ids" in unseen.text  # approving needs the reviewed ids
    synced = c.post("/api/drift/bulk", json=sync_body, headers=auth(operator)).json()
    ids = [i["action_id"] for i in synced["items"]]
    assert len(ids) == left

    def ended() -> bool:
        docs = [c.get(f"/api/actions/{a}", headers=auth(operator)).json() for a in ids]
        return all(d["state"] == "succeeded" for d in docs)

    deadline = time.monotonic() + 60
    while not ended():
        assert time.monotonic() < deadline, "bulk syncs did not end"
        time.sleep(0.1)
    assert run(c, operator)["state"] == "succeeded"
    resolved = c.get("/api/drift", params={"class": "missing_in_erp", "state": "resolved", "limit": 1},
                     headers=auth(operator)).json()["total"]  # fmt: skip
    assert resolved == left


def tower(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TOWER_")} | env
    return subprocess.run(
        [sys.executable, "-m", "tower_core.cli", *args], cwd=cwd, env=full, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_tower_token_cli_without_and_with_a_running_api(tmp_path: Path) -> None:
    data = {"TOWER_DATA_DIR": str(tmp_path / "data"), "TOWER_WAL_DIR": str(tmp_path / "wal")}
    offline = {**data, "TOWER_API_URL": "http://127.0.0.1:9"}  # nothing listens: the store is opened directly
    made = tower(offline, "token", "create", "--name", "alice", "--role", "operator", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    alice = made.stdout.strip().splitlines()[-1]
    assert alice.startswith("twr_") and "directly in the store" in made.stdout
    bad = tower(offline, "token", "create", "--name", "bob", "--role", "root", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("tower: error: --role must be one of")

    with TowerServer(tmp_path, TOWER_ADMIN_TOKEN=ADMIN) as srv:
        # the token made offline works against the API that now owns the store
        assert httpx.get(f"{srv.url}/api/tokens/me", headers=auth(alice)).json() == {
            "name": "alice",
            "role": "operator",
        }
        online = {**data, "TOWER_API_URL": srv.url}
        refused = tower(online, "token", "list", cwd=tmp_path)  # no admin token: clear error, exit 2
        assert refused.returncode == 2 and "TOWER_ADMIN_TOKEN" in refused.stderr
        as_admin = {**online, "TOWER_ADMIN_TOKEN": ADMIN}
        listed = tower(as_admin, "token", "list", cwd=tmp_path)
        assert listed.returncode == 0 and "alice" in listed.stdout and "operator" in listed.stdout
        token_id = next(ln.split()[1] for ln in listed.stdout.splitlines() if "alice" in ln)
        revoked = tower(as_admin, "token", "revoke", token_id, cwd=tmp_path)
        assert revoked.returncode == 0 and "through the API" in revoked.stdout
        assert httpx.get(f"{srv.url}/api/tokens/me", headers=auth(alice)).status_code == 401
        viewer = tower(as_admin, "token", "create", "--name", "vic", cwd=tmp_path)
        vic = viewer.stdout.strip().splitlines()[-1]
        assert httpx.get(f"{srv.url}/api/tokens/me", headers=auth(vic)).json()["role"] == "viewer"
        records = httpx.get(f"{srv.url}/api/audit", params={"object_type": "token"}, headers=auth(ADMIN)).json()
        actors = {(r["action"], r["actor"]) for r in records["items"]}
        assert ("token.revoke", "admin (bootstrap)") in actors
        assert any(a == "token.create" and who.startswith("cli:") for a, who in actors)  # the offline one
    assert alice not in (tmp_path / "server.log").read_text()


def capped_verifier(store: Store, monkeypatch: pytest.MonkeyPatch, cap: int) -> TokenVerifier:
    """A verifier on the real store whose cache holds ``cap`` tokens."""
    migrated(store)
    monkeypatch.setattr(auth_module, "_CACHE_MAX", cap)
    return TokenVerifier(store, ADMIN)


def test_the_token_cache_stays_bounded_under_random_tokens(
    embedded_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = capped_verifier(embedded_store, monkeypatch, 20)
    _, real = create_token(embedded_store, "rita", "viewer")
    assert verifier.verify(real) is not None
    for i in range(60):
        assert verifier.verify(f"twr_random_{i}") is None
    assert len(verifier._cache) <= 20
    assert verifier.verify(real) is not None  # evicted or not, a real token still works


def test_the_token_cache_evicts_safely_from_many_threads(
    embedded_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify runs in the threadpool: two threads evicting the same oldest entry raised KeyError (a 500)."""
    import threading

    verifier = capped_verifier(embedded_store, monkeypatch, 8)
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        for i in range(100):
            try:
                verifier.verify(f"twr_random_{n}_{i}")
            except BaseException as exc:  # any exception is the finding
                errors.append(exc)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(previous)
    assert errors == [] and len(verifier._cache) <= 8


def test_the_clis_reading_of_a_validation_refusal_is_a_line_not_python_data(api: dict[str, Any]) -> None:
    """FastAPI's 422 is a list of errors: the CLI printed it as `[{'type': 'missing', 'loc': ('body', ...` ."""
    from tower_core.api_answers import detail

    c, operator = api["c"], api["operator"]
    bad_limit = c.get("/api/drift", params={"limit": "many"}, headers=auth(operator))
    assert bad_limit.status_code == 422 and isinstance(bad_limit.json()["detail"], list)
    line = detail(bad_limit)
    assert line.startswith("limit: ") and "integer" in line and "{" not in line and "'" not in line
    two = c.get("/api/drift", params={"limit": "many", "min_age_days": "old"}, headers=auth(operator))
    assert two.status_code == 422 and len(two.json()["detail"]) == 2
    assert detail(two).count("; ") == 1 and "limit: " in detail(two) and "min_age_days: " in detail(two)


class _PausedTokenReads:
    """The real chDB store, whose token lookups wait at a gate after reading (a test wrapper, named as such): holds
    a verification between its read and its caching."""

    def __init__(self, store: Store) -> None:
        import threading

        self._store, self.read, self.gate = store, threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def query_rows(self, sql: str, params: Any = None) -> Any:
        rows = self._store.query_rows(sql, params)
        if "api_tokens" in sql:
            self.read.set()
            assert self.gate.wait(30)
        return rows


def test_a_token_revoked_while_a_request_reads_it_is_refused_at_once_after(
    embedded_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verification that read the token before its revocation cached it after the revocation's forget(): the
    revoked token passed every route for the cache's 5 s (a concurrency review saw 2,000-3,000 requests through)."""
    import threading

    from tower_core.store import tokens as token_store

    migrated(embedded_store)
    token_id, token = create_token(embedded_store, "rex", "operator")
    paused = _PausedTokenReads(embedded_store)
    verifier = TokenVerifier(paused, ADMIN)  # type: ignore[arg-type]
    seen: list[Any] = []
    reading = threading.Thread(target=lambda: seen.append(verifier.verify(token)))
    reading.start()
    assert paused.read.wait(30)  # it read the token, not revoked yet
    assert token_store.revoke(embedded_store, token_id)
    verifier.forget()  # what DELETE /api/tokens/{id} does once the revocation is stored
    paused.gate.set()
    reading.join(30)
    assert seen and seen[0] is not None  # that request was already under way
    assert verifier.verify(token) is None  # every later one is refused
