"""Overview: SLA compliance per region and flow step, breaches over time, unreconciled items by class and
age (count, and amount per currency), firing alerts and the last reconciliation run."""

from __future__ import annotations

import datetime as dt

import plotly.graph_objects as go
import streamlit as st

from dashboard import session, views
from dashboard.api_client import ApiUnavailable, load_overview

st.title("Overview")
api = session.api()
now = dt.datetime.now(dt.UTC)
try:
    data = load_overview(api, now)
except ApiUnavailable as exc:
    session.banner(exc, "overview")
session.show_errors(data.errors)

aging_doc = data.get("aging") or {"groups": [], "open": 0}
regions = sorted({g["region"] for g in aging_doc["groups"] if g.get("region")})
region = views.unset_all(st.selectbox("Region", views.options_with_all(regions), key="ov_region"))
aging = views.aging_table(aging_doc["groups"], region)
firing = (data.get("firing") or {}).get("breaches", [])
firing_here = [b for b in firing if not region or b.get("region") == region]
last_run = ((data.get("runs") or {}).get("items") or [None])[0]
run = views.run_summary(last_run)

# a part that failed to load is unknown, never "all clear"
aging_known, firing_known = "aging" not in data.errors, "firing" not in data.errors
c1, c2, c3 = st.columns(3)
c1.metric("Unreconciled items", f"{aging.total:,}" if aging_known else "unknown")
c2.metric("Firing alerts", len(firing_here) if firing_known else "unknown")
c3.metric("Last run", views.md_escape(run["state"]), help=f"started {run.get('started', '—')}")
totals = aging.currency_totals()
if totals:
    st.caption("Unreconciled amount per currency (|amount| of the open items)")
    for col, (cur, minor) in zip(st.columns(max(4, len(totals))), totals.items(), strict=False):
        col.metric(views.md_escape(f"Unreconciled {cur}"), views.md_escape(views.fmt_money(minor, cur)))

left, right = st.columns(2)
with left:
    st.subheader("SLA compliance by region and flow step")
    objectives = (data.get("compliance") or {}).get("objectives", [])
    objectives = [o for o in objectives if not region or o["region"] == region]
    heat = views.compliance_heatmap(objectives)
    if heat.regions:
        fig = go.Figure(
            go.Heatmap(
                z=heat.z,
                x=[views.plot_label(views.STEP_LABELS.get(s, s)) for s in heat.steps],
                y=[views.plot_label(r) for r in heat.regions],
                text=heat.text,
                texttemplate="%{text}",
                colorscale=[[0, "#c0392b"], [0.9, "#f39c12"], [1, "#27ae60"]],
                zmin=90,
                zmax=100,
                colorbar={"title": "% in SLA"},
                hovertemplate="%{y} · %{x}<br>%{text}<extra></extra>",
            )
        )
        fig.update_layout(height=300, margin={"l": 10, "r": 10, "t": 10, "b": 10})
        st.plotly_chart(fig, key="ov_heatmap", width="stretch")
    else:
        st.info("No SLA data yet: no flow step has been observed.")
with right:
    st.subheader("SLA breaches per region (last 7 days)")
    series = views.breach_series(
        [b for b in (data.get("breaches") or {}).get("breaches", []) if not region or b.get("region") == region], now
    )
    if series:
        fig = go.Figure()
        for reg, points in series.items():
            fig.add_trace(
                go.Scatter(
                    x=[p[0] for p in points],
                    y=[p[1] for p in points],
                    name=views.plot_label(reg),
                    mode="lines",
                    line_shape="hv",
                )
            )
        fig.update_layout(height=300, margin={"l": 10, "r": 10, "t": 10, "b": 10}, yaxis_title="active breaches")
        st.plotly_chart(fig, key="ov_breaches", width="stretch")
    else:
        st.info("No SLA breach in the last 7 days.")

st.subheader("Unreconciled items by class and age")
if aging.classes:
    fig = go.Figure()
    for bucket in views.AGE_BUCKETS:
        fig.add_trace(go.Bar(name=bucket, x=aging.classes, y=[aging.counts[c].get(bucket, 0) for c in aging.classes]))
    fig.update_layout(barmode="stack", height=300, margin={"l": 10, "r": 10, "t": 10, "b": 10}, yaxis_title="items")
    st.plotly_chart(fig, key="ov_aging_chart", width="stretch")
    st.dataframe(aging.rows(), key="ov_aging_table", hide_index=True, width="stretch")
elif aging_known:
    st.success("Nothing unreconciled.")

left, right = st.columns(2)
with left:
    st.subheader("Firing alerts")
    if firing_here:
        st.dataframe(
            [
                {
                    "sla": b["sla"],
                    "region": b["region"],
                    "step": b["step"],
                    "severity": b["severity"],
                    "since": views.fmt_time(b["starts_at"]),
                    "value": b.get("value"),
                    "summary": (b.get("annotations") or {}).get("summary", ""),
                }
                for b in firing_here
            ],
            key="ov_firing_table",
            hide_index=True,
        )
    elif firing_known:
        st.caption("No alert is firing.")
    am = session.settings().alertmanager_url
    if am:
        st.link_button("Open Alertmanager", views.link_without_credentials(am), key="ov_alertmanager")
with right:
    st.subheader("Last reconciliation run")
    st.dataframe([{"": k, "value": v} for k, v in run.items() if v], key="ov_run_table", hide_index=True)
    if session.can_act():
        session.confirmation("ov_run")

        def _ask_run() -> None:
            session.ask(
                "ov_run",
                "reconciliation run",
                "Start an incremental reconciliation run now?",
                lambda: api.start_run(full=False),
            )

        st.button("Run reconciliation now…", key="ov_start_run", on_click=_ask_run)
