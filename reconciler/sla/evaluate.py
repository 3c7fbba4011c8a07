"""SLA evaluation, pure: per-region step statistics -> compliance, burn rates and alerts; alerts + open
breaches -> the breach transitions to store and deliver.

Alert identity is its label set (alertname, sla, step, region, severity); a breach is one firing episode of
an alert, from the evaluation that first saw it firing (startsAt) to the one that saw it stop (endsAt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

import orjson

from reconciler.sla import burnrate as br
from reconciler.sla.definitions import Definitions, Objective, ThresholdRule, format_duration
from reconciler.sla.payloads import fingerprint

BURN_ALERT = "TowerSLABurnRate"
THRESHOLD_ALERT = "TowerSLAThreshold"
# Latency histogram bounds (seconds); each objective's threshold is added so its bucket reads compliance.
BASE_BOUNDS_S: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)


def bounds_for(threshold_s: float) -> tuple[float, ...]:
    return tuple(sorted({*BASE_BOUNDS_S, threshold_s}))


def query_windows(defs: Definitions, obj: Objective) -> list[float]:
    """Windows the step query counts, shortest first: every burn-rate window plus the objective's period."""
    return sorted({*br.windows_of(defs.rules), obj.period})


@dataclass(frozen=True)
class StepStats:
    """One region's counts for one objective, as the store returns them (windows in ``query_windows`` order)."""

    region: str
    totals: tuple[int, ...]
    bads: tuple[int, ...]
    stuck: int = 0
    in_flight: int = 0
    completed: int = 0
    quantiles_s: tuple[float, float, float] | None = None
    buckets: tuple[int, ...] = ()
    latency_sum_s: float = 0.0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StepStats:
        q = tuple(float(v) / 1e9 for v in row["q_ns"])
        return cls(
            region=row["region"],
            totals=tuple(int(v) for v in row["totals"]),
            bads=tuple(int(v) for v in row["bads"]),
            stuck=int(row["stuck"]),
            in_flight=int(row["in_flight"]),
            completed=int(row["completed"]),
            quantiles_s=q if int(row["completed"]) and len(q) == 3 else None,  # type: ignore[arg-type]
            buckets=tuple(int(v) for v in row["buckets"]),
            latency_sum_s=float(row["latency_sum_ns"]) / 1e9,
        )


OTHER_REGION = "other"


def fold_regions(stats: list[StepStats], keep: int) -> list[StepStats]:
    """The ``keep`` busiest regions (most items decided in the longest window, then by name) as they are; the
    rest added up as one region ``other`` (its latency quantiles unknown: they do not add). Regions come from the
    data, and each is ~40 metric series and its own alerts."""
    if len(stats) <= keep:
        return stats
    ranked = sorted(stats, key=lambda s: (-max(s.totals, default=0), s.region))
    kept = [s for s in ranked if s.region != OTHER_REGION][:keep]
    rest = [s for s in ranked if s not in kept]

    def add(values: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(sum(v) for v in zip(*values, strict=True))

    other = StepStats(
        region=OTHER_REGION,
        totals=add([s.totals for s in rest]),
        bads=add([s.bads for s in rest]),
        stuck=sum(s.stuck for s in rest),
        in_flight=sum(s.in_flight for s in rest),
        completed=sum(s.completed for s in rest),
        quantiles_s=rest[0].quantiles_s if len(rest) == 1 else None,
        buckets=add([s.buckets for s in rest]),
        latency_sum_s=sum(s.latency_sum_s for s in rest),
    )
    return sorted([*kept, other], key=lambda s: s.region)


@dataclass(frozen=True)
class ObjectiveStatus:
    """Where one objective stands in one region at one evaluation."""

    sla: str
    step: str
    region: str
    target: float
    threshold_s: float
    period_s: float
    decided: int
    bad: int
    compliance: float | None
    budget_remaining: float
    burn_rates: dict[float, float]
    windows: dict[float, tuple[int, int]]  # window -> (bad, decided)
    firing: dict[str, list[br.WindowRule]]
    stuck: int
    in_flight: int
    completed: int
    quantiles_s: tuple[float, float, float] | None
    bounds_s: tuple[float, ...]
    buckets: tuple[int, ...]
    latency_sum_s: float

    def to_json(self) -> dict[str, Any]:
        q = self.quantiles_s
        return {
            "sla": self.sla,
            "step": self.step,
            "region": self.region,
            "target": self.target,
            "threshold_s": self.threshold_s,
            "period_s": self.period_s,
            "decided": self.decided,
            "bad": self.bad,
            "compliance": self.compliance,
            "error_budget_remaining": self.budget_remaining,
            "burn_rates": {format_duration(w): r for w, r in sorted(self.burn_rates.items())},
            "windows": {
                format_duration(w): {"bad": b, "decided": d, "burn_rate": self.burn_rates[w]}
                for w, (b, d) in sorted(self.windows.items())
            },
            "firing": {sev: [_rule_text(r) for r in rules] for sev, rules in self.firing.items()},
            "stuck": self.stuck,
            "in_flight": self.in_flight,
            "completed": self.completed,
            "latency_p50_s": q[0] if q else None,
            "latency_p90_s": q[1] if q else None,
            "latency_p99_s": q[2] if q else None,
        }


def _rule_text(r: br.WindowRule) -> str:
    return f"{format_duration(r.long_s)}/{format_duration(r.short_s)} > {r.factor:g}"


def objective_status(defs: Definitions, obj: Objective, stats: StepStats) -> ObjectiveStatus:
    windows = query_windows(defs, obj)
    if len(stats.totals) != len(windows) or len(stats.bads) != len(windows):
        raise ValueError(f"expected counts for {len(windows)} windows, got {len(stats.totals)}")
    counts = {w: (b, t) for w, b, t in zip(windows, stats.bads, stats.totals, strict=True)}
    burns = {w: br.burn_rate(b, t, obj.target) for w, (b, t) in counts.items()}
    firing: dict[str, list[br.WindowRule]] = {}
    for rule in br.firing_rules(defs.rules, burns):
        firing.setdefault(rule.severity, []).append(rule)
    bad, decided = counts[obj.period]
    return ObjectiveStatus(
        sla=obj.name,
        step=obj.step,
        region=stats.region,
        target=obj.target,
        threshold_s=obj.threshold,
        period_s=obj.period,
        decided=decided,
        bad=bad,
        compliance=br.compliance(bad, decided),
        budget_remaining=br.budget_remaining(bad, decided, obj.target),
        burn_rates=burns,
        windows=counts,
        firing=firing,
        stuck=stats.stuck,
        in_flight=stats.in_flight,
        completed=stats.completed,
        quantiles_s=stats.quantiles_s,
        bounds_s=bounds_for(obj.threshold),
        buckets=stats.buckets,
        latency_sum_s=stats.latency_sum_s,
    )


@dataclass(frozen=True)
class Links:
    """Where alerts point people: the dashboard's SLA page, for the annotation and Alertmanager's generatorURL alike
    (the API's breach list needs a bearer token, which a link in a chat or an e-mail cannot carry)."""

    dashboard_url: str

    def dashboard(self, **query: str) -> str:
        return f"{self.dashboard_url.rstrip('/')}/slas?{urlencode(query)}"

    def generator(self, **query: str) -> str:
        return self.dashboard(**query)


@dataclass(frozen=True)
class Alert:
    """An alert that should be firing now."""

    kind: str
    sla: str
    step: str
    region: str
    severity: str
    value: float
    annotations: dict[str, str]
    generator_url: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        return {
            "alertname": BURN_ALERT if self.kind == "burn_rate" else THRESHOLD_ALERT,
            "sla": self.sla,
            "step": self.step,
            "region": self.region,
            "severity": self.severity,
        }

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)


def objective_alerts(obj: Objective, status: ObjectiveStatus, links: Links) -> list[Alert]:
    """One alert per severity with a firing rule."""
    out = []
    for severity, rules in sorted(status.firing.items()):
        rule = max(rules, key=lambda r: status.burn_rates[r.long_s])
        long_bad, long_total = status.windows[rule.long_s]
        burn = status.burn_rates[rule.long_s]
        summary = (
            f"{status.region} {obj.step}: error budget burning {burn:.1f}x too fast over "
            f"{format_duration(rule.long_s)} ({long_bad} of {long_total} items over "
            f"{format_duration(obj.threshold)}; {status.stuck} stuck now) — objective {obj.summary()}"
        )
        q = {"sla": obj.name, "step": obj.step, "region": status.region}
        out.append(
            Alert(
                kind="burn_rate",
                sla=obj.name,
                step=obj.step,
                region=status.region,
                severity=severity,
                value=burn,
                annotations={
                    "summary": summary,
                    "description": obj.description or obj.summary(),
                    "dashboard": links.dashboard(**q),
                    "rules": ", ".join(_rule_text(r) for r in rules),
                },
                generator_url=links.generator(**q),
                details={"burn_rates": {format_duration(w): b for w, b in sorted(status.burn_rates.items())}},
            )
        )
    return out


def threshold_alerts(rule: ThresholdRule, rows: Iterable[Mapping[str, Any]], links: Links) -> list[Alert]:
    """One alert per region whose count of violating items exceeds the rule's max_count."""
    out = []
    for row in rows:
        count = int(row["items"])
        if count <= rule.max_count:
            continue
        region = row["region"]
        q = {"sla": rule.name, "step": rule.step, "region": region}
        out.append(
            Alert(
                kind="threshold",
                sla=rule.name,
                step=rule.step,
                region=region,
                severity=rule.severity,
                value=float(count),
                annotations={
                    "summary": (
                        f"{region}: {count} unreconciled item(s) older than {format_duration(rule.max_age)} "
                        f"(rule: {rule.summary()})"
                    ),
                    "description": rule.description or rule.summary(),
                    "dashboard": links.dashboard(**q),
                },
                generator_url=links.generator(**q),
                details={"items": count, "oldest_ns": int(row.get("oldest_ns") or 0)},
            )
        )
    return out


@dataclass(frozen=True)
class Breach:
    """One firing episode of an alert, as stored in ``sla_breaches``."""

    breach_id: str
    fingerprint: str
    kind: str
    sla: str
    step: str
    region: str
    severity: str
    labels: dict[str, str]
    annotations: dict[str, str]
    generator_url: str
    status: str
    starts_ms: int
    ends_ms: int
    value: float
    peak_value: float
    evaluated_ms: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {
            "BreachId": self.breach_id,
            "Fingerprint": self.fingerprint,
            "Sla": self.sla,
            "Kind": self.kind,
            "Step": self.step,
            "Region": self.region,
            "Severity": self.severity,
            "Labels": self.labels,
            "Annotations": self.annotations,
            "Status": self.status,
            "StartsAt": self.starts_ms,
            "EndsAt": self.ends_ms,
            "Value": self.value,
            "PeakValue": self.peak_value,
            "Details": orjson.dumps({**self.details, "generator_url": self.generator_url}).decode(),
            "EvaluatedAt": self.evaluated_ms,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Breach:
        details = orjson.loads(row["details"] or "{}")
        return cls(
            breach_id=row["breach_id"],
            fingerprint=row["fingerprint"],
            kind=row["kind"],
            sla=row["sla"],
            step=row["step"],
            region=row["region"],
            severity=row["severity"],
            labels=dict(row["labels"]),
            annotations=dict(row["annotations"]),
            generator_url=details.pop("generator_url", ""),
            status=row["status"],
            starts_ms=int(row["starts_ms"]),
            ends_ms=int(row["ends_ms"]),
            value=float(row["value"]),
            peak_value=float(row["peak_value"]),
            evaluated_ms=int(row["evaluated_ms"]),
            details=details,
        )

    def to_json(self) -> dict[str, Any]:
        from reconciler.sla.payloads import rfc3339

        return {
            "breach_id": self.breach_id,
            "fingerprint": self.fingerprint,
            "sla": self.sla,
            "kind": self.kind,
            "step": self.step,
            "region": self.region,
            "severity": self.severity,
            "status": self.status,
            "starts_at": rfc3339(self.starts_ms),
            "ends_at": rfc3339(self.ends_ms) if self.status != "firing" else None,
            "duration_s": ((self.ends_ms if self.status != "firing" else self.evaluated_ms) - self.starts_ms) / 1000,
            "value": self.value,
            "peak_value": self.peak_value,
            "labels": self.labels,
            "annotations": self.annotations,
            "generator_url": self.generator_url,
            "details": self.details,
        }


def breach_id(fp: str, starts_ms: int) -> str:
    return hashlib.sha256(f"{fp}:{starts_ms}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Transitions:
    started: list[Breach]
    continuing: list[Breach]
    resolved: list[Breach]
    # closed without a word to anyone: copies of an episode that still fires, opened by another process
    # evaluating at the same moment (two API replicas); "resolving" one told Alertmanager the live alert had ended
    merged: list[Breach] = field(default_factory=list)

    @property
    def firing(self) -> list[Breach]:
        return self.started + self.continuing

    def rows(self) -> list[Breach]:
        return self.started + self.continuing + self.resolved + self.merged


def transitions(open_breaches: Sequence[Breach], alerts: Sequence[Alert], now_ms: int) -> Transitions:
    """Compare what fires now with the breaches open so far: new ones start at ``now``, open ones that still
    fire continue (startsAt kept, value and annotations refreshed), open ones that stopped resolve at ``now``."""
    by_fp: dict[str, Breach] = {}
    for b in sorted(open_breaches, key=lambda b: (b.starts_ms, b.breach_id)):
        by_fp.setdefault(b.fingerprint, b)  # the earliest open episode of an alert is the one that continues
    started, continuing = [], []
    seen = set()
    for a in alerts:
        fp = a.fingerprint
        if fp in seen:
            continue
        seen.add(fp)
        prev = by_fp.get(fp)
        if prev is None:
            started.append(
                Breach(
                    breach_id=breach_id(fp, now_ms),
                    fingerprint=fp,
                    kind=a.kind,
                    sla=a.sla,
                    step=a.step,
                    region=a.region,
                    severity=a.severity,
                    labels=a.labels,
                    annotations=a.annotations,
                    generator_url=a.generator_url,
                    status="firing",
                    starts_ms=now_ms,
                    ends_ms=0,
                    value=a.value,
                    peak_value=a.value,
                    evaluated_ms=now_ms,
                    details=a.details,
                )
            )
        else:
            continuing.append(
                replace(
                    prev,
                    annotations=a.annotations,
                    generator_url=a.generator_url,
                    value=a.value,
                    peak_value=max(prev.peak_value, a.value),
                    evaluated_ms=now_ms,
                    details=a.details,
                )
            )
    resolved = [
        replace(b, status="resolved", ends_ms=max(now_ms, b.starts_ms), evaluated_ms=now_ms)
        for b in open_breaches
        if b.fingerprint not in seen
    ]
    merged = [
        replace(b, status="merged", ends_ms=max(now_ms, b.starts_ms), evaluated_ms=now_ms)
        for b in open_breaches
        if b.fingerprint in seen and by_fp[b.fingerprint] is not b
    ]
    return Transitions(started, continuing, resolved, merged)
