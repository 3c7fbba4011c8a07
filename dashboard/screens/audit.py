"""Audit: who did what, when, to which object, with what result (newest first, filtered by the API)."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from dashboard import session, views
from dashboard.api_client import ApiError, ApiUnavailable, load_audit

st.title("Audit log")
api = session.api()
try:
    facets = api.audit_facets()  # the filters' choices: actors, actions, object types, outcomes seen lately
except ApiUnavailable as exc:
    session.banner(exc, "audit")
except ApiError as exc:
    st.warning(f"Could not load the filter choices: {views.md_escape(exc.detail)}")
    facets = {"actors": [], "actions": [], "object_types": [], "outcomes": []}

with st.container(border=True):
    f = st.columns([1, 1, 1, 1, 1, 1])
    actor = views.unset_all(f[0].selectbox("Who", views.options_with_all(facets["actors"]), key="au_actor"))
    action = views.unset_all(f[1].selectbox("Did", views.options_with_all(facets["actions"]), key="au_action"))
    object_type = views.unset_all(
        f[2].selectbox("Object type", views.options_with_all(facets["object_types"]), key="au_object_type")
    )
    outcome = views.unset_all(f[3].selectbox("Result", views.options_with_all(facets["outcomes"]), key="au_outcome"))
    object_id = f[4].text_input("Object id", key="au_object_id")
    days = f[5].selectbox("Period", (1, 7, 30, 365), index=1, format_func=lambda d: f"last {d} d", key="au_days")
    g = st.columns([1, 1, 4])
    page_size = g[0].selectbox("Per page", (50, 100, 500), key="au_page_size")
    signature = repr((actor, action, object_type, outcome, object_id, days, page_size))
    if st.session_state.get("au_signature") != signature:  # another filter: back to the first page
        st.session_state["au_signature"] = signature
        st.session_state["au_page"] = 1
    page = int(g[1].number_input("Page", min_value=1, step=1, key="au_page"))

params = {
    "actor": actor,
    "action": action,
    "object_type": object_type,
    "outcome": outcome,
    "object_id": object_id.strip(),
    "since": (dt.datetime.now(dt.UTC) - dt.timedelta(days=days)).isoformat(),
    "limit": page_size,
    "offset": (page - 1) * page_size,
}
try:
    data = load_audit(api, params)
except ApiUnavailable as exc:
    session.banner(exc, "audit")
session.show_errors(data.errors)
doc = data.get("audit") or {"items": [], "total": 0}
st.metric("Records", f"{doc['total']:,}")
st.caption(f"Page {page} of {views.page_count(doc['total'], page_size)}")
st.dataframe(views.audit_rows(doc["items"]), key="au_table", hide_index=True, width="stretch")
