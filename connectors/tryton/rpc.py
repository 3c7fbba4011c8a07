"""Tryton JSON-RPC over HTTP: login, session header, value encoding and the fault contract.

``POST /<db>/rpc/`` with ``{"id", "method", "params"}``; ``common.db.login`` returns ``[user_id, session]``,
later calls send ``Authorization: Session base64(login:user_id:session)``. Tryton encodes Decimal, date and
datetime as ``{"__class__": ..., ...}`` objects.

Faults (DOMAIN.md §4): timeouts, connection errors, 5xx and 429 are retried with exponential backoff
(tenacity) and end as TransientError; a Tryton ``UserError``/``UserWarning`` (validation, closed or missing
period, access) is a BusinessRuleError carrying Tryton's own message, never retried. An expired session is
renewed once. Every call is one OTel span with DOMAIN.md §2 attributes.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import threading
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from connectors.base import BusinessRuleError, TransientError

tracer = trace.get_tracer("tower.connectors.tryton")
_TRANSIENT_ERRORS = ("ConcurrencyException", "DatabaseOperationalError", "RateLimitException")


def encode(value: Any) -> Any:
    """Python values -> Tryton's JSON forms."""
    if isinstance(value, Decimal):
        return {"__class__": "Decimal", "decimal": str(value)}
    if isinstance(value, dt.datetime):
        v = value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value
        return {
            "__class__": "datetime", "year": v.year, "month": v.month, "day": v.day,
            "hour": v.hour, "minute": v.minute, "second": v.second, "microsecond": v.microsecond,
        }  # fmt: skip
    if isinstance(value, dt.date):
        return {"__class__": "date", "year": value.year, "month": value.month, "day": value.day}
    if isinstance(value, Mapping):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """Tryton's JSON forms -> Python values (datetimes are UTC, as trytond stores them)."""
    if isinstance(value, dict):
        cls = value.get("__class__")
        if cls == "Decimal":
            return Decimal(value["decimal"])
        if cls == "date":
            return dt.date(value["year"], value["month"], value["day"])
        if cls == "datetime":
            return dt.datetime(
                value["year"], value["month"], value["day"], value["hour"], value["minute"], value["second"],
                value.get("microsecond", 0), tzinfo=dt.UTC,
            )  # fmt: skip
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def fault(error: Any) -> Exception:
    """A JSON-RPC ``error`` member -> the connector error it means."""
    if isinstance(error, list) and error:
        kind = str(error[0])
        args = error[1] if len(error) > 1 else []
        if isinstance(args, list):
            texts = args[1:3] if kind == "UserWarning" else args[:2]  # a warning's first arg is its key
            message = " ".join(str(a) for a in texts if isinstance(a, str) and a).strip()
        else:
            message = str(args)
        if kind in _TRANSIENT_ERRORS:
            return TransientError(f"tryton {kind}: {message}")
        if kind in ("UserError", "UserWarning", "AccessError", "LoginException"):
            return BusinessRuleError(message or kind)
        return BusinessRuleError(f"tryton server error {kind}: {message}".strip())
    return BusinessRuleError(f"tryton error: {error!r}")


class AmbiguousWriteError(TransientError):
    """A write was sent but its answer was lost (timeout, dropped connection, a 5xx or garbled answer that a
    proxy may have made up after Tryton committed): it may have been applied.
    Not retried blindly: the caller looks at the target first (DOMAIN.md §4, "in progress, may have written")."""


class _SessionExpired(Exception):
    pass


READ_OPS = frozenset({"search", "search_read", "read", "search_count", "fields_get", "default_get", "get_preferences"})


def is_write(method: str) -> bool:
    parts = method.split(".")
    if parts[0] == "model":
        return parts[-1] not in READ_OPS
    return parts[0] == "wizard" and parts[-1] == "execute"


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, TransientError) and not isinstance(exc, AmbiguousWriteError)


class TrytonRpc:
    def __init__(
        self,
        url: str,
        database: str,
        user: str,
        password: str,
        *,
        timeout_s: float = 10.0,
        attempts: int = 4,
        backoff_s: float = 0.25,
    ) -> None:
        self.endpoint = f"{url.rstrip('/')}/{database}/rpc/"
        self.database, self.user, self._password = database, user, password
        self.http = httpx.Client(timeout=timeout_s)
        self.attempts, self.backoff_s = attempts, backoff_s
        self._auth: str | None = None
        self._context: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------ transport

    def _post(self, method: str, params: list[Any], auth: str | None) -> Any:
        headers = {"Authorization": auth} if auth else {}
        body = {"id": next(self._ids), "method": method, "params": encode(params)}
        try:
            r = self.http.post(self.endpoint, json=body, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never reached the server
            raise TransientError(f"tryton {method}: connection failed ({exc.__class__.__name__})") from exc
        except httpx.TransportError as exc:  # sent, answer lost
            what = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection lost"
            if is_write(method):
                raise AmbiguousWriteError(f"tryton {method}: {what} after sending; it may have been applied") from exc
            raise TransientError(f"tryton {method}: {what} ({exc.__class__.__name__})") from exc
        if r.status_code in (401, 403):
            if auth:
                raise _SessionExpired()
            raise BusinessRuleError(f"tryton refused the login of {self.user!r} (HTTP {r.status_code})")
        if r.status_code == 429:  # refused before any work
            raise TransientError(f"tryton {method}: HTTP {r.status_code}")
        if r.status_code >= 500:
            # Tryton rolls back a transaction that fails, but a 5xx may come from a proxy that gave up after
            # Tryton committed: for a write that is not proof of "not applied"
            if is_write(method):
                raise AmbiguousWriteError(f"tryton {method}: HTTP {r.status_code}; it may have been applied")
            raise TransientError(f"tryton {method}: HTTP {r.status_code}")
        if r.status_code != 200:
            raise BusinessRuleError(f"tryton {method}: HTTP {r.status_code} {r.text[:200]}")
        try:
            doc = r.json()
        except ValueError:
            if is_write(method):
                raise AmbiguousWriteError(f"tryton {method}: answer not JSON; it may have been applied") from None
            raise TransientError(f"tryton {method}: response is not JSON") from None
        if doc.get("error") is not None:
            raise fault(doc["error"])
        return decode(doc.get("result"))

    def _retrying(self, method: str, params: list[Any], auth: str | None, attributes: Mapping[str, str]) -> Any:
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential(multiplier=self.backoff_s, max=5),
            stop=stop_after_attempt(self.attempts),
            reraise=True,
        )
        for attempt in retrying:
            with attempt, tracer.start_as_current_span(f"tryton {method}", kind=SpanKind.CLIENT) as span:
                span.set_attribute("revops.system", "erp")
                span.set_attribute("rpc.system", "jsonrpc")
                span.set_attribute("rpc.method", method)
                span.set_attribute("tower.attempt", attempt.retry_state.attempt_number)
                for k, v in attributes.items():
                    span.set_attribute(k, v)
                try:
                    return self._post(method, params, auth)
                except (TransientError, BusinessRuleError) as exc:
                    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                    raise
        raise TransientError(f"tryton {method}: no attempt made")  # pragma: no cover

    # ------------------------------------------------------------ session

    def login(self) -> None:
        result = self._retrying(
            "common.db.login", [self.user, {"password": self._password}, "en"], None, {"tryton.database": self.database}
        )
        if not isinstance(result, list) or len(result) < 2:
            raise BusinessRuleError("tryton login refused")
        user_id, session = result[0], result[1]
        token = base64.b64encode(f"{self.user}:{user_id}:{session}".encode()).decode()
        self._auth = f"Session {token}"
        self._context = self._retrying("model.res.user.get_preferences", [True, {}], self._auth, {})

    @property
    def context(self) -> dict[str, Any]:
        with self._lock:
            if self._context is None:
                self.login()
            return dict(self._context or {})

    def call(self, method: str, *params: Any, attributes: Mapping[str, str] | None = None) -> Any:
        """One RPC call in the user's session (logging in, or again once if the session expired)."""
        for renewed in (False, True):
            with self._lock:
                if self._auth is None:
                    self.login()
                auth = self._auth
            try:
                return self._retrying(method, list(params), auth, attributes or {})
            except _SessionExpired:
                with self._lock:
                    self._auth = self._context = None
                if renewed:
                    break
        raise BusinessRuleError(f"tryton {method}: the session was refused twice (check TOWER_TRYTON_USER)")

    # ------------------------------------------------------------ model helpers

    def model(self, model: str, op: str, *params: Any, attributes: Mapping[str, str] | None = None) -> Any:
        return self.call(f"model.{model}.{op}", *params, self.context, attributes=attributes)

    def search_read(
        self,
        model: str,
        domain: list[Any],
        fields: list[str],
        *,
        order: list[Any] | None = None,
        limit: int | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        return self.model(model, "search_read", domain, 0, limit, order, fields, attributes=attributes)
