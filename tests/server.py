"""Run ``tower serve`` as a real subprocess on loopback (its own chDB path), for HTTP-level tests."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
_MIGRATED: Path | None = None


def migrated_data_dir() -> Path:
    """A chDB data dir that ``tower migrate`` built, once per test process (kept until it exits).

    A server's first start on an empty data dir spends ~2 CPU-seconds migrating it, and the suite starts dozens of
    them on two cores; TowerServer starts from a copy of this one. The migrations themselves are tested where they
    are the subject (test_cli, test_migration_checksums, test_store_contract, the ClickHouse-HTTP tests)."""
    global _MIGRATED
    if _MIGRATED is None:
        base = Path(tempfile.mkdtemp(prefix="tower-migrated-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOWER_", "OTEL_"))}
        env["TOWER_DATA_DIR"] = str(base / "data")
        done = subprocess.run(
            [sys.executable, "-m", "tower_core.cli", "migrate"], cwd=base, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"tower migrate failed: {done.stdout}{done.stderr}")
        _MIGRATED = base / "data"
    return _MIGRATED


class TowerServer:
    def __init__(self, workdir: Path, **env: str) -> None:
        """A first start on the embedded store copies migrated_data_dir() instead of migrating."""
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TOWER_", "OTEL_"))}
        self.env.update(
            {
                "TOWER_DATA_DIR": str(workdir / "data"),
                "TOWER_WAL_DIR": str(workdir / "wal"),
                "TOWER_PORT": str(self.port),
                "TOWER_API_URL": self.url,
                "TOWER_FLUSH_INTERVAL_S": "0.2",
                "TOWER_ADMIN_TOKEN": "tower-tests-admin",  # every API read needs a token
            }
        )
        self.env.update(env)
        self.auth = {"Authorization": f"Bearer {self.env['TOWER_ADMIN_TOKEN']}"}
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "server.log"

    def start(self, timeout: float = 60, until: str = "/readyz") -> TowerServer:
        """Start and wait until ``until`` answers 200 (``/healthz``: up, whether or not its store answers)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / self.env["TOWER_DATA_DIR"]  # as tower serve, started in workdir, reads it
        if not self.env.get("TOWER_CLICKHOUSE_URL") and not data.exists():
            shutil.copytree(migrated_data_dir(), data, symlinks=True)  # chDB links tables by relative paths
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tower_core.cli", "serve"],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tower serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}{until}", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("tower serve did not become ready")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> TowerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
