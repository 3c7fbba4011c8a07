"""A running tower with a known estate for the dashboard tests.

The simulated estate (connectors/simulator, default fault mix, small) is served over its loopback HTTP API
from the test process; ``tower serve`` (a subprocess owning its chDB path) reconciles it through the
simulator's HTTP connectors, so drift items, corrective syncs and the next run's resolution are real. Flow-step
spans for a few invoices go through the real OpenTelemetry SDK (OTLP/HTTP) so the transactions and SLA
compliance have data: per region a known number of invoices posted on time and late.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from connectors.simulator import Estate, EstateConfig, FaultRates
from connectors.simulator.server import SimServer
from tests.conftest import free_port
from tests.server import TowerServer

ADMIN = "adm-dashboard-test"
MIN_NS = 60_000_000_000


class ServedEstate:
    """What the simulator's HTTP API serves: the in-memory systems of a generated estate."""

    def __init__(self, estate: Estate) -> None:
        self.estate = estate
        self.billing, self.erp, self.cdp = estate.billing, estate.erp, estate.cdp

    def manifest_json(self) -> str:
        return self.estate.manifest.to_json()

    def flows(self) -> list[dict[str, Any]]:
        return []


def small_estate(seed: int = 11, invoices: int = 300) -> Estate:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    config = EstateConfig(
        seed=seed,
        customers=40,
        invoices=invoices,
        start=now - dt.timedelta(days=40),
        as_of=now - dt.timedelta(hours=1),
        fault_rates=FaultRates.default(),
    )
    estate = Estate.generate(config)
    estate.set_clock(lambda: dt.datetime.now(dt.UTC))
    return estate


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Tower:
    server: TowerServer
    sim: SimServer
    estate: Estate
    tokens: dict[str, str] = field(default_factory=dict)  # role -> token

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, method: str, path: str, token: str = ADMIN, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers=auth(token), timeout=60, **kwargs)

    def run(self, full: bool = True, timeout: float = 120) -> dict[str, Any]:
        """A reconciliation run through the API, waited for."""
        r = self.call("POST", "/api/runs", json={"full": full})
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.call("GET", f"/api/runs/{run_id}").json()
            if doc.get("state") in ("succeeded", "failed"):
                assert doc["state"] == "succeeded", doc
                return doc
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} did not end")

    def token(self, name: str, role: str) -> str:
        r = self.call("POST", "/api/tokens", json={"name": name, "role": role})
        assert r.status_code == 201, r.text
        self.tokens[role] = r.json()["token"]
        return self.tokens[role]

    def items(self, **params: Any) -> list[dict[str, Any]]:
        return self.call("GET", "/api/drift", params={"limit": 1000, **params}).json()["items"]


@contextmanager
def running_tower(workdir: Path, estate: Estate | None = None, **env: str) -> Iterator[Tower]:
    estate = estate or small_estate()
    sim = SimServer(ServedEstate(estate), port=free_port()).start()
    server = TowerServer(
        workdir,
        TOWER_ADMIN_TOKEN=ADMIN,
        TOWER_RECONCILE_CONNECTORS="simulator",
        TOWER_SIMULATOR_URL=sim.url,
        TOWER_RECONCILE_INTERVAL_S="0",
        TOWER_RECONCILE_FULL_INTERVAL_S="0",
        TOWER_RECONCILE_ACTIONS_INTERVAL_S="0",
        TOWER_SLA_EVAL_INTERVAL_S="0",
        **env,
    )
    try:
        server.start()
        yield Tower(server, sim, estate)
    finally:
        server.stop()
        sim.stop()


def send_step_spans(url: str, plan: dict[str, tuple[int, int]], start_ns: int, prefix: str = "inv_sla") -> list[str]:
    """Per region (on time, late): invoices whose billing span starts a minute apart from ``start_ns`` and
    whose ERP posting comes 1 minute (on time) or 40 minutes (late; the SLA is 15 min) later. Each system
    exports with its own trace (context lost at the batch boundary), joined by the invoice id."""
    tracers, providers = {}, []
    for system in ("billing", "erp"):
        provider = TracerProvider(resource=Resource.create({"service.name": f"dash-{system}"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{url}/v1/traces")))
        providers.append(provider)
        tracers[system] = provider.get_tracer(f"dash.{system}")
    invoices = []
    for region, (on_time, late) in plan.items():
        for i in range(on_time + late):
            inv = f"{prefix}_{region}_{i:03d}"
            invoices.append(inv)
            t = start_ns + i * MIN_NS
            latency = (40 if i >= on_time else 1) * MIN_NS
            common = {"revops.step": "invoice_to_ledger", "revops.region": region, "revops.invoice.id": inv}
            billing = tracers["billing"].start_span(
                "invoice.finalized", start_time=t, attributes={**common, "revops.system": "billing"}
            )
            billing.end(end_time=t + 200_000_000)
            erp = tracers["erp"].start_span(
                "erp.post_invoice", start_time=t + latency, attributes={**common, "revops.system": "erp"}
            )
            erp.end(end_time=t + latency + 300_000_000)
    for provider in providers:
        provider.force_flush()
        provider.shutdown()
    return invoices


def send_billing_span(url: str, invoice_id: str, region: str, at_ns: int) -> None:
    """Only the billing side of an invoice's posting step (the ERP never posted it: missing_in_erp)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "dash-billing"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{url}/v1/traces")))
    span = provider.get_tracer("dash.billing").start_span(
        "invoice.finalized",
        start_time=at_ns,
        attributes={
            "revops.step": "invoice_to_ledger",
            "revops.region": region,
            "revops.invoice.id": invoice_id,
            "revops.system": "billing",
        },
    )
    span.end(end_time=at_ns + 150_000_000)
    provider.force_flush()
    provider.shutdown()


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} not reached after {timeout}s")
