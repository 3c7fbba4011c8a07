"""Acceptance: SLA alerts through a real Prometheus Alertmanager (Debian's prometheus-alertmanager, installed
by scripts/system-deps.sh) from a real `tower serve`, fed real OTLP spans from the OpenTelemetry SDK.

A delay injected into EU's invoice_to_ledger fires one alert group for EU and that step only, visible in
Alertmanager's API and notified by it; when the delay ends the alerts resolve. A clean estate fires nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from reconciler.sla.payloads import fingerprint, webhook_alert, webhook_message
from reconciler.sla.service import SlaService
from tests.conftest import free_port, migrated
from tests.fixtures.fault_proxy import FaultProxy
from tests.server import TowerServer
from tests.sla_estate import MIN, Delay, Receiver, base_ns, evaluate, iso, send_estate, wait_stored
from tests.test_sla_store import M, T, scenario
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store import sla as sla_store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "sla-test-admin-token"
EU_GROUP = {"alertname": "TowerSLABurnRate", "sla": "invoice_posted", "step": "invoice_to_ledger", "region": "EU"}


@dataclass
class Alertmanager:
    url: str
    receiver: Receiver

    def groups(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v2/alerts/groups", timeout=5).json()

    def wait_alerts(self, done: Callable[[list[dict]], bool], timeout: float = 15.0) -> list[dict]:
        """The alerts not resolved, once ``done`` holds for them (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            alerts = httpx.get(f"{self.url}/api/v2/alerts", params={"active": "true"}, timeout=5).json()
            alerts = [a for a in alerts if a["status"]["state"] != "unprocessed"]  # active, or inhibited by a page
            if done(alerts) or time.monotonic() > deadline:
                return alerts
            time.sleep(0.1)

    def wait_groups(self, count: int, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            groups = self.groups()
            if len(groups) == count or time.monotonic() > deadline:
                return groups
            time.sleep(0.1)


def alertmanager_binary() -> str:
    binary = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
    if os.path.exists(binary):
        return binary
    reason = (
        "prometheus-alertmanager is not installed; `make test` installs the Debian package as root "
        "(scripts/system-deps.sh), or run: apt-get install prometheus-alertmanager"
    )
    if os.geteuid() == 0:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    """Alertmanager on a free loopback port, configured from the shipped example (fast group timers), its
    webhook receiver a real local HTTP server."""
    binary = alertmanager_binary()
    config = yaml.safe_load((ROOT / "reconciler/sla/config/alertmanager.example.yml").read_text())
    config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    with Receiver() as rx:
        config["receivers"][0]["webhook_configs"][0]["url"] = rx.url
        (tmp_path / "am.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "am.log", "wb")
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'am.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"alertmanager did not start: {(tmp_path / 'am.log').read_text()[-2000:]}")
                time.sleep(0.1)
            yield Alertmanager(url, rx)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            log.close()


def metric_values(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_eu_invoice_delay_fires_one_alert_group_and_resolves(tmp_path: Path, alertmanager: Alertmanager) -> None:
    with TowerServer(
        tmp_path / "tower",
        TOWER_ADMIN_TOKEN=TOKEN,
        TOWER_SLA_EVAL_INTERVAL_S="0",  # evaluations only at the instants the test picks
        TOWER_ALERTMANAGER_URL=alertmanager.url,
    ) as srv:
        # 12 hours of invoices in NA, EU and APAC every 2 minutes, posted in about a minute; between 4h and 5h
        # EU's ERP postings take 40 minutes (threshold 15m).
        b = base_ns(13)
        delay = Delay("EU", b + 240 * MIN, b + 300 * MIN, 40 * MIN)
        invoices = send_estate(srv.url, b, 12, delays=(delay,))
        wait_stored(srv.url, invoices[-1], srv.auth)

        t1 = b + 300 * MIN  # at the end of the delay
        doc = evaluate(srv.url, TOKEN, t1)
        assert sorted((a["labels"]["region"], a["step"], a["severity"]) for a in doc["firing"]) == [
            ("EU", "invoice_to_ledger", "page"),
            ("EU", "invoice_to_ledger", "ticket"),
        ]
        assert doc["delivery"]["alertmanager"] == {"sent": 2}

        (group,) = alertmanager.wait_groups(1)
        assert group["labels"] == EU_GROUP
        alerts = {a["labels"]["severity"]: a for a in group["alerts"]}
        assert set(alerts) == {"page", "ticket"}
        for severity, alert in alerts.items():
            assert alert["labels"] == {**EU_GROUP, "severity": severity}
            assert alert["fingerprint"] == fingerprint(alert["labels"])  # our fingerprint is Alertmanager's
            assert alert["startsAt"].startswith(iso(t1)[:19])
            assert alert["annotations"]["summary"].startswith("EU invoice_to_ledger: error budget burning")
            assert alert["annotations"]["dashboard"].endswith("sla=invoice_posted&step=invoice_to_ledger&region=EU")
        assert alerts["page"]["status"]["state"] == "active"
        assert alerts["ticket"]["status"]["inhibitedBy"] == [alerts["page"]["fingerprint"]]  # the example's rule

        # Alertmanager notified the group once, and its message has the shape our webhook notifier sends
        (note,) = alertmanager.receiver.wait(1)
        assert note["status"] == "firing" and note["groupLabels"] == EU_GROUP
        ours = webhook_message("x", [webhook_alert("firing", {**EU_GROUP, "severity": "page"}, {}, 0, None, "")], "")
        assert set(ours) == set(note) - {"path"}
        assert set(ours["alerts"][0]) == set(note["alerts"][0])

        # the API and /metrics tell the same story
        firing = httpx.get(f"{srv.url}/api/sla/breaches", headers=srv.auth, params={"status": "firing"}).json()[
            "breaches"
        ]
        assert {(b_["region"], b_["severity"]) for b_ in firing} == {("EU", "page"), ("EU", "ticket")}
        page = next(b_ for b_ in firing if b_["severity"] == "page")
        assert page["value"] == pytest.approx(100.0)  # every EU item decided in the last hour was late
        stuck = httpx.get(
            f"{srv.url}/api/sla/stuck",
            headers=srv.auth,
            params={"sla": "invoice_posted", "region": "EU", "at": iso(t1)},
        ).json()["items"]
        # started 4h22..4h44 (every 2 minutes), past 15 minutes and not posted by 5h00 (4h20's posting starts at 5h00)
        assert len(stuck) == 12
        burn = metric_values(srv.url, "tower_sla_burn_rate")
        eu5m = (("region", "EU"), ("sla", "invoice_posted"), ("step", "invoice_to_ledger"), ("window", "5m"))
        na5m = (("region", "NA"), ("sla", "invoice_posted"), ("step", "invoice_to_ledger"), ("window", "5m"))
        assert burn[eu5m] == pytest.approx(100.0) and burn[na5m] == 0.0
        fire = metric_values(srv.url, "tower_sla_alert_firing")
        assert {dict(k)["region"] for k in fire} == {"EU"} and len(fire) == 2
        compliance = metric_values(srv.url, "tower_sla_compliance_ratio")
        assert compliance[(("region", "NA"), ("sla", "invoice_posted"), ("step", "invoice_to_ledger"))] == 1.0

        # still firing two minutes later: re-sent, same episode, still one group and no new notification
        doc = evaluate(srv.url, TOKEN, t1 + 2 * MIN)
        assert doc["started"] == [] and len(doc["firing"]) == 2
        (group,) = alertmanager.wait_groups(1)
        assert all(a["startsAt"].startswith(iso(t1)[:19]) for a in group["alerts"])
        time.sleep(2.5)  # > group_interval: a changed group would have been notified again by now
        assert len(alertmanager.receiver.messages) == 1

        # the delay ended at 5h; by 12h even the ticket's 6h short window is clean: everything resolves
        t2 = b + 720 * MIN
        doc = evaluate(srv.url, TOKEN, t2)
        assert doc["firing"] == [] and sorted(r["severity"] for r in doc["resolved"]) == ["page", "ticket"]
        assert alertmanager.wait_groups(0) == []
        notes = alertmanager.receiver.wait(2)
        assert [n["status"] for n in notes] == ["firing", "resolved"]
        assert notes[1]["groupLabels"] == EU_GROUP
        past = httpx.get(
            f"{srv.url}/api/sla/breaches", headers=srv.auth, params={"status": "resolved", "region": "EU"}
        ).json()
        assert past["firing"] == 0 and len(past["breaches"]) == 2
        assert all(b_["ends_at"].startswith(iso(t2)[:19]) for b_ in past["breaches"])
        assert (
            httpx.get(f"{srv.url}/api/sla/breaches", headers=srv.auth, params={"region": "NA"}).json()["breaches"] == []
        )


def test_clean_estate_fires_nothing(tmp_path: Path, alertmanager: Alertmanager) -> None:
    with (
        Receiver() as hook,
        TowerServer(
            tmp_path / "tower",
            TOWER_ADMIN_TOKEN=TOKEN,
            TOWER_SLA_EVAL_INTERVAL_S="0",
            TOWER_ALERTMANAGER_URL=alertmanager.url,
            TOWER_SLA_WEBHOOK_URLS=f'["{hook.url}"]',
        ) as srv,
    ):
        b = base_ns(13)
        invoices = send_estate(srv.url, b, 12)
        wait_stored(srv.url, invoices[-1], srv.auth)
        for hours in (1, 5, 12):
            doc = evaluate(srv.url, TOKEN, b + hours * 60 * MIN)
            assert doc["firing"] == [] and doc["started"] == []
        time.sleep(2.5)  # > Alertmanager's group_wait
        assert alertmanager.groups() == []
        assert alertmanager.receiver.messages == [] and hook.messages == []
        assert httpx.get(f"{srv.url}/api/sla/breaches", headers=srv.auth).json()["breaches"] == []
        compliance = httpx.get(f"{srv.url}/api/sla/compliance", headers=srv.auth).json()["objectives"]
        assert {(c["region"], c["compliance"], c["stuck"]) for c in compliance} == {
            ("NA", 1.0, 0),
            ("EU", 1.0, 0),
            ("APAC", 1.0, 0),
        }


def test_backfills_record_nothing_firing_alerts_outlive_slow_evaluations_and_lost_resolutions_are_resent(
    embedded_store: Store, alertmanager: Alertmanager
) -> None:
    """The service in-process on real chDB, the real Alertmanager behind a fault proxy."""
    migrated(embedded_store)
    scenario(embedded_store)
    with FaultProxy(alertmanager.url) as proxy:
        settings = Settings(
            database=embedded_store.database,
            alertmanager_url=proxy.url,
            sla_eval_interval_s=600,  # evaluations further apart than Alertmanager's resolve_timeout (5m)
            alertmanager_resend_s=60,
        )
        svc = SlaService(settings, embedded_store)
        first = svc.evaluate(T + 60 * M)
        firing = sorted(b.breach_id for b in first.transitions.firing)
        assert firing and first.delivery["alertmanager"]["sent"] == len(firing)
        active = alertmanager.wait_alerts(lambda alerts: len(alerts) == len(firing))
        assert len(active) == len(firing)
        for a in active:  # held for 4 x max(600 s, 60 s), not Alertmanager's 5 minutes
            held = dt.datetime.fromisoformat(a["endsAt"]) - dt.datetime.fromisoformat(a["updatedAt"])
            assert dt.timedelta(minutes=39) < held <= dt.timedelta(minutes=40)

        # a back-fill (an instant before the last recorded one) is assessed, not recorded, not delivered
        posts = len(proxy.seen)
        past = svc.evaluate(T + 5 * M)
        assert not past.recorded and past.delivery == {} and len(proxy.seen) == posts
        assert sorted(r["breach_id"] for r in sla_store.open_breaches(embedded_store)) == firing
        assert svc.last is first
        assert svc.evaluate(0, record=False).to_json()["evaluated_at"].startswith("1970-01-01")  # 0 is an instant
        assert svc.evaluate(T + 61 * M).transitions.started == []  # the same episodes go on

        # the resolution Alertmanager refuses is sent again with the next delivery
        proxy.plan.extend(["503"] * 3)  # the client's three attempts
        ended = svc.evaluate(T + 24 * 60 * M)
        assert len(ended.transitions.resolved) == len(firing) and "error" in ended.delivery["alertmanager"]
        assert len(alertmanager.wait_alerts(lambda alerts: False, timeout=1.0)) == len(firing)  # still active
        again = svc.evaluate(T + 24 * 60 * M + M)
        assert again.delivery["alertmanager"]["sent"] == len(firing)
        assert alertmanager.wait_alerts(lambda alerts: alerts == []) == []


def test_an_assessment_that_records_nothing_logs_no_breach_starts(
    embedded_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """GET /api/sla/compliance before the first scheduled evaluation assesses without recording; it logged
    "3 started" on every read while no breach was stored or delivered."""
    migrated(embedded_store)
    scenario(embedded_store)
    svc = SlaService(Settings(database=embedded_store.database), embedded_store)
    with caplog.at_level(logging.INFO, logger="tower.sla"):
        assessed = svc.evaluate(T + 60 * M, record=False)
        assert assessed.transitions.started and not assessed.recorded
        assert not [r for r in caplog.records if "started" in r.getMessage()]
        recorded = svc.evaluate(T + 60 * M)
        assert recorded.recorded
        assert [r for r in caplog.records if f"{len(recorded.transitions.started)} started" in r.getMessage()]
