"""The project's simulated estate (connectors/simulator) against a real `tower serve` with the demo SLA file
that `tower demo` uses: a clean estate (every fault rate 0) fires nothing at any instant, although it holds
declined payments, refunds, partial and multi-invoice payments and repeated profile changes; the same estate
with the default fault mix fires only where the manifest put SLA-relevant faults."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import httpx
import pytest

from connectors.simulator.config import FaultRates
from connectors.simulator.live import LiveEstate, demo_config
from connectors.simulator.telemetry import Telemetry
from tests.server import TowerServer
from tests.sla_estate import evaluate
from tower_core.demo import demo_sla

pytestmark = pytest.mark.slow
TOKEN = "sla-sim-admin-token"
# faults after which an item never reaches the target system, or reaches it late
SLA_FAULTS = {
    "invoice_posted": {"erp_posting_delayed", "erp_posting_missing", "erp_business_rejection"},
    "payment_applied": {"payment_not_applied", "partial_payment_under_applied"},
    "refund_posted": {"refund_not_posted"},
    "customer_synced": {"customer_missing_in_billing"},
}


def play(tmp_path: Path, faults: FaultRates) -> tuple[list[list[dict]], LiveEstate]:
    """Play 30 minutes of estate that ended 10 minutes ago, then evaluate at 10, 20, 30 and 40 minutes."""
    with TowerServer(
        tmp_path / "tower",
        TOWER_ADMIN_TOKEN=TOKEN,
        TOWER_SLA_EVAL_INTERVAL_S="0",
        TOWER_SLA_CONFIG=str(demo_sla()),
    ) as srv:
        start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=40)
        config = demo_config(seed=5, rate_per_min=20, horizon_min=30, customers=40, start=start, fault_rates=faults)
        telemetry = Telemetry(srv.url)
        estate = LiveEstate(config, telemetry)
        estate.advance(int(time.time() * 1000))  # the whole timeline up to now, with its own timestamps
        telemetry.flush(10)
        telemetry.shutdown()
        last = max(estate.invoices)
        deadline = time.monotonic() + 30
        while (
            httpx.get(f"{srv.url}/api/transactions", headers=srv.auth, params={"invoice_id": last}).status_code != 200
        ):
            assert time.monotonic() < deadline, "the estate's spans were not stored"
            time.sleep(0.2)
        time.sleep(1)  # the events of the last batch
        firing = []
        for minutes in (10, 20, 30, 40):
            at = int((start + dt.timedelta(minutes=minutes)).timestamp() * 1e9)
            firing.append(evaluate(srv.url, TOKEN, at)["firing"])
        return firing, estate


def test_clean_simulated_estate_fires_nothing(tmp_path: Path) -> None:
    firing, estate = play(tmp_path, FaultRates.clean())
    assert len(estate.manifest.faults) == 0 and estate.counts["payment"] > 100
    assert firing == [[], [], [], []]


def test_faulty_simulated_estate_fires_only_where_the_manifest_says(tmp_path: Path) -> None:
    firing, estate = play(tmp_path, FaultRates.default())
    fired = {(b["sla"], b["region"]) for at in firing for b in at}
    assert fired, "the default fault mix should breach something"
    allowed = {(sla, f.region) for f in estate.manifest.faults for sla, kinds in SLA_FAULTS.items() if f.fault in kinds}
    outage = any(f.fault == "erp_outage" for f in estate.manifest.faults)
    unexplained = {
        (sla, region)
        for sla, region in fired - allowed
        if not (outage and sla in ("invoice_posted", "payment_applied", "refund_posted"))
    }
    assert unexplained == set()
