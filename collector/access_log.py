"""The access log without the e-mail addresses a query string can carry (a CDP user looked up by address,
`GET /api/cdp/events?user_id=...`): log lines are kept longer and read by more people than the data they
describe, and the store only ever holds the address's pseudonym."""

from __future__ import annotations

import logging
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
ACCESS_LOGGER = "uvicorn.access"


def redact_query(path: str) -> str:
    """``path`` with every query value that holds an '@' (as sent or percent-encoded) replaced; the rest as
    sent."""
    base, sep, query = path.partition("?")
    if not sep or ("@" not in query and "%40" not in query.lower()):
        return path
    pairs = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if "@" in unquote_plus(value) or "@" in unquote_plus(name):
            name, value = (REDACTED, "") if "@" in unquote_plus(name) else (name, REDACTED)
        pairs.append(f"{name}{eq}{value}")
    return f"{base}?{'&'.join(pairs)}"


class RedactQueryAddresses(logging.Filter):
    """On uvicorn's access logger, whose records carry (client, method, path with query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def install() -> None:
    """Idempotent; called once the server's logging is configured."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactQueryAddresses) for f in logger.filters):
        logger.addFilter(RedactQueryAddresses())
