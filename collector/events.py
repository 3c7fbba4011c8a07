"""CloudEvents 1.0 business events: parsing, validation and rows. Pure, no IO.

Structured mode (``application/cloudevents+json``, or plain JSON), batch mode
(``application/cloudevents-batch+json``). The ``traceparent`` extension (W3C) ties an event to a trace.
Business attributes use the revops names of DOMAIN.md §2, in ``data`` or as extension attributes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from collector.correlation import extract_keys
from tower_core.models import MAX_AMOUNT_MINOR, amount_error, key_ref
from tower_core.store.arrow_schemas import BUSINESS_EVENTS, BUSINESS_KEY_LINKS

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
# W3C Trace Context: version 00 is exactly four fields; a later version is read for its first four fields and
# may carry more after a dash (a receiver "must parse" those it knows); version ff is invalid
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
_REQUIRED = ("id", "source", "type", "specversion")
MAX_FIELD = 1024
# Sources only the tower's own signed receivers write (connectors.stripe.mapping.SOURCE, connectors.segment.tracking
# .SOURCE): an unsigned CloudEvent under one of them could plant an id first, so the genuine signed delivery is
# dropped as a repeat, or replace one later. Matched trimmed and case-insensitively.
RESERVED_SOURCES = {
    "stripe": "Stripe's events go to /webhooks/stripe, where their signature is checked",
    "cdp": "CDP messages go to /v1/batch, /v1/identify, /v1/track or /v1/group with a write key",
}
MAX_EVENTS_PER_BATCH = 10_000
# JSON nesting an event may hold: orjson reads 1024 levels but writes only 254, and no business event needs more
MAX_DEPTH = 64


class EventError(ValueError):
    """One event is invalid; the message says which attribute and why."""


@dataclass(frozen=True)
class BusinessEvent:
    event_id: str
    source: str
    type: str
    subject: str
    time_ns: int
    trace_id: str
    span_id: str
    attributes: dict[str, str]
    data: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BusinessEvent:
        return cls(**doc)


def parse_time(value: Any) -> int:
    """RFC 3339 timestamp -> ns since the epoch (nanosecond fractions kept)."""
    if not isinstance(value, str):
        raise EventError("time must be an RFC 3339 string")
    m = re.match(r"^(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:\d{2})$", value)
    if not m:
        raise EventError(f"time {value[:40]!r} is not RFC 3339")
    stamp = m.group(1).replace("t", "T").replace(" ", "T")
    leap = stamp.endswith(":60")  # RFC 3339 allows a leap second: read as the first instant of the next minute
    try:  # the pattern admits 2024-02-30, 25:00 or +25:00; the calendar does not
        base = dt.datetime.fromisoformat(stamp[:-2] + "59" if leap else stamp) + dt.timedelta(seconds=int(leap))
        tz = dt.UTC if m.group(3) in ("Z", "z") else dt.datetime.strptime(m.group(3), "%z").tzinfo
        seconds = int(base.replace(tzinfo=tz).timestamp())
    except (ValueError, OverflowError):
        raise EventError(f"time {value[:40]!r} is not a valid date and time") from None
    ns = seconds * 1_000_000_000 + int((m.group(2) or "0").ljust(9, "0"))
    if not _MIN_TIME_NS <= ns <= _MAX_TIME_NS:
        raise EventError(f"time {value[:40]!r} is outside 1900-01-01 .. 2262-04-11 (what the store can hold)")
    return ns


# DateTime64(9) columns and int64 nanoseconds hold 1900-01-01 .. 2262-04-11
_MIN_TIME_NS = int(dt.datetime(1900, 1, 1, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
_MAX_TIME_NS = 2**63 - 1
_AMOUNT = re.compile(r"^-?\d{1,16}$")  # minor units; amount_error bounds them


def amount_minor(text: str) -> int | None:
    """``revops.amount_minor`` as an integer, or None when it is not a whole number of minor units the tower
    takes (tower_core.models.MAX_AMOUNT_MINOR)."""
    return int(text) if _AMOUNT.match(text) and amount_error(int(text)) is None else None


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return orjson.dumps(value).decode()
    return None


def nesting_depth(node: Any, stop_at: int = MAX_DEPTH + 1) -> int:
    """How deep JSON containers nest (iterative: no recursion limit to hit), counted up to ``stop_at``."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if deepest >= stop_at:
                return deepest
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def parse_event(doc: Any, received_ns: int, key_names: Collection[str] = ()) -> BusinessEvent:
    """``key_names``: attribute names mapped onto business keys (TOWER_KEY_ATTRIBUTE_MAP), read from ``data``
    besides ``revops.*`` (CloudEvents extension names cannot hold a dot, so ``data`` is where they arrive)."""
    if not isinstance(doc, dict):
        raise EventError("an event must be a JSON object")
    if nesting_depth(doc) > MAX_DEPTH:
        raise EventError(f"the event nests JSON deeper than {MAX_DEPTH} levels")
    for attr in _REQUIRED:
        if not isinstance(doc.get(attr), str) or not doc[attr]:
            raise EventError(f"required attribute {attr!r} is missing or not a non-empty string")
        if len(doc[attr]) > MAX_FIELD:
            raise EventError(f"attribute {attr!r} is longer than {MAX_FIELD} characters")
    if doc["specversion"] != "1.0":
        raise EventError(f"specversion {doc['specversion']!r} is not supported (1.0 is)")
    if (where := RESERVED_SOURCES.get(doc["source"].strip().lower())) is not None:
        raise EventError(f"source {doc['source']!r} is reserved for the tower's own receiver: {where}")
    trace_id = span_id = ""
    if "traceparent" in doc:
        m = _TRACEPARENT.fullmatch(str(doc["traceparent"]).strip().lower())
        if (
            not m
            or m.group(1) == "ff"
            or (m.group(1) == "00" and m.group(4) is not None)
            or m.group(2) == "0" * 32
            or m.group(3) == "0" * 16
        ):
            raise EventError("traceparent is not a valid W3C traceparent")
        trace_id, span_id = m.group(2), m.group(3)
    time_ns = parse_time(doc["time"]) if "time" in doc else received_ns
    attrs: dict[str, str] = {}
    data = doc.get("data")
    if isinstance(data, dict):
        for k, v in data.items():
            text = _scalar_text(v)
            if text is not None and (k.startswith("revops.") or k in key_names):
                attrs[k] = text
    for k, v in doc.items():  # extension attributes (revops* or mapped names) win over data fields
        if k not in (
            "data",
            "data_base64",
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "subject",
            "datacontenttype",
            "dataschema",
            "traceparent",
            "tracestate",
        ):
            text = _scalar_text(v)
            if text is not None:
                attrs[k] = text
    for short, full in (
        ("revopssystem", "revops.system"),
        ("revopsregion", "revops.region"),
        ("revopsstep", "revops.step"),
    ):
        if short in attrs:
            attrs.setdefault(full, attrs[short])
    if "revops.amount_minor" in attrs and amount_minor(attrs["revops.amount_minor"]) is None:
        raise EventError(
            f"revops.amount_minor must be a whole number of minor units, at most {MAX_AMOUNT_MINOR:,} either way"
        )
    return BusinessEvent(
        event_id=doc["id"],
        source=doc["source"],
        type=doc["type"],
        subject=str(doc.get("subject") or ""),
        time_ns=time_ns,
        trace_id=trace_id,
        span_id=span_id,
        attributes=attrs,
        data=orjson.dumps(data).decode() if data is not None else "",
    )


def parse_body(
    body: bytes, content_type: str | None, received_ns: int, key_names: Collection[str] = ()
) -> tuple[list[BusinessEvent], list[dict]]:
    """Valid events and, for the others, ``{"index", "id", "error"}``. Raises EventError if the body as a
    whole is unusable."""
    mt = (content_type or "").split(";", 1)[0].strip().lower()
    if mt not in (STRUCTURED, BATCH, "application/json"):
        raise EventError(f"unsupported content type {mt or '(none)'!r}; use {STRUCTURED} or {BATCH}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"malformed JSON: {exc}") from None
    if mt == BATCH:
        if not isinstance(doc, list):
            raise EventError("a batch must be a JSON array of events")
        docs = doc
    else:
        docs = [doc]
    if len(docs) > MAX_EVENTS_PER_BATCH:
        raise EventError(f"a batch holds at most {MAX_EVENTS_PER_BATCH} events")
    good, bad = [], []
    for i, d in enumerate(docs):
        try:
            good.append(parse_event(d, received_ns, key_names))
        except EventError as exc:
            given = d.get("id") if isinstance(d, dict) else None  # echoed only when it is an id (text)
            bad.append({"index": i, "id": given if isinstance(given, str) else None, "error": str(exc)})
    return good, bad


def to_tables(
    events: list[BusinessEvent], received_ns: list[int], key_names: Mapping[str, str]
) -> tuple[pa.Table, pa.Table]:
    """business_events rows, and business_key_links rows for events that carry a trace."""
    cols: dict[str, list[Any]] = {n: [] for n in BUSINESS_EVENTS.names}
    links: dict[tuple[str, str, str, str], list[Any]] = {}
    for ev, recv in zip(events, received_ns, strict=True):
        a = ev.attributes
        carried = extract_keys(a, key_names)
        keys = dict(carried)  # one per type for the key columns; KeyRefs has them all
        amount = a.get("revops.amount_minor", "0")
        row = {
            "EventId": ev.event_id,
            "Source": ev.source,
            "Type": ev.type,
            "Subject": ev.subject,
            "Time": ev.time_ns,
            "ReceivedAt": recv,
            "TraceId": ev.trace_id,
            "SpanId": ev.span_id,
            "System": a.get("revops.system", ""),
            "Region": a.get("revops.region", ""),
            "Step": a.get("revops.step", ""),
            "CustomerId": keys.get("customer", ""),
            "InvoiceId": keys.get("invoice", ""),
            "PaymentId": keys.get("payment", ""),
            "LedgerEntryId": keys.get("ledger_entry", ""),
            "KeyRefs": [key_ref(t, v) for t, v in carried],
            "AmountMinor": amount_minor(amount) or 0,
            "Currency": a.get("revops.currency", ""),
            "Attributes": list(a.items()),
            "Data": ev.data,
        }
        for k, v in row.items():
            cols[k].append(v)
        if ev.trace_id:
            for key_type, value in carried:
                k = (key_type, value, ev.trace_id, row["System"])
                cur = links.get(k)
                if cur is None:
                    links[k] = [row["Region"], ev.time_ns, ev.time_ns]
                else:
                    cur[1], cur[2] = min(cur[1], ev.time_ns), max(cur[2], ev.time_ns)
    return pa.Table.from_pydict(cols, schema=BUSINESS_EVENTS), links_table(links)


def links_table(links: Mapping[tuple[str, str, str, str], list[Any]]) -> pa.Table:
    """{(key_type, key_value, trace_id, system): [region, first_ns, last_ns]} -> business_key_links rows."""
    keys = list(links)
    vals = [links[k] for k in keys]
    return pa.Table.from_pydict(
        {
            "KeyType": [k[0] for k in keys],
            "KeyValue": [k[1] for k in keys],
            "TraceId": [k[2] for k in keys],
            "System": [k[3] for k in keys],
            "Region": [v[0] for v in vals],
            "FirstSeen": [v[1] for v in vals],
            "LastSeen": [v[2] for v in vals],
        },
        schema=BUSINESS_KEY_LINKS,
    )
