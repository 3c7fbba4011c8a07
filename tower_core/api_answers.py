"""Reading the API's answers in the CLI commands that go through it: one line for whatever comes instead of the
expected JSON (an error, a proxy's HTML page, another shape), never a traceback."""

from __future__ import annotations

from typing import Any

import httpx

from tower_core.errors import ConfigError, one_line

# Set on the API's 503 when its store (ClickHouse) fails: the API is up, the store is not.
STORE_UNAVAILABLE_HEADER = "X-Tower-Unavailable"


def detail(response: httpx.Response) -> str:
    """The API's reason (FastAPI's ``detail``), or the start of whatever else the body holds, on one line."""
    try:
        doc = response.json()
    except ValueError:
        return one_line(response.text)
    reason = doc.get("detail", doc) if isinstance(doc, dict) else doc
    if isinstance(reason, list) and reason and all(isinstance(e, dict) and "msg" in e for e in reason):
        return one_line("; ".join(_validation_error(e) for e in reason))
    return one_line(str(reason))


def _validation_error(error: dict[str, Any]) -> str:
    """One entry of FastAPI's 422 list as ``where: what`` (``query.region: Field required``), not Python data."""
    where = ".".join(str(part) for part in error.get("loc") or [])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def json_answer(response: httpx.Response, what: str, expect: type = dict) -> Any:
    """A 2xx answer's JSON of the ``expect``ed type (an object or a list), else a ConfigError naming ``what``."""
    if response.status_code >= 400:
        raise ConfigError(f"{what}: the API answered {response.status_code}: {detail(response)}")
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if not isinstance(doc, expect):
        kind = "object" if expect is dict else "list"
        got = response.status_code
        raise ConfigError(f"{what}: the API answered {got} with something unexpected, not a JSON {kind}")
    return doc
