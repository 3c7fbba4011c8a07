"""A server store that did not answer when `tower serve` started is reached in the background.

Ingest needs no store to acknowledge (the write-ahead buffer holds it), so a restart during a ClickHouse outage
keeps taking spans and events instead of refusing them; what reads or writes the store (the flusher, the
reconciler's and SLA jobs) starts once the server answers and the migrations have run. Until then readiness says
why, and API reads answer 503 like any store outage.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential

from tower_core.errors import ConfigError, StoreError

log = logging.getLogger("tower.api")

# between attempts: 1 s doubling to this, so a server that comes back is reached within it
MAX_RETRY_WAIT_S = 15.0


def retry_until_reached(
    ready_store: Callable[[], None],
    stop: threading.Event,
    on_retry: Callable[[int, BaseException], None],
    max_wait_s: float = MAX_RETRY_WAIT_S,
) -> bool:
    """Call ``ready_store`` until it raises no StoreError (True), or until ``stop`` is set (False); ``on_retry``
    hears of each failed attempt. A ConfigError is not retried: it passes through."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            on_retry(state.attempt_number, exc)

    retrying = Retrying(
        retry=retry_if_exception_type(StoreError),
        wait=wait_exponential(multiplier=1, max=max_wait_s),
        stop=stop_when_event_set(stop),
        before_sleep=before_sleep,
        sleep=stop.wait,  # a stop ends the wait at once
        reraise=True,
    )
    try:
        retrying(ready_store)
    except StoreError:  # stopped while it did not answer
        return False
    return True


class StoreBringUp:
    """Runs ``ready_store`` (connect, migrate) until it succeeds, then the ``start_parts`` given to start();
    stops when asked.

    A ConfigError from ``ready_store`` (a database a newer release migrated) cannot mend by waiting: it is kept
    in ``fatal`` and ``on_fatal`` is called (`tower serve` stops its server and exits with it; by default the
    process sends itself SIGTERM, as an operator would).
    """

    def __init__(
        self,
        ready_store: Callable[[], None],
        on_fatal: Callable[[], None] | None = None,
        max_wait_s: float = MAX_RETRY_WAIT_S,
    ) -> None:
        self._ready_store = ready_store
        self._on_fatal = on_fatal or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self._start_parts: Callable[[], None] = lambda: None
        self._max_wait_s = max_wait_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tower-store-bring-up", daemon=True)
        self.last_error = "not reached yet"
        self.fatal: str | None = None
        self.started = False  # start_parts ran: the caller stops those parts at shutdown

    @property
    def pending(self) -> bool:
        return not self.started

    def start(self, start_parts: Callable[[], None]) -> None:
        self._start_parts = start_parts
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """No new attempt after this; an attempt under way ends first (its connect timeout bounds it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

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
            reached = retry_until_reached(self._ready_store, self._stop, self._retrying, self._max_wait_s)
        except ConfigError as exc:
            self._give_up(str(exc))
            return
        if not reached or self._stop.is_set():
            return
        try:
            self._start_parts()
        except Exception as exc:  # a part that cannot start: as at a normal start, the process stops
            log.exception("starting the store's jobs failed")
            self._give_up(f"starting the store's jobs failed: {exc}")
            return
        self.started = True
        log.info("the store answers: migrated; flushing the write-ahead buffer and starting the jobs")
