"""SLAs & alerts: the definitions in force, compliance per objective and region, breach history, and a link
to Alertmanager when one is configured (TOWER_ALERTMANAGER_URL)."""

from __future__ import annotations

import streamlit as st

from dashboard import session, views
from dashboard.api_client import ApiUnavailable, load_slas

st.title("SLAs & alerts")
api = session.api()
cfg = session.settings()
try:
    data = load_slas(api)
except ApiUnavailable as exc:
    session.banner(exc, "slas")
session.show_errors(data.errors)

if cfg.alertmanager_url:
    st.link_button("Open Alertmanager", views.link_without_credentials(cfg.alertmanager_url), key="sla_alertmanager")
else:
    st.caption("No Alertmanager configured (TOWER_ALERTMANAGER_URL); breaches are listed below.")

definitions = data.get("definitions") or {}
st.subheader("Objectives")
st.dataframe(
    [
        {
            "name": o["name"],
            "step": views.STEP_LABELS.get(o["step"], o["step"]),
            "target": views.fmt_pct(o["target"], 1),
            "threshold": o["threshold"],
            "period": o["period"],
            "regions": o["regions"] if isinstance(o["regions"], str) else ", ".join(o["regions"]),
            "description": o.get("description", ""),
        }
        for o in definitions.get("objectives", [])
    ],
    key="sla_definitions",
    hide_index=True,
    width="stretch",
)
with st.expander("Burn-rate windows and threshold rules"):
    st.dataframe(definitions.get("burn_rate_windows", []), key="sla_windows", hide_index=True)
    st.dataframe(
        [
            {k: v for k, v in t.items() if not isinstance(v, list | dict) or k in ("regions",)}
            for t in definitions.get("thresholds", [])
        ],
        key="sla_thresholds",
        hide_index=True,
    )

compliance = data.get("compliance") or {}
objectives = compliance.get("objectives", [])
regions = sorted({o["region"] for o in objectives})
linked = st.query_params.get("region")  # an alert's dashboard link (?sla=&step=&region=) opens filtered
if linked in regions and "sla_region" not in st.session_state:
    st.session_state["sla_region"] = linked
region = views.unset_all(st.selectbox("Region", views.options_with_all(regions), key="sla_region"))
shown = [o for o in objectives if not region or o["region"] == region]
st.subheader("Compliance")
st.caption(f"Evaluated {views.fmt_time(compliance.get('evaluated_at'))}")
st.dataframe(
    [
        {
            "objective": o["sla"],
            "region": o["region"],
            "compliance": views.fmt_pct(o["compliance"]),
            "late / decided": f"{o['bad']:,} / {o['decided']:,}",
            "budget left": views.fmt_pct(o["error_budget_remaining"], 1),
            "p50": views.fmt_duration(o["latency_p50_s"]),
            "p99": views.fmt_duration(o["latency_p99_s"]),
            "stuck": o["stuck"],
            "firing": ", ".join(f"{sev}: {'; '.join(rules)}" for sev, rules in o["firing"].items()),
        }
        for o in shown
    ],
    key="sla_compliance",
    hide_index=True,
    width="stretch",
)

st.subheader("Breaches")
status = st.selectbox("Status", ("all", "firing", "resolved"), key="sla_status")
breaches = [
    b
    for b in (data.get("breaches") or {}).get("breaches", [])
    if (status == "all" or b["status"] == status) and (not region or b["region"] == region)
]
st.metric("Breaches shown (last 30 days)", len(breaches))
st.dataframe(
    [
        {
            "status": b["status"],
            "sla": b["sla"],
            "region": b["region"],
            "step": b["step"],
            "severity": b["severity"],
            "started": views.fmt_time(b["starts_at"]),
            "ended": views.fmt_time(b["ends_at"]),
            "lasted": views.fmt_duration(b["duration_s"]),
            "peak": b.get("peak_value"),
            "link": b.get("generator_url") or "",
        }
        for b in breaches
    ],
    key="sla_breaches",
    hide_index=True,
    width="stretch",
    column_config={"link": st.column_config.LinkColumn("link")},
)
