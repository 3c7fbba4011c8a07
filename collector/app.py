"""FastAPI application factory: wires settings, the store and one router per resource."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from collector import access_log
from collector.audit import AuditRefusals
from collector.auth import TokenVerifier, get_principal, require, route_role
from collector.ingest import IngestService
from collector.limits import BodySizeLimit
from collector.routers import actions as action_routes
from collector.routers import audit as audit_routes
from collector.routers import bulk as bulk_routes
from collector.routers import (
    cdp,
    drift,
    events,
    health,
    lookups,
    metrics,
    otlp,
    runs,
    sources,
    statements,
    tokens,
    webhooks,
)
from collector.routers import dead_letters as dead_letter_routes
from collector.routers import overview as overview_routes
from collector.routers import sla as sla_routes
from collector.scheduler import create_scheduler
from collector.store_bring_up import StoreBringUp
from collector.telemetry import setup_telemetry
from collector.telemetry import shutdown as shutdown_telemetry
from reconciler.service import RUN_STOP_WAIT_S, ReconcilerService
from reconciler.sla.prom import SlaCollector
from reconciler.sla.service import SlaService
from tower_core.api_answers import STORE_UNAVAILABLE_HEADER
from tower_core.errors import StoreError
from tower_core.settings import Settings
from tower_core.store import Store

log = logging.getLogger("tower.api")


def _echoable(value: Any) -> Any:
    """A validation error's values as the JSON answer that echoes the rejected input can hold them (each was a
    500 instead of the 422): NaN and infinities (Python's JSON reader accepts them in a body) as text, a lone
    surrogate (``"\\ud800"`` in a body) and bytes that are not UTF-8 (a body of another content type) escaped."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_echoable(str(k)): _echoable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_echoable(v) for v in value]
    return value


def create_app(settings: Settings, store: Store, *, bring_up: StoreBringUp | None = None) -> FastAPI:
    """``bring_up``: the store did not answer at start; the app uses its gated view (``bring_up.store``, which
    answers 503 until reached and migrated), takes ingest into its buffer meanwhile and starts what needs the store
    once ``bring_up`` has reached it (collector.store_bring_up)."""
    if bring_up is not None:
        store = bring_up.store  # type: ignore[assignment]  # a Store until reached, then the store itself
    ingest = IngestService(settings, store, store_ready=bring_up is None)
    scheduler = create_scheduler()  # shared by periodic jobs (SLA evaluation, reconciler runs)
    sla = SlaService(settings, store)  # invalid SLA definitions stop the start here (ConfigError)
    sla.schedule(scheduler)
    ingest.metrics.registry.register(SlaCollector(sla))
    reconciler = ReconcilerService(settings, store)  # unknown TOWER_RECONCILE_CONNECTORS stops the start here

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        access_log.install()  # here: uvicorn configures its loggers after the app is built
        telemetry = setup_telemetry(settings)
        if telemetry is not None:
            ingest.own_spans_received = telemetry[1].stop

        def start_store_parts() -> None:
            """The bring-up calls it again after StoreUnreachable: every step is safe to repeat or done once."""
            if bring_up is not None:
                ingest.prepare_store()  # done at construction when the store answered at start
            if not ingest.started:
                ingest.start()
            # closes interrupted runs, recovers in-progress actions, then adds its jobs (a store error comes first)
            reconciler.start(scheduler)
            scheduler.start()

        if bring_up is None:
            start_store_parts()
        else:
            bring_up.start(start_store_parts)
        log.info(
            "serving on the %s store (database %s%s); %d bytes wait in the write-ahead buffer",
            store.backend,
            store.database,
            ", not reached yet: retrying in the background" if bring_up is not None else "",
            ingest.wal.pending_bytes,
        )
        try:
            yield
        finally:
            if bring_up is not None:
                bring_up.stop()
            if scheduler.running:
                scheduler.shutdown(wait=False)
            reconciler.stop(timeout_s=RUN_STOP_WAIT_S)  # a run in progress ends at its next stage, recorded
            sla.close()
            ingest.stop()  # a buffer never flushed (the store not reached) is kept for the next start
            if telemetry is not None:
                shutdown_telemetry(telemetry[0])

    app = FastAPI(title="Revenue Control Tower", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.ingest = ingest
    app.state.scheduler = scheduler
    app.state.sla = sla
    app.state.reconciler = reconciler
    app.state.bring_up = bring_up
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    app.state.verifier = TokenVerifier(store, admin)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        """FastAPI parses the body before a route's dependencies run, so a malformed body would get its 422
        before the token and role check (and unaudited): the check runs first here."""
        role = route_role(request.scope.get("route"))
        if role is not None:
            try:
                principal = await run_in_threadpool(get_principal, request, request.headers.get("authorization"))
                require(role)(principal)
            except HTTPException as refused:
                return JSONResponse({"detail": refused.detail}, refused.status_code, refused.headers)
        return await request_validation_exception_handler(request, RequestValidationError(_echoable(exc.errors())))

    @app.exception_handler(StoreError)
    async def store_unavailable(request: Request, exc: StoreError) -> JSONResponse:
        log.warning("store error on %s: %s", request.url.path, exc)
        # the header tells a client (the dashboard) that the API is up and its store is not
        headers = {"Retry-After": "5", STORE_UNAVAILABLE_HEADER: "store"}
        return JSONResponse({"detail": "the store is unavailable; try again"}, 503, headers)

    for module in (health, otlp, events, lookups, metrics, tokens, webhooks, cdp, dead_letter_routes):
        app.include_router(module.router)
    app.include_router(sla_routes.router)
    for module in (drift, action_routes, runs, statements, sources):
        app.include_router(module.router)
    for module in (bulk_routes, overview_routes, audit_routes):  # the dashboard's extra reads and bulk actions
        app.include_router(module.router)
    app.add_middleware(AuditRefusals, store=lambda: app.state.store)
    app.add_middleware(BodySizeLimit, limit=settings.api_max_body_bytes)
    if settings.cors_origins:  # no cross-origin access unless origins are listed
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
