"""FastAPI application factory: wires settings, the store and one router per resource."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from collector.routers import health
from tower_core.settings import Settings
from tower_core.store import Store


def create_app(settings: Settings, store: Store) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(title="Revenue Control Tower", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.include_router(health.router)
    return app
