"""Pure evaluation: statistics -> status and alerts, breach transitions, wire formats, webhook dedup plans."""

from __future__ import annotations

import pytest

from reconciler.sla import evaluate as ev
from reconciler.sla.definitions import parse_definitions
from reconciler.sla.payloads import fingerprint, group_key, rfc3339, webhook_alert, webhook_message
from reconciler.sla.redact import redact_url, scrub
from reconciler.sla.webhook import plan_messages

DEFS = parse_definitions(
    """
objectives:
  - {name: invoice_posted, step: invoice_to_ledger, target: 99%, threshold: 15m, period: 30d}
thresholds:
  - {name: old_items, kind: unreconciled_age, max_age: 2d, max_count: 1}
"""
)
OBJ = DEFS.objectives[0]
LINKS = ev.Links("http://dash:8501")
WINDOWS = [300, 1800, 3600, 21600, 259200, 2592000]


def stats(region: str, counts: dict[int, tuple[int, int]], **kw: object) -> ev.StepStats:
    return ev.StepStats(
        region=region,
        totals=tuple(counts[w][1] for w in WINDOWS),
        bads=tuple(counts[w][0] for w in WINDOWS),
        **kw,  # type: ignore[arg-type]
    )


def test_query_windows_are_every_rule_window_plus_the_period() -> None:
    assert ev.query_windows(DEFS, OBJ) == WINDOWS
    assert ev.bounds_for(900)[:9] == (1, 5, 15, 30, 60, 120, 300, 600, 900)
    assert 1000 in ev.bounds_for(1000)


def test_eu_delay_pages_and_tickets_with_hand_computed_burn_rates() -> None:
    # 23 of 23 decided in the last hour are late (100x); 3 of 3 in the last 5m; 23 of 143 over 6h and 3d
    # (16.08x); 23 of 1000 over 30 days: compliance 97.7%, budget 1 - 2.3 = -1.3.
    counts = {300: (3, 3), 1800: (15, 15), 3600: (23, 23), 21600: (23, 143), 259200: (23, 143), 2592000: (23, 1000)}
    st = ev.objective_status(DEFS, OBJ, stats("EU", counts, stuck=13, in_flight=20, completed=980))
    assert st.burn_rates[3600] == pytest.approx(100.0)
    assert st.burn_rates[21600] == pytest.approx(2300 / 143)
    assert st.compliance == pytest.approx(0.977)
    assert st.budget_remaining == pytest.approx(-1.3)
    assert sorted(st.firing) == ["page", "ticket"]
    assert [(r.long_s, r.short_s) for r in st.firing["page"]] == [(3600, 300), (21600, 1800)]
    alerts = ev.objective_alerts(OBJ, st, LINKS)
    assert [a.severity for a in alerts] == ["page", "ticket"]
    page = alerts[0]
    assert page.labels == {
        "alertname": "TowerSLABurnRate",
        "sla": "invoice_posted",
        "step": "invoice_to_ledger",
        "region": "EU",
        "severity": "page",
    }
    assert page.value == pytest.approx(100.0)  # the long window of the hottest firing rule
    assert page.annotations["summary"].startswith("EU invoice_to_ledger: error budget burning 100.0x too fast over 1h")
    assert "13 stuck now" in page.annotations["summary"]
    assert page.annotations["dashboard"] == "http://dash:8501/slas?sla=invoice_posted&step=invoice_to_ledger&region=EU"
    assert page.generator_url.startswith("http://dash:8501/slas?sla=invoice_posted")  # a link needs no token
    doc = st.to_json()
    assert doc["windows"]["1h"] == {"bad": 23, "decided": 23, "burn_rate": pytest.approx(100.0)}
    assert doc["firing"]["page"] == ["1h/5m > 14.4", "6h/30m > 6"]


def test_a_healthy_region_fires_nothing() -> None:
    counts = {w: (0, 100) for w in WINDOWS}
    counts[2592000] = (5, 10000)  # a few late items over the month: 0.05% < 1%
    st = ev.objective_status(DEFS, OBJ, stats("NA", counts))
    assert st.firing == {} and ev.objective_alerts(OBJ, st, LINKS) == []
    assert st.compliance == pytest.approx(0.9995) and st.budget_remaining == pytest.approx(0.95)


def test_counts_for_the_wrong_windows_are_refused() -> None:
    with pytest.raises(ValueError):
        ev.objective_status(DEFS, OBJ, ev.StepStats("EU", (1, 2), (0, 0)))


def test_threshold_alerts_only_above_max_count() -> None:
    rule = DEFS.thresholds[0]
    rows = [{"region": "EU", "items": 3, "oldest_ns": 5}, {"region": "NA", "items": 1, "oldest_ns": 7}]
    (alert,) = ev.threshold_alerts(rule, rows, LINKS)
    assert alert.labels == {
        "alertname": "TowerSLAThreshold",
        "sla": "old_items",
        "step": "reconciliation",
        "region": "EU",
        "severity": "ticket",
    }
    assert alert.value == 3 and "3 unreconciled item(s) older than 2d" in alert.annotations["summary"]


def _alert(region: str = "EU", severity: str = "page", value: float = 20.0) -> ev.Alert:
    return ev.Alert("burn_rate", "invoice_posted", "invoice_to_ledger", region, severity, value, {"summary": "s"}, "g")


def test_transitions_start_continue_and_resolve() -> None:
    t0 = 1_700_000_000_000
    first = ev.transitions([], [_alert(), _alert(severity="ticket")], t0)
    assert [b.severity for b in first.started] == ["page", "ticket"] and not first.resolved
    page = first.started[0]
    assert (page.status, page.starts_ms, page.ends_ms, page.fingerprint) == ("firing", t0, 0, _alert().fingerprint)
    # a minute later the page burns hotter, the ticket stopped
    second = ev.transitions(first.started, [_alert(value=50.0)], t0 + 60_000)
    assert second.started == []
    (cont,) = second.continuing
    assert (cont.breach_id, cont.starts_ms, cont.value, cont.peak_value) == (page.breach_id, t0, 50.0, 50.0)
    (res,) = second.resolved
    assert (res.severity, res.status, res.ends_ms) == ("ticket", "resolved", t0 + 60_000)
    # then it cools down, still firing: the peak stays
    third = ev.transitions(second.continuing, [_alert(value=30.0)], t0 + 120_000)
    assert (third.continuing[0].value, third.continuing[0].peak_value) == (30.0, 50.0)
    # and a new episode after resolution is a new breach
    gone = ev.transitions(third.continuing, [], t0 + 180_000)
    again = ev.transitions([], [_alert()], t0 + 240_000)
    assert gone.resolved[0].breach_id != again.started[0].breach_id


def test_duplicate_open_episodes_keep_the_earliest_and_merge_the_rest_without_resolving_them() -> None:
    """Two API replicas evaluating at once each open the episode. The copy used to be 'resolved', and its
    resolution (the same labels) told Alertmanager the live alert had ended: a page flapped (a replicas review)."""
    a = ev.transitions([], [_alert()], 1000).started[0]
    b = ev.transitions([], [_alert()], 2000).started[0]
    t = ev.transitions([b, a], [_alert()], 3000)
    assert [x.breach_id for x in t.continuing] == [a.breach_id]
    assert t.resolved == []
    assert [(x.breach_id, x.status, x.ends_ms) for x in t.merged] == [(b.breach_id, "merged", 3000)]
    assert {x.breach_id for x in t.rows()} == {a.breach_id, b.breach_id}  # the copy is closed in the store
    assert t.merged[0].to_json()["ends_at"] is not None
    # once the alert stops, every open copy resolves (so none stays open)
    gone = ev.transitions([b, a], [], 4000)
    assert sorted(x.breach_id for x in gone.resolved) == sorted([a.breach_id, b.breach_id]) and gone.merged == []


def test_breach_row_round_trip() -> None:
    b = ev.transitions([], [_alert()], 1_700_000_000_123).started[0]
    row = b.to_row()
    back = ev.Breach.from_row(
        {
            "breach_id": row["BreachId"],
            "fingerprint": row["Fingerprint"],
            "kind": row["Kind"],
            "sla": row["Sla"],
            "step": row["Step"],
            "region": row["Region"],
            "severity": row["Severity"],
            "labels": row["Labels"],
            "annotations": row["Annotations"],
            "status": row["Status"],
            "starts_ms": row["StartsAt"],
            "ends_ms": row["EndsAt"],
            "value": row["Value"],
            "peak_value": row["PeakValue"],
            "details": row["Details"],
            "evaluated_ms": row["EvaluatedAt"],
        }
    )
    assert back == b
    assert b.to_json()["starts_at"] == "2023-11-14T22:13:20.123Z"


def test_fingerprint_is_alertmanagers() -> None:
    # Values read from Alertmanager 0.25's API for the same label sets (tests/test_sla_alertmanager.py checks live).
    labels = {"alertname": "TowerSLABurnRate", "sla": "invoice_posted", "step": "invoice_to_ledger", "region": "EU"}
    assert fingerprint({**labels, "severity": "page"}) == "57c9bafaaea34ce2"
    assert fingerprint({**labels, "severity": "ticket"}) == "b94ffd5d5eb5c2db"
    assert fingerprint({}) == "cbf29ce484222325"  # FNV-1a's offset basis: the empty label set


def test_webhook_message_is_alertmanagers_version_4() -> None:
    labels = _alert().labels
    firing = webhook_alert("firing", labels, {"summary": "s", "x": "1"}, 1_000, None, "g")
    resolved = webhook_alert("resolved", {**labels, "severity": "ticket"}, {"summary": "s"}, 1_000, 61_000, "g")
    msg = webhook_message("tower-webhook", [resolved, firing], "http://api")
    assert set(msg) == {
        "version",
        "groupKey",
        "truncatedAlerts",
        "status",
        "receiver",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "alerts",
    }
    assert msg["version"] == "4" and msg["status"] == "firing" and msg["truncatedAlerts"] == 0
    assert (
        msg["groupKey"]
        == group_key(labels)
        == ('{}:{alertname="TowerSLABurnRate", region="EU", sla="invoice_posted", step="invoice_to_ledger"}')
    )
    assert msg["commonLabels"] == {k: v for k, v in labels.items() if k != "severity"}
    assert msg["commonAnnotations"] == {"summary": "s"}
    assert [a["status"] for a in msg["alerts"]] == ["firing", "resolved"]
    assert msg["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    assert msg["alerts"][1]["endsAt"] == rfc3339(61_000) == "1970-01-01T00:01:01.000Z"


def test_webhook_plan_dedups_by_fingerprint_and_announces_resolutions_once() -> None:
    page, ticket = ev.transitions([], [_alert(), _alert(severity="ticket")], 5_000).started
    key = group_key(page.labels)
    # nothing told yet: one message for the group with both alerts
    assert [(k, len(f), len(r)) for k, f, r in plan_messages([page, ticket], [], set())] == [(key, 2, 0)]
    told = {(page.fingerprint, 5_000, "firing"), (ticket.fingerprint, 5_000, "firing")}
    assert plan_messages([page, ticket], [], told) == []  # repeat without change: nothing
    # the ticket resolves: one message (page still firing, ticket resolved)
    res = ev.transitions([page, ticket], [_alert()], 9_000).resolved
    assert [(len(f), [b.severity for b in r]) for _, f, r in plan_messages([page], res, told)] == [(1, ["ticket"])]
    told.add((ticket.fingerprint, 5_000, "resolved"))
    assert plan_messages([page], res, told) == []
    # a resolution whose firing was never told to this receiver is not announced
    assert plan_messages([], res, set()) == []


def test_receiver_urls_are_redacted_to_scheme_host_and_port() -> None:
    assert redact_url("https://hooks.slack.com/services/T0/B0/XYZ") == "https://hooks.slack.com/***"
    assert redact_url("http://u:p@am.example:9093") == "http://***@am.example:9093"
    assert redact_url("http://am.example:9093/") == "http://am.example:9093"
    assert redact_url("https://relay.example/?token=abc") == "https://relay.example/***"
    assert redact_url("not a url") == "***"
    text = "POST http://u:s3cret@am:9093/x failed; password s3cret"
    assert "s3cret" not in scrub(text, "http://u:s3cret@am:9093/x")


def test_regions_past_the_cap_add_up_as_other() -> None:
    def stats(region: str, total: int, bad: int, q: tuple[float, float, float] | None) -> ev.StepStats:
        return ev.StepStats(region, (total, total * 2), (bad, bad), stuck=bad, in_flight=1, completed=total,
                            quantiles_s=q, buckets=(total, total), latency_sum_s=float(total))  # fmt: skip

    rows = [stats("EU", 50, 1, (1.0, 2.0, 3.0)), stats("x1", 3, 1, (1.0, 1.0, 1.0)), stats("NA", 20, 0, None),
            stats("x2", 2, 2, (5.0, 5.0, 5.0)), stats("other", 1, 0, None)]  # fmt: skip
    assert ev.fold_regions(rows, 5) == rows  # within the cap: as they are
    folded = {s.region: s for s in ev.fold_regions(rows, 2)}
    assert set(folded) == {"EU", "NA", "other"} and folded["EU"] == rows[0] and folded["NA"] == rows[2]
    other = folded["other"]
    assert (other.totals, other.bads, other.stuck, other.in_flight, other.completed) == ((6, 12), (3, 3), 3, 3, 6)
    assert other.buckets == (6, 6) and other.latency_sum_s == 6.0 and other.quantiles_s is None
