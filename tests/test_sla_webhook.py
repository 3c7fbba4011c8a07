"""Acceptance: without an Alertmanager, the webhook notifier posts Alertmanager's version-4 JSON to a real local
receiver: fire, repeat without change (no duplicate), resolve -- with `tower serve` restarted in between, and
still no duplicate (the notification log lives in the store)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.server import TowerServer
from tests.sla_estate import MIN, Delay, Receiver, base_ns, evaluate, send_estate, wait_stored

pytestmark = pytest.mark.slow
TOKEN = "sla-webhook-admin-token"
GROUP = '{}:{alertname="TowerSLABurnRate", region="EU", sla="invoice_posted", step="invoice_to_ledger"}'


def test_webhook_fire_repeat_restart_resolve_without_duplicates(tmp_path: Path) -> None:
    with Receiver() as rx:
        env = {
            "TOWER_ADMIN_TOKEN": TOKEN,
            "TOWER_SLA_EVAL_INTERVAL_S": "0",
            "TOWER_SLA_WEBHOOK_URLS": f'["{rx.url}"]',
        }
        b = base_ns(13)
        t1, t2 = b + 300 * MIN, b + 720 * MIN
        srv = TowerServer(tmp_path / "tower", **env)
        del srv.env["TOWER_API_URL"]  # its port alone says where it answers: externalURL said :8000
        with srv:
            invoices = send_estate(srv.url, b, 12, delays=(Delay("EU", b + 240 * MIN, b + 300 * MIN, 40 * MIN),))
            wait_stored(srv.url, invoices[-1], srv.auth)
            doc = evaluate(srv.url, TOKEN, t1)  # fire
            assert [s["status"] for s in doc["delivery"]["webhook"]["sent"]] == ["firing"]
            (msg,) = rx.wait(1)
            assert msg["version"] == "4" and msg["status"] == "firing" and msg["groupKey"] == GROUP
            assert msg["receiver"] == "tower-webhook" and msg["externalURL"] == srv.url
            assert msg["groupLabels"]["region"] == "EU" and msg["truncatedAlerts"] == 0
            assert sorted(a["labels"]["severity"] for a in msg["alerts"]) == ["page", "ticket"]
            assert all(a["status"] == "firing" and a["endsAt"] == "0001-01-01T00:00:00Z" for a in msg["alerts"])
            assert all(len(a["fingerprint"]) == 16 for a in msg["alerts"])
            fired = {a["fingerprint"]: a["startsAt"] for a in msg["alerts"]}

            doc = evaluate(srv.url, TOKEN, t1 + MIN)  # repeat without change
            assert len(doc["firing"]) == 2 and doc["delivery"]["webhook"]["sent"] == []
        assert len(rx.messages) == 1

        with TowerServer(tmp_path / "tower", **env) as srv:  # restarted, same store
            doc = evaluate(srv.url, TOKEN, t1 + 2 * MIN)
            assert len(doc["firing"]) == 2 and doc["started"] == [] and doc["delivery"]["webhook"]["sent"] == []
            assert len(rx.messages) == 1

            doc = evaluate(srv.url, TOKEN, t2)  # the delay is over: resolve
            assert [s["status"] for s in doc["delivery"]["webhook"]["sent"]] == ["resolved"]
            msgs = rx.wait(2)
            assert len(msgs) == 2
            res = msgs[1]
            assert res["status"] == "resolved" and res["groupKey"] == GROUP
            assert {a["fingerprint"]: a["startsAt"] for a in res["alerts"]} == fired  # the same episodes
            assert all(a["status"] == "resolved" and a["endsAt"] != "0001-01-01T00:00:00Z" for a in res["alerts"])

        with TowerServer(tmp_path / "tower", **env) as srv:  # restarted again: nothing is told twice
            for at in (t2 + MIN, t2 + 10 * MIN):
                doc = evaluate(srv.url, TOKEN, at)
                assert doc["firing"] == [] and doc["delivery"]["webhook"]["sent"] == []
            history = httpx.get(f"{srv.url}/api/sla/breaches", headers=srv.auth).json()["breaches"]
            assert sorted((h["severity"], h["status"]) for h in history) == [
                ("page", "resolved"),
                ("ticket", "resolved"),
            ]
        assert len(rx.messages) == 2
