"""``tower reconcile`` (a run through the API, with a progress bar) and ``tower reconciler`` (the scheduled
jobs in a process of their own, beside a ClickHouse server). The chDB path belongs to ``tower serve``, so
the CLI never opens it: it asks the API."""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tower_core.api_answers import detail, json_answer
from tower_core.errors import ConfigError, StoreUnreachable, one_line
from tower_core.redact import redact_url
from tower_core.settings import Settings

POLL_S = 0.2
# behind a load balancer, another API replica than the one that accepted the run may not know it for a moment
# (the accepting one stores its record as the run starts): a 404 this soon after the start is asked again
NOT_YET_VISIBLE_S = 10.0


def _token(settings: Settings) -> str:
    for secret in (settings.api_token, settings.admin_token):
        if secret is not None and secret.get_secret_value():
            return secret.get_secret_value()
    raise ConfigError("set TOWER_API_TOKEN to an operator token (POST /api/tokens) to start runs through the API")


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the API at {redact_url(str(client.base_url))}: {exc}") from None
    if response.status_code in (401, 403):
        raise ConfigError(f"the API refused the token ({response.status_code}): {detail(response)}")
    return response


def reconcile_via_api(
    settings: Settings,
    *,
    region: str = "",
    full: bool = False,
    as_of: dt.datetime | None = None,
    console: Console | None = None,
    timeout_s: float = 3600.0,
) -> int:
    """Start a run and follow it to the end; 0 when it succeeded, 1 when it failed."""
    out = console or Console()
    headers = {"Authorization": f"Bearer {_token(settings)}"}
    body: dict[str, Any] = {"full": full, "region": region}
    if as_of is not None:
        body["as_of"] = as_of.isoformat()
    with httpx.Client(base_url=settings.api_url, headers=headers, timeout=30.0) as client:
        started = _call(client, "POST", "/api/runs", json=body)
        if started.status_code == 409:
            raise ConfigError(detail(started))
        run_id = str(json_answer(started, "the run was not started").get("run_id") or "")
        if not run_id:
            raise ConfigError("the run was not started: the API's answer names no run")
        accepted = time.monotonic()
        deadline = accepted + timeout_s
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=out, transient=False) as bar:
            task = bar.add_task(f"run {run_id}: starting", total=7)
            while True:
                answer = _call(client, "GET", f"/api/runs/{run_id}")
                if answer.status_code == 404 and time.monotonic() - accepted < NOT_YET_VISIBLE_S:
                    time.sleep(POLL_S)
                    continue
                doc = json_answer(answer, f"run {run_id}")
                progress = doc.get("progress") or {}
                bar.update(
                    task,
                    total=max(int(progress.get("total") or 7), 1),
                    completed=int(progress.get("done") or 0),
                    description=f"run {run_id}: {progress.get('stage') or doc.get('state')}",
                )
                if doc.get("state") in ("succeeded", "failed"):
                    break
                if time.monotonic() > deadline:
                    raise ConfigError(f"run {run_id} did not finish within {timeout_s:.0f}s")
                time.sleep(POLL_S)
        residual = "none"
        if doc["state"] == "succeeded" and doc.get("residual_minor"):  # per currency: they never add up
            query = {"run_id": run_id, "limit": 1}
            statement = json_answer(_call(client, "GET", "/api/statements", params=query), f"run {run_id}'s statement")
            by_currency = statement.get("residual_by_currency") or {}
            residual = ", ".join(f"{c} {n} minor units" for c, n in by_currency.items()) or str(doc["residual_minor"])
    if doc["state"] == "failed":  # the error line goes where every other command's does
        err = Console(stderr=True, soft_wrap=True)
        error = one_line(str(doc.get("error")), 1000)
        err.print(f"tower: error: run {run_id} failed: {error}", markup=False, highlight=False)
        return 1
    out.print(
        f"run {run_id} ({doc.get('mode')}{', region ' + doc['region'] if doc.get('region') else ''}) succeeded: "
        f"{doc.get('drift_new')} new, {doc.get('drift_resolved')} resolved, {doc.get('drift_open')} open drift "
        f"items; unexplained residual: {residual}",
        markup=False,
        highlight=False,
    )
    skipped = sum(n for k, n in (doc.get("pulled") or {}).items() if k.endswith("_skipped"))
    if skipped:
        out.print(
            f"{skipped} source records could not be mapped and were skipped: GET /api/sources/skipped",
            markup=False,
            highlight=False,
        )
    return 0


def run_reconciler(settings: Settings, stop: threading.Event | None = None) -> int:
    """The scheduled jobs beside a ClickHouse server, until SIGINT/SIGTERM (or ``stop`` is set)."""
    if not settings.clickhouse_url:
        raise ConfigError(
            "`tower reconciler` runs beside a ClickHouse server: set TOWER_CLICKHOUSE_URL "
            "(on the embedded store the jobs run inside `tower serve`)"
        )
    from collector.scheduler import create_scheduler
    from reconciler.service import RUN_STOP_WAIT_S, ReconcilerService
    from tower_core.store import migrate, open_store
    from tower_core.store.reach import retry_until_reached

    # the jobs are this process's reason to be: TOWER_RECONCILE_SCHEDULER=false, set for the API beside it (and
    # often shared with it), must not turn them off here
    settings = settings.model_copy(update={"reconcile_scheduler": True})
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    store = open_store(settings, connect=False)  # a bad URL stops here

    def ready_store() -> None:
        store.connect()
        migrate(store)

    try:
        ready_store()
    except StoreUnreachable as exc:  # a server that does not answer yet (restarting): waited for, as `tower serve` does
        console = Console(stderr=True, markup=False, highlight=False)
        console.print(f"{exc}: waiting for it (Ctrl-C stops)")
        if not retry_until_reached(ready_store, stop, lambda n, e: console.print(f"still waiting (attempt {n}: {e})")):
            return 0  # stopped while waiting
    service = ReconcilerService(settings, store)
    # the API's scheduler: a turn that wakes up to 60 s late still runs (APScheduler's default of 1 s dropped the
    # turn of a process paused or busy for 2 s, the daily full run's included)
    scheduler = create_scheduler()
    service.start(scheduler)
    scheduler.start()
    Console().print(f"reconciler jobs running against {store.database} (Ctrl-C stops)", markup=False)
    try:
        stop.wait()
    finally:
        service.stop(timeout_s=RUN_STOP_WAIT_S)  # a run in progress ends at its next stage, recorded
        scheduler.shutdown(wait=True)
        store.close()
    return 0
