"""A server store that did not answer when `tower serve` started is reached in the background.

Ingest needs no store to acknowledge (the write-ahead buffer holds it), so a restart during a ClickHouse outage
keeps taking spans and events instead of refusing them; what reads or writes the store (the API's routes, the
flusher, the reconciler's and SLA jobs) waits until the server answers and the migrations (with their check for
a database a newer release migrated) have run. Until then readiness says why, and the rest answers 503 like any
store outage.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from tower_core.errors import ConfigError, StoreError, StoreUnreachable
from tower_core.store import Store
from tower_core.store.reach import MAX_RETRY_WAIT_S, retry_until_reached

log = logging.getLogger("tower.api")

# a stop waits this long for an attempt under way (one at a server that accepts and never answers lasts up to the
# query timeout); the process then exits without it, its buffer kept for the next start
STOP_WAIT_S = 3.0


class GatedStore:
    """The app's store until the bring-up has reached and migrated it: every call answers StoreUnreachable (503),
    so nothing reads or writes a database whose schema was not checked and brought up to date first."""

    def __init__(self, store: Store, why: Callable[[], str]) -> None:
        self._store, self._why = store, why
        self._open = threading.Event()
        self.backend, self.database = store.backend, store.database

    def open(self) -> None:
        self._open.set()

    def ping(self) -> bool:
        return self._open.is_set() and self._store.ping()

    def close(self) -> None:
        self._store.close()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if self._open.is_set() or not callable(attr):
            return attr

        def refused(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnreachable(f"the store has not been reached since the start ({self._why()})")

        return refused


class StoreBringUp:
    """Runs ``ready_store`` (connect, migrate: on the store itself) until the server answers, opens ``store`` (the
    gated view the app uses), then runs the ``start_parts`` given to start() until they no longer find the
    server gone; each is retried only while no ClickHouse answers.

    What waiting cannot mend (a refused login, a database a newer release migrated) is kept in ``fatal`` and
    ``on_fatal`` is called (`tower serve` stops its server and exits with it; by default the process sends itself
    SIGTERM, as an operator would).
    """

    def __init__(
        self,
        store: Store,
        ready_store: Callable[[], None],
        on_fatal: Callable[[], None] | None = None,
        max_wait_s: float = MAX_RETRY_WAIT_S,
    ) -> None:
        self.store = GatedStore(store, lambda: self.last_error)
        self._ready_store = ready_store
        self._on_fatal = on_fatal or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self._max_wait_s = max_wait_s
        self._start_parts: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tower-store-bring-up", daemon=True)
        self.last_error = "not reached yet"
        self.fatal: str | None = None
        self.started = False  # start_parts ran to the end

    @property
    def pending(self) -> bool:
        return not self.started

    def start(self, start_parts: Callable[[], None]) -> None:
        """``start_parts`` may be called again after it raised StoreUnreachable: each of its steps must be safe to
        repeat or done once."""
        self._start_parts = start_parts
        self._thread.start()

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """No new attempt after this; waits ``timeout_s`` for one under way."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("an attempt to reach the store is still under way; stopping without it")

    def _retrying(self, attempt: int, exc: BaseException) -> None:
        self.last_error = str(exc)
        log.warning(
            "the store still does not answer (attempt %d: %s); ingest goes on into the write-ahead buffer", attempt, exc
        )

    def _give_up(self, why: str) -> None:
        self.fatal = why
        log.error("%s; stopping", why)
        self._on_fatal()

    def _run(self) -> None:
        try:
            if not retry_until_reached(self._ready_store, self._stop, self._retrying, self._max_wait_s):
                return
            if self._stop.is_set():
                return
            self.store.open()
            if not retry_until_reached(self._start_parts, self._stop, self._retrying, self._max_wait_s):
                return
        except (ConfigError, StoreError) as exc:  # answered, and refused: as at a normal start, the process stops
            self._give_up(str(exc))
            return
        except Exception as exc:
            log.exception("starting the parts that need the store failed")
            self._give_up(f"starting the parts that need the store failed: {exc}")
            return
        self.started = True
        log.info("the store answers: migrated; flushing the write-ahead buffer and starting the jobs")
