"""FastAPI dependencies and request helpers shared by the routers."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import Request
from pydantic import AfterValidator, AwareDatetime

from collector.ingest import IngestService
from collector.otlp import OtlpError
from tower_core.settings import Settings
from tower_core.store import Store

# The instants the store's DateTime columns (and Python's datetime in every time zone) can hold: a time outside is
# a 422 here, not an overflow deep in the store answered as "store unavailable" or written into a row nobody reads.
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(2106, 2, 7, tzinfo=dt.UTC)


def in_store_range(value: dt.datetime) -> dt.datetime:
    """The instant in UTC (naive means UTC), if the store can hold it."""
    outside = f"must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} UTC"
    try:
        utc = (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it
        raise ValueError(outside) from None
    if not EARLIEST <= utc < LATEST:
        raise ValueError(outside)
    return utc


StoreTime = Annotated[AwareDatetime, AfterValidator(in_store_range)]
MAX_MINOR = 2**63 - 1  # Int64 minor units
MAX_AGE_DAYS = 100_000


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_ingest(request: Request) -> IngestService:
    return request.app.state.ingest


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) anything larger than ``limit`` without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise OtlpError(413, f"request body exceeds {limit} bytes")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise OtlpError(413, f"request body exceeds {limit} bytes")
    return bytes(chunks)
