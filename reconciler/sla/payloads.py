"""Wire formats of alert delivery, pure: Alertmanager's label fingerprint, the ``POST /api/v2/alerts`` body and
Alertmanager's version-4 webhook message (what Slack-compatible relays accept).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Alertmanager's group labels for SLA alerts: one group per SLA, step and region (severities share it).
GROUP_BY = ("alertname", "sla", "step", "region")
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of a firing alert in webhook messages

_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_SEP = 0xFF


def fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager's fingerprint of a label set (prometheus/common model.LabelSet.Fingerprint: FNV-1a 64 over
    sorted names and values, each followed by 0xff), as 16 hex digits."""
    h = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode():
                h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
            h = ((h ^ _SEP) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch -> '2026-01-01T00:00:00.123Z'."""
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def am_alert(
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    starts_ms: int,
    generator_url: str,
    ends_ms: int | None = None,
) -> dict[str, Any]:
    """One element of ``POST /api/v2/alerts``. A firing alert's endsAt lies ahead (the sender keeps pushing it
    out while the alert fires, as Prometheus does); a resolved one's is when it ended."""
    doc: dict[str, Any] = {
        "labels": dict(labels),
        "annotations": dict(annotations),
        "startsAt": rfc3339(starts_ms),
        "generatorURL": generator_url,
    }
    if ends_ms is not None:
        doc["endsAt"] = rfc3339(ends_ms)
    return doc


def group_labels(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: labels[k] for k in GROUP_BY if k in labels}


def group_key(labels: Mapping[str, str]) -> str:
    """Alertmanager's group key form for the root route: '{}:{name="value", ...}'."""
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels(labels).items()))
    return "{}:{" + inner + "}"


def _common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    first = maps[0]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in maps[1:])}


def webhook_alert(
    status: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    starts_ms: int,
    ends_ms: int | None,
    generator_url: str,
) -> dict[str, Any]:
    return {
        "status": status,
        "labels": dict(labels),
        "annotations": dict(annotations),
        "startsAt": rfc3339(starts_ms),
        "endsAt": rfc3339(ends_ms) if ends_ms else ZERO_TIME,
        "generatorURL": generator_url,
        "fingerprint": fingerprint(labels),
    }


def webhook_message(receiver: str, alerts: Iterable[dict[str, Any]], external_url: str) -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4) for one group of ``webhook_alert`` documents."""
    alerts = sorted(alerts, key=lambda a: (a["status"] != "firing", a["labels"].get("severity", ""), a["fingerprint"]))
    if not alerts:
        raise ValueError("a webhook message needs at least one alert")
    labels = [a["labels"] for a in alerts]
    return {
        "version": "4",
        "groupKey": group_key(labels[0]),
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": group_labels(labels[0]),
        "commonLabels": _common(labels),
        "commonAnnotations": _common([a["annotations"] for a in alerts]),
        "externalURL": external_url,
        "alerts": alerts,
    }
