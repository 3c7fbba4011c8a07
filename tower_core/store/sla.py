"""SLA reads and writes: step latencies per region from ``step_activity``, stuck items, drift age, breach history
and the webhook notification log. All values are bound parameters; times are integer nanoseconds (UTC).

An item of a step (an invoice for invoice_to_ledger...) starts at its first activity in the step's source
system and ends at its last activity in the target system (collector/correlation.py STEPS). Judged against a
latency threshold it is *decided* once it completes (good when within the threshold) or once the threshold
has passed without completion (bad: "stuck", even if it completes later). Its decision time is therefore
``end`` when good, ``start + threshold`` when bad, so each item counts exactly once, in the windows that
contain its decision time, and an evaluation at a past ``now`` gives the answer it would have given then.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from tower_core.store.base import Store

NS = 1_000_000_000

# One row per item of the step, as of {now}: its region, start (first activity in the source system), whether it
# ended by {now} and when: its first activity in the target system at or after the start. A row of step_activity
# is one activity (a span's start and end; migration 0015), so a target row counts from its start when that is
# after the item's start, else from its end if that lies in [start, now] (a span running across the start).
# Later target activity (a duplicate posting, a status refresh, the next profile change) and earlier history do
# not stretch the latency, merged or not. A target row in the same whole second as the start counts as at the
# start: Stripe times its events in whole seconds, so a customer updated 0.3 s after the CDP's change is stamped
# before it; so does one up to {skew_ns} before the start (TOWER_SLA_CLOCK_SKEW_S: an ERP whose clock runs behind
# billing's stamps a prompt posting before the finalization, and the item stayed stuck for good).
# Items whose decision can fall inside the longest window start no earlier than {lo} = now - window -
# threshold, so rows of older days are pruned through the (Step, Day, ...) primary key. Per region, the
# decided and bad counts of each window, and latency figures of the items completed over the period.
# One row per item (the subquery both the statistics and the stuck list read).
_ITEMS = (
    "SELECT KeyValue AS key, "
    "  if(anyIf(Region, System = {source:String} AND Region != '') != '', "
    "     anyIf(Region, System = {source:String} AND Region != ''), "
    "     if(anyIf(Region, Region != '') != '', anyIf(Region, Region != ''), 'unknown')) AS region, "
    "  toUnixTimestamp64Nano(minIf(FirstSeen, System = {source:String})) AS start_ns, "
    "  arrayFilter(x -> x > 0, arrayMap(p -> if(p.1 >= start_ns, p.1, if(intDiv(p.1, {ns:Int64}) = "
    "     intDiv(start_ns, {ns:Int64}) OR p.1 >= start_ns - {skew_ns:Int64}, start_ns, "
    "     if(p.2 >= start_ns AND p.2 <= {now:Int64}, p.2, 0))), groupArrayIf((toUnixTimestamp64Nano(FirstSeen), "
    "     toUnixTimestamp64Nano(LastSeen)), System = {target:String}))) AS ends, "
    "  notEmpty(ends) AS ended, "
    "  if(ended, arrayMin(ends), 0) AS end_ns, "
    "  if(ended, greatest(end_ns - start_ns, 0), 0) AS latency_ns, "
    "  ended AND latency_ns <= {threshold_ns:Int64} AS good, "
    "  (ended AND latency_ns > {threshold_ns:Int64}) OR (NOT ended AND start_ns + {threshold_ns:Int64} <= {now:Int64}) "
    "     AS bad, "
    "  if(good, end_ns, start_ns + {threshold_ns:Int64}) AS decision_ns "
    "FROM $db.step_activity "
    "WHERE Step = {step:String} AND KeyType = {key_type:String} "
    "  AND Day >= toDate(fromUnixTimestamp64Nano({lo:Int64})) AND Day <= toDate(fromUnixTimestamp64Nano({now:Int64})) "
    "  AND FirstSeen <= fromUnixTimestamp64Nano({now:Int64}) "
    "GROUP BY KeyValue "
    "HAVING countIf(System = {source:String}) > 0 AND start_ns >= {lo:Int64}"
    ") "
)

_STEP_STATS = (
    "SELECT region, "
    "  sumForEach(arrayMap(w -> toUInt64((good OR bad) AND decision_ns > {now:Int64} - w), {windows_ns:Array(Int64)}))"
    "    AS totals, "
    "  sumForEach(arrayMap(w -> toUInt64(bad AND decision_ns > {now:Int64} - w), {windows_ns:Array(Int64)})) AS bads, "
    "  countIf(NOT ended AND start_ns + {threshold_ns:Int64} <= {now:Int64}) AS stuck, "
    "  countIf(NOT ended) AS in_flight, "
    "  countIf(ended AND end_ns > {now:Int64} - {period_ns:Int64}) AS completed, "
    "  quantilesExactIf(0.5, 0.9, 0.99)(latency_ns, ended AND end_ns > {now:Int64} - {period_ns:Int64}) AS q_ns, "
    "  sumForEach(arrayMap(b -> toUInt64(ended AND end_ns > {now:Int64} - {period_ns:Int64} AND latency_ns <= b), "
    "    {bounds_ns:Array(Int64)})) AS buckets, "
    "  sumIf(latency_ns, ended AND end_ns > {now:Int64} - {period_ns:Int64}) AS latency_sum_ns "
    "FROM (/*items*/"
    "WHERE empty({regions:Array(String)}) OR has({regions:Array(String)}, region) "
    "GROUP BY region ORDER BY region"
).replace("/*items*/", _ITEMS)

_STUCK = (
    "SELECT key, region, start_ns, {now:Int64} - start_ns AS age_ns FROM (/*items*/"
    "WHERE NOT ended AND start_ns + {threshold_ns:Int64} <= {now:Int64} "
    "  AND (empty({regions:Array(String)}) OR has({regions:Array(String)}, region)) "
    "ORDER BY start_ns, key LIMIT {limit:UInt32}"
).replace("/*items*/", _ITEMS)


STEP_ACTIVITY = pa.schema(
    [
        ("Step", pa.string()),
        ("Day", pa.date32()),
        ("KeyType", pa.string()),
        ("KeyValue", pa.string()),
        ("System", pa.string()),
        ("FirstSeen", pa.timestamp("ns", tz="UTC")),
        ("Region", pa.string()),
        ("LastSeen", pa.timestamp("ns", tz="UTC")),
    ]
)


def write_step_activity(store: Store, system: str, activity: Sequence[Any]) -> int:
    """Activity the reconciler learned from pulled records (reconciler.sla.ledger_activity.Activity); a record
    pulled twice writes the same row, which the table's aggregates collapse."""
    if not activity:
        return 0
    rows: dict[str, list[Any]] = {name: [] for name in STEP_ACTIVITY.names}
    for a in activity:
        at = a.at if a.at.tzinfo else a.at.replace(tzinfo=dt.UTC)
        for name, value in (
            ("Step", a.step), ("Day", at.date()), ("KeyType", a.key_type), ("KeyValue", a.key), ("System", system),
            ("FirstSeen", at), ("Region", a.region), ("LastSeen", at),
        ):  # fmt: skip
            rows[name].append(value)
    return store.insert_arrow("step_activity", pa.Table.from_pydict(rows, schema=STEP_ACTIVITY))


def _step_params(
    step: str,
    key_type: str,
    source: str,
    target: str,
    threshold_s: float,
    now_ns: int,
    lookback_s: float,
    regions: Sequence[str],
    skew_s: float = 0.0,
) -> dict[str, Any]:
    threshold_ns = int(threshold_s * NS)
    return {
        "step": step,
        "key_type": key_type,
        "source": source,
        "target": target,
        "threshold_ns": threshold_ns,
        "now": now_ns,
        "lo": now_ns - int(lookback_s * NS) - threshold_ns,
        "regions": list(regions),
        "ns": NS,
        "skew_ns": int(skew_s * NS),
    }


def step_stats(
    store: Store,
    *,
    step: str,
    key_type: str,
    source: str,
    target: str,
    threshold_s: float,
    now_ns: int,
    windows_s: Sequence[float],
    period_s: float,
    bounds_s: Sequence[float],
    regions: Sequence[str] = (),
    skew_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Per region: decided and bad item counts per window (``windows_s`` order), stuck and in-flight items,
    latency quantiles (p50/p90/p99 ns), cumulative histogram counts per bound and the latency sum over
    ``period_s``. One set-based query over the step's rows of the longest window."""
    lookback = max([period_s, *windows_s])
    params = _step_params(step, key_type, source, target, threshold_s, now_ns, lookback, regions, skew_s)
    params |= {
        "windows_ns": [int(w * NS) for w in windows_s],
        "period_ns": int(period_s * NS),
        "bounds_ns": [int(b * NS) for b in bounds_s],
    }
    return store.query_rows(_STEP_STATS, params)


def stuck_items(
    store: Store,
    *,
    step: str,
    key_type: str,
    source: str,
    target: str,
    threshold_s: float,
    now_ns: int,
    lookback_s: float,
    regions: Sequence[str] = (),
    limit: int = 100,
    skew_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Items started in the source system, not ended in the target, past their threshold (oldest first)."""
    params = _step_params(step, key_type, source, target, threshold_s, now_ns, lookback_s, regions, skew_s)
    return store.query_rows(_STUCK, params | {"limit": limit})


def unreconciled_by_region(
    store: Store,
    *,
    now_ns: int,
    max_age_s: float,
    exclude_states: Sequence[str],
    classes: Sequence[str] = (),
    regions: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Per region, drift items not in ``exclude_states`` first seen more than ``max_age_s`` before now
    (latest version of each item), with the oldest first-seen time."""
    return store.query_rows(
        "SELECT region, count() AS items, toUnixTimestamp64Nano(min(first_seen)) AS oldest_ns FROM ("
        "  SELECT DriftId, argMax(State, Version) AS state, argMax(Class, Version) AS class, "
        "    if(argMax(Region, Version) = '', 'unknown', argMax(Region, Version)) AS region, "
        "    argMax(FirstSeen, Version) AS first_seen "
        "  FROM $db.drift_items GROUP BY DriftId) "
        "WHERE state NOT IN {exclude:Array(String)} "
        "  AND first_seen <= fromUnixTimestamp64Nano({cutoff:Int64}) "
        "  AND (empty({classes:Array(String)}) OR has({classes:Array(String)}, class)) "
        "  AND (empty({regions:Array(String)}) OR has({regions:Array(String)}, region)) "
        "GROUP BY region ORDER BY region",
        {
            "exclude": list(exclude_states),
            "cutoff": now_ns - int(max_age_s * NS),
            "classes": list(classes),
            "regions": list(regions),
        },
    )


# --- breach history


_BREACH_SCHEMA = pa.schema(
    [
        ("BreachId", pa.string()),
        ("Fingerprint", pa.string()),
        ("Sla", pa.string()),
        ("Kind", pa.string()),
        ("Step", pa.string()),
        ("Region", pa.string()),
        ("Severity", pa.string()),
        ("Labels", pa.map_(pa.string(), pa.string())),
        ("Annotations", pa.map_(pa.string(), pa.string())),
        ("Status", pa.string()),
        ("StartsAt", pa.timestamp("ms", tz="UTC")),
        ("EndsAt", pa.timestamp("ms", tz="UTC")),
        ("Value", pa.float64()),
        ("PeakValue", pa.float64()),
        ("Details", pa.string()),
        ("EvaluatedAt", pa.timestamp("ms", tz="UTC")),
        ("Version", pa.uint64()),
    ]
)


def write_breaches(store: Store, rows: Iterable[dict[str, Any]], version: int) -> int:
    """Insert breach states (dicts keyed like ``_BREACH_SCHEMA`` without Version; times in ms)."""
    rows = list(rows)
    if not rows:
        return 0
    cols: dict[str, list[Any]] = {name: [] for name in _BREACH_SCHEMA.names}
    for r in rows:
        for name in _BREACH_SCHEMA.names:
            if name == "Version":
                cols[name].append(version)
            elif name in ("Labels", "Annotations"):
                cols[name].append(list(r[name].items()))
            else:
                cols[name].append(r[name])
    table = pa.Table.from_pydict(cols, schema=_BREACH_SCHEMA)
    return store.insert_arrow("sla_breaches", table, dedup_token=f"sla_breaches_{version}")


def open_breaches(store: Store) -> list[dict[str, Any]]:
    """Breaches whose latest state is firing (the evaluator's memory across restarts)."""
    return store.query_rows(
        "SELECT "
        "BreachId AS breach_id, Fingerprint AS fingerprint, Sla AS sla, Kind AS kind, Step AS step, Region AS region, "
        "Severity AS severity, Labels AS labels, Annotations AS annotations, Status AS status, "
        "toUnixTimestamp64Milli(StartsAt) AS starts_ms, toUnixTimestamp64Milli(EndsAt) AS ends_ms, Value AS value, "
        "PeakValue AS peak_value, Details AS details, toUnixTimestamp64Milli(EvaluatedAt) AS evaluated_ms"
        " FROM $db.sla_breaches FINAL WHERE Status = 'firing' ORDER BY StartsAt, BreachId"
    )


def last_evaluated_ms(store: Store) -> int:
    """The latest evaluation instant (ms) a recorded evaluation wrote to the breach history, 0 when none: every
    recorded evaluation rewrites the breaches it finds firing and those it resolves."""
    rows = store.query_rows("SELECT toUnixTimestamp64Milli(max(EvaluatedAt)) AS ms, count() AS n FROM $db.sla_breaches")
    return int(rows[0]["ms"]) if rows and int(rows[0]["n"]) else 0


def list_breaches(
    store: Store,
    *,
    status: str | None = None,
    region: str | None = None,
    step: str | None = None,
    sla: str | None = None,
    since_ms: int = 0,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """Breach history, newest first; empty filters match everything."""
    return store.query_rows(
        "SELECT "
        "BreachId AS breach_id, Fingerprint AS fingerprint, Sla AS sla, Kind AS kind, Step AS step, Region AS region, "
        "Severity AS severity, Labels AS labels, Annotations AS annotations, Status AS status, "
        "toUnixTimestamp64Milli(StartsAt) AS starts_ms, toUnixTimestamp64Milli(EndsAt) AS ends_ms, Value AS value, "
        "PeakValue AS peak_value, Details AS details, toUnixTimestamp64Milli(EvaluatedAt) AS evaluated_ms"
        " FROM $db.sla_breaches FINAL "
        "WHERE ({status:String} = '' OR Status = {status:String}) "
        "  AND ({region:String} = '' OR Region = {region:String}) "
        "  AND ({step:String} = '' OR Step = {step:String}) "
        "  AND ({sla:String} = '' OR Sla = {sla:String}) "
        "  AND (Status = 'firing' OR EndsAt >= fromUnixTimestamp64Milli({since:Int64})) "
        "ORDER BY StartsAt DESC, BreachId LIMIT {limit:UInt32}",
        {
            "status": status or "",
            "region": region or "",
            "step": step or "",
            "sla": sla or "",
            "since": since_ms,
            "limit": limit,
        },
    )


# --- webhook notification log


def receiver_key(url: str) -> str:
    """How the log names a receiver: its URL's SHA-256, as a URL often carries a secret (migration 0020)."""
    return "sha256:" + hashlib.sha256(url.encode()).hexdigest()


def notified(store: Store, receiver: str) -> set[tuple[str, int, str]]:
    """(fingerprint, startsAt ms, status) already delivered to the receiver at URL ``receiver``."""
    rows = store.query_rows(
        "SELECT DISTINCT Fingerprint AS fp, toUnixTimestamp64Milli(StartsAt) AS starts_ms, Status AS status "
        "FROM $db.sla_notifications WHERE Receiver = {r:String}",
        {"r": receiver_key(receiver)},
    )
    return {(r["fp"], int(r["starts_ms"]), r["status"]) for r in rows}


def record_notifications(
    store: Store, receiver: str, group_key: str, entries: Iterable[tuple[str, int, str]], http_status: int, version: int
) -> None:
    """Remember that the receiver at URL ``receiver`` was told each (fingerprint, startsAt ms, status)."""
    entries = sorted(set(entries))
    if not entries:
        return
    now = dt.datetime.now(dt.UTC)
    receiver = receiver_key(receiver)
    table = pa.Table.from_pydict(
        {
            "Receiver": [receiver] * len(entries),
            "Fingerprint": [e[0] for e in entries],
            "StartsAt": [e[1] for e in entries],
            "Status": [e[2] for e in entries],
            "GroupKey": [group_key] * len(entries),
            "SentAt": [now] * len(entries),
            "HttpStatus": [http_status] * len(entries),
            "Version": [version] * len(entries),
        },
        schema=pa.schema(
            [
                ("Receiver", pa.string()),
                ("Fingerprint", pa.string()),
                ("StartsAt", pa.timestamp("ms", tz="UTC")),
                ("Status", pa.string()),
                ("GroupKey", pa.string()),
                ("SentAt", pa.timestamp("ms", tz="UTC")),
                ("HttpStatus", pa.uint16()),
                ("Version", pa.uint64()),
            ]
        ),
    )
    token = hashlib.sha256(f"{receiver}\n{group_key}".encode()).hexdigest()[:16]
    store.insert_arrow("sla_notifications", table, dedup_token=f"sla_notifications_{token}_{version}")


def audit(
    store: Store, actor: str, action: str, object_id: str, after: str, note: str = "", outcome: str = "ok"
) -> None:
    """One audit_log record of an SLA mutation (its id is its insert deduplication token)."""
    audit_id = uuid.uuid4().hex
    table = pa.Table.from_pydict(
        {
            "AuditId": [audit_id],
            "EventTime": [dt.datetime.now(dt.UTC)],
            "Actor": [actor],
            "Action": [action],
            "ObjectType": ["sla"],
            "ObjectId": [object_id],
            "Before": [""],
            "After": [after],
            "Note": [note],
            "Outcome": [outcome],
        },
        schema=pa.schema(
            [
                ("AuditId", pa.string()),
                ("EventTime", pa.timestamp("us", tz="UTC")),
                ("Actor", pa.string()),
                ("Action", pa.string()),
                ("ObjectType", pa.string()),
                ("ObjectId", pa.string()),
                ("Before", pa.string()),
                ("After", pa.string()),
                ("Note", pa.string()),
                ("Outcome", pa.string()),
            ]
        ),
    )
    store.insert_arrow("audit_log", table, dedup_token=f"audit_{audit_id}")
