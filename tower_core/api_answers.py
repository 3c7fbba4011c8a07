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
    return one_line(reason_of(doc))


def reason_of(doc: Any) -> str:
    """The reason in an API answer's JSON: its ``detail``, FastAPI's 422 list read as ``where: what; ...``
    (``limit: Input should be a valid integer``), not as the Python repr of the list (what the CLI printed)."""
    reason = doc.get("detail", doc) if isinstance(doc, dict) else doc
    if isinstance(reason, list) and reason and all(isinstance(e, dict) and "msg" in e for e in reason):
        return "; ".join(_validation_error(e) for e in reason)
    return str(reason)


def _validation_error(error: dict[str, Any]) -> str:
    """One entry of the 422 list; where it was sent (query, body, path) goes, the field's path stays."""
    where = ".".join(str(part) for part in (error.get("loc") or [])[1:])
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
