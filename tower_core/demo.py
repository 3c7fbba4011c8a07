"""``tower demo``: the API on the embedded store (with its scheduler), the estate at demo pace and the
dashboard, as child processes stopped together.

The API owns the chDB path; the estate process talks to it only over HTTP (telemetry in) and serves its
simulated billing/ERP/CDP on a loopback port, which the reconciler inside the API pulls from
(``TOWER_RECONCILE_CONNECTORS=simulator``). Each run plays a fresh invoice-number range, so the data kept
from earlier runs never collides with the new estate; ``--reset`` deletes everything first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from collector.wal import claim as claim_buffer_dir
from tower_core.children import die_with_parent
from tower_core.errors import ConfigError
from tower_core.settings import Settings, own_api_url
from tower_core.store.embedded import data_dir_owner

RUN_RANGE = 10_000_000  # invoice numbers per demo run


def demo_sla() -> Path:
    """SLA definitions tuned to demo pace (shipped with the simulator)."""
    import connectors.simulator

    return Path(connectors.simulator.__file__).with_name("demo_sla.yaml")


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Children run in their own session: a terminal Ctrl-C reaches only the demo, which stops them in
    order (dashboard, estate, API), so the estate's last telemetry still reaches the API."""
    return subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=die_with_parent)


def _stop(procs: list[subprocess.Popen], timeout_s: float = 20) -> None:
    """SIGINT each child still running, newest first, wait for it, kill it if it does not stop."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def prepare_run(settings: Settings, *, reset: bool) -> int:
    """``--reset`` deletes the store's data, the write-ahead buffer and the run counter; then the number of
    this demo run (kept beside the data dir), so each run plays its own range of invoice ids."""
    if reset:
        # never another tower's: a reset beside a running `tower serve` on the same dirs deleted its data and buffer
        owner = data_dir_owner(Path(settings.data_dir))
        if owner:
            raise ConfigError(f"data dir {settings.data_dir} is owned by {owner}: stop it before --reset deletes it")
        if Path(settings.wal_dir).is_dir():
            os.close(claim_buffer_dir(Path(settings.wal_dir)))  # refuses a buffer another process holds
        for path in (settings.data_dir, settings.wal_dir):
            shutil.rmtree(path, ignore_errors=True)
        (Path(settings.data_dir).parent / "simulator-run").unlink(missing_ok=True)
    path = Path(settings.data_dir).parent / "simulator-run"
    try:
        run = int(path.read_text().strip()) + 1
    except (OSError, ValueError):
        run = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(run))
    return run


def _wait_ready(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ConfigError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"{what} did not become ready at {url} within {timeout_s:.0f} s")
        time.sleep(0.3)


def estate_env(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The simulated estate's environment: its OTLP exporters and event sender carry the first ingest token
    when the tower requires one (OTEL_EXPORTER_OTLP_HEADERS, unless the user set it)."""
    env = dict(os.environ if environ is None else environ)
    if settings.ingest_tokens:
        token = quote(settings.ingest_tokens[0].get_secret_value(), safe="")
        env.setdefault("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization=Bearer%20{token}")
    return env


def api_env(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The API child's environment: reconcile against the estate, often, unless the user chose otherwise."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("TOWER_RECONCILE_CONNECTORS", "simulator")
    env.setdefault("TOWER_SIMULATOR_URL", f"http://127.0.0.1:{settings.simulator_port}")
    env.setdefault("TOWER_RECONCILE_INTERVAL_S", "60")
    env.setdefault("TOWER_SLA_EVAL_INTERVAL_S", "30")
    env.setdefault("TOWER_ADMIN_TOKEN", secrets.token_urlsafe(32))  # mints the dashboard's operator token
    if demo_sla().exists():
        env.setdefault("TOWER_SLA_CONFIG", str(demo_sla()))
    return env


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ANY = ("0.0.0.0", "::", "")


def demo_api_url(settings: Settings) -> str:
    """Where the demo's own API answers: TOWER_HOST:TOWER_PORT. TOWER_API_URL, when set, must name it: the demo
    waited on TOWER_API_URL and sent the estate's telemetry there, into another tower when the two differed."""
    host = "127.0.0.1" if settings.host in _ANY else settings.host
    own = own_api_url(settings)
    if "api_url" not in settings.model_fields_set:
        return own
    url = urlsplit(settings.api_url)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        port = -1
    same_host = url.hostname == host or (url.hostname in _LOOPBACK and (host in _LOOPBACK or settings.host in _ANY))
    if url.scheme == "http" and same_host and port == settings.port:
        return settings.api_url.rstrip("/")
    raise ConfigError(
        f"TOWER_API_URL does not name the demo's own API at {own} (TOWER_HOST, TOWER_PORT): unset it or make "
        "them agree, or the demo would send its simulated estate to another tower"
    )


def run_demo(settings: Settings, *, reset: bool = False) -> int:
    from dashboard.launch import dashboard_command, dashboard_env, demo_token
    from tower_core.ports import check_port_free

    if settings.clickhouse_url:
        raise ConfigError("tower demo runs on the embedded store; unset TOWER_CLICKHOUSE_URL")
    settings = settings.model_copy(update={"api_url": demo_api_url(settings)})
    # before anything starts: with its port taken, the API child fails while another tower there answers the
    # readiness check, and the estate would send its simulated telemetry to that one
    for host, port in (
        (settings.host, settings.port),
        ("127.0.0.1", settings.simulator_port),
        (settings.dashboard_host, settings.dashboard_port),
    ):
        check_port_free(host, port)
    run = prepare_run(settings, reset=reset)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops the demo even when a script started it in the background: POSIX shells start background
        # jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    tower = [sys.executable, "-m", "tower_core.cli"]
    procs: list[subprocess.Popen] = []
    try:
        env = api_env(settings)
        api = _spawn([*tower, "serve"], env=env)
        procs.append(api)
        _wait_ready(f"{settings.api_url}/readyz", api, "the API")
        estate = _spawn(
            [
                *tower,
                "simulate",
                "run",
                "--api-url",
                settings.api_url,
                "--port",
                str(settings.simulator_port),
                "--id-offset",
                str(run * RUN_RANGE),
                "--manifest",
                str(Path(settings.data_dir).parent / f"demo-manifest-run{run}.json"),
            ],
            env=estate_env(settings),
        )
        procs.append(estate)
        _wait_ready(f"http://127.0.0.1:{settings.simulator_port}/healthz", estate, "the simulated estate")
        token = demo_token(settings, env["TOWER_ADMIN_TOKEN"])  # the dashboard signs in as an operator
        procs.append(_spawn(dashboard_command(settings), env=dashboard_env(settings, token)))
        print(f"API:       {settings.api_url}  (docs at {settings.api_url}/docs)", flush=True)
        print(f"Dashboard: http://{settings.dashboard_host}:{settings.dashboard_port}", flush=True)
        print(f"Estate:    http://127.0.0.1:{settings.simulator_port}  (simulated billing/ERP/CDP, run {run})")
        print("Ctrl-C stops everything; data is kept for the next run (--reset starts fresh).", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        failed = next((p for p in procs if p.poll() is not None), None)
        return failed.returncode or 1 if failed is not None else 0
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(procs)
