"""Correlation rules: which attributes are business keys, how traces join into one business transaction,
and how a transaction's flow steps are timed. Pure functions over plain data; the store does the lookups.

A business transaction is the set of traces connected through shared *identifying* keys (invoice, payment,
ledger entry) and OTel span links, plus the CDP profile trace of its customer. Customer keys do not expand
the set — a customer has many invoices — except to bring in that customer's CDP trace.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from tower_core.models import split_key_ref

# DOMAIN.md §2 attribute conventions -> key types stored in business_key_links.
KEY_ATTRIBUTES: dict[str, str] = {
    "revops.customer.id": "customer",
    "revops.cdp.user_id": "cdp_user",
    "revops.invoice.id": "invoice",
    "revops.payment.id": "payment",
    "revops.ledger.entry.id": "ledger_entry",
}
KEY_TYPES = frozenset(KEY_ATTRIBUTES.values()) | {"trace"}
EXPANDING_KEY_TYPES = frozenset({"invoice", "payment", "ledger_entry", "trace"})
EVENT_KEY_TYPES = frozenset({"invoice", "payment", "ledger_entry"})  # the identifying keys events are found by
SYSTEMS = ("cdp", "billing", "erp")

# Flow steps (DOMAIN.md §1): step -> (system where it starts, system where it ends).
STEPS: dict[str, tuple[str, str]] = {
    "cdp_to_billing": ("cdp", "billing"),
    "invoice_to_ledger": ("billing", "erp"),
    "payment_to_cash": ("billing", "erp"),
    "refund_to_ledger": ("billing", "erp"),
}
MAX_KEY_VALUE_LEN = 256


def key_attribute_names(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Attribute name -> key type, with settings' extra names mapped onto revops attributes."""
    names = dict(KEY_ATTRIBUTES)
    for attr, target in (extra or {}).items():
        if target in KEY_ATTRIBUTES:
            names[attr] = KEY_ATTRIBUTES[target]
    return names


def _values(raw: str) -> list[str]:
    """One attribute value, or an array attribute (rendered as a JSON list) carrying several ids."""
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        try:
            items = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return [raw]
        return [str(v) for v in items if v not in (None, "")]
    return [raw] if raw else []


def extract_keys(attrs: Mapping[str, str], names: Mapping[str, str]) -> list[tuple[str, str]]:
    """Business keys (key_type, value) carried by one span's or event's attributes."""
    found: list[tuple[str, str]] = []
    for attr, key_type in names.items():
        raw = attrs.get(attr)
        if raw:
            for value in _values(raw):
                if len(value) <= MAX_KEY_VALUE_LEN and (key_type, value) not in found:
                    found.append((key_type, value))
    return found


def seed_key(query: Mapping[str, str | None]) -> tuple[str, str]:
    """The (key_type, value) a transactions query starts from; exactly one must be given."""
    given = [(k, v) for k, v in query.items() if v]
    if len(given) != 1:
        raise ValueError("give exactly one of invoice_id, customer_id, payment_id, ledger_entry_id, trace_id")
    param, value = given[0]
    key_type = {
        "invoice_id": "invoice",
        "customer_id": "customer",
        "payment_id": "payment",
        "trace_id": "trace",
        "ledger_entry_id": "ledger_entry",
    }[param]
    return key_type, value


@dataclass(frozen=True)
class Link:
    key_type: str
    key_value: str
    trace_id: str
    system: str
    first_seen_ns: int
    last_seen_ns: int


def keys_to_follow(links: Iterable[Link], known: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Identifying keys found on the traces so far that have not been looked up yet."""
    return {
        (ln.key_type, ln.key_value)
        for ln in links
        if ln.key_type in EXPANDING_KEY_TYPES and (ln.key_type, ln.key_value) not in known
    }


def event_seeds(rows: Iterable[Mapping[str, str]]) -> set[tuple[str, str]]:
    """The identifying keys of events found by a key no span carries (events without trace context): the keys a
    lookup seeds from besides its own."""
    seeds = {(t, r[t]) for r in rows for t in EVENT_KEY_TYPES if r.get(t)}
    for r in rows:  # every key of an event naming several of one type ('type:value', migration 0021)
        for ref in r.get("key_refs") or ():
            key_type, value = split_key_ref(ref)
            if key_type in EVENT_KEY_TYPES and value:
                seeds.add((key_type, value))
    return seeds


def customers_of(links: Iterable[Link]) -> set[str]:
    return {ln.key_value for ln in links if ln.key_type == "customer"}


@dataclass(frozen=True)
class SyncActivity:
    """A candidate activity of a customer's CDP -> billing sync: a trace, by its customer-key link, or a trace-less
    event. A billing trace counts as a customer update only once it is known to name no invoice, payment or
    ledger entry (``update_candidates`` says which to ask about): the others are the customer's invoices."""

    customer: str
    system: str
    at_ns: int
    ref: tuple[str, str]  # ("trace", trace id) or ("event", event id)


def sync_activities(links: Iterable[Link], events: Iterable[Mapping[str, Any]] = ()) -> list[SyncActivity]:
    out = [
        SyncActivity(ln.key_value, ln.system, ln.first_seen_ns, ("trace", ln.trace_id))
        for ln in links
        if ln.key_type == "customer" and ln.system in ("cdp", "billing")
    ]
    out += [
        SyncActivity(str(r["customer"]), str(r["system"]), int(r["time_ns"]), ("event", str(r["event_id"])))
        for r in events
        if r.get("customer") and r.get("system") in ("cdp", "billing")
    ]
    return out


def _changes_and_after(
    activities: Iterable[SyncActivity], txn_start_ns: int
) -> list[tuple[SyncActivity, list[SyncActivity]]]:
    """Per customer with a CDP change: the change that led to the transaction (the latest no later than its first
    billing/ERP activity, else the earliest after it) and billing's activities from then on, in time order (the
    same whole second counts: Stripe stamps whole seconds)."""
    by_customer: dict[str, list[SyncActivity]] = {}
    for a in activities:
        by_customer.setdefault(a.customer, []).append(a)
    out = []
    for acts in by_customer.values():
        cdp = sorted((a for a in acts if a.system == "cdp"), key=lambda a: (a.at_ns, a.ref))
        if not cdp:
            continue
        before = [a for a in cdp if a.at_ns <= txn_start_ns]
        change = before[-1] if before else cdp[0]
        sec = change.at_ns // 1_000_000_000
        after = [a for a in acts if a.system == "billing" and a.at_ns // 1_000_000_000 >= sec]
        out.append((change, sorted(after, key=lambda a: (a.at_ns, a.ref))))
    return out


def update_candidates(activities: Iterable[SyncActivity], txn_start_ns: int, per_customer: int = 5) -> set[str]:
    """The billing traces to ask about (do they name an invoice, a payment or a ledger entry?): per customer, the
    first ``per_customer`` after its CDP change."""
    return {
        a.ref[1]
        for _, after in _changes_and_after(activities, txn_start_ns)
        for a in [a for a in after if a.ref[0] == "trace"][:per_customer]
    }


def pick_customer_sync(
    activities: Iterable[SyncActivity], txn_start_ns: int, updates: Collection[str] = ()
) -> set[tuple[str, str]]:
    """Per customer, the CDP profile change that led to this transaction and billing's first customer update
    from then on, so the transaction times its cdp_to_billing step. ``updates``: the billing traces known to be
    customer updates (no other billing trace is one); billing's trace-less events of the step are updates."""
    chosen: set[tuple[str, str]] = set()
    for change, after in _changes_and_after(activities, txn_start_ns):
        chosen.add(change.ref)
        first = next((a for a in after if a.ref[0] == "event" or a.ref[1] in updates), None)
        if first is not None:
            chosen.add(first.ref)
    return chosen


@dataclass
class SpanView:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start_ns: int
    duration_ns: int
    status: str
    attributes: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    resource: dict[str, str] = field(default_factory=dict)  # the span's resource attributes (revops.* ones)

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.duration_ns

    @property
    def system(self) -> str:
        """The span's own revops.system, else its resource's (a service names its system once, as the key-link
        and SLA views read it)."""
        return self.attributes.get("revops.system") or self.resource.get("revops.system", "")

    @property
    def step(self) -> str:
        return self.attributes.get("revops.step", "")  # a span's own, as the SLA's activity view reads it

    @property
    def failed(self) -> bool:
        return self.status == "Error"


@dataclass
class EventView:
    event_id: str
    type: str
    time_ns: int
    system: str
    step: str
    trace_id: str
    keys: dict[str, str]

    @property
    def failed(self) -> bool:
        return FAILED_EVENT.search(self.type) is not None


# A failed attempt (an error span, an event whose type says fail/reject/error) neither starts nor ends a step,
# as in the SLA views (migration 0015): a rejected posting is not a posting.
FAILED_EVENT = re.compile(r"(?i)(fail|reject|error)")


@dataclass(frozen=True)
class StepTiming:
    step: str
    start_ns: int | None
    end_ns: int | None
    systems_seen: tuple[str, ...]
    missing_systems: tuple[str, ...]
    failed_systems: tuple[str, ...] = ()

    @property
    def latency_ms(self) -> float | None:
        if self.start_ns is None or self.end_ns is None:
            return None
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def complete(self) -> bool:
        return not self.missing_systems and self.latency_ms is not None


def step_end(start_ns: int | None, targets: Iterable[tuple[int, int]], skew_ns: int = 0) -> int | None:
    """The end of the target activity that ended the step: the first one (by its start) at or after the step's
    start, as the SLA picks it (tower_core/store/sla.py), so a later duplicate posting or the next payment's
    application does not stretch the latency. An activity (start, end) counts when it starts at or after the
    step's start, in the same whole second (Stripe stamps whole seconds) or up to ``skew_ns`` before it (clocks of
    two systems differ: TOWER_SLA_CLOCK_SKEW_S), or runs across it. The view shows where that activity ended; the
    SLA decides at its start."""
    if start_ns is None:
        return None
    sec = start_ns // 1_000_000_000
    ended = [
        (first, last)
        for first, last in targets
        if first >= start_ns - skew_ns or first // 1_000_000_000 == sec or last >= start_ns
    ]
    if not ended:
        return None
    return max(min(ended)[1], start_ns)


@dataclass(frozen=True)
class RecordActivity:
    """A system's activity on a step known from its records, not a span or event of the transaction: what the
    SLA counts too (the ERP records the reconciler pulls, among them the postings the tower's own corrective
    syncs wrote)."""

    step: str
    system: str
    start_ns: int
    end_ns: int


def step_timings(
    spans: Iterable[SpanView],
    events: Iterable[EventView] = (),
    records: Iterable[RecordActivity] = (),
    skew_ns: int = 0,
) -> list[StepTiming]:
    """Start = first activity of the step in its source system; end = its first target activity from then on
    (``step_end``)."""
    points: dict[str, list[tuple[str, int, int, bool]]] = {}
    for s in spans:
        if s.step in STEPS:
            points.setdefault(s.step, []).append((s.system, s.start_ns, s.end_ns, s.failed))
    for e in events:
        if e.step in STEPS:
            points.setdefault(e.step, []).append((e.system, e.time_ns, e.time_ns, e.failed))
    for r in records:  # only where the transaction shows the step: they complete it, they never start one
        if r.step in points:
            points[r.step].append((r.system, r.start_ns, r.end_ns, False))
    out = []
    for step in STEPS:
        if step not in points:
            continue
        source, target = STEPS[step]
        pts = points[step]
        starts = [s for system, s, _, failed in pts if system == source and not failed]
        first = min(starts, default=None)
        end = step_end(first, [(s, e) for system, s, e, failed in pts if system == target and not failed], skew_ns)
        seen = tuple(sorted({system for system, _, _, _ in pts if system}))
        missing = tuple(s for s in (source, target) if s not in seen)
        failed = tuple(sorted({system for system, _, _, f in pts if system and f}))
        out.append(StepTiming(step, first, end, seen, missing, failed))
    return out


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    import datetime as dt

    secs, rem = divmod(ns, 1_000_000_000)
    return dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{rem:09d}Z"


def assemble(
    seed: tuple[str, str],
    links: Iterable[Link],
    spans: Iterable[SpanView],
    events: Iterable[EventView] = (),
    records: Iterable[RecordActivity] = (),
    skew_ns: int = 0,
) -> dict[str, Any]:
    """The transaction document the API returns: traces, spans and events in time order, steps (which
    ``records`` may complete; ``skew_ns``: see step_end), gaps."""
    links = list(links)
    spans = sorted(spans, key=lambda s: (s.start_ns, s.trace_id, s.span_id))
    events = sorted(events, key=lambda e: (e.time_ns, e.event_id))
    traces: dict[str, dict[str, Any]] = {}
    for s in spans:
        t = traces.setdefault(
            s.trace_id,
            {
                "trace_id": s.trace_id,
                "systems": set(),
                "start_ns": s.start_ns,
                "end_ns": s.end_ns,
                "span_count": 0,
                "linked_by": set(),
            },
        )
        t["systems"].add(s.system) if s.system else None
        t["start_ns"] = min(t["start_ns"], s.start_ns)
        t["end_ns"] = max(t["end_ns"], s.end_ns)
        t["span_count"] += 1
    for ln in links:
        if ln.trace_id in traces:
            traces[ln.trace_id]["linked_by"].add(f"{ln.key_type}:{ln.key_value}")
    seen_systems = {s.system for s in spans if s.system} | {e.system for e in events if e.system}
    steps = step_timings(spans, events, records, skew_ns)
    return {
        "seed": {"key_type": seed[0], "value": seed[1]},
        "keys": sorted({(ln.key_type, ln.key_value) for ln in links if ln.trace_id in traces}),
        "traces": [
            {
                **t,
                "systems": sorted(t["systems"]),
                "linked_by": sorted(t["linked_by"]),
                "start": _iso(t["start_ns"]),
                "end": _iso(t["end_ns"]),
            }
            for t in sorted(traces.values(), key=lambda t: t["start_ns"])
        ],
        "spans": [
            {
                "trace_id": s.trace_id,
                "span_id": s.span_id,
                "parent_span_id": s.parent_span_id,
                "name": s.name,
                "service": s.service,
                "system": s.system,
                "step": s.step,
                "start": _iso(s.start_ns),
                "end": _iso(s.end_ns),
                "start_ns": s.start_ns,
                "duration_ms": s.duration_ns / 1e6,
                "status": s.status,
                "attributes": s.attributes,
                "links": s.links,
            }
            for s in spans
        ],
        "events": [
            {
                "id": e.event_id,
                "type": e.type,
                "time": _iso(e.time_ns),
                "system": e.system,
                "step": e.step,
                "trace_id": e.trace_id,
                "keys": e.keys,
            }
            for e in events
        ],
        "steps": [
            {
                "step": st.step,
                "start": _iso(st.start_ns),
                "end": _iso(st.end_ns),
                "latency_ms": st.latency_ms,
                "complete": st.complete,
                "systems_seen": list(st.systems_seen),
                "missing_systems": list(st.missing_systems),
                "failed_systems": list(st.failed_systems),
            }
            for st in steps
        ],
        "systems_seen": sorted(seen_systems),
        "missing_systems": [s for s in SYSTEMS if s not in seen_systems],
    }
