"""SLA definitions: the YAML file's schema and its validation, with the line of every error. Pure (the loader
reads one file).

A file holds burn-rate windows, latency objectives per flow step and region, and threshold rules; see the
shipped default ``reconciler/sla/config/sla.yaml`` for every field with its meaning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from collector.correlation import STEPS
from reconciler.classify import CLASSES, STATES
from reconciler.sla.burnrate import DEFAULT_RULES, WindowRule, error_budget
from tower_core.errors import ConfigError

# The business key that identifies an item of each step (what step_activity.KeyType holds; migrations 0005, 0015).
STEP_ITEM_KEYS: dict[str, str] = {
    "cdp_to_billing": "customer",
    "invoice_to_ledger": "invoice",
    "payment_to_cash": "payment",
    "refund_to_ledger": "payment",
}
SEVERITIES = ("page", "ticket")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NAME = r"^[a-z][a-z0-9_]{0,62}$"
_REGION = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# Longest duration accepted (10 years): times are Int64 nanoseconds (about 292 years), and an evaluation reads
# now - (period + threshold) and older; far beyond this the bounds overflow and an objective silently reads nothing.
MAX_DURATION_S = 3650 * 86400


def parse_duration(value: Any) -> float:
    """'90s', '15m', '6h', '3d', '1w' or a number of seconds -> seconds (> 0)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number with a unit, e.g. 15m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: use a number with s, m, h, d or w, e.g. 15m")
    if not math.isfinite(seconds) or seconds <= 0:  # YAML's .nan and .inf are floats too
        raise ValueError(f"duration {value!r} must be a positive, finite number of seconds")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {value!r} is too long: at most {format_duration(MAX_DURATION_S)} (10 years)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact form: 300 -> '5m', 259200 -> '3d'."""
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_S[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _regions(value: Any) -> tuple[str, ...]:
    """'all' (or absent) -> () meaning every region; else a list of region codes."""
    if value is None or value == "all":
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("regions must be 'all' or a list of region codes, e.g. [EU, NA]")
    for r in value:
        if not isinstance(r, str) or not _REGION.match(r):
            raise ValueError(f"invalid region {r!r}: letters, digits, '_' or '-', at most 32")
    return tuple(value)


def _names(value: Any, known: Sequence[str], what: str, *, empty: bool) -> tuple[str, ...]:
    """A list of names from ``known`` (``what``: 'drift class'); a misspelt one would silently match nothing."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or not (value or empty):
        kind = "a list" if empty else "a non-empty list"
        raise ValueError(f"must be {kind} of {what} names, e.g. [{known[0]}]")
    for v in value:
        if v not in known:
            raise ValueError(f"unknown {what} {v!r}; one of {', '.join(known)}")
    return tuple(value)


def _target(value: Any) -> float:
    """0.99, '99%' or '99.9%' -> fraction strictly between 0 and 1."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(Decimal(value.strip()[:-1]) / 100)  # Decimal: '99.9%' is exactly 0.999
        except (InvalidOperation, ValueError):
            raise ValueError(f"invalid target {value!r}: use a fraction (0.99) or a percentage ('99%')") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"invalid target {value!r}: use a fraction (0.99) or a percentage ('99%')")
    if not 0 < value < 1:
        raise ValueError(f"target {value!r} must be between 0 and 1 exclusive (e.g. 0.99 or '99%')")
    return float(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BurnWindow(_Strict):
    severity: Literal["page", "ticket"]
    long: float
    short: float
    burn_rate: float = Field(gt=0, allow_inf_nan=False)

    @field_validator("long", "short", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _short_below_long(self) -> BurnWindow:
        if self.short >= self.long:
            raise ValueError(f"short window ({format_duration(self.short)}) must be shorter than long")
        return self

    def rule(self) -> WindowRule:
        return WindowRule(self.severity, self.long, self.short, self.burn_rate)


class Objective(_Strict):
    """'target of step items complete within threshold, over period', evaluated per region."""

    name: str = Field(pattern=_NAME)
    step: str
    regions: tuple[str, ...] = ()
    target: float
    threshold: float
    period: float = 30 * 86400
    description: str = ""

    @field_validator("regions", mode="before")
    @classmethod
    def _check_regions(cls, value: Any) -> tuple[str, ...]:
        return _regions(value)

    @field_validator("target", mode="before")
    @classmethod
    def _check_target(cls, value: Any) -> float:
        return _target(value)

    @field_validator("threshold", "period", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("step")
    @classmethod
    def _known_step(cls, value: str) -> str:
        if value not in STEPS:
            raise ValueError(f"unknown step {value!r}; one of {', '.join(STEPS)}")
        return value

    @property
    def key_type(self) -> str:
        return STEP_ITEM_KEYS[self.step]

    @property
    def source(self) -> str:
        return STEPS[self.step][0]

    @property
    def target_system(self) -> str:
        return STEPS[self.step][1]

    def summary(self) -> str:
        return (
            f"{self.target * 100:g}% of {self.step} within {format_duration(self.threshold)} "
            f"over {format_duration(self.period)}"
        )


class ThresholdRule(_Strict):
    """'no more than max_count unreconciled drift items older than max_age', per region."""

    name: str = Field(pattern=_NAME)
    kind: Literal["unreconciled_age"]
    max_age: float
    max_count: int = Field(0, ge=0)
    regions: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    exclude_states: tuple[str, ...] = ("resolved", "acknowledged", "ignored")
    severity: Literal["page", "ticket"] = "ticket"
    step: str = Field("reconciliation", pattern=_NAME)
    description: str = ""

    @field_validator("regions", mode="before")
    @classmethod
    def _check_regions(cls, value: Any) -> tuple[str, ...]:
        return _regions(value)

    @field_validator("classes", mode="before")
    @classmethod
    def _check_classes(cls, value: Any) -> tuple[str, ...]:
        if value is None or value == "all":
            return ()
        return _names(value, CLASSES, "drift class", empty=False)  # [] is no class, not every class

    @field_validator("exclude_states", mode="before")
    @classmethod
    def _check_states(cls, value: Any) -> tuple[str, ...]:
        return _names(value, STATES, "drift state", empty=True)  # [] counts items in every state

    @field_validator("max_age", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    def summary(self) -> str:
        return f"at most {self.max_count} unreconciled item(s) older than {format_duration(self.max_age)}"


class SlaFile(_Strict):
    version: Literal[1] = 1
    burn_rate_windows: tuple[BurnWindow, ...] | None = None
    objectives: tuple[Objective, ...] = ()
    thresholds: tuple[ThresholdRule, ...] = ()


@dataclass(frozen=True)
class Definitions:
    """Validated SLA definitions and where they came from."""

    source: str
    rules: tuple[WindowRule, ...]
    objectives: tuple[Objective, ...]
    thresholds: tuple[ThresholdRule, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "burn_rate_windows": [
                {
                    "severity": r.severity,
                    "long": format_duration(r.long_s),
                    "short": format_duration(r.short_s),
                    "burn_rate": r.factor,
                }
                for r in self.rules
            ],
            "objectives": [
                {
                    **o.model_dump(),
                    "regions": list(o.regions) or "all",
                    "threshold": format_duration(o.threshold),
                    "threshold_s": o.threshold,
                    "period": format_duration(o.period),
                    "period_s": o.period,
                    "source_system": o.source,
                    "target_system": o.target_system,
                    "summary": o.summary(),
                }
                for o in self.objectives
            ],
            "thresholds": [
                {
                    **t.model_dump(),
                    "regions": list(t.regions) or "all",
                    "classes": list(t.classes) or "all",
                    "exclude_states": list(t.exclude_states),
                    "max_age": format_duration(t.max_age),
                    "max_age_s": t.max_age,
                    "summary": t.summary(),
                }
                for t in self.thresholds
            ],
        }


# --- YAML with line numbers


def _compose(text: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse YAML into plain data plus the 1-based line of every path; duplicate keys are errors."""
    loader = yaml.SafeLoader(text)
    lines: dict[tuple[Any, ...], int] = {}

    def walk(n: yaml.Node, path: tuple[Any, ...]) -> None:
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in n.value:
                if k.tag == MERGE_TAG:  # '<<: *base': its keys may be overridden here, as YAML means
                    continue
                key = k.value
                if key in seen:
                    raise _LineError(k.start_mark.line + 1, f"duplicate key {key!r} (first on line {seen[key]})")
                seen[key] = k.start_mark.line + 1
                walk(v, (*path, key))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, (*path, i))

    try:
        node = loader.get_single_node()
        if node is None:
            return None, {(): 1}
        walk(node, ())  # before construction, which folds merged keys into the mapping beside its own
        data = loader.construct_document(node)
    finally:
        loader.dispose()
    return data, lines


MERGE_TAG = "tag:yaml.org,2002:merge"


class _LineError(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = line, reason


def _line_of(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int:
    """Line of the deepest known prefix of a validation error's location."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 1


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif err.get("type") == "missing":
        msg = "required field missing"
    return msg


def parse_definitions(text: str, source: str = "<sla>") -> Definitions:
    """Validate an SLA file's text. Raises ConfigError('<source>:<line>: <where>: <reason>')."""
    try:
        data, lines = _compose(text)
    except _LineError as exc:
        raise ConfigError(f"{source}:{exc.line}: {exc.reason}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        reason = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{source}:{line}: invalid YAML: {reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}:1: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the file must be a mapping with objectives and thresholds")
    try:
        parsed = SlaFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first.get("loc", ()))
        where = _where(loc)
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{source}:{_line_of(lines, loc)}: {prefix}{_message(first)}") from None
    seen: dict[str, tuple[Any, ...]] = {}
    for section in ("objectives", "thresholds"):
        for i, item in enumerate(getattr(parsed, section)):
            path = (section, i, "name")
            if item.name in seen:
                first_line = _line_of(lines, seen[item.name])
                raise ConfigError(
                    f"{source}:{_line_of(lines, path)}: {_where(path)}: duplicate name {item.name!r} "
                    f"(first on line {first_line})"
                )
            seen[item.name] = path
    for i, o in enumerate(parsed.objectives):
        if o.threshold >= o.period:
            path = ("objectives", i, "threshold")
            raise ConfigError(
                f"{source}:{_line_of(lines, path)}: {_where(path)}: threshold must be shorter than period"
            )
    rules = DEFAULT_RULES if parsed.burn_rate_windows is None else tuple(w.rule() for w in parsed.burn_rate_windows)
    _check_rules(parsed, rules, lines, source)
    return Definitions(source, rules, parsed.objectives, parsed.thresholds)


def _check_rules(
    parsed: SlaFile, rules: tuple[WindowRule, ...], lines: dict[tuple[Any, ...], int], source: str
) -> None:
    """Refuse burn-rate windows that can never page: none at all, a repeated one, or a factor an objective's
    burn rate cannot exceed (a rule fires when both windows burn strictly faster than its factor, and the
    fastest burn, every item bad, is 1 / (1 - target))."""

    def fail(path: tuple[Any, ...], reason: str) -> ConfigError:
        return ConfigError(f"{source}:{_line_of(lines, path)}: {_where(path)}: {reason}")

    if parsed.burn_rate_windows is not None and not rules:
        raise fail(("burn_rate_windows",), "needs at least one window (omit it for the defaults)")
    seen: dict[tuple[str, float, float], int] = {}
    for i, r in enumerate(rules):
        key = (r.severity, r.long_s, r.short_s)
        if key in seen:
            first = _line_of(lines, ("burn_rate_windows", seen[key]))
            raise fail(
                ("burn_rate_windows", i),
                f"duplicate {r.severity} window {format_duration(r.long_s)}/{format_duration(r.short_s)} "
                f"(first on line {first})",
            )
        seen[key] = i
    for j, o in enumerate(parsed.objectives):
        most = 1.0 / error_budget(o.target)  # burnrate.burn_rate of an all-bad window, same arithmetic
        for i, r in enumerate(rules):
            if r.factor < most:
                continue
            window = f"{r.severity} window {format_duration(r.long_s)}/{format_duration(r.short_s)}"
            reason = (
                f"burn rate {r.factor:g} of the {window} can never be exceeded by objective {o.name!r} "
                f"(target {o.target * 100:g}% burns at most {most:.4g}); use a burn_rate below that"
            )
            if parsed.burn_rate_windows is None:
                raise fail(
                    ("objectives", j, "target"),
                    f"the default {reason}, or set burn_rate_windows",
                )
            raise fail(("burn_rate_windows", i, "burn_rate"), reason)


def default_path() -> Path:
    return Path(str(resources.files("reconciler.sla").joinpath("config/sla.yaml")))


def days_read_back(defs: Definitions) -> int:
    """Whole days of history the evaluation reads: the longest objective period or burn-rate window, plus the
    longest threshold (an item is read from that far before the window) and a day of margin (the store's clock
    may differ from the tower's). Telemetry kept for less makes objectives look met, or breached, on data already
    deleted."""
    longest = max([o.period for o in defs.objectives] + [r.long_s for r in defs.rules] + [0.0])
    threshold = max([o.threshold for o in defs.objectives] + [0.0])
    return math.ceil((longest + threshold) / 86400) + 1


def load_definitions(path: Path | None = None) -> Definitions:
    """Read and validate the SLA file (the shipped default when ``path`` is None)."""
    path = path or default_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read SLA definitions {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}:1: not UTF-8 text") from None
    return parse_definitions(text, str(path))
