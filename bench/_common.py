"""Helpers shared by the bench scripts: realistic OTLP requests, a server subprocess, RSS readings."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = (
    ("cdp", "segment", "cdp_to_billing"),
    ("billing", "stripe-billing", "invoice_to_ledger"),
    ("erp", "tryton-erp", "invoice_to_ledger"),
)
REGIONS = ("NA", "EU", "APAC")
CURRENCIES = ("USD", "EUR", "GBP", "JPY")


def realistic_request(first_span: int, n: int, seed: int = 0, base_ns: int = 1_767_225_600_000_000_000) -> bytes:
    """n spans in 3 systems, 12-16 attributes each (revops keys, HTTP, DB), parent/child within traces."""
    rnd = random.Random(seed * 1_000_003 + first_span)
    req = ExportTraceServiceRequest()
    per_system = {}
    for system, service, _ in SYSTEMS:
        rs = req.resource_spans.add()
        for k, v in (
            ("service.name", service),
            ("revops.system", system),
            ("deployment.environment", "prod"),
            ("host.name", f"{service}-{rnd.randint(1, 9)}"),
        ):
            rs.resource.attributes.add(key=k).value.string_value = v
        ss = rs.scope_spans.add()
        ss.scope.name, ss.scope.version = f"revops.{system}", "1.4.2"
        per_system[system] = ss
    for i in range(first_span, first_span + n):
        system, service, step = SYSTEMS[i % 3]
        txn = i // 3
        region = REGIONS[txn % 3]
        sp = per_system[system].spans.add()
        sp.trace_id = (txn * 3 + i % 3 + 1).to_bytes(16, "big")
        sp.span_id = (i + 1).to_bytes(8, "big")
        sp.name = f"{system}.{step}"
        sp.kind = 2
        start = base_ns + txn * 1_000_000 + (i % 3) * 300_000_000
        sp.start_time_unix_nano = start
        sp.end_time_unix_nano = start + rnd.randint(1_000_000, 80_000_000)
        attrs = {
            "revops.system": system,
            "revops.region": region,
            "revops.step": step,
            "revops.customer.id": f"cus_{txn % 50_000:06d}",
            "revops.invoice.id": f"in_{txn:09d}",
            "revops.currency": CURRENCIES[txn % 4],
            "http.request.method": "POST",
            "http.route": f"/v1/{step}",
            "server.address": f"{service}.internal",
            "db.system": "postgresql",
            "db.operation.name": "INSERT",
            "user_agent.original": "revops-sim/1.0",
        }
        if system == "erp":
            attrs["revops.ledger.entry.id"] = f"je_{txn:09d}"
        for k, v in attrs.items():
            sp.attributes.add(key=k).value.string_value = v
        sp.attributes.add(key="revops.amount_minor").value.int_value = rnd.randint(100, 10_000_000)
        sp.attributes.add(key="http.response.status_code").value.int_value = 200
        sp.status.code = 1
    return req.SerializeToString()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tower serve` on a fresh directory, as a subprocess."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
        self.env.update(
            {
                "TOWER_DATA_DIR": str(workdir / "data"),
                "TOWER_WAL_DIR": str(workdir / "wal"),
                "TOWER_PORT": str(self.port),
                **env,
            }
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        workdir = self.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(workdir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tower_core.cli", "serve"],
            cwd=workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"tower serve exited: see {workdir / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("tower serve did not become ready")

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident set size of the server in MB."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = {ln.split(":")[0]: ln.split(":")[1].strip() for ln in status.splitlines() if ":" in ln}
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (user + system, all its threads: chDB's too)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    prefix = f"{name}{{{labels}}}" if labels else name
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix + " "))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
