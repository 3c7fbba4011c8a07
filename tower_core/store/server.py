"""Server backend: a ClickHouse server or ClickHouse Cloud over HTTP through clickhouse-connect."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa

from tower_core.errors import ConfigError, StoreError, StoreUnreachable
from tower_core.store.base import SESSION_SETTINGS, check_identifier, qualify, rows_of
from tower_core.store.params import format_params


def parse_url(url: str) -> dict[str, Any]:
    """``http(s)://user:pass@host:port/db`` -> clickhouse-connect arguments (password never logged)."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"TOWER_CLICKHOUSE_URL must look like http://user:pass@host:8123/db, got scheme {u.scheme!r}")
    try:
        port = u.port
    except ValueError:  # its message quotes the URL, which may hold the password: not repeated
        raise ConfigError(
            "TOWER_CLICKHOUSE_URL has no valid port; percent-encode '/', '?', '#' and '@' in the user and password"
        ) from None
    return {
        "host": u.hostname,
        "port": port or (8443 if u.scheme == "https" else 8123),
        "username": unquote(u.username or "default"),
        "password": unquote(u.password or ""),
        "secure": u.scheme == "https",
        "database": u.path.strip("/") or None,
    }


class ServerStore:
    """Store backed by clickhouse-connect; one client per thread (clients are not thread-safe)."""

    backend = "server"

    def __init__(
        self,
        url: str,
        database: str | None = None,
        connect_timeout_s: float = 5.0,
        query_timeout_s: float = 300.0,
        *,
        connect: bool = True,
    ) -> None:
        self._args = parse_url(url)
        self.database = check_identifier(database or self._args.pop("database") or "tower")
        self._args.pop("database", None)
        self._timeout = connect_timeout_s
        self._query_timeout = query_timeout_s
        self._local = threading.local()
        if connect:  # unreachable here is a configuration problem (`tower serve` waits instead: connect=False)
            try:
                self.connect()
            except StoreError as exc:
                raise ConfigError(str(exc)) from None

    def connect(self) -> None:
        self._client()
        self.command("CREATE DATABASE IF NOT EXISTS $db")

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            import clickhouse_connect
            from clickhouse_connect import common

            common.set_setting("dict_parameter_format", "map")  # bind dicts as Map literals, not JSON
            logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)  # we report errors ourselves
            try:
                client = clickhouse_connect.get_client(
                    **self._args,
                    connect_timeout=self._timeout,
                    send_receive_timeout=self._query_timeout,
                    autogenerate_session_id=False,
                    settings=dict(SESSION_SETTINGS),
                )
            except Exception as exc:  # later, an unreachable server is transient: callers retry StoreError
                where = f"{self._args['host']}:{self._args['port']}"
                raise _store_error(exc, f"cannot reach ClickHouse at {where}: ") from None
            self._local.client = client
        return client

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        bound = format_params(params)  # a parameter that cannot be bound is the caller's bug, not the store's
        try:
            self._client().command(qualify(sql, self.database), parameters=bound)
        except StoreError:
            raise
        except Exception as exc:
            raise _store_error(exc) from None

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        bound = format_params(params)
        try:
            return self._client().query_arrow(qualify(sql, self.database), parameters=bound)
        except StoreError:
            raise
        except Exception as exc:
            raise _store_error(exc) from None

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return rows_of(self.query_arrow(sql, params))

    def insert_arrow(self, table: str, data: pa.Table, *, dedup_token: str | None = None) -> int:
        if data.num_rows == 0:
            return 0
        settings = {"insert_deduplication_token": check_identifier(dedup_token)} if dedup_token else {}
        # clickhouse-connect writes Arrow's IPC file format, which holds one dictionary per column: chunks encoded
        # each with its own (the simulator's bulk tables) share one first
        if any(pa.types.is_dictionary(t) for t in data.schema.types):
            data = data.unify_dictionaries()
        try:
            self._client().insert_arrow(check_identifier(table), data, database=self.database, settings=settings)
        except StoreError:
            raise
        except Exception as exc:
            raise _store_error(exc) from None
        return data.num_rows

    def insert_select(self, sql: str, data: bytes, fmt: str, params: Mapping[str, Any] | None = None) -> None:
        if not fmt.isalnum():
            raise ValueError(f"unsafe format name {fmt!r}")
        bound = format_params(params)
        try:
            self._client().command(qualify(sql, self.database) + f" FORMAT {fmt}", parameters=bound, data=data)
        except StoreError:
            raise
        except Exception as exc:
            raise _store_error(exc) from None

    def ping(self) -> bool:
        try:
            return bool(self._client().ping())
        except Exception:
            return False

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
# what a proxy in front of ClickHouse (nginx, chproxy, an ingress) answers while the server restarts
_GATEWAY = re.compile(r"HTTP status 50[234]\b")
# TLS that cannot work as configured (a plain-HTTP server behind an https URL, a certificate refused); a handshake
# the other end cut short (EOF, reset: a TCP proxy with no server behind it) is no answer
_TLS_REFUSED = re.compile(r"WRONG_VERSION_NUMBER|certificate|hostname", re.IGNORECASE)


def _store_error(exc: Exception, prefix: str = "") -> StoreError:
    """StoreUnreachable when no ClickHouse answered (refused, timed out, a gateway's 502-504): worth waiting for;
    StoreError when one answered and refused (a login, a query), or TLS cannot work (a configuration to fix)."""
    from clickhouse_connect.driver.exceptions import OperationalError

    message = prefix + _short(exc)
    text = str(exc)
    no_answer = (isinstance(exc, OperationalError) and not _TLS_REFUSED.search(text)) or bool(_GATEWAY.search(text))
    return StoreUnreachable(message) if no_answer else StoreError(message)


def _short(exc: Exception) -> str:
    """One readable line: the OS reason when there is one, else the first line of the message."""
    text = str(exc).strip()
    errno = _ERRNO.search(text)
    if errno:
        return errno.group(1).strip().lower()
    lines = text.splitlines()
    return lines[0] if lines else type(exc).__name__
