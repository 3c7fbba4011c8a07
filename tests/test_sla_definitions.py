"""SLA definition files: the shipped default is valid; invalid files fail with the line and the reason, and
`tower serve` refuses them at start with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from collector.correlation import STEPS
from reconciler.sla import burnrate as br
from reconciler.sla.definitions import (
    STEP_ITEM_KEYS,
    default_path,
    format_duration,
    load_definitions,
    parse_definitions,
    parse_duration,
)
from tower_core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
version: 1
objectives:
  - name: invoice_posted_eu
    step: invoice_to_ledger
    regions: [EU]
    target: 99.9%
    threshold: 10m
    period: 7d
thresholds:
  - name: old_items
    kind: unreconciled_age
    max_age: 36h
    classes: [missing_in_erp]
"""


def test_the_shipped_default_is_valid_and_covers_every_step() -> None:
    defs = load_definitions()
    assert defs.source == str(default_path())
    assert {o.step for o in defs.objectives} == set(STEPS)
    assert defs.rules == br.DEFAULT_RULES
    rule = defs.thresholds[0]
    assert (rule.kind, rule.max_age, rule.max_count) == ("unreconciled_age", 2 * 86400, 0)
    invoice = next(o for o in defs.objectives if o.step == "invoice_to_ledger")
    assert (invoice.target, invoice.threshold, invoice.period, invoice.regions) == (0.99, 900, 30 * 86400, ())
    assert set(STEP_ITEM_KEYS) == set(STEPS)


def test_a_valid_file_parses_with_defaults() -> None:
    defs = parse_definitions(GOOD, "f.yaml")
    (obj,) = defs.objectives
    assert (obj.target, obj.threshold, obj.period, obj.regions) == (0.999, 600, 7 * 86400, ("EU",))
    assert (obj.key_type, obj.source, obj.target_system) == ("invoice", "billing", "erp")
    assert obj.summary() == "99.9% of invoice_to_ledger within 10m over 1w"
    (rule,) = defs.thresholds
    assert rule.classes == ("missing_in_erp",) and rule.max_age == 36 * 3600
    assert rule.exclude_states == ("resolved", "acknowledged", "ignored") and rule.severity == "ticket"
    assert defs.rules == br.DEFAULT_RULES  # burn_rate_windows omitted
    doc = defs.to_json()
    assert doc["objectives"][0]["threshold"] == "10m" and doc["thresholds"][0]["regions"] == "all"


def test_a_yaml_merge_key_copies_an_objective_whose_own_keys_override_it() -> None:
    text = (
        "objectives:\n"
        "  - &base {name: a, step: invoice_to_ledger, target: 99%, threshold: 15m}\n"
        "  - <<: *base\n"
        "    name: b\n"
        "    regions: [EU]\n"
    )
    a, b = parse_definitions(text, "f.yaml").objectives
    assert (a.name, b.name, b.regions, b.threshold, b.target) == ("a", "b", ("EU",), 900, 0.99)
    with pytest.raises(ConfigError, match="f.yaml:6: duplicate key 'name' \\(first on line 4\\)"):
        parse_definitions(text + "    name: c\n", "f.yaml")  # a key written twice is still an error


def test_custom_burn_windows_replace_the_defaults() -> None:
    defs = parse_definitions("burn_rate_windows:\n  - {severity: page, long: 2h, short: 10m, burn_rate: 10}\n")
    assert defs.rules == (br.WindowRule("page", 7200, 600, 10.0),)


def test_limits_that_are_still_accepted() -> None:
    """The bounds refuse only what can never work: a factor just below the fastest burn, 10 years, every
    drift state, and a low target with windows it can exceed."""
    defs = parse_definitions(
        "burn_rate_windows:\n  - {severity: page, long: 1h, short: 5m, burn_rate: 99.9}\n"
        "  - {severity: ticket, long: 1h, short: 5m, burn_rate: 1}\n"
        "objectives:\n  - {name: x, step: invoice_to_ledger, target: 99%, threshold: 15m, period: 3650d}\n"
        "  - {name: y, step: invoice_to_ledger, target: 99.9%, threshold: 15m}\n"
        "thresholds:\n  - {name: z, kind: unreconciled_age, max_age: 2d, exclude_states: [], classes: all}\n"
    )
    assert [r.factor for r in defs.rules] == [99.9, 1.0] and defs.objectives[0].period == 3650 * 86400
    assert (defs.thresholds[0].exclude_states, defs.thresholds[0].classes) == ((), ())
    low = "burn_rate_windows:\n  - {severity: page, long: 1h, short: 5m, burn_rate: 4}\n"
    assert parse_definitions(low + "objectives:\n  - {name: x, step: invoice_to_ledger, target: 80%, threshold: 1m}\n")


BAD = [
    (
        "objectives:\n  - name: x\n    step: invoice_to_ledger\n    target: 1.5\n    threshold: 15m\n",
        "f.yaml:4: objectives[0].target: target 1.5 must be between 0 and 1 exclusive (e.g. 0.99 or '99%')",
    ),
    (
        "objectives:\n  - name: x\n    step: invoice_to_cash\n    target: 99%\n    threshold: 15m\n",
        "f.yaml:3: objectives[0].step: unknown step 'invoice_to_cash'; one of " + ", ".join(STEPS),
    ),
    (
        "objectives:\n  - name: x\n    step: invoice_to_ledger\n    target: 99%\n",
        "f.yaml:2: objectives[0].threshold: required field missing",
    ),
    (
        "objectives:\n  - name: x\n    step: invoice_to_ledger\n    target: 99%\n    threshold: 15 minutes\n",
        "f.yaml:5: objectives[0].threshold: invalid duration '15 minutes': use a number with s, m, h, d or w, e.g. 15m",
    ),
    (
        "objectives:\n  - name: x\n    step: invoice_to_ledger\n    target: 99%\n    threshold: 15m\n"
        "    treshold: 1m\n",
        "f.yaml:6: objectives[0].treshold: unknown field",
    ),
    (
        "objectives:\n  - name: x\n    step: invoice_to_ledger\n    target: 99%\n    threshold: 40d\n",
        "f.yaml:5: objectives[0].threshold: threshold must be shorter than period",
    ),
    ("objectives: [\n", "f.yaml:2: invalid YAML: while parsing a flow node expected the node content, but found"),
    ("version: 1\nversion: 1\n", "f.yaml:2: duplicate key 'version' (first on line 1)"),
    ("- 1\n", "f.yaml:1: the file must be a mapping with objectives and thresholds"),
    (
        "burn_rate_windows:\n  - {severity: page, long: 5m, short: 1h, burn_rate: 2}\n",
        "f.yaml:2: burn_rate_windows[0]: short window (1h) must be shorter than long",
    ),
    (
        "burn_rate_windows:\n  - {severity: sms, long: 1h, short: 5m, burn_rate: 2}\n",
        "f.yaml:2: burn_rate_windows[0].severity: Input should be 'page' or 'ticket'",
    ),
    (
        GOOD + "  - name: invoice_posted_eu\n    kind: unreconciled_age\n    max_age: 2d\n",
        "f.yaml:14: thresholds[1].name: duplicate name 'invoice_posted_eu' (first on line 3)",
    ),
    (
        "thresholds:\n  - name: y\n    kind: unreconciled_age\n    max_age: 2d\n    regions: [EU, 'bad region']\n",
        "f.yaml:5: thresholds[0].regions: invalid region 'bad region': letters, digits, '_' or '-', at most 32",
    ),
    ("version: 2\n", "f.yaml:1: version: Input should be 1"),
    # a misspelt drift class or state would silently match nothing
    (
        "thresholds:\n  - name: y\n    kind: unreconciled_age\n    max_age: 2d\n    classes: [mising_in_erp]\n",
        "f.yaml:5: thresholds[0].classes: unknown drift class 'mising_in_erp'; one of missing_in_erp, ",
    ),
    (
        "thresholds:\n  - name: y\n    kind: unreconciled_age\n    max_age: 2d\n    classes: []\n",
        "f.yaml:5: thresholds[0].classes: must be a non-empty list of drift class names, e.g. [missing_in_erp]",
    ),
    (
        "thresholds:\n  - name: y\n    kind: unreconciled_age\n    max_age: 2d\n"
        "    exclude_states: [resolvd, acknowledged]\n",
        "f.yaml:5: thresholds[0].exclude_states: unknown drift state 'resolvd'; one of new, persisting, resolved, ",
    ),
    # burn-rate windows that can never page
    ("burn_rate_windows: []\n", "f.yaml:1: burn_rate_windows: needs at least one window (omit it for the defaults)"),
    (
        "burn_rate_windows:\n  - {severity: page, long: 1h, short: 5m, burn_rate: .inf}\n",
        "f.yaml:2: burn_rate_windows[0].burn_rate: Input should be a finite number",
    ),
    (
        "burn_rate_windows:\n  - {severity: page, long: 1h, short: 5m, burn_rate: .nan}\n",
        "f.yaml:2: burn_rate_windows[0].burn_rate: Input should be a finite number",
    ),
    (
        "burn_rate_windows:\n  - {severity: page, long: 1h, short: 5m, burn_rate: 14.4}\n"
        "  - {severity: ticket, long: 3d, short: 6h, burn_rate: 1}\n"
        "  - {severity: page, long: 1h, short: 5m, burn_rate: 10}\n",
        "f.yaml:4: burn_rate_windows[2]: duplicate page window 1h/5m (first on line 2)",
    ),
    (
        "burn_rate_windows:\n  - {severity: page, long: 1h, short: 5m, burn_rate: 14.4}\n"
        "  - {severity: page, long: 6h, short: 30m, burn_rate: 100}\n"
        "objectives:\n  - {name: x, step: invoice_to_ledger, target: 99%, threshold: 15m}\n",
        "f.yaml:3: burn_rate_windows[1].burn_rate: burn rate 100 of the page window 6h/30m can never be exceeded "
        "by objective 'x' (target 99% burns at most 100)",
    ),
    (
        "objectives:\n  - name: x\n    step: invoice_to_ledger\n    target: 90%\n    threshold: 15m\n",
        "f.yaml:4: objectives[0].target: the default burn rate 14.4 of the page window 1h/5m can never be exceeded "
        "by objective 'x' (target 90% burns at most 10)",
    ),
    # durations beyond 10 years overflow the nanosecond bounds of the evaluation
    (
        "objectives:\n  - name: x\n    step: invoice_to_ledger\n    target: 99%\n    threshold: 15m\n"
        "    period: 20000w\n",
        "f.yaml:6: objectives[0].period: duration '20000w' is too long: at most 3650d (10 years)",
    ),
    (
        "burn_rate_windows:\n  - {severity: ticket, long: 3651d, short: 6h, burn_rate: 1}\n",
        "f.yaml:2: burn_rate_windows[0].long: duration '3651d' is too long: at most 3650d (10 years)",
    ),
    (
        "thresholds:\n  - {name: y, kind: unreconciled_age, max_age: 100000d}\n",
        "f.yaml:2: thresholds[0].max_age: duration '100000d' is too long: at most 3650d (10 years)",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(": ", 1)[1][:40] for _, m in BAD])
def test_invalid_files_name_the_line_and_the_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_definitions(text, "f.yaml")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("6h", 21600), ("3d", 259200), ("1w", 604800), (120, 120)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["15", "15 min", "-5m", "0s", True, None, "m", float("nan"), float("inf"), "20000w", "3651d", 1e300]
)
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_picks_the_largest_exact_unit() -> None:
    assert [format_duration(s) for s in (300, 1800, 3600, 259200, 90, 2.5)] == ["5m", "30m", "1h", "3d", "90s", "2.5s"]


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    clean |= {"TOWER_DATA_DIR": str(tmp_path / "data"), "TOWER_WAL_DIR": str(tmp_path / "wal"), **env}
    return subprocess.run(
        [sys.executable, "-m", "tower_core.cli", "serve", "--port", "1"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tower_serve_refuses_an_invalid_sla_file_with_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "sla.yaml"
    bad.write_text("objectives:\n  - name: x\n    step: invoice_to_ledger\n    target: 1.5\n    threshold: 15m\n")
    proc = _serve(tmp_path, TOWER_SLA_CONFIG=str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"tower: error: {bad}:4: objectives[0].target: target 1.5 must be between 0 and 1 exclusive "
        "(e.g. 0.99 or '99%')"
    ]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before the store was opened


def test_tower_serve_refuses_a_missing_sla_file_and_bad_alerting_settings(tmp_path: Path) -> None:
    proc = _serve(tmp_path, TOWER_SLA_CONFIG=str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"tower: error: cannot read SLA definitions {tmp_path / 'nope.yaml'}: No such file or directory"
    ]
    proc = _serve(tmp_path, TOWER_ALERTMANAGER_RESEND_S="600")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("tower: error: invalid setting TOWER_ALERTMANAGER_RESEND_S")
    proc = _serve(tmp_path, TOWER_SLA_WEBHOOK_URLS='["ftp://x"]')
    assert proc.returncode == 2 and "TOWER_SLA_WEBHOOK_URLS" in proc.stderr
