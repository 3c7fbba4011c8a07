"""Prometheus view of the last SLA evaluation, so an existing Prometheus can graph and alert on it too.

Values are those of the last recorded evaluation (``tower_sla_last_evaluation_timestamp_seconds`` says when).
The latency distribution is a *gauge histogram* over each objective's period (not a counter): use it directly
in ``histogram_quantile`` without ``rate``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.sla.definitions import format_duration

if TYPE_CHECKING:
    from reconciler.sla.service import SlaService

_SSR = ["sla", "step", "region"]


def _le(bound: float) -> str:
    return f"{bound:g}"


class SlaCollector(Collector):
    def __init__(self, service: SlaService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        evaluations = CounterMetricFamily("tower_sla_evaluations", "SLA evaluations recorded.")
        evaluations.add_metric([], svc.counters.evaluations)
        yield evaluations
        errors = CounterMetricFamily("tower_sla_evaluation_errors", "SLA evaluations that failed (retried).")
        errors.add_metric([], svc.counters.errors)
        yield errors
        notes = CounterMetricFamily(
            "tower_sla_notifications", "Alert deliveries by channel and outcome.", labels=["channel", "outcome"]
        )
        for (channel, outcome), n in sorted(svc.counters.notifications.items()):
            notes.add_metric([channel, outcome], n)
        yield notes
        target = GaugeMetricFamily("tower_sla_objective_ratio", "Target good share of an objective.", labels=_SSR[:2])
        threshold = GaugeMetricFamily(
            "tower_sla_latency_threshold_seconds", "Latency an item must stay within.", labels=_SSR[:2]
        )
        for obj in svc.definitions.objectives:
            target.add_metric([obj.name, obj.step], obj.target)
            threshold.add_metric([obj.name, obj.step], obj.threshold)
        yield target
        yield threshold

        last = svc.last
        if last is None:
            return
        when = GaugeMetricFamily(
            "tower_sla_last_evaluation_timestamp_seconds", "Evaluation instant of the values below."
        )
        when.add_metric([], last.now_ns / 1e9)
        yield when
        took = GaugeMetricFamily("tower_sla_evaluation_duration_seconds", "Duration of the last evaluation.")
        took.add_metric([], last.duration_s)
        yield took

        comp = GaugeMetricFamily(
            "tower_sla_compliance_ratio", "Good share of items decided over the objective's period.", labels=_SSR
        )
        budget = GaugeMetricFamily(
            "tower_sla_error_budget_remaining_ratio",
            "Share of the period's error budget left (negative when overspent).",
            labels=_SSR,
        )
        burn = GaugeMetricFamily(
            "tower_sla_burn_rate",
            "Error-budget burn rate per window (1 = exactly on budget).",
            labels=[*_SSR, "window"],
        )
        decided = GaugeMetricFamily(
            "tower_sla_items_decided",
            "Items decided (completed or past threshold) per window.",
            labels=[*_SSR, "window"],
        )
        bad = GaugeMetricFamily(
            "tower_sla_items_bad", "Items over their threshold per window.", labels=[*_SSR, "window"]
        )
        stuck = GaugeMetricFamily(
            "tower_sla_items_stuck", "Items in flight past their threshold (breaching before completing).", labels=_SSR
        )
        flight = GaugeMetricFamily("tower_sla_items_in_flight", "Items started and not yet completed.", labels=_SSR)
        quant = GaugeMetricFamily(
            "tower_sla_step_latency_quantile_seconds",
            "Step latency quantiles of items completed over the period.",
            labels=[*_SSR, "quantile"],
        )
        hist = GaugeHistogramMetricFamily(
            "tower_sla_step_latency_seconds",
            "Step latency of items completed over the objective's period (gauge histogram).",
            labels=_SSR,
        )
        for s in last.statuses:
            labels = [s.sla, s.step, s.region]
            if s.compliance is not None:
                comp.add_metric(labels, s.compliance)
            budget.add_metric(labels, s.budget_remaining)
            for w, rate in sorted(s.burn_rates.items()):
                burn.add_metric([*labels, format_duration(w)], rate)
                b, d = s.windows[w]
                decided.add_metric([*labels, format_duration(w)], d)
                bad.add_metric([*labels, format_duration(w)], b)
            stuck.add_metric(labels, s.stuck)
            flight.add_metric(labels, s.in_flight)
            if s.quantiles_s is not None:
                for q, v in zip(("0.5", "0.9", "0.99"), s.quantiles_s, strict=True):
                    quant.add_metric([*labels, q], v)
            if len(s.buckets) == len(s.bounds_s):
                buckets = [(_le(b), c) for b, c in zip(s.bounds_s, s.buckets, strict=True)]
                buckets.append(("+Inf", s.completed))
                hist.add_metric(labels, buckets, s.latency_sum_s)
        yield from (comp, budget, burn, decided, bad, stuck, flight, quant, hist)

        firing = GaugeMetricFamily(
            "tower_sla_alert_firing",
            "1 for every SLA alert firing at the last evaluation.",
            labels=["alertname", "sla", "step", "region", "severity"],
        )
        for b in last.transitions.firing:
            firing.add_metric([b.labels[k] for k in ("alertname", "sla", "step", "region", "severity")], 1)
        yield firing
        over = GaugeMetricFamily(
            "tower_sla_threshold_items", "Items violating a threshold rule, per region.", labels=["sla", "region"]
        )
        for name, rows in last.thresholds.items():
            for r in rows:
                over.add_metric([name, r["region"]], int(r["items"]))
        yield over
