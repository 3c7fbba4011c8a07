"""Actions: corrective syncs and replays with their status (refreshed until they end), the dead-letter list,
circuit breakers, and bulk actions on a filtered set of items (the count is shown, then asked again)."""

from __future__ import annotations

import streamlit as st

from dashboard import session, views
from dashboard.api_client import ApiError, ApiUnavailable, TowerApi, load_actions

ACTION_STATES = ("pending", "in_progress", "succeeded", "failed")
BULK_ACTIONS = {"acknowledge": "Acknowledge", "ignore": "Ignore (note required)", "sync": "Corrective sync"}

st.title("Actions")
api = session.api()
cfg = session.settings()
operator = session.can_act()

with st.container(border=True):
    st.markdown("**Actions list**")
    a1, a2, a3 = st.columns([2, 1, 1])
    states = a1.multiselect("State", ACTION_STATES, key="ac_state")
    dead_only = a2.toggle("Dead letters only", key="ac_dead")
    limit = a3.selectbox("Show", (25, 50, 100), key="ac_limit")

if operator:
    with st.container(border=True):
        st.markdown("**Bulk action on a filtered set of open items**")
        b = st.columns(4)
        b_region = views.unset_all(
            b[0].selectbox("Region", views.options_with_all(("NA", "EU", "APAC")), key="bulk_region")
        )
        b_classes = b[1].multiselect("Class", views.DRIFT_CLASSES, key="bulk_class")
        b_age = views.unset_all(b[2].selectbox("Age", views.options_with_all(views.AGE_BUCKETS), key="bulk_age"))
        b_states = b[3].multiselect(
            "State (default: open)", ("new", "persisting", "acknowledged", "ignored"), key="bulk_state"
        )
    bulk_filters = views.DriftFilters(region=b_region, classes=list(b_classes), age=b_age, states=list(b_states))
else:
    bulk_filters = views.DriftFilters()

params = {"state": list(states), "limit": limit, "dead_letter": "true" if dead_only else None}
try:
    data = load_actions(api, params, bulk_filters.params())
except ApiUnavailable as exc:
    session.banner(exc, "actions")
session.show_errors(data.errors)

listing = data.get("actions") or {"items": [], "total": 0}
dead = data.get("dead_letters") or {"items": [], "total": 0}
m = st.columns(3)
m[0].metric("Actions (filtered)", f"{listing['total']:,}")
m[1].metric("Dead letters", f"{dead['total']:,}")
breakers = (data.get("breakers") or {}).get("breakers", {})
m[2].metric("Open breakers", sum(1 for b in breakers.values() if b.get("state") == "open"))
st.dataframe(views.action_rows(listing["items"]), key="ac_table", hide_index=True, width="stretch")
if breakers:
    st.caption(
        " · ".join(views.md_escape(f"{sys}: {b['state']} ({b['failures']} failures)") for sys, b in breakers.items())
    )


@st.fragment(run_every=cfg.dashboard_refresh_s)
def _follow(api: TowerApi, action_ids: list[str]) -> None:
    """Status of actions started from this page, refreshed until each has ended."""
    try:  # one request for all of them (one per action made a refresh of 480 take 35 s)
        rows = api.actions(action_id=action_ids, limit=len(action_ids), sort="created_at", order="asc")["items"]
    except (ApiError, ApiUnavailable) as exc:
        st.warning(f"Cannot follow the actions: {views.md_escape(exc)}")
        return
    done = sum(1 for a in rows if views.action_finished(a))
    st.progress(done / max(1, len(rows)), text=f"{done} of {len(rows)} actions ended")
    st.dataframe(views.action_rows(rows), key="ac_follow_table", hide_index=True, width="stretch")
    if done == len(rows):
        st.session_state.pop("ac_following", None)
        st.rerun(scope="app")


following = st.session_state.get("ac_following") or []
if following:
    st.subheader("Following")
    _follow(api, following)

choices = {a["action_id"]: a for a in listing["items"]} | {a["action_id"]: a for a in dead["items"]}
kept = st.session_state.get("ac_item")
if kept and kept not in choices:  # the open action stays open when the list's filter no longer shows it
    try:
        choices[kept] = api.action(kept)
    except (ApiError, ApiUnavailable):
        st.session_state["ac_item"] = ""
chosen = st.selectbox(
    "Open an action",
    ["", *choices],
    format_func=lambda a: "—" if not a else " · ".join(str(choices[a][k]) for k in ("class", "target_ref", "state")),
    key="ac_item",
)
if chosen:
    action = choices[chosen]
    st.json(
        {
            k: action[k]
            for k in (
                "action_id",
                "kind",
                "operation",
                "state",
                "attempts",
                "last_error",
                "result",
                "original_action_id",
                "requested_by",
                "approved_by",
            )
            if k in action
        },
        expanded=False,
    )
    if operator:
        session.confirmation("action", chosen)

        def _ask_replay() -> None:

            def run() -> dict:
                doc = api.replay(chosen)
                st.session_state["ac_following"] = [doc["action_id"]]
                return doc

            what = views.md_escape(f"{action['operation']} {action['target_ref']}")
            prompt = f"Replay failed action {views.md_escape(chosen)} ({what})?"
            session.ask("action", "replay", prompt, run, chosen)

        def _ask_approve() -> None:

            def run() -> dict:
                doc = api.approve(chosen)
                st.session_state["ac_following"] = [doc["action_id"]]
                return doc

            what = views.md_escape(f"{action['operation']} of {action['target_ref']}")
            session.ask("action", "approve", f"Approve and run {what}?", run, chosen)

        c1, c2 = st.columns(2)
        c1.button("Replay…", key="ac_replay", on_click=_ask_replay, disabled=action["state"] != "failed")
        c2.button(
            "Approve…",
            key="ac_approve",
            on_click=_ask_approve,
            disabled=action["state"] != "pending" or bool(action.get("approved_by")),
        )

if operator:
    st.subheader("Bulk action")
    matching = (data.get("matching") or {}).get("total", 0)
    st.metric("Open items matching the bulk filter", f"{matching:,}")
    kind = st.selectbox("Action", list(BULK_ACTIONS), format_func=BULK_ACTIONS.get, key="bulk_action")
    note = st.text_input("Note (required to acknowledge or ignore)", key="bulk_note")
    if kind == "sync":
        st.checkbox("Approve business-rule corrections (amount, currency, duplicate posting)", key="bulk_approve")
    ready = matching > 0 and (kind == "sync" or bool(note.strip()))

    shown_ids = [i["drift_id"] for i in (data.get("matching") or {}).get("items", [])]

    def _ask_bulk() -> None:
        # read at click time: a note typed and clicked at once is the one that is sent (and shown in the question)
        count, ids = matching, shown_ids
        chosen_kind = st.session_state.get("bulk_action") or kind
        said = (st.session_state.get("bulk_note") or "").strip()
        approve = chosen_kind == "sync" and bool(st.session_state.get("bulk_approve"))
        if chosen_kind != "sync" and not said:
            return

        def run() -> dict:
            doc = api.bulk(chosen_kind, bulk_filters.body(), ids, said, approve=approve)
            # followed until they end: the corrections that run, not those left waiting for an approval
            started = [i["action_id"] for i in doc.get("items", []) if i.get("action_id") and i.get("approved")]
            if started:
                st.session_state["ac_following"] = started
            return doc

        prompt = views.bulk_prompt(chosen_kind, count, bulk_filters, said, approve)
        session.ask("bulk", f"bulk {chosen_kind}", prompt, run)

    st.button(f"{BULK_ACTIONS[kind]} {matching:,} items…", key="bulk_apply", on_click=_ask_bulk, disabled=not ready)
    session.confirmation("bulk")
    result = st.session_state.get(session.RESULT)
    if result and result.get("ok") and result["where"] == "bulk":
        doc = result["doc"]  # what it did is said above, in the confirmation's place
        if doc.get("errors"):
            st.dataframe(doc["errors"], key="bulk_errors", hide_index=True)
else:
    st.caption("Read-only: your role cannot start, replay or approve actions.")
