"""Reads for the dashboard: the audit log (who did what, when, with what result) and the unreconciled
items' aging per class and currency. Writes of audit records live with their writers
(``reconcile.write_audit``); this module only lists them. Every value is a bound parameter.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from tower_core.store.base import Store

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
FAR = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)

_AUDIT_WHERE = """
WHERE EventTime >= {since:DateTime64(6)} AND EventTime < {until:DateTime64(6)}
    AND ({actor:String} = '' OR Actor = {actor:String})
    -- a name, or a family of names by its prefix ending in '.' ('drift.'): 'action.replay' is not 'action.replayed'
    AND ({action:String} = '' OR Action = {action:String}
        OR (endsWith({action:String}, '.') AND startsWith(Action, {action:String})))
    AND ({object_type:String} = '' OR ObjectType = {object_type:String})
    AND ({object_id:String} = '' OR ObjectId = {object_id:String})
    AND ({outcome:String} = '' OR Outcome = {outcome:String})
"""
_AUDIT_LIST = (
    "SELECT AuditId AS audit_id, EventTime AS at, Actor AS actor, Action AS action, ObjectType AS object_type, "
    "ObjectId AS object_id, Before AS before, After AS after, Note AS note, Outcome AS outcome "
    "FROM $db.audit_log /*where*/ ORDER BY EventTime DESC, AuditId LIMIT 1 BY AuditId "
    "LIMIT {limit:UInt32} OFFSET {offset:UInt64}"
)
_AUDIT_COUNT = "SELECT count() AS n FROM $db.audit_log /*where*/"


def list_audit(
    store: Store,
    *,
    actor: str = "",
    action: str = "",
    object_type: str = "",
    object_id: str = "",
    outcome: str = "",
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Newest first; ``action`` matches a prefix (``drift.`` = every queue transition)."""
    params = {
        "actor": actor,
        "action": action,
        "object_type": object_type,
        "object_id": object_id,
        "outcome": outcome,
        "since": since or EPOCH,
        "until": until or FAR,
        "limit": limit,
        "offset": offset,
    }
    rows = store.query_rows(_AUDIT_LIST.replace("/*where*/", _AUDIT_WHERE), params)
    total = store.query_rows(_AUDIT_COUNT.replace("/*where*/", _AUDIT_WHERE), params)[0]["n"]
    for r in rows:
        for k in ("before", "after"):
            try:
                r[k] = json.loads(r[k]) if r[k] else None
            except ValueError:
                pass  # a writer stored plain text: show it as it is
    return rows, int(total)


def audit_facets(store: Store) -> dict[str, list[str]]:
    """Actors, actions, object types and outcomes seen in the last 90 days (the audit page's filter choices)."""
    rows = store.query_rows(
        "SELECT groupUniqArray(200)(Actor) AS actors, groupUniqArray(200)(Action) AS actions, "
        "groupUniqArray(50)(ObjectType) AS object_types, groupUniqArray(20)(Outcome) AS outcomes "
        "FROM $db.audit_log WHERE EventTime >= now64(6) - INTERVAL 90 DAY"
    )
    doc = rows[0] if rows else {}
    return {k: sorted(doc.get(k) or []) for k in ("actors", "actions", "object_types", "outcomes")}


def drift_aging(store: Store, now: dt.datetime, region: str = "") -> list[dict[str, Any]]:
    """Unresolved drift items per class, aging bucket, currency and region: count and |amount| in minor units.

    Amounts are summed per currency only (never across currencies). Buckets as the drift list's age filter.
    """
    from tower_core.store.reconcile import AGE_BUCKET, AGE_DAYS, _compose

    sql = _compose(
        "SELECT Class AS class, Region AS region, Currency AS currency, /*age_bucket*/ AS age_bucket, "
        "count() AS items, sum(abs(AmountMinor)) AS amount_minor "
        "FROM (SELECT Class, Region, Currency, AmountMinor, /*age_days*/ AS age "
        "FROM $db.drift_items FINAL WHERE State != 'resolved' AND ({region:String} = '' OR Region = {region:String})) "
        "GROUP BY class, region, currency, age_bucket ORDER BY class, region, currency, age_bucket",
        age_bucket=AGE_BUCKET,
        age_days=AGE_DAYS,
    )
    return store.query_rows(sql, {"now": now, "region": region})
