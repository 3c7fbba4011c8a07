"""The SLA API in-process (FastAPI TestClient over the real app and chDB): reads, the operator-only audited
evaluation, and clear 4xx answers to bad input."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from collector.app import create_app
from collector.auth import create_token
from tests.conftest import free_port, migrated
from tests.test_sla_store import M, T, scenario
from tower_core.settings import Settings
from tower_core.store import Store

ADMIN = "sla-api-admin"


@pytest.fixture
def client(embedded_store: Store, tmp_path: Path) -> Iterator[tuple[TestClient, Store]]:
    migrated(embedded_store)
    settings = Settings(
        database=embedded_store.database,
        wal_dir=tmp_path / "wal",
        admin_token=ADMIN,
        sla_eval_interval_s=0,
        sla_dashboard_url="https://dash.example",
    )
    with TestClient(create_app(settings, embedded_store)) as c:
        yield c, embedded_store


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_definitions_and_empty_state(client: tuple[TestClient, Store]) -> None:
    c, _ = client
    defs = c.get("/api/sla/definitions", headers=auth(ADMIN)).json()
    assert [o["name"] for o in defs["objectives"]] == [
        "customer_synced",
        "invoice_posted",
        "payment_applied",
        "refund_posted",
    ]
    assert defs["burn_rate_windows"][0] == {"severity": "page", "long": "1h", "short": "5m", "burn_rate": 14.4}
    assert c.get("/api/sla/breaches", headers=auth(ADMIN)).json() == {"breaches": [], "firing": 0}
    assert c.get("/api/sla/compliance", headers=auth(ADMIN)).json()["objectives"] == []
    assert c.get("/api/sla/stuck", params={"sla": "invoice_posted"}, headers=auth(ADMIN)).json() == {
        "sla": "invoice_posted",
        "items": [],
    }


def test_evaluate_needs_an_operator_and_is_audited(client: tuple[TestClient, Store]) -> None:
    c, store = client
    _, viewer = create_token(store, "vera", "viewer")
    _, operator = create_token(store, "otto", "operator")
    at = {"now": dt.datetime.fromtimestamp((T + 60 * M) / 1e9, dt.UTC).isoformat()}
    assert c.post("/api/sla/evaluate", json=at).status_code == 401
    r = c.post("/api/sla/evaluate", json=at, headers=auth(viewer))
    assert r.status_code == 403 and "operator" in r.json()["detail"]
    scenario(store)
    r = c.post("/api/sla/evaluate", json=at, headers=auth(operator))
    assert r.status_code == 200
    doc = r.json()
    assert doc["evaluated_at"] == "2026-01-01T01:00:00.000Z" and doc["recorded"] is True
    # EU's invoices, and the never-applied payment pay_x (no region: "unknown") of the payment_applied SLA
    assert sorted((b["sla"], b["region"], b["severity"]) for b in doc["firing"]) == [
        ("invoice_posted", "EU", "page"),
        ("invoice_posted", "EU", "ticket"),
        ("payment_applied", "unknown", "page"),
        ("payment_applied", "unknown", "ticket"),
    ]
    assert doc["firing"][0]["annotations"]["dashboard"].startswith("https://dash.example/slas?")
    rows = store.query_rows("SELECT Actor, Action, ObjectType, After FROM $db.audit_log WHERE Action = 'sla.evaluate'")
    assert [(r_["Actor"], r_["Action"], r_["ObjectType"]) for r_ in rows] == [("otto", "sla.evaluate", "sla")]
    assert '"firing":4' in rows[0]["After"]
    # reads reflect the recorded evaluation
    comp = c.get("/api/sla/compliance", params={"region": "EU", "sla": "invoice_posted"}, headers=auth(ADMIN)).json()
    (eu,) = comp["objectives"]
    assert (eu["region"], eu["stuck"], eu["decided"], eu["bad"]) == ("EU", 3, 6, 4)
    assert sorted(eu["firing"]) == ["page", "ticket"]
    assert (
        c.get("/api/sla/breaches", params={"status": "firing", "region": "EU"}, headers=auth(ADMIN)).json()["firing"]
        == 2
    )
    assert c.get("/api/sla/breaches", params={"status": "resolved"}, headers=auth(ADMIN)).json()["breaches"] == []
    stuck = c.get("/api/sla/stuck", params={"sla": "invoice_posted", "at": at["now"]}, headers=auth(ADMIN)).json()[
        "items"
    ]
    assert [i["key"] for i in stuck] == ["in_f", "in_i2", "in_c"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("post", "/api/sla/evaluate", {"json": {"now": "2100-01-01T00:00:00Z"}}, 400),  # in the future
        ("post", "/api/sla/evaluate", {"json": {"now": "2999-01-01T00:00:00Z"}}, 422),  # past what the store holds
        ("post", "/api/sla/evaluate", {"json": {"now": "yesterday"}}, 422),
        ("post", "/api/sla/evaluate", {"json": {"now": "2026-01-01T00:00:00"}}, 422),  # no time zone
        ("get", "/api/sla/breaches", {"params": {"status": "maybe"}}, 422),
        ("get", "/api/sla/breaches", {"params": {"limit": 0}}, 422),
        ("get", "/api/sla/stuck", {"params": {"sla": "no_such_sla"}}, 404),
        ("get", "/api/sla/stuck", {"params": {}}, 422),
        ("get", "/api/sla/compliance", {"params": {"region": "E U"}}, 422),
    ],
)
def test_bad_input_is_a_clear_4xx(
    client: tuple[TestClient, Store], method: str, path: str, kwargs: dict, status: int
) -> None:
    c, _ = client
    r = getattr(c, method)(path, headers=auth(ADMIN), **kwargs)
    assert r.status_code == status, r.text
    assert "detail" in r.json()


def test_every_metric_the_readme_names_is_exposed_under_that_name(client: tuple[TestClient, Store]) -> None:
    """The README named two counters without their _total suffix: rules written from it matched nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    c, store = client
    scenario(store)
    now = dt.datetime.fromtimestamp((T + 60 * M) / 1e9, dt.UTC).isoformat()
    assert c.post("/api/sla/evaluate", json={"now": now}, headers=auth(ADMIN)).status_code == 200
    exposed: set[str] = set()
    for family in text_string_to_metric_families(c.get("/metrics").text):
        # a counter's samples are <family>_total, and so is its name in PromQL; a histogram is named by its family
        suffixes = {"counter": ["_total"], "histogram": ["", "_bucket", "_sum", "_count"]}.get(family.type, [""])
        suffixes += ["_bucket", "_gsum", "_gcount"] if family.type == "gaugehistogram" else []
        exposed |= {family.name + suffix for suffix in suffixes}
    named = set(re.findall(r"\btower_[a-z_]+", (Path(__file__).parent.parent / "README.md").read_text()))
    named -= {"tower_core"}  # the package
    assert len(named) >= 10 and named - exposed == set()


def test_metrics_expose_sla_series_after_an_evaluation(client: tuple[TestClient, Store]) -> None:
    c, store = client
    scenario(store)
    text = c.get("/metrics").text
    assert 'tower_sla_objective_ratio{sla="invoice_posted",step="invoice_to_ledger"} 0.99' in text
    assert "tower_sla_burn_rate{" not in text  # nothing evaluated yet
    c.post(
        "/api/sla/evaluate",
        json={"now": dt.datetime.fromtimestamp((T + 60 * M) / 1e9, dt.UTC).isoformat()},
        headers=auth(ADMIN),
    )
    text = c.get("/metrics").text
    labels = 'region="EU",sla="invoice_posted",step="invoice_to_ledger"'
    assert f"tower_sla_items_stuck{{{labels}}} 3.0" in text
    assert f'tower_sla_step_latency_seconds_bucket{{le="900",{labels}}} 2.0' in text  # 300 s and 600 s
    assert f"tower_sla_step_latency_seconds_gcount{{{labels}}} 3.0" in text
    assert f'tower_sla_burn_rate{{{labels},window="1h"}}' in text
    assert "tower_sla_evaluations_total 1.0" in text
    assert 'tower_sla_alert_firing{alertname="TowerSLABurnRate",region="EU"' in text


class _Receivers:
    """One local server for a webhook (answers 200) and an Alertmanager (answers 401, remembering the auth)."""

    def __init__(self) -> None:
        self.auth: list[str] = []
        seen = self.auth

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path.startswith("/api/v2/alerts"):
                    seen.append(self.headers.get("Authorization", ""))
                self.send_response(401 if self.path.startswith("/api/v2/alerts") else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_receiver_urls_are_redacted_in_answers_and_logs(
    embedded_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Slack-style webhook URL's path is a bearer credential, and so is user:password in the Alertmanager
    URL: neither may appear in the evaluate answer or in any log line (the tower's nor httpx's)."""
    migrated(embedded_store)
    scenario(embedded_store)
    rx = _Receivers()
    hook = f"http://127.0.0.1:{rx.port}/services/T0001/B0001/HOOKSECRET1"
    dead = f"http://127.0.0.1:{free_port()}/services/T9/B9/HOOKSECRET2"  # nobody listens: a delivery failure
    settings = Settings(
        database=embedded_store.database,
        wal_dir=tmp_path / "wal",
        admin_token=ADMIN,
        sla_eval_interval_s=0,
        sla_webhook_urls=[hook, dead],
        alertmanager_url=f"http://amuser:AMPASSWORD@127.0.0.1:{rx.port}",
    )
    at = {"now": dt.datetime.fromtimestamp((T + 60 * M) / 1e9, dt.UTC).isoformat()}
    try:
        with caplog.at_level(logging.DEBUG), TestClient(create_app(settings, embedded_store)) as c:
            r = c.post("/api/sla/evaluate", json=at, headers=auth(ADMIN))
    finally:
        rx.close()
    assert r.status_code == 200, r.text
    delivery = r.json()["delivery"]
    assert delivery["alertmanager"] == {"error": f"HTTP 401 Unauthorized from http://127.0.0.1:{rx.port}/***"}
    assert [(s["receiver"], s["url"]) for s in delivery["webhook"]["sent"]] == [
        (0, f"http://127.0.0.1:{rx.port}/***")
    ] * len(delivery["webhook"]["sent"])
    assert delivery["webhook"]["sent"] and delivery["webhook"]["failures"] > 0
    # the credentials still reach Alertmanager, as basic auth
    assert rx.auth and set(rx.auth) == {"Basic " + base64.b64encode(b"amuser:AMPASSWORD").decode()}
    logs = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "Alertmanager delivery failed" in logs and "webhook 1 (http://127.0.0.1:" in logs
    assert f"HTTP Request: POST http://127.0.0.1:{rx.port}/*** " in logs  # httpx's own request log
    for secret in ("HOOKSECRET1", "HOOKSECRET2", "AMPASSWORD", "amuser", "/services/"):
        assert secret not in r.text, secret
        assert secret not in logs, secret


def test_regions_past_the_cap_are_evaluated_as_one(embedded_store: Store, tmp_path: Path) -> None:
    """Regions come from the data (revops.region): 3,000 spans of made-up regions grew /metrics to 32 MB, one
    set of ~40 series (and alerts) per region. Past TOWER_SLA_MAX_REGIONS, the quieter ones are one `other`."""
    migrated(embedded_store)
    scenario(embedded_store)  # EU: six items; NA and APAC: one each
    settings = Settings(
        database=embedded_store.database, wal_dir=tmp_path / "wal", admin_token=ADMIN, sla_eval_interval_s=0,
        sla_max_regions=1,
    )  # fmt: skip
    with TestClient(create_app(settings, embedded_store)) as c:
        now = dt.datetime.fromtimestamp((T + 60 * M) / 1e9, dt.UTC).isoformat()
        assert c.post("/api/sla/evaluate", json={"now": now}, headers=auth(ADMIN)).status_code == 200
        text = c.get("/metrics").text
    stuck = [ln for ln in text.splitlines() if ln.startswith("tower_sla_items_stuck{")]
    lines = [ln for ln in text.splitlines() if 'sla="invoice_posted"' in ln and 'region="' in ln]
    regions = {ln.split('region="')[1].split('"')[0] for ln in lines}
    assert regions == {"EU", "other"}
    assert 'tower_sla_items_stuck{region="EU",sla="invoice_posted",step="invoice_to_ledger"} 3.0' in stuck
