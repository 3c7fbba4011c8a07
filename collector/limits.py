"""Request limits: the JSON API's body size (ingest routes enforce their own, larger cap after decompression),
and how many days one ingest request may spread over."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

INGEST_PREFIXES = ("/v1/", "/webhooks/")
# Days one ingest request's spans or events may fall on. Each day is a partition of otel_traces (a month, of
# business_events) that never merges with another: one request of 1,000 spans on 1,000 days made 1,000 parts,
# 13,000 files and 11 KB of disk per span, for good, and held the flusher for seconds. Real clients send what
# just happened; a backfill sends a month per request at most.
MAX_DAYS_PER_REQUEST = 31
_DAY_NS = 86_400 * 10**9


def spread_error(times_ns: Iterable[int], what: str) -> str | None:
    """Why a request whose ``what`` happened at ``times_ns`` is refused whole (None when it is not)."""
    days = {t // _DAY_NS for t in times_ns}
    if len(days) <= MAX_DAYS_PER_REQUEST:
        return None
    return (
        f"the {what} of one request fall on {len(days)} days, at most {MAX_DAYS_PER_REQUEST}: each day is a "
        "partition of the store; send them in requests of fewer days"
    )


class BodySizeLimit:
    """Refuse API request bodies over ``limit`` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(INGEST_PREFIXES):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send, self.limit)
            return
        # The whole body is read before the app runs: a route must never act on a body that is then refused (a
        # cut-short body can still be valid JSON, and the mutation would happen behind the 413).
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await _too_large(send, self.limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail": "request body exceeds {limit} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
