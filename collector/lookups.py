"""Trace-by-id and business-transaction lookups: store reads glued to the pure correlation rules."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from collector import correlation as corr
from tower_core.store import Store
from tower_core.store import traces as q

TRACE_ID = re.compile(r"[0-9a-f]{32}")  # used with fullmatch: "$" let a trailing newline through
MAX_TRACES = 200
MAX_SPANS = 20_000  # per answer (a 100k-span trace was a 38 MB body and ~900 MB of server memory)
MAX_EVENTS = 1_000
MAX_EVENT_SEEDS = 100  # events read for the other keys of a key no span carries
MAX_HOPS = 4  # invoice -> payment -> ERP application -> ... : a real flow needs two, a loop of ids stops here


def _span_view(row: dict[str, Any]) -> corr.SpanView:
    return corr.SpanView(
        trace_id=row["trace_id"],
        span_id=row["span_id"],
        parent_span_id=row["parent_span_id"],
        name=row["name"],
        service=row["service"],
        start_ns=int(row["start_ns"]),
        duration_ns=int(row["duration_ns"]),
        status=row["status"],
        attributes=dict(row["attributes"]),
        links=list(row["link_trace_ids"]),
        resource=dict(row.get("resource") or {}),
    )


def _link(row: dict[str, Any]) -> corr.Link:
    return corr.Link(
        row["key_type"], row["key_value"], row["trace_id"], row["system"], int(row["first_ns"]), int(row["last_ns"])
    )


def get_trace(store: Store, trace_id: str) -> dict[str, Any] | None:
    rng = q.trace_range(store, trace_id)
    if rng is None:
        return None
    rows = q.spans_of_traces(store, {trace_id: rng}, limit=MAX_SPANS + 1)
    spans = [_span_view(r) for r in rows[:MAX_SPANS]]
    doc = corr.assemble(("trace", trace_id), [], spans)
    return {
        "trace_id": trace_id,
        "spans": doc["spans"],
        "span_count": len(doc["spans"]),
        "truncated": len(rows) > MAX_SPANS,  # the earliest MAX_SPANS spans are shown
        "start": doc["traces"][0]["start"] if doc["traces"] else None,
        "end": doc["traces"][0]["end"] if doc["traces"] else None,
    }


def get_transaction(store: Store, seed: tuple[str, str], skew_ns: int = 0) -> dict[str, Any] | None:
    """Traces reachable from the seed key (rules in collector.correlation), with their spans and events.

    Reads: the seed's traces (for a key no span carries, also those of the keys its events carry); their keys;
    hops through identifying keys and the customers' CDP traces (``_expand``); the time ranges; then spans and
    events side by side."""
    key_type, value = seed
    cut = {"traces": False, "spans": False, "events": False}
    seeds = {seed}
    events_read: set[tuple[str, str]] = set()  # keys whose trace-less events were read for their other keys
    if key_type == "trace":
        traces = {value}
    else:
        seed_rows = q.links_for_keys(store, [seed], limit=MAX_TRACES)
        if not seed_rows and key_type != "customer":
            # no span carries the key: events without trace context may (a batch job's ledger entry), and the
            # other keys they carry make the transaction
            seeds |= corr.event_seeds(q.events_for(store, [seed], (), limit=MAX_EVENT_SEEDS))
            events_read.add(seed)
            if len(seeds) > 1:
                seed_rows = q.links_for_keys(store, sorted(seeds), limit=MAX_TRACES)
        cut["traces"] = any(int(r["total"]) > len(seed_rows) for r in seed_rows)
        traces = {ln.trace_id for ln in map(_link, seed_rows)}
    links = [_link(r) for r in q.links_for_traces(store, traces)]
    # a customer's own view reads all its events below; the others read the customers' sync events
    sync = _Sync(with_events=key_type != "customer")
    # a customer's transaction too: its traces name its invoices and payments, whose ERP traces may not name it
    cut["traces"] |= _expand(store, seeds, traces, links, events_read, sync)
    ranges = _customer_sync(store, links, traces, sync)
    key_set = {(ln.key_type, ln.key_value) for ln in links} | seeds
    # events without trace context (a batch job, a CDP call) are found by their business keys alone
    customers = [value] if key_type == "customer" else []
    span_rows, event_rows = _all(
        lambda: q.spans_of_traces(store, ranges, limit=MAX_SPANS + 1),
        lambda: q.events_for(store, key_set, ranges, limit=MAX_EVENTS, customers=customers),
    )
    cut["spans"] = len(span_rows) > MAX_SPANS
    cut["events"] = any(int(r["total"]) > len(event_rows) for r in event_rows)
    have = {r["event_id"] for r in event_rows}
    event_rows = event_rows + [r for r in sync.picked_events if r["event_id"] not in have]
    span_rows = span_rows[:MAX_SPANS]
    if not span_rows and not event_rows and not links:
        return None
    events = [
        corr.EventView(
            r["event_id"],
            r["type"],
            int(r["time_ns"]),
            r["system"],
            r["step"],
            r["trace_id"],
            {k: r[k] for k in ("customer", "invoice", "payment", "ledger_entry") if r[k]},
        )
        for r in event_rows
    ]
    spans = [_span_view(r) for r in span_rows]
    records = _erp_records(store, key_set, spans, events, skew_ns)
    doc = corr.assemble(seed, links, spans, events, records, skew_ns)
    # what the answer leaves out: the earliest and the latest traces and events of a key carried by more than
    # MAX_TRACES / MAX_EVENTS are shown, the earliest MAX_SPANS spans
    doc["truncated"] = cut
    return doc


def _erp_records(
    store: Store,
    keys: set[tuple[str, str]],
    spans: list[corr.SpanView],
    events: list[corr.EventView],
    skew_ns: int = 0,
) -> list[corr.RecordActivity]:
    """The ERP's activity on the transaction's invoices and payments as the SLA counts it, read when a step
    waits for the ERP (a transaction its spans and events complete needs no more reads): a posting known only
    from the ERP's records (Tryton's, or one the tower's own corrective sync wrote) left its step "waiting for
    erp" and late after the SLA counted it done. From the day before the transaction's first activity."""
    steps = corr.step_timings(spans, events, skew_ns=skew_ns)
    waiting = [st for st in steps if not st.complete and corr.STEPS[st.step][1] == "erp"]
    times = [s.start_ns for s in spans] + [e.time_ns for e in events]
    if not waiting or not times:
        return []
    since = dt.datetime.fromtimestamp(min(times) // 1_000_000_000, dt.UTC).date() - dt.timedelta(days=1)
    rows = q.erp_activity(store, keys, since, limit=MAX_EVENTS)
    return [corr.RecordActivity(r["step"], "erp", int(r["first_ns"]), int(r["last_ns"])) for r in rows]


@dataclass
class _Sync:
    """The customers' CDP -> billing sync candidates read while expanding (their CDP traces and billing's traces
    naming them; their trace-less sync events when ``with_events``), then the events picked among them."""

    with_events: bool
    links: list[corr.Link] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    asked: set[str] = field(default_factory=set)
    picked_events: list[dict[str, Any]] = field(default_factory=list)

    def reads(self, store: Store, customers: set[str]) -> list[Callable[[], list[dict[str, Any]]]]:
        new = sorted(customers - self.asked)
        self.asked |= customers
        if not new:
            return [list, list]
        events = partial(q.sync_events, store, new, limit=MAX_EVENT_SEEDS) if self.with_events else list
        return [partial(q.customer_sync_links, store, new, limit=MAX_TRACES), events]

    def add(self, link_rows: list[dict[str, Any]], event_rows: list[dict[str, Any]]) -> None:
        self.links += [_link(r) for r in link_rows]
        self.events += event_rows


def _expand(
    store: Store,
    seeds: set[tuple[str, str]],
    traces: set[str],
    links: list[corr.Link],
    events_read: set[tuple[str, str]],
    sync: _Sync,
) -> bool:
    """Grow ``traces`` and ``links`` in place: hop through the identifying keys (and span links) of the traces
    found so far, and the other keys of trace-less events naming them (a Stripe webhook names the invoice and
    the payment, while the ERP's spans name one each), until a hop finds nothing new, so the answer is the same
    whichever key it starts from (a payment's ERP application is two hops from its invoice's billing trace).
    Per hop, side by side: the keys' traces, their events, and the sync candidates of customers first seen; then
    the new traces' keys. True when MAX_TRACES cut it."""
    known = set(seeds)
    follow = corr.keys_to_follow(links, known) | {("trace", t) for t in traces}
    ask_events = {k for k in seeds | follow if k[0] in corr.EVENT_KEY_TYPES} - events_read
    cut = False
    for _ in range(MAX_HOPS):
        customers = corr.customers_of(links) - sync.asked
        if not follow and not customers and not ask_events:
            break
        hop_rows, event_rows, *sync_rows = _all(
            partial(q.expansion_links, store, sorted(follow), limit=MAX_TRACES) if follow else list,
            partial(q.events_for, store, sorted(ask_events), (), limit=MAX_EVENT_SEEDS) if ask_events else list,
            *sync.reads(store, customers),
        )
        sync.add(*sync_rows)
        hop = [_link(r) for r in hop_rows]
        known |= follow
        events_read |= ask_events
        from_events = corr.event_seeds(event_rows) - known
        found = {ln.trace_id for ln in hop}
        found |= {ln.key_value for ln in links if ln.key_type == "trace"}  # span links
        room = max(0, MAX_TRACES - len(traces))
        new = set(sorted(found - traces)[:room])
        cut |= len(found - traces) > room
        if not new and not from_events:
            break
        added = [_link(r) for r in q.links_for_traces(store, new)] if new else []
        links += added
        traces |= new
        follow = corr.keys_to_follow(added, known) | {("trace", t) for t in new} | from_events
        ask_events = {k for k in follow if k[0] in corr.EVENT_KEY_TYPES} - events_read
    late = corr.customers_of(links) - sync.asked  # first seen on the traces of the last hop the cap allowed
    if late:
        sync.add(*_all(*sync.reads(store, late)))
    return cut


def _customer_sync(store: Store, links: list[corr.Link], traces: set[str], sync: _Sync) -> dict[str, tuple[int, int]]:
    """Add each customer's CDP -> billing sync (``corr.pick_customer_sync``): its traces into ``traces`` and
    ``links`` in place, its trace-less events into ``sync.picked_events``. Asks which billing traces after the
    change name an invoice (so are no customer update) beside reading the time ranges, which it returns."""
    start = min((ln.first_seen_ns for ln in links if ln.system != "cdp"), default=0)
    acts = corr.sync_activities(sync.links, sync.events)
    check = corr.update_candidates(acts, start)
    maybe = {ref for kind, ref in corr.pick_customer_sync(acts, start, updates=check) if kind == "trace"}
    keyed, ranges = _all(
        partial(q.links_for_traces, store, check) if check else list,
        partial(q.trace_ranges, store, traces | maybe | check),
    )
    invoices = {r["trace_id"] for r in keyed if r["key_type"] in corr.EVENT_KEY_TYPES}
    picked = corr.pick_customer_sync(acts, start, updates=check - invoices)
    new = {ref for kind, ref in picked if kind == "trace"} - traces
    links += [ln for ln in sync.links if ln.trace_id in new]
    traces |= new
    events = {ref for kind, ref in picked if kind == "event"}
    sync.picked_events = [r for r in sync.events if r["event_id"] in events]
    return {t: r for t, r in ranges.items() if t in traces}


_READS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tower-lookup")


def _all(*reads: Callable[[], Any]) -> list[Any]:
    """Independent reads at once (ClickHouse releases the GIL while it works), this thread doing the first; a
    read that is ``list`` (nothing to ask) costs nothing."""
    futures = [_READS.submit(r) if r is not list else None for r in reads[1:]]
    first = reads[0]()
    return [first, *(f.result() if f is not None else [] for f in futures)]
