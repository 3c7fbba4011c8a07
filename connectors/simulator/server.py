"""The simulated billing, ERP and CDP over a small loopback HTTP API.

The demo's estate runs in its own process (only ``tower serve`` may open the chDB path), so the reconciler
inside ``tower serve`` reaches the estate through this API with the HTTP connectors of ``client.py``.
Errors keep the connector contract: TransientError -> 503 (+ Retry-After), BusinessRuleError or bad input
-> 422 with the message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any, Protocol

import uvicorn
from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from connectors.base import BusinessRuleError, TransientError
from connectors.simulator import codec
from connectors.simulator.systems import BillingSystem, CdpSystem, ErpSystem
from tower_core.errors import ConfigError
from tower_core.models import Invoice, Payment
from tower_core.ports import check_port_free

Limit = Annotated[int, Query(ge=1, le=10_000)]
Cursor = Annotated[str | None, Query(max_length=40)]


class EstateSource(Protocol):
    billing: BillingSystem
    erp: ErpSystem
    cdp: CdpSystem

    def manifest_json(self) -> str: ...

    def flows(self) -> list[dict[str, Any]]: ...


def _page(page: Any) -> dict[str, Any]:
    return {"items": [codec.to_json(i) for i in page.items], "next_cursor": page.next_cursor, "done": page.done}


def create_sim_app(source: EstateSource) -> FastAPI:
    app = FastAPI(title="Simulated revenue estate", version="0.1.0")

    @app.exception_handler(TransientError)
    async def transient(request: Request, exc: TransientError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, {"Retry-After": "2"})

    @app.exception_handler(BusinessRuleError)
    async def business(request: Request, exc: BusinessRuleError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 422)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 422)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "billing": source.billing.health().ok, "erp": source.erp.health().ok}

    @app.get("/billing/health")
    def billing_health() -> dict[str, Any]:
        h = source.billing.health()
        return {"ok": h.ok, "detail": h.detail}

    @app.get("/erp/health")
    def erp_health() -> dict[str, Any]:
        h = source.erp.health()
        return {"ok": h.ok, "detail": h.detail}

    @app.get("/billing/invoices")
    def invoices(cursor: Cursor = None, limit: Limit = 1000) -> dict[str, Any]:
        return _page(source.billing.pull_invoices(cursor, limit))

    @app.get("/billing/payments")
    def payments(cursor: Cursor = None, limit: Limit = 1000) -> dict[str, Any]:
        return _page(source.billing.pull_payments(cursor, limit))

    @app.get("/billing/customers")
    def customers(cursor: Cursor = None, limit: Limit = 1000) -> dict[str, Any]:
        return _page(source.billing.pull_customers(cursor, limit))

    @app.get("/cdp/profiles")
    def profiles(cursor: Cursor = None, limit: Limit = 1000) -> dict[str, Any]:
        return _page(source.cdp.pull_profiles(cursor, limit))

    @app.get("/erp/ledger-entries")
    def entries(cursor: Cursor = None, limit: Limit = 1000) -> dict[str, Any]:
        return _page(source.erp.pull_ledger_entries(cursor, limit))

    @app.get("/erp/ledger-entries/by-ref")
    def by_ref(external_ref: Annotated[str, Query(min_length=1, max_length=256)]) -> list[dict[str, Any]]:
        return [codec.to_json(e) for e in source.erp.find_by_external_ref(external_ref)]

    @app.post("/erp/invoices")
    def post_invoice(invoice: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        return codec.outcome_json(source.erp.post_invoice(codec.from_json(Invoice, invoice)))

    @app.post("/erp/payment-applications")
    def apply_payment(
        payment: Annotated[dict[str, Any], Body()],
        invoice_id: Annotated[str, Body(min_length=1, max_length=256)],
        amount_minor: Annotated[int, Body()],
    ) -> dict[str, Any]:
        p = codec.from_json(Payment, payment)
        return codec.outcome_json(source.erp.apply_payment(p, invoice_id, amount_minor))

    @app.post("/erp/credit-memos")
    def post_credit_memo(refund: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        return codec.outcome_json(source.erp.post_credit_memo(codec.from_json(Payment, refund)))

    @app.post("/erp/ledger-entries/{entry_id}/cancel")
    def cancel_entry(
        entry_id: Annotated[str, Path(min_length=1, max_length=256)],
        reason: Annotated[str, Body(embed=True, max_length=1000)] = "",
    ) -> dict[str, Any]:
        return codec.outcome_json(source.erp.cancel_entry(entry_id, reason))

    @app.get("/manifest")
    def manifest() -> Response:
        return Response(source.manifest_json(), media_type="application/json")

    @app.get("/flows")
    def flows() -> list[dict[str, Any]]:
        return source.flows()

    return app


class SimServer:
    """uvicorn in a background thread of the estate process (loopback only)."""

    def __init__(self, source: EstateSource, host: str = "127.0.0.1", port: int = 8600) -> None:
        config = uvicorn.Config(create_sim_app(source), host=host, port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="sim-http", daemon=True)
        self.url = f"http://{host}:{port}"

    def start(self, ready: Callable[[], None] | None = None) -> SimServer:
        cfg = self.server.config
        try:  # a clear error instead of uvicorn's log line and a dead thread
            check_port_free(cfg.host, cfg.port)
        except ConfigError as exc:
            raise RuntimeError(f"the simulator API {exc}") from None
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the simulator API could not listen on {self.url}")
            threading.Event().wait(0.05)
        if ready:
            ready()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
