"""View models: pure functions turning API documents into what the pages draw (no IO, no Streamlit).

Nothing here decides anything about the business: classes, states, SLAs and amounts come from the API; this
module only reshapes, formats and orders them, so it is tested as plain functions.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tower_core.models import format_money

ROLES = ("viewer", "operator", "admin")
STEP_ORDER = ("cdp_to_billing", "invoice_to_ledger", "payment_to_cash", "refund_to_ledger")
STEP_LABELS = {
    "cdp_to_billing": "CDP → billing",
    "invoice_to_ledger": "billing → ERP (invoice)",
    "payment_to_cash": "billing → ERP (payment)",
    "refund_to_ledger": "billing → ERP (refund)",
}
SYSTEM_ORDER = ("cdp", "billing", "erp")
AGE_BUCKETS = ("0-1d", "2-7d", "8-30d", ">30d")
# the API's drift classes (reconciler/classify.py CLASSES; a test checks they agree: the dashboard imports only the API)
DRIFT_CLASSES = (
    "missing_in_erp", "missing_in_billing", "amount_mismatch", "currency_mismatch", "status_mismatch",
    "duplicate_posting", "payment_unapplied", "orphan_payment", "under_applied", "over_applied",
    "customer_unsynced", "customer_unmatched", "refund_unposted", "region_mismatch", "stale_sync",
)  # fmt: skip
FINAL_ACTION_STATES = frozenset({"succeeded", "failed"})
SORT_KEYS = {
    "first seen": "first_seen",
    "last seen": "last_seen",
    "amount": "amount",
    "class": "class",
    "region": "region",
    "state": "state",
    "updated": "updated_at",
}


# --- text from outside, shown by Markdown-rendering elements ------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-!|<>~$&])")
_MD_LIST_START = re.compile(r"^(\d+)\.")


def md_escape(text: object) -> str:
    """Text from the URL, the API or a user, made literal for an element that renders Markdown (st.warning,
    st.caption, st.header, a metric's value, a confirmation prompt...): a shared link or a stored note must not
    draw a link, emphasis or a heading on someone else's screen. Each Markdown character gets a backslash; line
    breaks become spaces (a new line could start a list or a code block; these are one-line messages)."""
    one_line = " ".join(str(text).splitlines()).strip()
    return _MD_LIST_START.sub(r"\1\\.", _MD_SPECIAL.sub(r"\\\1", one_line))


def plot_label(text: object) -> str:
    """A client-supplied name (a region, a step) as a Plotly label: Plotly renders <a>, <b> and <br> in labels,
    so a span's attribute could otherwise draw a link on the operator's chart."""
    return html.escape(str(text), quote=False)


# --- roles ----------------------------------------------------------------------------------------------------
def link_without_credentials(url: str) -> str:
    """A URL to show or open in the browser, without the ``user:password@`` the server uses (a link on the page
    would show it to every viewer)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def can_act(role: str | None) -> bool:
    """Operators and admins see action buttons; viewers (and an unknown role) do not."""
    return role in ROLES and ROLES.index(role) >= ROLES.index("operator")


# --- money and time -------------------------------------------------------------------------------------------
def fmt_money(minor: int | None, currency: str) -> str:
    """Integer minor units as a decimal amount in the currency's ISO exponent (JPY has none): 123456 EUR ->
    1,234.56 EUR; a code the tower does not know stays in minor units, said so."""
    return "—" if minor is None or not currency else format_money(int(minor), currency)


def fmt_duration(seconds: float | None) -> str:
    """Short human duration: 850 ms, 12.5 s, 7 min, 3.2 h, 4.0 d."""
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def fmt_pct(fraction: float | None, digits: int = 2) -> str:
    return "no data" if fraction is None else f"{fraction * 100:.{digits}f}%"


def parse_time(value: Any) -> dt.datetime | None:
    """An API timestamp (ISO string or datetime) as an aware UTC datetime; None for empty or the epoch."""
    if value in (None, ""):
        return None
    if isinstance(value, dt.datetime):
        t = value
    else:
        try:
            t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    t = t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return None if t.year <= 1970 else t.astimezone(dt.UTC)


def fmt_time(value: Any) -> str:
    t = parse_time(value)
    return "—" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")


def action_outcome(op: str, doc: Any) -> tuple[str, str]:
    """How a confirmed operation's reply reads: (level: success, info or error; message). The API answers 200
    with the action whatever became of it, so a sync the ERP refused is a failed action, not a done one."""
    if isinstance(doc, Mapping) and "matched" in doc:  # a bulk action: what became of each item
        clean = not doc.get("failed") and not doc.get("awaiting_approval")
        return ("success" if clean else "info"), bulk_outcome(doc)
    if not (isinstance(doc, Mapping) and "action_id" in doc and "state" in doc):
        return "success", f"{op}: done"
    state, error = doc["state"], md_escape(doc.get("last_error") or "")
    if state == "succeeded":
        return "success", f"{op}: done"
    if state == "failed":
        listed = " It is on the dead-letter list." if doc.get("dead_letter") else ""
        return "error", f"{op} failed: {error or 'no reason given'}.{listed}"
    if state == "in_progress":
        return "info", f"{op} is running; the Actions page shows how it ends."
    if doc.get("next_attempt_at"):
        return "info", f"{op} will be tried again at {fmt_time(doc['next_attempt_at'])} ({error or 'no reason given'})."
    if not doc.get("approved_by"):
        return "info", f"{op} is waiting for an operator's approval (Actions page)."
    return "info", f"{op} is queued; the Actions page shows how it ends."


UNKNOWN_OUTCOME = (
    "{op}: the API did not answer in time, so whether it was carried out is not known (it may still be). "
    "Look at the Actions page or the item's history before asking again."
)


# --- overview -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heatmap:
    regions: list[str]
    steps: list[str]
    z: list[list[float | None]]  # compliance in percent, [region][step]; None = nothing decided yet
    text: list[list[str]]


def compliance_heatmap(objectives: Iterable[Mapping[str, Any]]) -> Heatmap:
    """Region x flow step grid of SLA compliance (percent), from /api/sla/compliance's objectives."""
    rows = list(objectives)
    steps = [s for s in STEP_ORDER if any(r["step"] == s for r in rows)]
    steps += sorted({r["step"] for r in rows} - set(steps))
    regions = sorted({r["region"] for r in rows})
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["region"], r["step"]), []).append(r)
    # a region and step with several objectives (one per contract or tier) shows its worst: a firing objective is
    # never painted over by one that is met
    cell = {
        k: min(v, key=lambda r: (r.get("compliance") is None, r.get("compliance") or 0.0)) for k, v in cells.items()
    }
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for region in regions:
        zr: list[float | None] = []
        tr: list[str] = []
        for step in steps:
            r = cell.get((region, step))
            comp = None if r is None else r.get("compliance")
            zr.append(None if comp is None else round(comp * 100, 3))
            if r is None:
                tr.append("")
            else:
                shown = f"{fmt_pct(comp)}<br>{r.get('bad', 0)} of {r.get('decided', 0)} late"
                if len(cells[(region, step)]) > 1:
                    shown += f"<br>{plot_label(r.get('name', ''))}, worst of {len(cells[(region, step)])}"
                tr.append(shown)
        z.append(zr)
        text.append(tr)
    return Heatmap(regions, steps, z, text)


def breach_series(
    breaches: Iterable[Mapping[str, Any]], now: dt.datetime, hours: int = 24 * 7, bucket_h: int = 1
) -> dict[str, list[tuple[dt.datetime, int]]]:
    """Per region, how many breaches were active in each time bucket of the window ending ``now``. A 'merged'
    breach is a copy of another's episode (two API replicas evaluating at once): not counted again."""
    end = now.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
    edges = [end - dt.timedelta(hours=h) for h in range(hours, -1, -bucket_h)]
    spans: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}
    for b in breaches:
        if b.get("status") == "merged":
            continue
        start = parse_time(b.get("starts_at"))
        if start is None:
            continue
        stop = parse_time(b.get("ends_at")) or now
        spans.setdefault(b.get("region") or "(all)", []).append((start, stop))
    out: dict[str, list[tuple[dt.datetime, int]]] = {}
    for region in sorted(spans):
        series = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            series.append((lo, sum(1 for s, e in spans[region] if s < hi and e >= lo)))
        out[region] = series
    return out


@dataclass(frozen=True)
class AgingTable:
    classes: list[str]
    counts: dict[str, dict[str, int]]  # class -> bucket -> items
    amounts: dict[str, dict[str, dict[str, int]]]  # class -> bucket -> currency -> minor units
    currencies: list[str]
    total: int

    def rows(self) -> list[dict[str, Any]]:
        """One row per class: count per bucket, then amount per currency (all buckets)."""
        out = []
        for cls in self.classes:
            row: dict[str, Any] = {"class": cls}
            for b in AGE_BUCKETS:
                row[b] = self.counts[cls].get(b, 0)
            row["items"] = sum(self.counts[cls].values())
            for cur in self.currencies:
                total = sum(self.amounts[cls].get(b, {}).get(cur, 0) for b in AGE_BUCKETS)
                row[f"amount {cur}"] = fmt_money(total, cur) if total else ""
            out.append(row)
        return out

    def currency_totals(self) -> dict[str, int]:
        """|amount| per currency over every class and bucket (items without an amount have no currency)."""
        totals: dict[str, int] = {}
        for per_bucket in self.amounts.values():
            for per_cur in per_bucket.values():
                for cur, v in per_cur.items():
                    if cur:
                        totals[cur] = totals.get(cur, 0) + v
        return dict(sorted(totals.items()))


def aging_table(groups: Iterable[Mapping[str, Any]], region: str = "") -> AgingTable:
    """Unreconciled items by class x aging bucket (count) and per currency (amount), from /api/overview/aging."""
    counts: dict[str, dict[str, int]] = {}
    amounts: dict[str, dict[str, dict[str, int]]] = {}
    currencies: set[str] = set()
    total = 0
    for g in groups:
        if region and g.get("region") != region:
            continue
        cls, bucket, cur = g["class"], g["age_bucket"], g.get("currency") or ""
        n, amount = int(g["items"]), int(g["amount_minor"])
        counts.setdefault(cls, {})[bucket] = counts.get(cls, {}).get(bucket, 0) + n
        per_cur = amounts.setdefault(cls, {}).setdefault(bucket, {})
        per_cur[cur] = per_cur.get(cur, 0) + amount
        if cur:
            currencies.add(cur)
        total += n
    classes = sorted(counts, key=lambda c: (-sum(counts[c].values()), c))
    return AgingTable(classes, counts, amounts, sorted(currencies), total)


def run_summary(run: Mapping[str, Any] | None) -> dict[str, str]:
    """The last reconciliation run as label -> value."""
    if not run:
        return {"state": "no run yet"}
    started, finished = parse_time(run.get("started_at")), parse_time(run.get("finished_at"))
    took = (finished - started).total_seconds() if started and finished else None
    done = run.get("state") in ("succeeded", "failed")  # a running run has counted nothing yet: 0 would mislead

    def count(key: str) -> str:
        return f"{int(run.get(key) or 0):,}" if done else "—"

    return {
        "state": str(run.get("state", "")),
        "mode": f"{run.get('mode', '')}{' · ' + run['region'] if run.get('region') else ''}",
        "started": fmt_time(started),
        "duration": fmt_duration(took),
        "open items": count("drift_open"),
        "new": count("drift_new"),
        "resolved": count("drift_resolved"),
        "error": str(run.get("error") or ""),
    }


# --- unreconciled ---------------------------------------------------------------------------------------------
@dataclass
class DriftFilters:
    """The Unreconciled page's filters, as the API's query parameters."""

    region: str = ""
    classes: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    age: str = ""
    system: str = ""
    customer: str = ""
    currency: str = ""
    min_amount: int = 0
    max_amount: int | None = None

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {}
        for name in ("region", "age", "system", "currency"):
            if getattr(self, name):
                p[name] = getattr(self, name)
        if self.customer.strip():
            p["key"] = self.customer.strip()
        if self.classes:
            p["class"] = list(self.classes)
        if self.states:
            p["state"] = list(self.states)
        if self.min_amount:
            p["min_amount"] = int(self.min_amount)
        if self.max_amount is not None:
            p["max_amount"] = int(self.max_amount)
        return p

    def body(self) -> dict[str, Any]:
        """The same filter as POST /api/drift/bulk's ``filter`` (it takes the list's parameter names)."""
        return self.params()


def page_params(page: int, page_size: int, sort: str, descending: bool) -> dict[str, Any]:
    return {
        "limit": page_size,
        "offset": max(0, page - 1) * page_size,
        "sort": SORT_KEYS.get(sort, sort),
        "order": "desc" if descending else "asc",
    }


def page_count(total: int, page_size: int) -> int:
    return max(1, -(-int(total) // max(1, page_size)))


def drift_rows(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table rows of /api/drift items (amount formatted in its currency)."""
    return [
        {
            "class": i["class"],
            "key": i.get("primary_key") or i.get("invoice_id") or i.get("payment_id") or i.get("customer_id"),
            "region": i.get("region", ""),
            "amount": fmt_money(i.get("amount_minor"), i.get("currency", "")),
            "state": i.get("state", ""),
            "age": i.get("age_bucket", ""),
            "system": i.get("system", ""),
            "customer": i.get("customer_id", ""),
            "reason": i.get("reason_code", ""),
            "first seen": fmt_time(i.get("first_seen")),
            "drift id": i["drift_id"],
        }
        for i in items
    ]


def item_label(item: Mapping[str, Any]) -> str:
    """The item picker's text; an item known only by its id (a link to it) shows just that."""
    key = item.get("primary_key") or item.get("invoice_id") or item.get("payment_id") or item.get("customer_id")
    if "class" not in item:
        return f"item {item['drift_id']}"
    return f"{item['class']} · {key} · {fmt_money(item.get('amount_minor'), item.get('currency', ''))}"


def diff_rows(diff: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "field": d["field"],
            "billing": "" if d.get("billing") is None else str(d["billing"]),
            "erp": "" if d.get("erp") is None else str(d["erp"]),
            "differs": "≠" if d.get("differs") else "",
        }
        for d in diff
    ]


def step_thresholds(definitions: Mapping[str, Any] | None, region: str = "") -> dict[str, float]:
    """Flow step -> latency threshold in seconds, from /api/sla/definitions (the tightest objective)."""
    out: dict[str, float] = {}
    for o in (definitions or {}).get("objectives", []):
        regions = o.get("regions", "all")
        if region and regions != "all" and region not in regions:
            continue
        step, threshold = o.get("step"), o.get("threshold_s")
        if step and threshold is not None:
            out[step] = min(out.get(step, float(threshold)), float(threshold))
    return out


@dataclass(frozen=True)
class Bar:
    """One bar of the transaction waterfall."""

    label: str  # row label (system · span or step)
    kind: str  # "span" or "step"
    system: str
    start: dt.datetime
    end: dt.datetime
    latency_ms: float | None
    threshold_ms: float | None
    within: bool | None  # step latency within its SLA threshold (None: no threshold or incomplete)
    detail: str


def bar_hover(bar: Bar) -> str:
    """The waterfall bar's hover text. Plotly renders a subset of HTML there (links included), and span names and
    trace details are whatever a client sent: they are escaped, only the line breaks are ours."""
    parts = (bar.label, fmt_time(bar.start), bar_verdict(bar), bar.detail)
    return "<br>".join(html.escape(p, quote=False) for p in parts)


def transaction_bars(
    txn: Mapping[str, Any] | None, thresholds_s: Mapping[str, float], now: dt.datetime | None = None
) -> list[Bar]:
    """The CDP -> billing -> ERP waterfall: each system's spans in time order, then each flow step's span
    from its source to its target system with its latency against the step's SLA threshold. A step still
    waiting for its target system runs until ``now`` (when given), late once past its threshold."""
    if not txn:
        return []
    bars: list[Bar] = []
    spans = sorted(
        txn.get("spans", []),
        key=lambda s: (SYSTEM_ORDER.index(s["system"]) if s.get("system") in SYSTEM_ORDER else 9, s.get("start_ns", 0)),
    )
    for s in spans:
        start, end = parse_time(s.get("start")), parse_time(s.get("end"))
        if start is None or end is None:
            continue
        bars.append(
            Bar(
                label=f"{s.get('system') or '?'} · {s.get('name', '')}",
                kind="span",
                system=s.get("system") or "",
                start=start,
                end=max(end, start),
                latency_ms=s.get("duration_ms"),
                threshold_ms=None,
                within=None,
                detail=f"trace {s.get('trace_id', '')[:12]}… · {s.get('status', '')}",
            )
        )
    for st in sorted(txn.get("steps", []), key=lambda x: STEP_ORDER.index(x["step"]) if x["step"] in STEP_ORDER else 9):
        start, end = parse_time(st.get("start")), parse_time(st.get("end"))
        if start is None:
            continue
        threshold_s = thresholds_s.get(st["step"])
        latency = st.get("latency_ms")
        complete = bool(st.get("complete")) and end is not None and latency is not None
        within = None if threshold_s is None or not complete else latency <= threshold_s * 1000
        waited = max(now, start) if now is not None and not complete else start
        if not complete and threshold_s is not None and (waited - start).total_seconds() > threshold_s:
            within = False  # still waiting, and already past the SLA
        missing = ", ".join(st.get("missing_systems") or [])
        bars.append(
            Bar(
                label=f"step · {STEP_LABELS.get(st['step'], st['step'])}",
                kind="step",
                system="",
                start=start,
                end=end if complete and end is not None else waited,
                latency_ms=latency if complete else None,
                threshold_ms=None if threshold_s is None else threshold_s * 1000,
                within=within,
                detail=("waiting for " + missing) if missing else "complete",
            )
        )
    return bars


def bar_verdict(bar: Bar) -> str:
    if bar.kind != "step":
        return fmt_duration((bar.latency_ms or 0) / 1000)
    if bar.latency_ms is None:
        waited = (bar.end - bar.start).total_seconds()
        if not waited:
            return f"incomplete ({bar.detail})"
        late = " (late)" if bar.within is False else ""
        sla = f" · SLA {fmt_duration(bar.threshold_ms / 1000)}" if bar.threshold_ms is not None else ""
        return f"{bar.detail} for {fmt_duration(waited)}{sla}{late}"
    lat = fmt_duration(bar.latency_ms / 1000)
    if bar.threshold_ms is None:
        return lat
    sla = fmt_duration(bar.threshold_ms / 1000)
    return f"{lat} ≤ SLA {sla}" if bar.within else f"{lat} > SLA {sla} (late)"


# --- actions --------------------------------------------------------------------------------------------------
def action_finished(action: Mapping[str, Any] | None) -> bool:
    return bool(action) and action.get("state") in FINAL_ACTION_STATES  # type: ignore[union-attr]


def action_rows(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "action id": a["action_id"],
            "kind": a.get("kind", ""),
            "class": a.get("class", ""),
            "operation": a.get("operation", ""),
            "target": f"{a.get('target_system', '')}:{a.get('target_ref', '')}",
            "state": a.get("state", ""),
            "attempts": a.get("attempts", 0),
            "requested by": a.get("requested_by", ""),
            "approved by": a.get("approved_by", ""),
            "dead letter": "yes" if a.get("dead_letter") else "",
            "last error": a.get("last_error", ""),
            "updated": fmt_time(a.get("updated_at")),
        }
        for a in items
    ]


def bulk_prompt(action: str, count: int, filters: DriftFilters, note: str = "", approve: bool = False) -> str:
    """The second question of a bulk action (Markdown): what will happen to how many items, with the note that
    will be sent, so what is confirmed is what is stored."""
    what = {"acknowledge": "acknowledge", "ignore": "ignore", "sync": "start a corrective sync for"}[action]
    scope = ", ".join(f"{k}={v}" for k, v in filters.params().items())
    scope = md_escape(scope) if scope else "no filter: every open item"
    said = f" with the note “{md_escape(note)}”" if note.strip() else ""
    if action == "sync":
        said += (
            ", approving the business-rule corrections among them (amount, currency, duplicate posting)"
            if approve
            else "; business-rule corrections among them will wait for an approval"
        )
    return f"This will {what} {count} item{'s' if count != 1 else ''} ({scope}){said}. Confirm?"


def bulk_outcome(doc: Mapping[str, Any]) -> str:
    """What a bulk action did (Markdown): a correction created but waiting for an approval was not started."""
    done, matched, failed = (int(doc.get(k, 0)) for k in ("done", "matched", "failed"))
    if doc.get("action") != "sync":
        return f"{done} of {matched} items done, {failed} refused."
    started, waiting = int(doc.get("started", 0)), int(doc.get("awaiting_approval", 0))
    said = f"{started} of {matched} corrections started"
    if waiting:
        said += f", {waiting} waiting for an approval (approve them here one by one, or repeat with approval ticked)"
    if done - started - waiting > 0:
        said += f", {done - started - waiting} already done or under way"
    return f"{said}, {failed} refused."


# --- audit ----------------------------------------------------------------------------------------------------
def audit_rows(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    def change(r: Mapping[str, Any]) -> str:
        before, after = r.get("before"), r.get("after")
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            keys = [k for k in after if before.get(k) != after.get(k)]
            return ", ".join(f"{k}: {before.get(k)} → {after.get(k)}" for k in keys)
        return (
            ""
            if after is None
            else (str(after) if not isinstance(after, Mapping) else ", ".join(f"{k}={v}" for k, v in after.items()))
        )

    return [
        {
            "when": fmt_time(r.get("at")),
            "who": r.get("actor", ""),
            "did": r.get("action", ""),
            "on": f"{r.get('object_type', '')} {r.get('object_id', '')}".strip(),
            "result": r.get("outcome", ""),
            "change": change(r),
            "note": r.get("note", ""),
        }
        for r in items
    ]


# --- intake ---------------------------------------------------------------------------------------------------
def dead_letter_rows(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ingest records the store refused: what, how many rows, since when, and the store's reason."""
    return [
        {
            "name": d.get("name", ""),
            "kind": d.get("kind", ""),
            "rows": d.get("rows", ""),
            "set aside": fmt_time(d.get("set_aside_at")),
            "reason": d.get("error", ""),
        }
        for d in items
    ]


def skipped_rows(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Source records a pull could not map; cleared ones (a later pull mapped them) say when."""
    return [
        {
            "source": f"{s.get('connector', '')} {s.get('stream', '')}".strip(),
            "record": s.get("ref") or "(no id)",
            "reason": s.get("reason", ""),
            "first skipped": fmt_time(s.get("first_skipped_at")),
            "last skipped": fmt_time(s.get("last_skipped_at")),
            "times": s.get("times", 0),
            "cleared": fmt_time(s.get("cleared_at")) if s.get("cleared") else "",
        }
        for s in items
    ]


def skip_label(skip: Mapping[str, Any]) -> str:
    """One skipped record named for a chooser: source and id."""
    return f"{skip.get('connector', '')} {skip.get('stream', '')}: {skip.get('ref') or '(no id)'}"


def options_with_all(values: Sequence[str], all_label: str = "(all)") -> list[str]:
    return [all_label, *values]


def unset_all(value: str | None, all_label: str = "(all)") -> str:
    return "" if value in (None, all_label) else value
