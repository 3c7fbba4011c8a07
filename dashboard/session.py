"""Per-session state shared by the pages: settings, the API client with this session's token, who the token
belongs to, the API-down banner and the two-step confirmation of actions. Streamlit glue only; HTTP goes
through ``api_client`` and formatting through ``views``."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import streamlit as st

from dashboard import views
from dashboard.api_client import ApiError, ApiTimeout, ApiUnavailable, TowerApi
from tower_core.errors import ConfigError
from tower_core.settings import Settings, load_settings

TOKEN = "session_token"  # a token typed in this session (when settings hold none)
PRINCIPAL = "principal"
CONFIRM = "pending_confirmation"
RESULT = "last_result"


def settings() -> Settings:
    """The dashboard's settings (environment / .env); bad ones stop the page with one clear message."""
    try:
        return load_settings()
    except ConfigError as exc:
        st.error(str(exc)[0].upper() + str(exc)[1:])
        st.stop()
        raise  # unreachable: st.stop() ends the run


def configured_token(cfg: Settings) -> str | None:
    secret = cfg.dashboard_token or cfg.api_token
    return secret.get_secret_value() if secret else None


def token(cfg: Settings) -> str | None:
    return configured_token(cfg) or st.session_state.get(TOKEN)


def api() -> TowerApi:
    """This session's client (one per API URL and token)."""
    cfg = settings()
    tok = token(cfg)
    key = (cfg.api_url, tok, cfg.dashboard_timeout_s)
    cached = st.session_state.get("_api")
    if cached is None or cached[0] != key:
        if cached is not None:
            cached[1].close()
        cached = (key, TowerApi(cfg.api_url, tok, cfg.dashboard_timeout_s))
        st.session_state["_api"] = cached
    return cached[1]


def principal() -> dict[str, str] | None:
    """Name and role of the token (None while the API cannot tell)."""
    return st.session_state.get(PRINCIPAL)


def role() -> str | None:
    p = principal()
    return p["role"] if p else None


def can_act() -> bool:
    return views.can_act(role())


def banner(exc: Exception, where: str) -> None:
    """The API-down banner with a retry button; the page stops drawing after it."""
    cfg = settings()
    if getattr(exc, "store_down", False):  # the API answers: telling the operator to start it sent them astray
        st.error(
            f"**The tower's store is unavailable** — {views.md_escape(str(exc))}. The API answers, but its "
            "ClickHouse store does not; the data on this page cannot be loaded and nothing was changed. Check the "
            "ClickHouse server (`TOWER_CLICKHOUSE_URL` of the API) and retry.",
            icon=":material/database:",
        )
    else:
        st.error(
            f"**The tower's API is unavailable** — {views.md_escape(str(exc))}. The data on this page cannot be "
            f"loaded; nothing was changed. Start it with `tower serve` (API at "
            f"{views.md_escape(views.link_without_credentials(cfg.api_url))}) and retry.",
            icon=":material/cloud_off:",
        )
    st.button("Retry", key=f"retry_{where}")
    st.stop()


def show_errors(errors: dict[str, str]) -> None:
    """A page's load errors: the API's own words, shown as text (st.warning renders Markdown)."""
    for name, message in errors.items():
        st.warning(f"Could not load {name.replace('_', ' ')}: {views.md_escape(message)}")


# --- two-step confirmation -----------------------------------------------------------------------------------
def ask(where: str, op: str, prompt: str, run: Callable[[], Any], target: str = "") -> None:
    """First click: remember what to do and ask. ``confirmation(where, target)`` shows the question to finish or
    cancel, for the same object and the same signed-in person only."""
    st.session_state.pop(RESULT, None)
    pending = {"where": where, "op": op, "prompt": prompt, "target": target, "run": run, "who": _who()}
    st.session_state[CONFIRM] = pending


def _who() -> str:
    return (principal() or {}).get("name", "")


def sign_out() -> None:
    """Forget the typed token, who it was and this session's client; nothing asked by the previous person can be
    confirmed by the next one."""
    for key in (CONFIRM, RESULT, TOKEN, PRINCIPAL):
        st.session_state.pop(key, None)
    cached = st.session_state.pop("_api", None)
    if cached is not None:
        cached[1].close()


def _confirmed() -> None:
    pending = st.session_state.pop(CONFIRM, None)
    if not pending or pending["who"] != _who():
        return
    try:
        doc = pending["run"]()
        st.session_state[RESULT] = {**_head(pending), "ok": True, "doc": doc}
    except ApiError as exc:
        st.session_state[RESULT] = {**_head(pending), "ok": False, "message": exc.detail, "status": exc.status}
    except ApiTimeout as exc:  # not a refusal: the change may have been made
        st.session_state[RESULT] = {**_head(pending), "ok": False, "unknown": True, "message": str(exc)}
    except ApiUnavailable as exc:
        st.session_state[RESULT] = {**_head(pending), "ok": False, "message": str(exc), "status": 503}


def _head(pending: dict[str, Any]) -> dict[str, Any]:
    return {k: pending[k] for k in ("where", "op", "target")}


def _cancelled() -> None:
    st.session_state.pop(CONFIRM, None)


def confirmation(where: str, target: str = "") -> None:
    """The pending question (if any) with Confirm / Cancel, and the outcome of the last confirmed action, both
    for the object on screen: a question asked about another object (the operator moved on) is dropped."""
    pending = st.session_state.get(CONFIRM)
    if pending and pending["where"] == where and pending["target"] != target:
        st.session_state.pop(CONFIRM, None)
        pending = None
    if pending and pending["where"] == where:
        with st.container(border=True):
            st.warning(pending["prompt"], icon=":material/warning:")
            c1, c2, _ = st.columns([1, 1, 4])
            c1.button("Confirm", key=f"confirm_{where}", type="primary", on_click=_confirmed)
            c2.button("Cancel", key=f"cancel_{where}", on_click=_cancelled)
    result = st.session_state.get(RESULT)
    if result and result["where"] == where and result["target"] == target:
        if result["ok"]:
            _show_outcome(result)
        elif result.get("unknown"):
            st.warning(views.UNKNOWN_OUTCOME.format(op=result["op"]), icon=":material/help:")
        else:
            st.error(f"{result['op']} refused (HTTP {result['status']}): {views.md_escape(str(result['message']))}")


def _show_outcome(result: dict[str, Any], done: str = "") -> None:
    level, message = views.action_outcome(result["op"], result.get("doc"))
    if level == "success":
        st.success(done or message, icon=":material/check_circle:")
    elif level == "info":
        st.info(message)
    else:
        st.error(message)


def choice_among(key: str, options: Collection[str]) -> None:
    """Before a chooser is drawn: a value that left its options (the action on it took it off the list) resets it."""
    if st.session_state.get(key) not in ("", None, *options):
        st.session_state[key] = ""


def outcome_if_gone(where: str, listed: Collection[str], done: Callable[[dict[str, Any]], str], what: str) -> None:
    """The outcome of the last confirmed action on an object that is no longer listed (the action removed it, so
    ``confirmation`` for the object on screen cannot show it): ``done(result)`` on success."""
    result = st.session_state.get(RESULT)
    if not result or result["where"] != where or result["target"] in listed:
        return
    if result["ok"]:
        _show_outcome(result, done(result))
    elif result.get("unknown"):
        st.warning(views.UNKNOWN_OUTCOME.format(op=result["op"]), icon=":material/help:")
    else:
        target, message = views.md_escape(str(result["target"])), views.md_escape(str(result["message"]))
        st.error(f"{what} of {target} refused (HTTP {result['status']}): {message}")


def clear_result() -> None:
    st.session_state.pop(RESULT, None)
