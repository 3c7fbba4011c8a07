"""Trace-by-id and business-transaction lookups: store reads glued to the pure correlation rules."""

from __future__ import annotations

import re
from typing import Any

from collector import correlation as corr
from tower_core.store import Store
from tower_core.store import traces as q

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_TRACES = 200


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
    )


def _link(row: dict[str, Any]) -> corr.Link:
    return corr.Link(
        row["key_type"], row["key_value"], row["trace_id"], row["system"], int(row["first_ns"]), int(row["last_ns"])
    )


def get_trace(store: Store, trace_id: str) -> dict[str, Any] | None:
    rng = q.trace_range(store, trace_id)
    if rng is None:
        return None
    spans = [_span_view(r) for r in q.spans_of_traces(store, {trace_id: rng})]
    doc = corr.assemble(("trace", trace_id), [], spans)
    return {
        "trace_id": trace_id,
        "spans": doc["spans"],
        "span_count": len(doc["spans"]),
        "start": doc["traces"][0]["start"] if doc["traces"] else None,
        "end": doc["traces"][0]["end"] if doc["traces"] else None,
    }


def get_transaction(store: Store, seed: tuple[str, str]) -> dict[str, Any] | None:
    """Traces reachable from the seed key (rules in collector.correlation), with their spans and events."""
    key_type, value = seed
    if key_type == "trace":
        traces = {value}
    else:
        traces = {ln.trace_id for ln in map(_link, q.links_for_keys(store, [seed], limit=MAX_TRACES))}
    if key_type != "customer":
        # one hop through identifying keys (invoice <-> payment <-> ledger entry) and span links, both ways
        first = [_link(r) for r in q.links_for_traces(store, traces)]
        follow = corr.keys_to_follow(first, {seed}) | {("trace", t) for t in traces}
        traces |= {ln.trace_id for ln in map(_link, q.links_for_keys(store, follow, limit=MAX_TRACES))}
        traces |= {ln.key_value for ln in first if ln.key_type == "trace"}
    traces = set(sorted(traces)[:MAX_TRACES])
    links = [_link(r) for r in q.links_for_traces(store, traces)]
    ranges = q.trace_ranges(store, traces)
    customers = corr.customers_of(links)
    if customers and key_type != "customer":
        # the CDP profile trace of the customer, which shares no identifying key with billing or ERP
        start = min((r[0] for r in ranges.values()), default=0)
        cdp = [_link(r) for r in q.cdp_links_for_customers(store, customers)]
        chosen = corr.pick_cdp_traces(cdp, start) - traces
        if chosen:
            links += [ln for ln in cdp if ln.trace_id in chosen]
            ranges |= q.trace_ranges(store, chosen)
    if not ranges and not links:
        return None
    spans = [_span_view(r) for r in q.spans_of_traces(store, ranges)]
    key_set = {(ln.key_type, ln.key_value) for ln in links} | {seed}
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
        for r in q.events_for(store, key_set, ranges)
    ]
    return corr.assemble(seed, links, spans, events)
