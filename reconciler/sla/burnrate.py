"""Multi-window, multi-burn-rate alerting math (Google SRE workbook, ch. 5; DOMAIN.md §7). Pure.

The error budget of an objective with target ``t`` is ``1 - t``: the share of items allowed to miss the
latency threshold. Over a window, the burn rate is the observed bad share divided by that budget: 1 means the
budget lasts exactly the objective's period, 14.4 means a 30-day budget is gone in 50 hours. A rule pairs a
long window (is it significant?) with a short one (is it still happening?) and fires only when BOTH burn
faster than its factor, so an alert stops soon after the problem does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowRule:
    """Fire ``severity`` when the burn rate over ``long_s`` and over ``short_s`` both exceed ``factor``."""

    severity: str
    long_s: float
    short_s: float
    factor: float


# The SRE workbook's recommendation for a 30-day objective (DOMAIN.md §7).
DEFAULT_RULES: tuple[WindowRule, ...] = (
    WindowRule("page", 3600, 300, 14.4),
    WindowRule("page", 6 * 3600, 1800, 6.0),
    WindowRule("ticket", 3 * 86400, 6 * 3600, 1.0),
)


def error_budget(target: float) -> float:
    """Allowed bad share of an objective, e.g. 0.01 for 99%."""
    if not 0 < target < 1:
        raise ValueError(f"target must be between 0 and 1 (exclusive), got {target}")
    return 1.0 - target


def burn_rate(bad: int, total: int, target: float) -> float:
    """How many times faster than sustainable the budget burns; 0 when nothing was decided in the window."""
    if bad < 0 or total < 0 or bad > total:
        raise ValueError(f"need 0 <= bad <= total, got bad={bad} total={total}")
    if total == 0:
        return 0.0
    return (bad / total) / error_budget(target)


def budget_remaining(bad: int, total: int, target: float) -> float:
    """Share of the period's error budget left (negative once overspent); 1.0 with no decided item."""
    return 1.0 - burn_rate(bad, total, target)


def compliance(bad: int, total: int) -> float | None:
    """Good share of decided items, or None when there were none."""
    if total == 0:
        return None
    return (total - bad) / total


def rule_fires(rule: WindowRule, burn_by_window: Mapping[float, float]) -> bool:
    """True when both of the rule's windows burn strictly faster than its factor."""
    return burn_by_window[rule.long_s] > rule.factor and burn_by_window[rule.short_s] > rule.factor


def firing_rules(rules: Sequence[WindowRule], burn_by_window: Mapping[float, float]) -> list[WindowRule]:
    return [r for r in rules if rule_fires(r, burn_by_window)]


def windows_of(rules: Sequence[WindowRule]) -> list[float]:
    """Every distinct window the rules read, shortest first."""
    return sorted({w for r in rules for w in (r.long_s, r.short_s)})
