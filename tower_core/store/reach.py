"""Waiting for a ClickHouse server that does not answer yet (`tower serve`'s bring-up, `tower reconciler`): one
retry loop for both, retrying only StoreUnreachable, so an answer that refuses is never waited out."""

from __future__ import annotations

import threading
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential

from tower_core.errors import StoreUnreachable

# between attempts: 1 s doubling to this, so a server that comes back is reached within it
MAX_RETRY_WAIT_S = 15.0


def retry_until_reached(
    attempt: Callable[[], None],
    stop: threading.Event,
    on_retry: Callable[[int, BaseException], None],
    max_wait_s: float = MAX_RETRY_WAIT_S,
) -> bool:
    """Call ``attempt`` until it raises no StoreUnreachable (True), or until ``stop`` is set (False); ``on_retry``
    hears of each failed attempt. Anything else it raises (a refused login, a ConfigError) is not retried."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            on_retry(state.attempt_number, exc)

    retrying = Retrying(
        retry=retry_if_exception_type(StoreUnreachable),
        wait=wait_exponential(multiplier=1, max=max_wait_s),
        stop=stop_when_event_set(stop),
        before_sleep=before_sleep,
        sleep=stop.wait,  # a stop ends the wait at once
        reraise=True,
    )
    try:
        retrying(attempt)
    except StoreUnreachable:  # stopped while it did not answer
        return False
    return True
