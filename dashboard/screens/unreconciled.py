"""Unreconciled: the exception queue, filtered, sorted and paginated by the API; one item's field-level diff,
its business transaction as a CDP → billing → ERP waterfall with each step's latency against its SLA, its
history, and its actions (corrective sync, acknowledge, ignore — each confirmed first)."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from dashboard import session, views
from dashboard.api_client import ApiError, ApiUnavailable, TowerApi, load_item, load_unreconciled

STATES = ("new", "persisting", "acknowledged", "ignored", "resolved")
REGIONS = ("NA", "EU", "APAC")

st.title("Unreconciled items")
api = session.api()
cfg = session.settings()

with st.container(border=True):
    r1 = st.columns([1, 2, 2, 1, 1])
    region = views.unset_all(r1[0].selectbox("Region", views.options_with_all(REGIONS), key="ur_region"))
    classes = r1[1].multiselect("Class", views.DRIFT_CLASSES, key="ur_class")
    states = r1[2].multiselect("State (default: open)", STATES, key="ur_state")
    age = views.unset_all(r1[3].selectbox("Age", views.options_with_all(views.AGE_BUCKETS), key="ur_age"))
    system = views.unset_all(
        r1[4].selectbox("System", views.options_with_all(("billing", "erp", "cdp")), key="ur_system")
    )
    r2 = st.columns([2, 1, 1, 1, 1, 1, 1])
    customer = r2[0].text_input("Customer / invoice / payment id", key="ur_customer")
    min_amount = r2[1].number_input("Min |amount| (minor units)", min_value=0, step=100, key="ur_min_amount")
    max_amount = r2[2].number_input("Max |amount| (minor units, 0 = none)", min_value=0, step=100, key="ur_max_amount")
    sort = r2[3].selectbox("Sort by", list(views.SORT_KEYS), key="ur_sort")
    descending = r2[4].toggle("Descending", value=True, key="ur_desc")
    page_size = r2[5].selectbox("Per page", (25, 50, 100), key="ur_page_size")

filters = views.DriftFilters(
    region=region,
    classes=list(classes),
    states=list(states),
    age=age,
    system=system,
    customer=customer,
    min_amount=int(min_amount or 0),
    max_amount=int(max_amount) if max_amount else None,
)
signature = repr((filters, sort, descending, page_size))
if st.session_state.get("ur_signature") != signature:  # another filter: back to the first page
    st.session_state["ur_signature"] = signature
    st.session_state["ur_page"] = 1
page = int(r2[6].number_input("Page", min_value=1, step=1, key="ur_page"))

try:
    data = load_unreconciled(api, {**filters.params(), **views.page_params(page, page_size, sort, descending)})
except ApiUnavailable as exc:
    session.banner(exc, "unreconciled")
session.show_errors(data.errors)
doc = data.get("drift") or {"items": [], "total": 0}
pages = views.page_count(doc["total"], page_size)
st.metric("Matching items", f"{doc['total']:,}")
st.caption(f"Page {page} of {pages} · sorted by {sort} {'descending' if descending else 'ascending'}")
st.dataframe(views.drift_rows(doc["items"]), key="ur_table", hide_index=True, width="stretch")

items = {i["drift_id"]: i for i in doc["items"]}
preset = st.query_params.get("drift")  # a link to one item (?drift=ID)
if preset and st.session_state.get("ur_item") is None:
    st.session_state["ur_item"] = preset
for kept in (preset, st.session_state.get("ur_item")):  # an open item stays open on another page of the list
    if kept and kept not in items:
        items[kept] = {"drift_id": kept}
options = ["", *items]
chosen = st.selectbox(
    "Open an item",
    options,
    format_func=lambda d: "—" if not d else views.item_label(items[d]),
    key="ur_item",
)


def _waterfall(txn: dict[str, Any] | None, thresholds: dict[str, float]) -> None:
    bars = views.transaction_bars(txn, thresholds, dt.datetime.now(dt.UTC))
    if not bars:
        st.info("No spans or events of this transaction have reached the tower yet.")
        return
    colors = {"cdp": "#8e44ad", "billing": "#2980b9", "erp": "#16a085"}
    fig = go.Figure()
    for b in bars:
        width_ms = max((b.end - b.start).total_seconds() * 1000, 1.0)
        color = (
            colors.get(b.system, "#7f8c8d")
            if b.kind == "span"
            else ("#27ae60" if b.within else "#c0392b" if b.within is False else "#95a5a6")
        )
        fig.add_trace(
            go.Bar(
                y=[html.escape(b.label, quote=False)],  # a client's span name: no markup on the axis
                x=[width_ms],
                base=[b.start.isoformat()],
                orientation="h",
                marker_color=color,
                text=[views.bar_verdict(b)],
                textposition="auto",
                showlegend=False,
                hovertext=[views.bar_hover(b)],
                hoverinfo="text",
            )
        )
        if b.kind == "step" and b.threshold_ms is not None:
            deadline = b.start.timestamp() * 1000 + b.threshold_ms
            fig.add_trace(
                go.Scatter(
                    y=[html.escape(b.label, quote=False)],
                    x=[deadline],
                    mode="markers",
                    showlegend=False,
                    marker={"symbol": "line-ns-open", "size": 18, "color": "#2c3e50"},
                    hovertext=["SLA deadline"],
                    hoverinfo="text",
                )
            )
    fig.update_xaxes(type="date")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=60 + 34 * len(bars), margin={"l": 10, "r": 10, "t": 10, "b": 10}, barmode="overlay")
    st.plotly_chart(fig, key="ur_waterfall", width="stretch")


@st.fragment(run_every=cfg.dashboard_refresh_s)
def _follow(api: TowerApi, action_ids: list[str]) -> None:
    """Status of the item's running actions, refreshed until each has ended."""
    rows = []
    for action_id in action_ids:
        try:
            rows.append(api.action(action_id))
        except (ApiError, ApiUnavailable) as exc:
            st.warning(f"Cannot follow action {views.md_escape(action_id)}: {views.md_escape(exc)}")
            return
    st.dataframe(views.action_rows(rows), key="ur_follow_table", hide_index=True)
    if all(views.action_finished(a) for a in rows):
        st.rerun(scope="app")
    st.caption(f"Running… refreshed every {cfg.dashboard_refresh_s:g} s")


def _item(api: TowerApi, drift_id: str) -> None:
    try:
        loaded = load_item(api, drift_id)
    except ApiUnavailable as exc:
        session.banner(exc, "item")
    if "item" not in loaded:
        reason = loaded.errors.get("item", "not found")
        st.warning(f"Cannot open item {views.md_escape(drift_id)}: {views.md_escape(reason)}")
        return
    item = loaded["item"]
    st.header(views.md_escape(f"{item['class']} · {item['primary_key']}"))
    st.caption(views.md_escape(f"{item['reason_code']}: {item['reason']}"))
    m = st.columns(5)
    m[0].metric("Amount", views.md_escape(views.fmt_money(item["amount_minor"], item["currency"])))
    m[1].metric("State", views.md_escape(item["state"]))
    m[2].metric("Age", views.md_escape(item["age_bucket"]))
    m[3].metric("Region", views.md_escape(item["region"] or "—"))
    m[4].metric("Seen in", views.md_escape(item["system"] or "—"))
    st.caption(
        f"First seen {views.fmt_time(item['first_seen'])} · last seen {views.fmt_time(item['last_seen'])}"
        + (f" · note: {views.md_escape(item['state_note'])}" if item.get("state_note") else "")
    )

    tabs = st.tabs(["Difference", "Transaction", "History", "Actions"])
    with tabs[0]:
        st.dataframe(views.diff_rows(item["diff"]), key="ur_diff", hide_index=True, width="stretch")
    with tabs[1]:
        thresholds = views.step_thresholds(loaded.get("definitions"), item["region"])
        _waterfall(item.get("transaction"), thresholds)
    with tabs[2]:
        if item["history"]:
            st.dataframe(views.audit_rows(item["history"]), key="ur_history", hide_index=True, width="stretch")
        else:
            st.caption("No one has acted on this item yet.")
    with tabs[3]:
        actions = item["actions"]
        if actions:
            active = [a["action_id"] for a in actions if not views.action_finished(a)]
            if active:
                _follow(api, active)
            st.dataframe(views.action_rows(actions), key="ur_actions", hide_index=True, width="stretch")
        else:
            st.caption("No corrective action yet.")

    if not session.can_act():
        return
    st.subheader("Act on this item")
    session.confirmation("item", drift_id)
    if item.get("policy_note"):  # a class and reason the tower leaves to a person: say what to do instead
        st.info(f"The tower does not correct this item: {views.md_escape(item['policy_note'])}")
    acts = item["operator_may"]  # what the API takes of this item
    what = views.md_escape(f"{item['class']} {item['primary_key']}")  # shown in the questions below
    c1, c2, c3 = st.columns(3)
    can_sync = acts["sync"]
    approve = item["policy"] == "approval"

    def _ask_sync() -> None:
        verb = "approve and run a corrective sync" if approve else "run a corrective sync"
        session.ask(
            "item",
            "corrective sync",
            f"{verb.capitalize()} of {what} against the ERP?",
            lambda: api.sync(drift_id, approve=approve),
            drift_id,
        )

    def _ask_ack() -> None:
        note = st.session_state.get("ur_note", "")
        prompt = f"Acknowledge {what}? Note: “{views.md_escape(note)}”"
        session.ask("item", "acknowledge", prompt, lambda: api.acknowledge(drift_id, note), drift_id)

    def _ask_ignore() -> None:
        note = st.session_state.get("ur_note", "")
        prompt = f"Ignore {what}? Note: “{views.md_escape(note)}”"
        session.ask("item", "ignore", prompt, lambda: api.ignore(drift_id, note), drift_id)

    c1.button(
        "Corrective sync…",
        key="ur_sync",
        on_click=_ask_sync,
        disabled=not can_sync,
        help=None
        if can_sync
        else "this class has no corrective operation; acknowledge or ignore it"
        if item["policy"] == "manual"
        else f"the item is {item['state']}",
    )
    note = st.text_area("Note (required to acknowledge or ignore)", key="ur_note", max_chars=2000)
    c2.button(
        "Acknowledge…",
        key="ur_ack",
        on_click=_ask_ack,
        disabled=not acts["acknowledge"] or not note.strip(),
        help="write a note first: the audit record says why",
    )
    c3.button(
        "Ignore…",
        key="ur_ignore",
        on_click=_ask_ignore,
        disabled=not acts["ignore"] or not note.strip(),
        help="write a note first: ignoring needs a reason",
    )


if chosen:
    st.divider()
    _item(api, chosen)
