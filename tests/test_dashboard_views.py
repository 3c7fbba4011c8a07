"""The dashboard's view models as plain functions: formatting, grids, series, waterfall bars, parameters."""

from __future__ import annotations

import datetime as dt

import pytest

from dashboard import views

T0 = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (123456, "EUR", "1,234.56 EUR"),
        (-5, "USD", "-0.05 USD"),
        (1234, "JPY", "1,234 JPY"),
        (0, "GBP", "0.00 GBP"),
        (100000000, "USD", "1,000,000.00 USD"),
        (None, "USD", "—"),
        (50000, "KRW", "50,000 KRW"),  # zero-decimal beyond JPY
        (12345, "KWD", "12.345 KWD"),  # three decimals
        (12345, "XYZ", "12,345 XYZ (minor units)"),  # unknown: never a guessed exponent
    ],
)
def test_money_uses_the_currency_exponent(minor: int | None, currency: str, text: str) -> None:
    assert views.fmt_money(minor, currency) == text


def test_roles_that_may_act() -> None:
    assert [views.can_act(r) for r in ("viewer", "operator", "admin", None, "root")] == [
        False,
        True,
        True,
        False,
        False,
    ]


def test_durations_and_times() -> None:
    assert views.fmt_duration(0.25) == "250 ms"
    assert views.fmt_duration(12.5) == "12.5 s"
    assert views.fmt_duration(900) == "15 min"
    assert views.fmt_duration(7200) == "2.0 h"
    assert views.fmt_duration(None) == "—"
    assert views.parse_time("2026-11-20T12:00:00Z") == T0
    assert views.parse_time("1970-01-01T00:00:00Z") is None  # the store's "never"
    assert views.fmt_time("2026-11-20T12:00:00.123Z") == "2026-11-20 12:00:00 UTC"


def test_compliance_heatmap_is_region_by_step_in_flow_order() -> None:
    objectives = [
        {"region": "EU", "step": "invoice_to_ledger", "compliance": 0.5, "bad": 3, "decided": 6},
        {"region": "NA", "step": "invoice_to_ledger", "compliance": 1.0, "bad": 0, "decided": 6},
        {"region": "EU", "step": "cdp_to_billing", "compliance": None, "bad": 0, "decided": 0},
    ]
    heat = views.compliance_heatmap(objectives)
    assert heat.regions == ["EU", "NA"]
    assert heat.steps == ["cdp_to_billing", "invoice_to_ledger"]
    assert heat.z == [[None, 50.0], [None, 100.0]]
    assert heat.text[0][1] == "50.00%<br>3 of 6 late"
    assert heat.text[1][0] == ""  # NA has no cdp_to_billing objective row


def test_a_cell_with_several_objectives_shows_the_worst_and_says_so() -> None:
    """A met objective listed after a firing one for the same region and step must not paint the cell green."""
    objectives = [
        {"name": "invoice_posted", "region": "EU", "step": "invoice_to_ledger", "compliance": 0.5, "bad": 3,
         "decided": 6},
        {"name": "contract_<b>x</b>", "region": "EU", "step": "invoice_to_ledger", "compliance": 1.0, "bad": 0,
         "decided": 6},
        {"name": "nothing_yet", "region": "EU", "step": "invoice_to_ledger", "compliance": None, "bad": 0,
         "decided": 0},
    ]  # fmt: skip
    for order in (objectives, objectives[::-1]):
        heat = views.compliance_heatmap(order)
        assert heat.z == [[50.0]]
        assert heat.text[0][0] == "50.00%<br>3 of 6 late<br>invoice_posted, worst of 3"
    met = views.compliance_heatmap(objectives[1:])
    assert met.z == [[100.0]] and "contract_&lt;b&gt;x&lt;/b&gt;, worst of 2" in met.text[0][0]


def test_client_supplied_names_cannot_draw_markup_on_a_chart() -> None:
    assert (
        views.plot_label('<a href="https://evil.example">EU</a>') == '&lt;a href="https://evil.example"&gt;EU&lt;/a&gt;'
    )
    assert views.plot_label("EU") == "EU" and views.plot_label("R&D") == "R&amp;D"


def test_the_outcome_of_a_confirmed_action_says_what_became_of_it() -> None:
    action = {"action_id": "a1", "state": "succeeded", "last_error": "", "approved_by": "olga"}
    assert views.action_outcome("corrective sync", action) == ("success", "corrective sync: done")
    level, said = views.action_outcome(
        "replay", {**action, "state": "failed", "last_error": "business rule: period 2026-09 is closed"}
    )
    assert level == "error" and said.startswith("replay failed: business rule") and "closed" in said
    assert views.action_outcome("approve", {**action, "state": "in_progress"})[0] == "info"
    waiting = views.action_outcome("corrective sync", {**action, "state": "pending", "approved_by": ""})
    assert waiting == ("info", "corrective sync is waiting for an operator's approval (Actions page).")
    later = {"state": "pending", "next_attempt_at": "2026-11-20T12:00:00Z", "last_error": "503"}
    retry = views.action_outcome("corrective sync", {**action, **later})
    assert retry[0] == "info" and "2026-11-20 12:00:00 UTC" in retry[1]
    assert views.action_outcome("acknowledge", {"drift_id": "d", "state": "acknowledged"}) == (
        "success",
        "acknowledge: done",
    )
    bulk = {"action": "sync", "matched": 8, "done": 5, "failed": 3, "started": 0, "awaiting_approval": 5}
    level, said = views.action_outcome("bulk sync", bulk)
    assert level == "info" and said.startswith("0 of 8 corrections started, 5 waiting for an approval")
    assert said.endswith("3 refused.")
    clean = {"action": "acknowledge", "matched": 4, "done": 4, "failed": 0}
    assert views.action_outcome("bulk acknowledge", clean) == ("success", "4 of 4 items done, 0 refused.")


def test_breach_series_counts_active_breaches_per_hour_and_region() -> None:
    now = T0 + dt.timedelta(minutes=30)
    breaches = [
        {"region": "EU", "starts_at": "2026-11-20T09:10:00Z", "ends_at": "2026-11-20T10:20:00Z"},
        {"region": "EU", "starts_at": "2026-11-20T10:05:00Z", "ends_at": None},  # still firing
        {"region": "NA", "starts_at": "2026-11-20T11:59:00Z", "ends_at": None},
        # a copy of the first EU episode another replica opened at the same moment: not a second breach
        {"region": "EU", "starts_at": "2026-11-20T09:10:00Z", "ends_at": "2026-11-20T10:20:00Z", "status": "merged"},
    ]
    series = views.breach_series(breaches, now, hours=6)
    eu = dict(series["EU"])
    assert eu[T0.replace(hour=9)] == 1
    assert eu[T0.replace(hour=10)] == 2
    assert eu[T0.replace(hour=11)] == 1
    assert eu[T0.replace(hour=12)] == 1
    assert eu[T0.replace(hour=8)] == 0
    na = dict(series["NA"])
    assert na[T0.replace(hour=11)] == 1 and na[T0.replace(hour=10)] == 0
    assert len(series["EU"]) == 6


def test_aging_table_counts_per_bucket_and_sums_amounts_per_currency_only() -> None:
    groups = [
        {"class": "missing_in_erp", "region": "EU", "currency": "EUR", "age_bucket": "0-1d", "items": 2,
         "amount_minor": 1000},
        {"class": "missing_in_erp", "region": "EU", "currency": "GBP", "age_bucket": "8-30d", "items": 1,
         "amount_minor": 500},
        {"class": "missing_in_erp", "region": "NA", "currency": "USD", "age_bucket": "0-1d", "items": 1,
         "amount_minor": 250},
        {"class": "customer_unsynced", "region": "NA", "currency": "", "age_bucket": ">30d", "items": 5,
         "amount_minor": 0},
    ]  # fmt: skip
    table = views.aging_table(groups)
    assert table.total == 9
    assert table.classes == ["customer_unsynced", "missing_in_erp"]  # most items first
    assert table.counts["missing_in_erp"] == {"0-1d": 3, "8-30d": 1}
    assert table.currency_totals() == {"EUR": 1000, "GBP": 500, "USD": 250}
    rows = {r["class"]: r for r in table.rows()}
    assert rows["missing_in_erp"]["items"] == 4 and rows["missing_in_erp"]["2-7d"] == 0
    assert rows["missing_in_erp"]["amount EUR"] == "10.00 EUR"
    assert rows["customer_unsynced"]["amount USD"] == ""
    eu = views.aging_table(groups, region="EU")
    assert eu.total == 3 and eu.currency_totals() == {"EUR": 1000, "GBP": 500}


def test_filters_become_the_apis_query_parameters() -> None:
    f = views.DriftFilters(region="EU", classes=["missing_in_erp"], age="2-7d", customer=" cus_1 ", min_amount=10)
    assert f.params() == {"region": "EU", "class": ["missing_in_erp"], "age": "2-7d", "key": "cus_1", "min_amount": 10}
    assert views.DriftFilters().params() == {}
    assert views.page_params(3, 25, "amount", True) == {"limit": 25, "offset": 50, "sort": "amount", "order": "desc"}
    assert views.page_count(51, 25) == 3 and views.page_count(0, 25) == 1
    prompt = views.bulk_prompt("ignore", 1, views.DriftFilters(region="NA"))
    assert prompt == "This will ignore 1 item (region=NA). Confirm?"
    assert "17 items (no filter" in views.bulk_prompt("sync", 17, views.DriftFilters())


def test_step_thresholds_take_the_tightest_objective_of_the_region() -> None:
    defs = {
        "objectives": [
            {"step": "invoice_to_ledger", "threshold_s": 900, "regions": "all"},
            {"step": "invoice_to_ledger", "threshold_s": 300, "regions": ["EU"]},
            {"step": "payment_to_cash", "threshold_s": 1800, "regions": "all"},
        ]
    }
    assert views.step_thresholds(defs, "EU") == {"invoice_to_ledger": 300, "payment_to_cash": 1800}
    assert views.step_thresholds(defs, "NA") == {"invoice_to_ledger": 900, "payment_to_cash": 1800}
    assert views.step_thresholds(None) == {}


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def test_transaction_bars_order_systems_then_steps_against_their_sla() -> None:
    txn = {
        "spans": [
            {"system": "erp", "name": "erp.post_invoice", "start": _iso(T0 + dt.timedelta(minutes=20)),
             "end": _iso(T0 + dt.timedelta(minutes=20, seconds=1)), "start_ns": 3, "duration_ms": 1000.0,
             "trace_id": "b" * 32, "status": "OK"},
            {"system": "billing", "name": "invoice.finalized", "start": _iso(T0),
             "end": _iso(T0 + dt.timedelta(seconds=2)), "start_ns": 1, "duration_ms": 2000.0, "trace_id": "a" * 32,
             "status": "OK"},
            {"system": "cdp", "name": "identify", "start": _iso(T0 - dt.timedelta(minutes=1)),
             "end": _iso(T0 - dt.timedelta(minutes=1)), "start_ns": 0, "duration_ms": 0.0, "trace_id": "c" * 32,
             "status": "OK"},
        ],
        "steps": [
            {"step": "invoice_to_ledger", "start": _iso(T0), "end": _iso(T0 + dt.timedelta(minutes=20, seconds=1)),
             "latency_ms": 1_201_000.0, "complete": True, "missing_systems": []},
            {"step": "payment_to_cash", "start": _iso(T0), "end": None, "latency_ms": None, "complete": False,
             "missing_systems": ["erp"]},
        ],
    }  # fmt: skip
    bars = views.transaction_bars(txn, {"invoice_to_ledger": 900, "payment_to_cash": 1800})
    assert [b.label for b in bars] == [
        "cdp · identify",
        "billing · invoice.finalized",
        "erp · erp.post_invoice",
        "step · billing → ERP (invoice)",
        "step · billing → ERP (payment)",
    ]
    late, waiting = bars[3], bars[4]
    assert late.within is False and late.threshold_ms == 900_000
    assert views.bar_verdict(late) == "20 min > SLA 15 min (late)"
    assert waiting.within is None and views.bar_verdict(waiting) == "incomplete (waiting for erp)"
    assert views.transaction_bars(None, {}) == []
    now = T0 + dt.timedelta(minutes=45)  # the payment step has been waiting 45 min for the ERP (SLA 30 min)
    waiting_now = views.transaction_bars(txn, {"payment_to_cash": 1800}, now)[-1]
    assert waiting_now.end == now and waiting_now.within is False
    assert views.bar_verdict(waiting_now) == "waiting for erp for 45 min · SLA 30 min (late)"
    early = views.transaction_bars(txn, {"payment_to_cash": 1800}, T0 + dt.timedelta(minutes=5))[-1]
    assert early.within is None and views.bar_verdict(early) == "waiting for erp for 5 min · SLA 30 min"
    fast = views.transaction_bars({"spans": [], "steps": [{**txn["steps"][0], "latency_ms": 60_000.0}]},
                                  {"invoice_to_ledger": 900})  # fmt: skip
    assert fast[0].within is True and views.bar_verdict(fast[0]) == "1 min ≤ SLA 15 min"


def test_diff_action_and_audit_rows() -> None:
    diff = views.diff_rows([{"field": "total_minor", "billing": "1100", "erp": None, "differs": True}])
    assert diff == [{"field": "total_minor", "billing": "1100", "erp": "", "differs": "≠"}]
    assert views.action_finished({"state": "succeeded"}) and not views.action_finished({"state": "in_progress"})
    assert not views.action_finished(None)
    rows = views.audit_rows(
        [
            {"at": "2026-11-20T12:00:00Z", "actor": "olga", "action": "drift.ignored", "object_type": "drift_item",
             "object_id": "d1", "before": {"state": "new", "note": ""}, "after": {"state": "ignored", "note": "dup"},
             "note": "dup", "outcome": "ok"},
            {"at": "2026-11-20T12:01:00Z", "actor": "vera", "action": "api.denied", "object_type": "api",
             "object_id": "POST /api/runs", "before": None, "after": {"status": 403}, "note": "", "outcome": "denied"},
        ]
    )  # fmt: skip
    assert rows[0]["who"] == "olga" and rows[0]["change"] == "state: new → ignored, note:  → dup"
    assert rows[1]["on"] == "api POST /api/runs" and rows[1]["change"] == "status=403" and rows[1]["result"] == "denied"
    assert views.unset_all("(all)") == "" and views.unset_all("EU") == "EU"
    item = {"drift_id": "d1", "class": "missing_in_erp", "primary_key": "in_1", "amount_minor": 1250, "currency": "EUR"}
    assert views.item_label(item) == "missing_in_erp · in_1 · 12.50 EUR"
    assert views.item_label({"drift_id": "d1"}) == "item d1"


def test_intake_rows_show_the_reason_and_when_a_skip_was_cleared() -> None:
    letters = views.dead_letter_rows(
        [{"name": "e1_c0_r1", "kind": "spans", "rows": 3, "error": "Code: 444", "set_aside_at": "2026-11-27T05:00:00Z"}]
    )
    assert letters == [
        {"name": "e1_c0_r1", "kind": "spans", "rows": 3, "set aside": "2026-11-27 05:00:00 UTC", "reason": "Code: 444"}
    ]
    assert views.dead_letter_rows([{"name": "x", "error": "unreadable reason file: gone"}])[0]["set aside"] == "—"
    common = {"connector": "tryton", "stream": "ledger_entries", "reason": "XBT", "times": 2}
    rows = views.skipped_rows(
        [
            {**common, "ref": "tryton:invoice:4", "cleared": False, "cleared_at": "1970-01-01T00:00:00Z"},
            {**common, "ref": "", "cleared": True, "cleared_at": "2026-11-27T05:01:00Z"},
        ]
    )
    assert [r["source"] for r in rows] == ["tryton ledger_entries"] * 2
    assert [r["record"] for r in rows] == ["tryton:invoice:4", "(no id)"]
    assert [r["cleared"] for r in rows] == ["", "2026-11-27 05:01:00 UTC"]


def test_the_class_filters_offer_every_class_the_reconciler_raises() -> None:
    from reconciler.classify import CLASSES

    assert sorted(views.DRIFT_CLASSES) == sorted(CLASSES)


def test_the_alertmanager_link_carries_no_credentials() -> None:
    assert (
        views.link_without_credentials("https://am:s3cret@am.example:9093/#/alerts")
        == "https://am.example:9093/#/alerts"
    )
    assert views.link_without_credentials("http://127.0.0.1:9093") == "http://127.0.0.1:9093"


MARKDOWN_ATTACKS = [
    "[x](http://evil.example/login) [**Session expired — click here**](http://evil.example)",
    "fixed per [ticket](http://evil.example) **URGENT** <b>x</b> `code` 日本語",
    "![logo](http://evil.example/a.png) <http://evil.example> _em_ *em* ~~gone~~ $x^2$ a | b",
    "# heading",
    "> quoted",
    "- listed",
    "+ listed",
    "1. numbered",
    "2) numbered",
    r"back\slash \*kept\* &lt; &#91;",
    "{braces} [ref][1] ref_name_with_underscores",
]
MARKUP = ("<a", "<img", "<em", "<strong", "<code", "<s>", "<del", "<h1", "<ol", "<ul", "<blockquote", "<table", "<p>")


@pytest.mark.parametrize("text", MARKDOWN_ATTACKS)
def test_escaped_text_renders_as_itself_with_no_link_or_emphasis(text: str) -> None:
    """Ids, notes and API messages go into st.warning/st.caption/st.header, which render Markdown: escaped, a shared
    link or a stored note shows its literal text, never a link, an image, emphasis, code, a heading or a list."""
    import html

    import markdown_it  # rich's dependency, so always installed with the dashboard

    md = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])
    rendered = md.render(f"Note: {views.md_escape(text)}")  # as the pages embed it, and on its own
    alone = md.render(views.md_escape(text))
    for out, prefix in ((rendered, "Note: "), (alone, "")):
        assert out.startswith("<p>") and out.endswith("</p>\n"), out
        assert html.unescape(out[3:-5]) == prefix + text
        assert not [tag for tag in MARKUP if tag in out[3:]], out
    assert "](" not in views.md_escape(text)


def test_escaping_keeps_plain_text_and_makes_a_note_one_line() -> None:
    assert views.md_escape("ERP outage, reposting tonight 12.50") == "ERP outage, reposting tonight 12.50"
    assert views.md_escape("  line one\nline two\r\n") == "line one line two"
    assert views.md_escape(42) == "42"
    assert views.md_escape("[a](b)") == r"\[a\]\(b\)"  # what show_errors does to a load error


def test_the_bulk_question_shows_the_note_that_will_be_sent() -> None:
    filters = views.DriftFilters(classes=["missing_in_erp"])
    prompt = views.bulk_prompt("acknowledge", 3, filters, "ERP outage INC-42, see [ticket](http://evil.example)")
    assert prompt.startswith("This will acknowledge 3 items (class=") and prompt.endswith(". Confirm?")
    assert r"with the note “ERP outage INC\-42, see \[ticket\]\(http://evil.example\)”" in prompt
    assert "with the note" not in views.bulk_prompt("sync", 1, views.DriftFilters(), "  ")


def test_a_span_name_with_markup_shows_as_text_in_the_waterfall_hover() -> None:
    """Plotly renders a subset of HTML in hover text, links included; span names are whatever a client sent."""
    txn = {
        "spans": [
            {"system": "billing", "name": "<a href='http://evil.example'>sign in</a>", "start": _iso(T0),
             "end": _iso(T0 + dt.timedelta(seconds=1)), "start_ns": 1, "duration_ms": 1000.0, "trace_id": "a" * 32,
             "status": "<b>OK</b>"},
        ],
        "steps": [],
    }  # fmt: skip
    (bar,) = [b for b in views.transaction_bars(txn, {}, now=T0) if b.kind == "span"]
    hover = views.bar_hover(bar)
    assert "<a " not in hover and "<b>" not in hover and "&lt;a href=" in hover
    assert hover.count("<br>") == 3  # only the layout's own line breaks stay markup


def test_a_timeout_is_told_apart_from_a_refusal_and_no_message_names_the_urls_credentials() -> None:
    """The transport is the client's one IO seam: here it times out, or cannot connect."""
    import httpx

    from dashboard.api_client import ApiTimeout, ApiUnavailable, TowerApi

    def timing_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    def refusing(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    url = "http://ops:s3cretpw@127.0.0.1:9"
    with pytest.raises(ApiTimeout) as slow:
        TowerApi(url, "t", transport=httpx.MockTransport(timing_out)).post("/api/drift/d1/sync", {})
    with pytest.raises(ApiUnavailable) as down:
        TowerApi(url, "t", transport=httpx.MockTransport(refusing)).get("/api/drift")
    assert not isinstance(down.value, ApiTimeout)
    for said in (str(slow.value), str(down.value)):
        assert "s3cretpw" not in said and "ops:" not in said and "http://127.0.0.1:9" in said
    assert "not known" in views.UNKNOWN_OUTCOME.format(op="corrective sync")


def test_a_running_run_shows_no_counts_yet() -> None:
    """The overview said "open items 0" while a run was under way (the API's counts are filled at its end)."""
    running = {"state": "running", "mode": "full", "started_at": "2026-01-01T00:00:00Z", "drift_open": 0}
    done = {**running, "state": "succeeded", "finished_at": "2026-01-01T00:00:03Z", "drift_open": 30, "drift_new": 2}
    assert [views.run_summary(running)[k] for k in ("open items", "new", "resolved")] == ["—", "—", "—"]
    summary = views.run_summary(done)
    figures = (summary["open items"], summary["new"], summary["resolved"], summary["duration"])
    assert figures == ("30", "2", "0", "3.0 s")
