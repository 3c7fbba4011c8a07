"""Alertmanager client (``POST /api/v2/alerts``), following Prometheus's client contract (DOMAIN.md §7).

Firing alerts are sent when they start and re-sent every ``resend_s`` while they fire, with endsAt
``hold_s`` ahead (Prometheus: 4 x max(evaluation interval, resend delay)), so an alert stays active between
evaluations however far apart they are, and still ends by itself if the tower stops sending. A resolved alert
is sent with its endsAt, again at the next delivery if Alertmanager did not take it. Grouping, silences and
inhibition are Alertmanager's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from reconciler.sla.evaluate import Breach
from reconciler.sla.payloads import am_alert
from reconciler.sla.redact import describe_error

log = logging.getLogger("tower.sla.alertmanager")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (429, 500, 502, 503, 504)


class AlertmanagerClient:
    def __init__(
        self, url: str, resend_s: float, eval_interval_s: float = 0.0, timeout_s: float = 5.0, attempts: int = 3
    ) -> None:
        # user:password in the URL becomes the client's basic auth, so no request URL (in httpx's log and error
        # messages) carries it
        parsed = httpx.URL(url.rstrip("/") + "/api/v2/alerts")
        auth = httpx.BasicAuth(parsed.username, parsed.password) if parsed.username or parsed.password else None
        self.url = str(parsed.copy_with(username=None, password=None))
        self._secret_url = url
        self.resend_s = resend_s
        self.hold_s = 4 * max(eval_interval_s, resend_s)
        self._unsent_resolved: dict[str, Breach] = {}  # fingerprint -> a resolution Alertmanager did not take
        self.attempts = attempts
        self._http = httpx.Client(timeout=timeout_s, auth=auth)
        self._last_sent: dict[str, float] = {}  # fingerprint -> monotonic time of the last send

    def close(self) -> None:
        self._http.close()

    def describe(self, exc: httpx.HTTPError) -> str:
        """The failure as text fit for API answers and logs (no credentials)."""
        return describe_error(exc, self._secret_url)

    def post(self, alerts: Sequence[dict[str, Any]]) -> None:
        """POST a batch of alerts, retrying transient failures briefly (the next evaluation re-sends anyway)."""
        for attempt in Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.2, max=2),
            reraise=True,
        ):
            with attempt:
                self._http.post(self.url, json=list(alerts)).raise_for_status()

    def due(self, firing: Sequence[Breach], started: set[str], now_mono: float) -> list[Breach]:
        """Firing breaches to send now: new ones, and those not sent for ``resend_s``."""
        return [
            b
            for b in firing
            if b.fingerprint in started or now_mono - self._last_sent.get(b.fingerprint, float("-inf")) >= self.resend_s
        ]

    def deliver(self, firing: Sequence[Breach], resolved: Sequence[Breach], started: set[str]) -> int:
        """Send what is due; returns the number of alerts sent. Raises httpx.HTTPError when Alertmanager fails."""
        now = time.monotonic()
        send = self.due(firing, started, now)
        for b in firing:  # an alert firing again supersedes its older resolution still waiting to be sent
            self._unsent_resolved.pop(b.fingerprint, None)
        ending = {**self._unsent_resolved, **{b.fingerprint: b for b in resolved}}
        hold_until_ms = int(time.time() * 1000 + self.hold_s * 1000)  # wall clock: Alertmanager's time
        batch = [am_alert(b.labels, b.annotations, b.starts_ms, b.generator_url, hold_until_ms) for b in send]
        batch += [am_alert(b.labels, b.annotations, b.starts_ms, b.generator_url, b.ends_ms) for b in ending.values()]
        if not batch:
            return 0
        try:
            self.post(batch)
        except httpx.HTTPError:
            self._unsent_resolved = ending  # the next delivery sends them again
            raise
        self._unsent_resolved = {}
        for b in send:
            self._last_sent[b.fingerprint] = now
        for fp in ending:
            self._last_sent.pop(fp, None)
        log.info("sent %d alert(s) to Alertmanager (%d resolved)", len(batch), len(ending))
        return len(batch)
