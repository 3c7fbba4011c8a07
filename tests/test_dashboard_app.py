"""Each dashboard page through streamlit.testing's AppTest against a real running API (``tower serve`` in a
subprocess) reconciling the simulated estate: the numbers shown are the API's, filters change them, the
action buttons call the API (after a confirmation), viewers see no buttons, and an API that is down gives a
banner instead of a traceback."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import views
from tests.conftest import free_port
from tests.dashboard_estate import Tower, running_tower, send_billing_span, send_step_spans, small_estate, wait_for

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
PAGES = ("overview", "unreconciled", "actions", "slas", "intake", "audit")


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tower]:
    with running_tower(tmp_path_factory.mktemp("dash-tower"), small_estate(seed=11, invoices=1500)) as t:
        t.run()
        t.token("olga", "operator")
        t.token("vera", "viewer")
        now = time.time_ns()
        send_step_spans(t.url, {"NA": (6, 0), "EU": (3, 3)}, now - 3 * 3600 * 10**9)
        missing = [i for i in t.items(**{"class": "missing_in_erp"}) if i["reason_code"] == "not_posted"]
        assert len(missing) >= 3, "the estate should hold a few unposted invoices"
        t.traced = missing[0]  # type: ignore[attr-defined]
        # five minutes ago: in flight, not yet late for the 15-minute SLA (no alert of its own)
        send_billing_span(t.url, missing[0]["invoice_id"], missing[0]["region"], now - 300 * 10**9)
        wait_for(
            lambda: (
                t.call("GET", "/api/transactions", params={"invoice_id": missing[0]["invoice_id"]}).status_code == 200
            ),
            what="the billing span stored",
        )
        wait_for(
            lambda: t.call("GET", "/api/transactions", params={"invoice_id": "inv_sla_EU_005"}).status_code == 200,
            what="the SLA spans stored",
        )
        assert t.call("POST", "/api/sla/evaluate", json={}).status_code == 200
        yield t


@pytest.fixture
def dash(tower: Tower, monkeypatch: pytest.MonkeyPatch) -> Callable[..., AppTest]:
    """An AppTest of the dashboard on one page, as the given role (None: no token configured)."""

    def make(page: str = "overview", role: str | None = "operator", **env: str) -> AppTest:
        monkeypatch.setenv("TOWER_API_URL", env.pop("api_url", tower.url))
        for name in ("TOWER_DASHBOARD_TOKEN", "TOWER_ALERTMANAGER_URL"):
            monkeypatch.delenv(name, raising=False)
        if role:
            monkeypatch.setenv("TOWER_DASHBOARD_TOKEN", tower.tokens[role])
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.run()
        if page != "overview":
            at.switch_page(f"screens/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return make


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


# Read-only dataframes and charts carry no element id in AppTest's tree, so tables are found by their
# columns and charts by their first trace.
TABLES = {
    "ov_aging_table": ("class", "0-1d", "items"),
    "ov_firing_table": ("sla", "severity", "since"),
    "ur_table": ("drift id", "first seen"),
    "ur_diff": ("field", "differs"),
    "ur_history": ("who", "did", "change"),
    "ur_actions": ("action id", "operation"),
    "sla_definitions": ("name", "threshold", "period"),
    "sla_compliance": ("objective", "late / decided"),
    "au_table": ("when", "who", "did", "on"),
    "in_skipped": ("source", "record", "times"),
    "in_letters": ("name", "kind", "set aside"),
}
CHARTS = {
    "ov_heatmap": lambda d: d[0]["type"] == "heatmap",
    "ov_breaches": lambda d: d[0]["type"] == "scatter",
    "ov_aging_chart": lambda d: d[0]["type"] == "bar" and d[0].get("orientation") != "h",
    "ur_waterfall": lambda d: d[0]["type"] == "bar" and d[0].get("orientation") == "h",
}


def frame(at: AppTest, key: str) -> Any:
    found = [d.value for d in at.dataframe if set(TABLES[key]) <= set(d.value.columns)]
    assert len(found) == 1, (key, [list(d.value.columns) for d in at.dataframe])
    return found[0]


def chart(at: AppTest, key: str) -> dict[str, Any]:
    specs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    found = [s for s in specs if s.get("data") and CHARTS[key](s["data"])]
    assert len(found) == 1, (key, len(specs))
    return found[0]


def shown(markdown: str) -> str:
    """The text a Markdown body shows: ids, notes and API messages are escaped (views.md_escape) before it."""
    return re.sub(r"\\(.)", r"\1", markdown)


def buttons(at: AppTest) -> set[str]:
    return {b.key for b in at.button} | {b.key for b in at.get("link_button") if getattr(b, "key", None)}


def open_items(t: Tower, **params: Any) -> list[dict[str, Any]]:
    return t.items(**params)


def test_overview_shows_the_apis_numbers_and_the_region_filter_changes_them(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    at = dash("overview")
    items = open_items(tower)
    assert metric(at, "Unreconciled items") == f"{len(items):,}"
    firing = tower.call("GET", "/api/sla/breaches", params={"status": "firing"}).json()["breaches"]
    assert firing and {(b["sla"], b["region"]) for b in firing} == {("invoice_posted", "EU")}  # 40 min late in EU
    assert metric(at, "Firing alerts") == str(len(firing))
    assert set(frame(at, "ov_firing_table")["region"]) == {"EU"}
    assert metric(at, "Last run") == "succeeded"
    table = frame(at, "ov_aging_table")
    assert dict(zip(table["class"], table["items"], strict=True)) == dict(Counter(i["class"] for i in items))
    assert set(table["0-1d"]) == {*table["items"]}  # the run found everything just now
    heat = chart(at, "ov_heatmap")["data"][0]
    assert heat["x"] == ["billing → ERP (invoice)"]
    by_region = {region: row[0] for region, row in zip(heat["y"], heat["z"], strict=True)}
    assert by_region["EU"] == 50.0 and by_region["NA"] == 100.0  # 3 of 6 late in EU, none in NA
    assert set(by_region) - {"EU", "NA"} <= {tower.traced["region"]}  # type: ignore[attr-defined]
    breaches = chart(at, "ov_breaches")["data"]
    assert [trace["name"] for trace in breaches] == ["EU"] and breaches[0]["y"][-1] == len(firing)
    usd = sum(abs(i["amount_minor"]) for i in items if i["currency"] == "USD")
    assert metric(at, "Unreconciled USD") == views.fmt_money(usd, "USD")
    assert "ov_start_run" in buttons(at)

    at.selectbox(key="ov_region").select("EU").run()
    eu = [i for i in items if i["region"] == "EU"]
    assert len(eu) != len(items)
    assert metric(at, "Unreconciled items") == f"{len(eu):,}"
    assert chart(at, "ov_heatmap")["data"][0]["y"] == ["EU"]
    assert metric(at, "Firing alerts") == str(len(firing))
    at.selectbox(key="ov_region").select("NA").run()
    assert metric(at, "Firing alerts") == "0"


def test_unreconciled_filters_sort_and_paginate_on_the_server(tower: Tower, dash: Callable[..., AppTest]) -> None:
    at = dash("unreconciled")
    total = len(open_items(tower))
    assert total > 25, "enough items for two pages"
    assert metric(at, "Matching items") == f"{total:,}"
    assert len(frame(at, "ur_table")) == 25  # the first page only
    at.number_input(key="ur_page").set_value(2).run()
    assert len(frame(at, "ur_table")) == total - 25

    at.multiselect(key="ur_class").select("missing_in_erp").run()
    missing = open_items(tower, **{"class": "missing_in_erp"})
    assert metric(at, "Matching items") == str(len(missing))
    assert at.number_input(key="ur_page").value == 1  # a new filter starts at the first page
    assert set(frame(at, "ur_table")["class"]) == {"missing_in_erp"}

    at.multiselect(key="ur_class").unselect("missing_in_erp").run()
    at.selectbox(key="ur_sort").select("amount").run()
    biggest = max(open_items(tower), key=lambda i: abs(i["amount_minor"]))
    assert frame(at, "ur_table")["amount"][0] == views.fmt_money(biggest["amount_minor"], biggest["currency"])
    at.toggle(key="ur_desc").set_value(False).run()
    assert frame(at, "ur_table")["amount"][0] != views.fmt_money(biggest["amount_minor"], biggest["currency"])

    at.selectbox(key="ur_region").select("APAC").run()
    at.text_input(key="ur_customer").input(biggest["customer_id"]).run()
    expected = open_items(tower, region="APAC", key=biggest["customer_id"])
    assert metric(at, "Matching items") == str(len(expected))


def test_one_item_shows_its_diff_transaction_waterfall_and_history(tower: Tower, dash: Callable[..., AppTest]) -> None:
    item = tower.traced  # type: ignore[attr-defined]
    at = dash("unreconciled", role="viewer")
    at.text_input(key="ur_customer").input(item["invoice_id"]).run()
    at.selectbox(key="ur_item").select(item["drift_id"]).run()
    assert not at.exception
    assert shown(at.header[0].value) == f"missing_in_erp · {item['invoice_id']}"
    assert metric(at, "Amount") == views.fmt_money(item["amount_minor"], item["currency"])
    diff = frame(at, "ur_diff")
    total_row = diff[diff["field"] == "total_minor"].iloc[0]
    assert (total_row["billing"], total_row["erp"], total_row["differs"]) == (str(item["amount_minor"]), "", "≠")
    traces = chart(at, "ur_waterfall")["data"]
    bars = [b for b in traces if b["type"] == "bar"]
    assert [b["y"][0] for b in bars] == ["billing · invoice.finalized", "step · billing → ERP (invoice)"]
    assert bars[-1]["text"][0].startswith("waiting for erp for ")  # in flight since its billing span
    deadline = next(t for t in traces if t["type"] == "scatter")  # the step's SLA deadline, 15 min after its start
    assert deadline["y"] == ["step · billing → ERP (invoice)"] and deadline["hovertext"] == ["SLA deadline"]
    history = frame(at, "ur_history")
    assert list(history["did"]) == ["drift.new"] and list(history["who"]) == ["reconciler"]


def test_operator_corrective_sync_asks_first_calls_the_api_and_the_next_run_resolves(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    item = [i for i in open_items(tower, **{"class": "missing_in_erp"}) if i["reason_code"] == "not_posted"][1]
    at = dash("unreconciled")
    at.text_input(key="ur_customer").input(item["invoice_id"]).run()
    at.selectbox(key="ur_item").select(item["drift_id"]).run()
    at.button(key="ur_sync").click().run()
    assert any("corrective sync of missing_in_erp" in shown(w.value) for w in at.warning)
    assert tower.call("GET", "/api/actions", params={"drift_id": item["drift_id"]}).json()["total"] == 0
    at.button(key="confirm_item").click().run()
    assert any("corrective sync: done" in s.value for s in at.success), [e.value for e in at.error]
    actions = tower.call("GET", "/api/actions", params={"drift_id": item["drift_id"]}).json()["items"]
    assert [(a["state"], a["requested_by"]) for a in actions] == [("succeeded", "olga")]
    assert list(frame(at, "ur_actions")["state"]) == ["succeeded"]

    over = dash("overview")
    runs_before = tower.call("GET", "/api/runs").json()["total"]
    over.button(key="ov_start_run").click().run()
    over.button(key="confirm_ov_run").click().run()
    assert tower.call("GET", "/api/runs").json()["total"] == runs_before + 1
    wait_for(lambda: tower.call("GET", "/api/runs").json()["items"][0]["state"] == "succeeded", what="the run")
    assert tower.call("GET", f"/api/drift/{item['drift_id']}").json()["state"] == "resolved"
    at.run()
    assert metric(at, "State") == "resolved"
    assert at.button(key="ur_sync").disabled


def test_ignore_needs_a_note_and_both_transitions_are_confirmed_and_audited(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    fresh = [i for i in open_items(tower, **{"class": "payment_unapplied"}) if i["state"] in ("new", "persisting")]
    first, second = fresh[:2]
    at = dash("unreconciled")
    at.selectbox(key="ur_item").set_value(first["drift_id"]).run()
    assert at.button(key="ur_ignore").disabled  # no note yet
    at.text_area(key="ur_note").input("profile merged by hand in billing").run()
    at.button(key="ur_ignore").click().run()
    assert tower.call("GET", f"/api/drift/{first['drift_id']}").json()["state"] == first["state"]  # only asked
    at.button(key="confirm_item").click().run()
    doc = tower.call("GET", f"/api/drift/{first['drift_id']}").json()
    assert (doc["state"], doc["state_note"]) == ("ignored", "profile merged by hand in billing")
    # the API takes nothing more of an ignored item: its buttons were enabled, each answered 409 or 422
    at.text_area(key="ur_note").input("one more note").run()
    assert metric(at, "State") == "ignored"
    assert all(at.button(key=k).disabled for k in ("ur_sync", "ur_ack", "ur_ignore"))

    at.selectbox(key="ur_item").set_value(second["drift_id"]).run()
    at.text_area(key="ur_note").input("").run()
    assert at.button(key="ur_ack").disabled  # acknowledging says why too
    at.text_area(key="ur_note").input("FX rate checked with treasury").run()
    at.button(key="ur_ack").click().run()
    at.button(key="cancel_item").click().run()
    assert tower.call("GET", f"/api/drift/{second['drift_id']}").json()["state"] == second["state"]
    at.button(key="ur_ack").click().run()
    at.button(key="confirm_item").click().run()
    assert tower.call("GET", f"/api/drift/{second['drift_id']}").json()["state"] == "acknowledged"
    trail = tower.call("GET", "/api/audit", params={"actor": "olga", "action": "drift."}).json()["items"]
    assert {(r["action"], r["object_id"]) for r in trail} >= {
        ("drift.ignored", first["drift_id"]),
        ("drift.acknowledged", second["drift_id"]),
    }


def test_a_viewer_sees_no_action_buttons_and_the_api_refuses_it_anyway(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    for page in PAGES:
        at = dash(page, role="viewer")
        assert buttons(at) <= {"sla_alertmanager", "ov_alertmanager"}, (page, buttons(at))
    at = dash("overview", role="viewer")
    assert any("Read-only" in c.value for c in at.sidebar.caption)
    at = dash("unreconciled", role="viewer")
    item = open_items(tower, **{"class": "missing_in_erp"})[0]
    at.selectbox(key="ur_item").set_value(item["drift_id"]).run()
    assert metric(at, "State") == item["state"] and buttons(at) == set()
    refused = tower.call("POST", f"/api/drift/{item['drift_id']}/sync", token=tower.tokens["viewer"], json={})
    assert refused.status_code == 403
    operator = dash("unreconciled")
    operator.selectbox(key="ur_item").set_value(item["drift_id"]).run()
    assert {"ur_sync", "ur_ack", "ur_ignore"} <= buttons(operator)


def test_actions_page_bulk_shows_the_count_asks_again_and_replays_failed_actions(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    at = dash("actions")
    at.multiselect(key="bulk_class").select("status_mismatch").run()
    targets = open_items(tower, **{"class": "status_mismatch"})
    n = len(targets)
    assert n >= 1
    assert metric(at, "Open items matching the bulk filter") == str(n)
    assert at.button(key="bulk_apply").disabled  # no note yet
    at.text_input(key="bulk_note").input("paid in the ERP by the lockbox run").run()
    apply = at.button(key="bulk_apply")
    assert apply.label == f"Acknowledge {n} items…"
    apply.click().run()
    assert any(f"This will acknowledge {n} item" in w.value for w in at.warning)
    assert {i["state"] for i in open_items(tower, **{"class": "status_mismatch"})} <= {"new", "persisting"}
    at.button(key="confirm_bulk").click().run()
    assert any(f"{n} of {n} items done" in i.value for i in at.success), [e.value for e in at.error]
    assert {i["state"] for i in open_items(tower, **{"class": "status_mismatch"})} == {"acknowledged"}
    bulk = tower.call("GET", "/api/audit", params={"action": "drift.bulk"}).json()["items"]
    assert bulk[0]["actor"] == "olga" and bulk[0]["after"]["matched"] == n

    # a correction the ERP refuses (posting into a closed period) fails: it is replayable from this page
    rejected = next(i for i in open_items(tower, **{"class": "missing_in_erp"}) if i["reason_code"] == "erp_rejected")
    failed = tower.call("POST", f"/api/drift/{rejected['drift_id']}/sync", json={"approve": True}).json()
    assert failed["state"] == "failed" and "closed" in failed["last_error"]
    at = dash("actions")
    at.multiselect(key="ac_state").select("failed").run()
    assert metric(at, "Actions (filtered)") == str(tower.call("GET", "/api/actions?state=failed").json()["total"])
    at.selectbox(key="ac_item").set_value(failed["action_id"]).run()
    assert not at.button(key="ac_replay").disabled and at.button(key="ac_approve").disabled
    at.button(key="ac_replay").click().run()
    at.button(key="confirm_action").click().run()
    replays = tower.call("GET", "/api/actions", params={"original_action_id": failed["action_id"]}).json()["items"]
    assert len(replays) == 1 and replays[0]["requested_by"] == "olga"
    assert replays[0]["state"] == "failed"  # the period is still closed
    assert any(e.value.startswith("replay failed: ") and "closed" in e.value for e in at.error), at.success
    assert not any("replay" in m.value for m in at.success)  # the API's 200 carries a failed action
    # the audit filter takes a name exactly, and a family by its prefix ending in a dot
    named = tower.call("GET", "/api/audit", params={"action": "action.replay"}).json()["items"]
    family = {r["action"] for r in tower.call("GET", "/api/audit", params={"action": "action."}).json()["items"]}
    assert named and {r["action"] for r in named} == {"action.replay"} and {"action.replay"} < family
    assert "ac_following" not in at.session_state  # followed until it ended, then the page stopped polling


def test_slas_page_definitions_compliance_breaches_and_the_alertmanager_link(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    at = dash("slas", role="viewer", TOWER_ALERTMANAGER_URL="http://am:ampass@127.0.0.1:9093")
    names = list(frame(at, "sla_definitions")["name"])
    assert names == ["customer_synced", "invoice_posted", "payment_applied", "refund_posted"]
    comp = frame(at, "sla_compliance")
    by_region = dict(zip(comp["region"], comp["compliance"], strict=True))
    assert by_region["EU"] == "50.00%" and by_region["NA"] == "100.00%"
    breaches = tower.call("GET", "/api/sla/breaches").json()["breaches"]
    assert metric(at, "Breaches shown (last 30 days)") == str(len(breaches))
    at.selectbox(key="sla_status").select("resolved").run()
    assert metric(at, "Breaches shown (last 30 days)") == str(sum(b["status"] == "resolved" for b in breaches))
    links = [b for b in at.get("link_button") if b.proto.url == "http://127.0.0.1:9093"]
    assert len(links) == 1  # the server's credentials are not handed to the viewer's browser
    overview = dash("overview", role="viewer", TOWER_ALERTMANAGER_URL="http://am:ampass@127.0.0.1:9093")
    assert [b.proto.url for b in overview.get("link_button")] == ["http://127.0.0.1:9093"]
    without = dash("slas", role="viewer")
    assert not list(without.get("link_button"))
    assert any("No Alertmanager configured" in c.value for c in without.caption)


def test_audit_page_lists_who_did_what_and_filters(tower: Tower, dash: Callable[..., AppTest]) -> None:
    tower.call("POST", "/api/runs", token=tower.tokens["viewer"], json={})  # a refused attempt, audited too
    at = dash("audit", role="viewer")
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=7)).isoformat()
    total = tower.call("GET", "/api/audit", params={"since": since, "limit": 1}).json()["total"]
    assert metric(at, "Records") == f"{total:,}"
    at.selectbox(key="au_actor").select("vera").run()
    rows = frame(at, "au_table")
    by_vera = tower.call("GET", "/api/audit", params={"actor": "vera"}).json()["items"]
    assert len(rows) == len(by_vera) >= 1 and set(rows["who"]) == {"vera"}
    assert set(rows["did"]) == {"api.denied"} and set(rows["result"]) == {"denied"}
    assert rows["on"][0] == "api POST /api/runs"  # newest first
    at.selectbox(key="au_actor").select("(all)").run()
    at.selectbox(key="au_object_type").select("token").run()
    assert metric(at, "Records") == "2"  # olga's and vera's tokens, created by the bootstrap admin


def test_api_down_gives_a_banner_and_no_traceback_on_every_page(dash: Callable[..., AppTest]) -> None:
    down = f"http://ops:s3cretpw@127.0.0.1:{free_port()}"
    for page in PAGES:
        at = dash(page, api_url=down)
        assert not at.exception
        assert any("API is unavailable" in e.value for e in at.error), (page, [e.value for e in at.error])
        said = [m.value for kind in (at.error, at.warning, at.info, at.caption, at.markdown) for m in kind]
        assert not [m for m in said if "s3cretpw" in m], page  # the URL's credentials are shown to nobody
        assert buttons(at) == {f"retry_{page}"}  # no action buttons while the role is unknown
        if page == "overview":  # (AppTest keeps the sidebar of the first page only)
            assert any("Identity unknown" in c.value for c in at.sidebar.caption)


def test_without_a_configured_token_it_asks_once_per_session(tower: Tower, dash: Callable[..., AppTest]) -> None:
    at = dash("overview", role=None)
    assert not at.title or at.title[0].value == "Revenue Control Tower"
    at.text_input(key="login_token").input("twr_wrong")  # a form: typed values count when it is submitted
    at.button(key="login_submit").click().run()
    assert any("refused this token" in e.value for e in at.error)
    at.text_input(key="login_token").input(tower.tokens["viewer"])
    at.button(key="login_submit").click().run()
    assert [t.value for t in at.title] == ["Overview"]
    assert any("vera" in c.value for c in at.sidebar.caption)
    at.run()  # another interaction: still signed in, not asked again
    assert [t.value for t in at.title] == ["Overview"] and "login_token" not in {t.key for t in at.text_input}
    at.button(key="sign_out").click().run()
    assert "login_token" in {t.key for t in at.text_input}


def sign_in(at: AppTest, token: str) -> None:
    at.text_input(key="login_token").input(token)
    at.button(key="login_submit").click().run()


def open_item(at: AppTest, item: dict[str, Any]) -> None:
    at.text_input(key="ur_customer").input(item["primary_key"]).run()
    at.selectbox(key="ur_item").set_value(item["drift_id"]).run()


def test_a_pending_question_stays_with_its_item_and_its_person(tower: Tower, dash: Callable[..., AppTest]) -> None:
    """Asked about item A, then B opened: B's Confirm acknowledged A. Asked, then signed out: the next person's
    Confirm ran the previous person's action under the previous token."""
    untouched = [i for i in open_items(tower) if i["state"] in ("new", "persisting")]
    a, b = [i for i in untouched if i["class"] not in ("payment_unapplied", "missing_in_erp")][-2:]
    at = dash("overview", role=None)
    sign_in(at, tower.tokens["operator"])  # olga
    at.switch_page("screens/unreconciled.py").run()
    open_item(at, a)
    at.text_area(key="ur_note").input("checking with billing").run()
    at.button(key="ur_ack").click().run()
    assert any(a["primary_key"] in shown(w.value) for w in at.warning) and "confirm_item" in buttons(at)
    open_item(at, b)
    assert "confirm_item" not in buttons(at) and not any(a["primary_key"] in shown(w.value) for w in at.warning)
    open_item(at, a)
    assert "confirm_item" not in buttons(at)  # dropped, not just hidden

    at.text_area(key="ur_note").input("checking with billing").run()
    at.button(key="ur_ack").click().run()  # asked again, then olga leaves
    at.switch_page("screens/overview.py").run()
    at.button(key="sign_out").click().run()
    other = tower.call("POST", "/api/tokens", json={"name": "oscar", "role": "operator"}).json()["token"]
    sign_in(at, other)
    at.switch_page("screens/unreconciled.py").run()
    open_item(at, a)
    assert "confirm_item" not in buttons(at)
    assert tower.call("GET", f"/api/drift/{a['drift_id']}").json()["state"] == a["state"]
    assert tower.call("GET", f"/api/drift/{b['drift_id']}").json()["state"] == b["state"]


def test_odd_answers_links_and_tokens_give_messages_not_tracebacks(
    tower: Tower, dash: Callable[..., AppTest], tmp_path: Path
) -> None:
    import http.server
    import threading

    class LoginPage(http.server.BaseHTTPRequestHandler):  # a stand-in for a proxy's login page (200, HTML)
        def do_GET(self) -> None:
            body = b"<html>please sign in</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoginPage)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        at = dash("overview", api_url=f"http://127.0.0.1:{proxy.server_address[1]}")
        assert any("not JSON" in e.value for e in at.error), [e.value for e in at.error]
    finally:
        proxy.shutdown()

    at = dash("overview", role=None)
    sign_in(at, "“twr_pasted_with_quotes”")
    assert not at.exception and any("ASCII" in e.value for e in at.error)

    dash("overview")  # the operator's environment
    for link in ("../overview/aging", "#x", "a/b"):  # ?drift= pasted into the API path as one segment
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["drift"] = link  # a fresh session opened from the link
        at.run()
        at.switch_page("screens/unreconciled.py").run()
        assert not at.exception, (link, [e.value for e in at.exception])
        assert any("Cannot open item" in w.value for w in at.warning), (link, [w.value for w in at.warning])


def test_the_audit_page_goes_back_to_page_one_when_a_filter_changes(tower: Tower, dash: Callable[..., AppTest]) -> None:
    at = dash("audit")
    at.number_input(key="au_page").set_value(2).run()
    who = at.selectbox(key="au_actor")
    assert len(who.options) > 1, who.options  # "all", then the actors the log holds (whichever tests ran first)
    who.select(who.options[1]).run()
    assert at.number_input(key="au_page").value == 1


def test_intake_lists_skipped_source_records_and_requeues_dead_letters(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    """A posting the estate's ERP serves malformed is passed over by the next run and listed; an OTLP request the
    store refuses sits in the dead-letter box (as an earlier version, whose receiver kept the field that makes it
    unstorable, set it aside); an operator sends it back (asked first, audited) and, the store still refusing it,
    it is set aside again; a viewer sees the skipped records and no dead letters."""
    import dataclasses

    from collector.dead_letter import DeadLetterBox
    from collector.wal import KIND_SPANS, Record
    from tests.test_dead_letter import UNSTORABLE_SPANS

    erp = tower.estate.erp
    with erp.lock:
        good = next(iter(erp.entries.values()))
        for n in (1, 2):
            erp.entries.put(dataclasses.replace(good, entry_id=f"erp_malformed_{n}", amount_minor="12.50"))  # type: ignore[arg-type]
    assert tower.run(full=False)["pulled"]["ledger_entries_skipped"] == 2
    box = DeadLetterBox(tower.server.workdir / "wal" / "dead-letter")
    box.put("earlier_c0_r0", Record(KIND_SPANS, 1, UNSTORABLE_SPANS), ValueError("Code: 444. UNKNOWN_PROTOBUF_FORMAT"))
    letters = wait_for(
        lambda: tower.call("GET", "/api/ingest/dead-letters").json()["items"], what="the refused request set aside"
    )

    at = dash("intake")
    assert metric(at, "Skipped source records (open)") == "2"
    skipped = frame(at, "in_skipped")
    assert sorted(skipped["record"]) == ["erp_malformed_1", "erp_malformed_2"]
    assert "amount_minor" in skipped["reason"][0]
    assert metric(at, "Ingest dead letters") == str(len(letters))
    name = letters[0]["name"]
    assert name in list(frame(at, "in_letters")["name"])
    at.selectbox(key="in_letter").set_value(name).run()
    at.button(key="in_requeue").click().run()
    assert any(f"Send {name} back" in shown(w.value) for w in at.warning)
    assert name in [d["name"] for d in tower.call("GET", "/api/ingest/dead-letters").json()["items"]]  # asked only
    at.button(key="confirm_dead_letter").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("back in the write-ahead buffer" in s.value for s in at.success), [e.value for e in at.error]
    audit = tower.call("GET", "/api/audit", params={"action": "ingest.requeue"}).json()["items"]
    assert audit[0]["actor"] == "olga" and audit[0]["object_id"] == name
    again = wait_for(
        lambda: [d for d in tower.call("GET", "/api/ingest/dead-letters").json()["items"] if d["name"] != name],
        what="the requeued record refused again and set aside under a new name",
    )
    assert len(again) == len(letters)

    at = dash("intake", role="viewer")
    assert metric(at, "Ingest dead letters") == "—" and not {"in_requeue", "in_dismiss"} & buttons(at)
    assert sorted(frame(at, "in_skipped")["record"]) == ["erp_malformed_1", "erp_malformed_2"]

    # a record that will never map (say it was deleted at the source): an operator dismisses it, with a note
    first, second = (f"sim-erp ledger_entries: erp_malformed_{n}" for n in (1, 2))
    at = dash("intake")
    at.selectbox(key="in_skip").set_value(first).run()
    assert at.button(key="in_dismiss").disabled  # no note yet
    at.text_input(key="in_skip_note").input("a first thought").run()
    at.button(key="in_dismiss").click().run()
    assert any(f"Dismiss {first}" in shown(w.value) for w in at.warning)
    at.selectbox(key="in_skip").set_value(second).run()  # moved on: the question about the first is dropped
    assert "confirm_skip" not in buttons(at)
    at.selectbox(key="in_skip").set_value(first).run()
    at.text_input(key="in_skip_note").input("deleted in the ERP by its owner")  # typed, then clicked at once
    at.button(key="in_dismiss").click().run()
    assert any("deleted in the ERP by its owner" in w.value for w in at.warning)  # the note that will be sent
    at.button(key="confirm_skip").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"{first} dismissed" in shown(s.value) for s in at.success), [e.value for e in at.error]
    assert metric(at, "Skipped source records (open)") == "1"
    audit = tower.call("GET", "/api/audit", params={"action": "source.dismiss"}).json()["items"]
    assert [(a["actor"], a["object_id"], a["note"]) for a in audit] == [
        ("olga", "sim-erp/ledger_entries/erp_malformed_1", "deleted in the ERP by its owner")
    ]


def test_a_bulk_note_typed_and_clicked_at_once_is_the_one_shown_and_stored(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    """The browser sends the corrected note with the click (one rerun): the question showed no note and the items
    were stored with the previous one."""
    counts = Counter(i["class"] for i in open_items(tower) if i["state"] in ("new", "persisting"))
    used = {"missing_in_erp", "payment_unapplied", "status_mismatch"}  # the other tests' classes
    cls = min((c for c in counts if c not in used), key=lambda c: (counts[c], c))
    at = dash("actions")
    at.multiselect(key="bulk_class").select(cls).run()
    at.text_input(key="bulk_note").input("draft - do not use").run()
    final = "ERP outage INC-42, reposting tonight"
    at.text_input(key="bulk_note").input(final)  # corrected, then clicked straight away
    at.button(key="bulk_apply").click().run()
    asked = [w.value for w in at.warning if "This will acknowledge" in w.value]
    assert len(asked) == 1 and f"the note “{final}”" in shown(asked[0]), asked
    at.button(key="confirm_bulk").click().run()
    assert not at.exception, [e.value for e in at.exception]
    stored = tower.items(**{"class": cls, "state": ["acknowledged"]})
    assert len(stored) == counts[cls] and {i["state_note"] for i in stored} == {final}


def test_markdown_in_a_shared_link_or_a_stored_note_shows_as_text(tower: Tower, dash: Callable[..., AppTest]) -> None:
    """A ?drift= link and a note are shown by Markdown-rendering elements: escaped, they show their literal text,
    never a link or bold text drawn inside the dashboard."""

    def literal(body: str, text: str) -> bool:
        return text in shown(body) and "](" not in body and not re.search(r"(?<!\\)\*\*", body)

    dash("unreconciled")  # the operator's environment
    link = "[x](http://evil.example/login) [**Session expired — click here**](http://evil.example)"
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["drift"] = link  # a fresh session opened from a shared link
    at.run()
    at.switch_page("screens/unreconciled.py").run()
    assert not at.exception, [e.value for e in at.exception]
    warned = [w.value for w in at.warning if "Cannot open item" in w.value]
    assert len(warned) == 1 and literal(warned[0], link), warned

    note = "fixed per [ticket](http://evil.example) **URGENT** <b>x</b> `code`"
    item = next(i for i in open_items(tower) if i["state"] in ("new", "persisting"))
    assert tower.call("POST", f"/api/drift/{item['drift_id']}/acknowledge", json={"note": note}).status_code == 200
    at = dash("unreconciled")
    open_item(at, item)
    noted = [c.value for c in at.caption if "note:" in c.value]
    assert len(noted) == 1 and literal(noted[0], f"note: {note}"), noted
    assert literal(at.header[0].value, item["primary_key"])
    at.text_area(key="ur_note").input(note).run()
    at.button(key="ur_ignore").click().run()
    asked = [w.value for w in at.warning if w.value.startswith("Ignore ")]
    assert len(asked) == 1 and literal(asked[0], f"Note: “{note}”"), asked


def test_bulk_sync_of_business_rule_items_says_they_wait_and_starts_them_once_approved(
    tower: Tower, dash: Callable[..., AppTest]
) -> None:
    classes = ("amount_mismatch", "currency_mismatch", "duplicate_posting")
    cls = next(c for c in classes if open_items(tower, **{"class": c}))
    n = len(open_items(tower, **{"class": cls}))
    at = dash("actions")
    at.multiselect(key="bulk_class").select(cls).run()
    at.selectbox(key="bulk_action").select("sync").run()
    at.button(key="bulk_apply").click().run()
    assert any("will wait for an approval" in w.value for w in at.warning)
    at.button(key="confirm_bulk").click().run()
    said = [m.value for m in at.info]
    assert any(f"0 of {n} corrections started, {n} waiting for an approval" in m for m in said), said
    assert not any("bulk sync" in m.value for m in at.success) and "ac_following" not in at.session_state
    waiting = tower.call("GET", "/api/actions", params={"state": "pending"}).json()["items"]
    assert {a["drift_id"] for a in waiting} >= {i["drift_id"] for i in open_items(tower, **{"class": cls})}
    assert not any(a["approved_by"] for a in waiting if a["class"] == cls)

    at.checkbox(key="bulk_approve").check().run()
    at.button(key="bulk_apply").click().run()
    assert any("approving the business-rule corrections" in w.value for w in at.warning)
    at.button(key="confirm_bulk").click().run()
    said = [m.value for m in (*at.info, *at.success)]
    assert any(f"{n} of {n} corrections started" in m for m in said), said

    # started: approved now, and leaving pending (the page follows them until they end, which may be before the
    # script looks: its session state is no witness)
    def ours() -> list[dict]:
        items = tower.call("GET", "/api/actions", params={"limit": 500}).json()["items"]
        return [a for a in items if a["class"] == cls]

    assert len(ours()) == n and all(a["approved_by"] for a in ours())
    wait_for(lambda: all(a["state"] != "pending" for a in ours()), what="the approved corrections started")


def test_markup_in_a_spans_region_is_text_on_the_overview_charts(tower: Tower, dash: Callable[..., AppTest]) -> None:
    """Last in this file: it adds a region (and a firing alert) to the module's estate."""
    region = '<a href="https://evil.example/login">EU ledger re-auth</a>'
    sent = send_step_spans(tower.url, {region: (0, 2)}, time.time_ns() - 2 * 3600 * 10**9, prefix="inv_mark")
    wait_for(
        lambda: tower.call("GET", "/api/transactions", params={"invoice_id": sent[-1]}).status_code == 200,
        what="the spans stored",
    )
    assert tower.call("POST", "/api/sla/evaluate", json={}).status_code == 200
    at = dash("overview", role="viewer")
    escaped = views.plot_label(region)
    assert escaped in chart(at, "ov_heatmap")["data"][0]["y"]
    assert escaped in [trace["name"] for trace in chart(at, "ov_breaches")["data"]]
    assert "<a href" not in json.dumps([el.proto.spec for el in at.get("plotly_chart")])


@pytest.mark.slow
def test_a_store_outage_behind_a_running_api_says_so_instead_of_start_tower_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ClickHouse down, every page told the operator to start `tower serve`, which was running: its 503 said
    the store was unavailable (a server review). The API marks that 503, and the banner names the store."""
    from tests.server import TowerServer
    from tests.test_faults import ClickHouseFixture

    ch = ClickHouseFixture(tmp_path / "clickhouse")
    ch.start()
    try:
        url = f"http://default:@127.0.0.1:{ch.port}"
        with TowerServer(tmp_path, TOWER_CLICKHOUSE_URL=url, TOWER_SLA_EVAL_INTERVAL_S="0") as srv:
            ch.stop()
            monkeypatch.setenv("TOWER_API_URL", srv.url)
            monkeypatch.setenv("TOWER_DASHBOARD_TOKEN", srv.env["TOWER_ADMIN_TOKEN"])
            at = AppTest.from_file(str(APP), default_timeout=60)
            at.run()
            assert not at.exception
            said = [e.value for e in at.error]
            assert any("store is unavailable" in m and "TOWER_CLICKHOUSE_URL" in m for m in said), said
            assert not any("Start it with `tower serve`" in m for m in said), said
    finally:
        ch.stop()
