"""Webhook notifier for estates without an Alertmanager: posts Alertmanager's version-4 webhook JSON to each
configured URL, one message per alert group (SLA, step, region), deduplicated by fingerprint.

A group is notified when one of its alerts has not been told to that receiver in its current state (firing
since startsAt, or resolved); the message carries the group's firing alerts and its newly resolved ones. What
each receiver was told is stored in ``sla_notifications`` (read before every send), so a restart never
notifies twice; a failed POST is retried at the next evaluation. Resolutions are only sent for alerts whose
firing was announced to that receiver.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from reconciler.sla.alertmanager import _retryable
from reconciler.sla.evaluate import Breach
from reconciler.sla.payloads import group_key, webhook_alert, webhook_message
from reconciler.sla.redact import describe_error, hide_from_httpx_log, redact_url
from tower_core.store import Store
from tower_core.store import sla as sla_store

log = logging.getLogger("tower.sla.webhook")
RECEIVER = "tower-webhook"


@dataclass(frozen=True)
class Sent:
    """One message sent; the receiver is named by its index in the settings and its redacted URL (the URL is
    a credential)."""

    receiver: int
    url: str
    group_key: str
    status: str
    alerts: int


def plan_messages(
    firing: Sequence[Breach], resolved: Sequence[Breach], told: set[tuple[str, int, str]]
) -> list[tuple[str, list[Breach], list[Breach]]]:
    """Pure: per group with something new to say, (group key, firing alerts, resolved alerts to announce)."""
    groups: dict[str, tuple[list[Breach], list[Breach]]] = {}
    for b in firing:
        groups.setdefault(group_key(b.labels), ([], []))[0].append(b)
    for b in resolved:
        if (b.fingerprint, b.starts_ms, "firing") in told and (b.fingerprint, b.starts_ms, "resolved") not in told:
            groups.setdefault(group_key(b.labels), ([], []))[1].append(b)
    out = []
    for key, (fire, res) in sorted(groups.items()):
        news = [b for b in fire if (b.fingerprint, b.starts_ms, "firing") not in told] + res
        if news:
            out.append((key, fire, res))
    return out


class WebhookNotifier:
    def __init__(
        self, store: Store, urls: Sequence[str], external_url: str, timeout_s: float = 5.0, attempts: int = 3
    ) -> None:
        self.store = store
        self.urls = list(urls)
        for url in self.urls:
            hide_from_httpx_log(url)
        self.external_url = external_url
        self.attempts = attempts
        self._http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _post(self, url: str, doc: dict) -> int:
        for attempt in Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.2, max=2),
            reraise=True,
        ):
            with attempt:
                resp = self._http.post(url, json=doc)
                resp.raise_for_status()
                return resp.status_code
        raise AssertionError("unreachable")

    def deliver(self, firing: Sequence[Breach], resolved: Sequence[Breach], version: int) -> tuple[list[Sent], int]:
        """Notify every receiver of what it has not been told yet. Returns (messages sent, failures)."""
        sent: list[Sent] = []
        failures = 0
        for index, url in enumerate(self.urls):
            told = sla_store.notified(self.store, url)
            for key, fire, res in plan_messages(firing, resolved, told):
                alerts = [
                    webhook_alert("firing", b.labels, b.annotations, b.starts_ms, None, b.generator_url) for b in fire
                ] + [
                    webhook_alert("resolved", b.labels, b.annotations, b.starts_ms, b.ends_ms, b.generator_url)
                    for b in res
                ]
                doc = webhook_message(RECEIVER, alerts, self.external_url)
                try:
                    code = self._post(url, doc)
                except httpx.HTTPError as exc:
                    failures += 1
                    log.warning(
                        "webhook %d (%s) failed for %s: %s (retried next evaluation)",
                        index,
                        redact_url(url),
                        key,
                        describe_error(exc, url),
                    )
                    continue
                entries = [(b.fingerprint, b.starts_ms, "firing") for b in fire]
                entries += [(b.fingerprint, b.starts_ms, "resolved") for b in res]
                sla_store.record_notifications(self.store, url, key, entries, code, version)
                sent.append(Sent(index, redact_url(url), key, doc["status"], len(alerts)))
        return sent, failures
