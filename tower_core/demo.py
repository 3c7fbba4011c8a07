"""``tower demo``: the API (embedded store) and the dashboard as child processes, stopped together."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

from tower_core.errors import ConfigError
from tower_core.settings import Settings


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_demo(settings: Settings, *, reset: bool = False) -> int:
    from dashboard.launch import dashboard_command, dashboard_env

    if settings.clickhouse_url:
        raise ConfigError("tower demo runs on the embedded store; unset TOWER_CLICKHOUSE_URL")
    if reset:
        for path in (settings.data_dir, settings.wal_dir):
            shutil.rmtree(path, ignore_errors=True)
    api = subprocess.Popen([sys.executable, "-m", "tower_core.cli", "serve"])
    procs = [api]
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            if api.poll() is not None:
                return api.returncode or 1
            try:
                if httpx.get(f"{settings.api_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"the API did not become ready at {settings.api_url} within 60 s")
            time.sleep(0.3)
        procs.append(subprocess.Popen(dashboard_command(settings), env=dashboard_env(settings)))
        print(f"API:       {settings.api_url}  (docs at {settings.api_url}/docs)", flush=True)
        print(f"Dashboard: http://127.0.0.1:{settings.dashboard_port}", flush=True)
        print("Ctrl-C stops everything; data is kept for the next run (--reset starts fresh).", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return next((p.returncode for p in procs if p.poll() is not None and p.returncode), 0)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(procs)
