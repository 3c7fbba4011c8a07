"""Dashboard entry point (`tower dashboard`): the token, who it belongs to, and the pages.

Everything comes from the API (dashboard/api_client.py); the dashboard never opens the store. The token comes
from settings (TOWER_DASHBOARD_TOKEN, else TOWER_API_TOKEN) or is asked for once per session.
"""

from __future__ import annotations

import streamlit as st

from dashboard import session, views
from dashboard.api_client import ApiError, ApiUnavailable, TowerApi

st.set_page_config(page_title="Revenue Control Tower", page_icon="🗼", layout="wide")
cfg = session.settings()


def _login(message: str = "") -> None:
    """Ask for a token once per session; it is checked against the API before it is kept."""
    st.title("Revenue Control Tower")
    if message:
        st.error(message)
    with st.form("login_form"):
        st.write("Paste your API token (`tower token create --name you --role operator` prints one).")
        typed = st.text_input("API token", type="password", key="login_token")
        submitted = st.form_submit_button("Sign in", key="login_submit")
    if submitted and typed.strip() and not typed.strip().isascii():
        st.error("This is not a tower token: tokens are ASCII text (check for typographic quotes).")
    elif submitted and typed.strip():
        probe = TowerApi(cfg.api_url, typed.strip(), cfg.dashboard_timeout_s)
        try:
            st.session_state[session.PRINCIPAL] = probe.whoami()
            st.session_state[session.TOKEN] = typed.strip()
            st.rerun()
        except ApiError as exc:
            st.error(f"The API refused this token: {views.md_escape(exc.detail)}")
        except ApiUnavailable as exc:
            st.error(f"The API is unavailable, so the token cannot be checked now: {views.md_escape(exc)}")
        finally:
            probe.close()
    st.stop()


if session.token(cfg) is None:
    _login()

if session.principal() is None:
    try:
        st.session_state[session.PRINCIPAL] = session.api().whoami()
    except ApiError as exc:
        if session.configured_token(cfg) is None:
            st.session_state.pop(session.TOKEN, None)
            _login(f"The API refused the token: {views.md_escape(exc.detail)}")
        st.error(f"The API refused the configured token (TOWER_DASHBOARD_TOKEN): {views.md_escape(exc.detail)}")
        st.stop()
    except ApiUnavailable:
        pass  # each page shows the banner; no role known means no action buttons

# One module per page under screens/ (not pages/: Streamlit treats a pages/ directory beside the entry script as a
# legacy multipage app and would run those files directly, without this entry's token check and navigation).
pages = [
    st.Page("screens/overview.py", title="Overview", icon=":material/dashboard:", url_path="overview", default=True),
    st.Page("screens/unreconciled.py", title="Unreconciled", icon=":material/rule:", url_path="unreconciled"),
    st.Page("screens/actions.py", title="Actions", icon=":material/build:", url_path="actions"),
    st.Page("screens/slas.py", title="SLAs & alerts", icon=":material/timer:", url_path="slas"),
    st.Page("screens/intake.py", title="Intake", icon=":material/inbox:", url_path="intake"),
    st.Page("screens/audit.py", title="Audit", icon=":material/history:", url_path="audit"),
]
nav = st.navigation(pages)

with st.sidebar:
    who = session.principal()
    if who:
        st.caption(f"Signed in as **{views.md_escape(who['name'])}** ({views.md_escape(who['role'])})")
        if not session.can_act():
            st.caption("Read-only: viewers see no action buttons.")
    else:
        st.caption("Identity unknown while the API is unavailable (read-only).")
    st.caption(f"API: {views.md_escape(views.link_without_credentials(cfg.api_url))}")
    if session.configured_token(cfg) is None and st.button("Sign out", key="sign_out"):
        session.sign_out()
        st.rerun()

nav.run()
