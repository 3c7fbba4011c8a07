"""Intake: what never reached the comparison. Source records a pull could not map (listed until a later pull
maps them), and ingest records the store refused (operators: list, and send one back once its cause is fixed)."""

from __future__ import annotations

import streamlit as st

from dashboard import session, views
from dashboard.api_client import ApiUnavailable, load_intake

st.title("Intake")
api = session.api()
operator = session.can_act()
include_cleared = st.toggle("Also records a later pull mapped", key="in_cleared")
try:
    data = load_intake(api, include_cleared=include_cleared, operator=operator)
except ApiUnavailable as exc:
    session.banner(exc, "intake")
session.show_errors(data.errors)

skipped = data.get("skipped") or {"items": [], "open": 0}
letters = data.get("dead_letters") or {"items": [], "total": 0}
m = st.columns(2)
m[0].metric("Skipped source records (open)", f"{skipped['open']:,}")
m[1].metric("Ingest dead letters", f"{letters['total']:,}" if operator else "—")

st.subheader("Skipped source records")
st.caption(
    "Records a connector pulled and could not map (a currency without an ISO 4217 exponent, a malformed record). "
    "The pull went on without them; fix them at the source and the next pull maps them."
)
if skipped["items"]:
    st.dataframe(views.skipped_rows(skipped["items"]), key="in_skipped", hide_index=True, width="stretch")
else:
    st.info("No source record is skipped.")
open_skips = {views.skip_label(s): s for s in skipped["items"] if not s.get("cleared")}
session.choice_among("in_skip", open_skips)  # dismissed (or mapped) since it was chosen
session.outcome_if_gone("skip", open_skips, lambda r: f"{views.md_escape(r['target'])} dismissed.", "dismissal")
if operator and open_skips:
    with st.expander("Dismiss a record no pull will map (cancelled or deleted at its source)"):
        label = st.selectbox("Record", ["", *open_skips], format_func=lambda k: k or "—", key="in_skip")
        note = st.text_input("What happened to it at the source (required)", key="in_skip_note")
        if label:

            def _ask_dismiss() -> None:
                # read at click time: a note typed and clicked at once is the one that is sent (and shown)
                chosen = st.session_state.get("in_skip") or ""
                said = (st.session_state.get("in_skip_note") or "").strip()
                record = open_skips.get(chosen)
                if record is None or not said:
                    return
                session.ask(
                    "skip",
                    "dismiss",
                    f"Dismiss {views.md_escape(chosen)} with the note “{views.md_escape(said)}”? It leaves the open "
                    "list; the audit log keeps the note.",
                    lambda: api.dismiss_skipped(record["connector"], record["stream"], record["ref"], said),
                    chosen,
                )

            st.button("Dismiss…", key="in_dismiss", on_click=_ask_dismiss, disabled=not note.strip())
            session.confirmation("skip", label)  # a question about another record is dropped

st.subheader("Ingest dead letters")
if not operator:
    st.caption("Operators only: these records hold the estate's raw data.")
else:
    st.caption(
        "Acknowledged ingest the store refused for good, set aside so the rest could drain. Send one back once "
        "its cause is fixed (an upgrade, a schema change); one the store still refuses is set aside again."
    )
    names = [d["name"] for d in letters["items"]]
    session.choice_among("in_letter", names)  # requeued (or gone) since it was chosen
    session.outcome_if_gone(
        "dead_letter",
        names,
        lambda r: (
            f"{views.md_escape(r['target'])} is back in the write-ahead buffer "
            f"({views.md_escape(r['doc'].get('rows', ''))} rows)."
        ),
        "requeue",
    )
    if names:
        st.dataframe(views.dead_letter_rows(letters["items"]), key="in_letters", hide_index=True, width="stretch")
        chosen = st.selectbox("Dead letter", ["", *names], format_func=lambda n: n or "—", key="in_letter")
        if chosen:

            def _ask_requeue() -> None:
                session.ask(
                    "dead_letter",
                    "requeue",
                    f"Send {views.md_escape(chosen)} back into the write-ahead buffer?",
                    lambda: api.requeue_dead_letter(chosen),
                    chosen,
                )

            st.button("Requeue…", key="in_requeue", on_click=_ask_requeue)
        session.confirmation("dead_letter", chosen)
    else:
        st.info("No ingest record is set aside.")
