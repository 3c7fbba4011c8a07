"""Burn-rate math with hand-computed numbers (reconciler/sla/burnrate.py is pure)."""

from __future__ import annotations

import pytest

from reconciler.sla import burnrate as br

PAGE_FAST = br.WindowRule("page", 3600, 300, 14.4)


def test_burn_rate_is_bad_share_over_error_budget() -> None:
    # 2 of 100 items late against a 99% target: 2% bad / 1% budget = 2x.
    assert br.burn_rate(2, 100, 0.99) == pytest.approx(2.0)
    # 30 of 1200 late: 2.5% / 1% = 2.5x; against 99.9%: 2.5% / 0.1% = 25x.
    assert br.burn_rate(30, 1200, 0.99) == pytest.approx(2.5)
    assert br.burn_rate(30, 1200, 0.999) == pytest.approx(25.0)
    # Everything late: 100% / 1% = 100x, the highest a 99% objective can burn.
    assert br.burn_rate(7, 7, 0.99) == pytest.approx(100.0)


def test_no_decided_item_burns_nothing() -> None:
    assert br.burn_rate(0, 0, 0.99) == 0.0
    assert br.budget_remaining(0, 0, 0.99) == 1.0
    assert br.compliance(0, 0) is None


def test_budget_remaining_and_compliance() -> None:
    # 5 of 1000 late against 99%: half the budget (10 items) is spent.
    assert br.budget_remaining(5, 1000, 0.99) == pytest.approx(0.5)
    assert br.compliance(5, 1000) == pytest.approx(0.995)
    # 30 of 1000: 3x the budget, 2 budgets overspent.
    assert br.budget_remaining(30, 1000, 0.99) == pytest.approx(-2.0)


def test_both_windows_must_exceed_strictly() -> None:
    assert br.rule_fires(PAGE_FAST, {3600: 15.0, 300: 20.0})
    assert not br.rule_fires(PAGE_FAST, {3600: 15.0, 300: 14.0})  # short window recovered
    assert not br.rule_fires(PAGE_FAST, {3600: 10.0, 300: 100.0})  # a blip, not significant
    assert not br.rule_fires(PAGE_FAST, {3600: 14.4, 300: 100.0})  # equal is not above


def test_default_rules_are_the_workbook_ones() -> None:
    assert [(r.severity, r.long_s, r.short_s, r.factor) for r in br.DEFAULT_RULES] == [
        ("page", 3600, 300, 14.4),
        ("page", 21600, 1800, 6.0),
        ("ticket", 259200, 21600, 1.0),
    ]
    assert br.windows_of(br.DEFAULT_RULES) == [300, 1800, 3600, 21600, 259200]


def test_hand_computed_scenario_pages_on_the_slow_rule_and_tickets() -> None:
    """99% target; counts per window chosen by hand:
    5m: 100 items, 7 bad -> 7x; 30m: 600, 40 bad -> 6.67x; 1h: 1200, 30 bad -> 2.5x;
    6h: 7200, 500 bad -> 6.94x; 3d: 86400, 1000 bad -> 1.157x.
    1h/5m at 14.4: 2.5 and 7 -> no. 6h/30m at 6: 6.94 and 6.67 -> page. 3d/6h at 1: 1.157 and 6.94 -> ticket."""
    counts = {300: (7, 100), 1800: (40, 600), 3600: (30, 1200), 21600: (500, 7200), 259200: (1000, 86400)}
    burns = {w: br.burn_rate(b, t, 0.99) for w, (b, t) in counts.items()}
    assert burns[1800] == pytest.approx(6.6667, rel=1e-4)
    assert burns[21600] == pytest.approx(6.9444, rel=1e-4)
    assert burns[259200] == pytest.approx(1.1574, rel=1e-4)
    fired = br.firing_rules(br.DEFAULT_RULES, burns)
    assert [(r.severity, r.long_s) for r in fired] == [("page", 21600), ("ticket", 259200)]


def test_recovered_short_windows_stop_the_pages_then_the_ticket() -> None:
    """The long windows still remember the incident; once the short ones are clean the rules stop."""
    burns = {300: 0.0, 1800: 0.0, 3600: 50.0, 21600: 20.0, 259200: 5.0}
    assert [r.severity for r in br.firing_rules(br.DEFAULT_RULES, burns)] == ["ticket"]  # 6h still burning
    burns[21600] = 0.0  # 6h later the ticket's short window is clean too
    assert br.firing_rules(br.DEFAULT_RULES, burns) == []


@pytest.mark.parametrize(("bad", "total", "target"), [(2, 1, 0.99), (-1, 5, 0.99), (1, 5, 1.0), (1, 5, 0.0)])
def test_impossible_inputs_are_refused(bad: int, total: int, target: float) -> None:
    with pytest.raises(ValueError):
        br.burn_rate(bad, total, target)
