"""SLA SQL on both store backends: step activity fed from spans and business events, per-region window counts,
stuck items, drift ages, breach history and the webhook notification log; the service's state survives a restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reconciler.sla.definitions import parse_definitions
from reconciler.sla.service import SlaService
from reconciler.sla.webhook import WebhookNotifier
from tests.conftest import migrated
from tests.sla_estate import Receiver
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store import sla as q
from tower_core.store.migrate import available

T = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
M = 60_000_000_000
S = 1_000_000_000


@pytest.fixture
def db(store: Store) -> Iterator[Store]:
    """A fresh database on chDB and, through clickhouse-connect, on the ClickHouse-HTTP test fixture."""
    migrated(store)
    yield store


def insert_spans(store: Store, spans: list[dict]) -> None:
    """spans: {ts, dur, attrs, resource?}, one bound INSERT each (other columns take their defaults).

    Plain INSERTs rather than insert_arrow: the ClickHouse-HTTP test fixture's streaming insert path does not
    run materialized views (a chDB quirk of the fixture; a real ClickHouse server always does)."""
    for i, s in enumerate(spans):
        store.command(
            "INSERT INTO $db.otel_traces (Timestamp, TraceId, SpanId, SpanName, ServiceName, SpanAttributes, "
            "ResourceAttributes, Duration, StatusCode) VALUES (fromUnixTimestamp64Nano({ts:Int64}), {tid:String}, "
            "{sid:String}, 'work', 'svc', {attrs:Map(String, String)}, {res:Map(String, String)}, {dur:UInt64}, "
            "{status:String})",
            {
                "ts": s["ts"],
                "tid": f"{i:032x}",
                "sid": f"{i:016x}",
                "attrs": s["attrs"],
                "res": s.get("resource", {}),
                "dur": s.get("dur", 0),
                "status": s.get("status", "Unset"),
            },
        )


def inv(key: str, system: str, ts: int, region: str = "EU", dur: int = 0, step: str = "invoice_to_ledger") -> dict:
    attrs = {"revops.step": step, "revops.system": system, "revops.invoice.id": key}
    if region:
        attrs["revops.region"] = region
    return {"ts": ts, "dur": dur, "attrs": attrs}


def scenario(store: Store) -> None:
    """Hand-made invoice_to_ledger items (threshold 15m) around now = T+60m; see each line."""
    insert_spans(
        store,
        [
            inv("in_a", "billing", T, dur=S),
            inv("in_a", "erp", T + 10 * M),  # good, 600 s, decided T+10m
            inv("in_b", "billing", T + 5 * M),
            inv("in_b", "erp", T + 40 * M),  # late, 2100 s, decided T+20m
            inv("in_c", "billing", T + 30 * M),  # stuck since T+45m
            inv("in_d", "billing", T + 50 * M),  # in flight, not yet past its threshold
            inv("in_e", "billing", T + 52 * M, region="NA"),
            inv("in_e", "erp", T + 57 * M),  # NA (source's region)
            inv("in_f", "billing", T + M),
            inv("in_f", "erp", T + 61 * M),  # posted after now: stuck at now
            inv("in_g", "billing", T + 2 * M, region=""),
            inv("in_g", "erp", T + 3 * M, region="APAC"),
            inv("in_h", "erp", T + 4 * M),  # no billing activity: not an item
            {  # another step: a payment, never applied
                "ts": T + 6 * M,
                "attrs": {"revops.step": "payment_to_cash", "revops.system": "billing", "revops.payment.id": "pay_x"},
            },
            # system and region as resource attributes; one span for two invoices (JSON array attribute)
            {
                "ts": T + 20 * M,
                "attrs": {"revops.step": "invoice_to_ledger", "revops.invoice.id": '["in_i1","in_i2"]'},
                "resource": {"revops.system": "billing", "revops.region": "EU"},
            },
            inv("in_i1", "erp", T + 25 * M),  # good, 300 s; in_i2 never posted: stuck since T+35m
        ],
    )


def stats(store: Store, now: int, **kw: object) -> dict[str, dict]:
    """Per region, invoice_to_ledger with a 15-minute threshold unless ``kw`` says otherwise."""
    args: dict[str, object] = {
        "step": "invoice_to_ledger",
        "key_type": "invoice",
        "source": "billing",
        "target": "erp",
        "threshold_s": 900,
        "windows_s": [300, 3600, 86400],
        "period_s": 86400,
        "bounds_s": [60, 600, 3600],
    }
    rows = q.step_stats(store, now_ns=now, **{**args, **kw})  # type: ignore[arg-type]
    return {r["region"]: r for r in rows}


def test_step_activity_come_from_spans_and_business_events(db: Store) -> None:
    scenario(db)
    rows = db.query_rows(
        "SELECT KeyType AS kt, KeyValue AS k, System AS sys, any(Region) AS region FROM $db.step_activity "
        "WHERE Step = 'invoice_to_ledger' GROUP BY kt, k, sys ORDER BY k, sys"
    )
    got = {(r["k"], r["sys"]): r["region"] for r in rows}
    assert got[("in_i1", "billing")] == "EU" and got[("in_i2", "billing")] == "EU"  # array + resource attrs
    assert got[("in_g", "erp")] == "APAC" and ("in_h", "erp") in got
    assert {r["kt"] for r in rows} == {"invoice"}
    events = [
        ("ev1", "billing", T, "pay_1"),
        ("ev2", "erp", T + 5 * M, "pay_1"),
    ]
    for event_id, system, ts, payment in events:
        db.command(
            "INSERT INTO $db.business_events (EventId, Source, Type, Time, ReceivedAt, System, Region, Step, "
            "CustomerId, InvoiceId, PaymentId, AmountMinor, Currency) VALUES ({id:String}, 'test', 'payment', "
            "fromUnixTimestamp64Nano({ts:Int64}), fromUnixTimestamp64Nano({ts:Int64}), {sys:String}, 'EU', "
            "'payment_to_cash', 'cus_1', 'in_a', {pay:String}, 100, 'EUR')",
            {"id": event_id, "ts": ts, "sys": system, "pay": payment},
        )
    rows = q.step_stats(
        db,
        step="payment_to_cash",
        key_type="payment",
        source="billing",
        target="erp",
        threshold_s=1800,
        now_ns=T + 60 * M,
        windows_s=[3600],
        period_s=3600,
        bounds_s=[300],
    )
    by = {r["region"]: r for r in rows}
    assert (by["EU"]["completed"], by["EU"]["q_ns"][0], by["EU"]["buckets"]) == (1, 300 * S, [1])
    assert by["unknown"]["stuck"] == 1  # pay_x: billing payment span at T+6m without region, never applied


def _erp_batch_event(store: Store, event_id: str, ts: int, invoices: list[str]) -> None:
    """One ERP event posting several invoices: its key column holds the last, KeyRefs all (collector/events.py)."""
    store.command(
        "INSERT INTO $db.business_events (EventId, Source, Type, Time, ReceivedAt, System, Region, Step, InvoiceId, "
        "KeyRefs) VALUES ({id:String}, 'erp-batch', 'erp.invoices.posted', fromUnixTimestamp64Nano({ts:Int64}), "
        "fromUnixTimestamp64Nano({ts:Int64}), 'erp', 'EU', 'invoice_to_ledger', {last:String}, {refs:Array(String)})",
        {"id": event_id, "ts": ts, "last": invoices[-1], "refs": [f"invoice:{i}" for i in invoices]},
    )


def test_an_event_naming_several_invoices_ends_each_of_their_items(db: Store) -> None:
    invoices = ["in_batch_a", "in_batch_b", "in_batch_c"]
    insert_spans(db, [inv(i, "billing", T) for i in invoices])
    _erp_batch_event(db, "ev_batch", T + M, invoices)
    (eu,) = stats(db, T + 30 * M).values()
    assert (eu["completed"], eu["stuck"], eu["bads"]) == (3, 0, [0, 0, 0])


def test_migration_0023_reads_again_the_batch_events_stored_before_it_and_can_run_twice(store: Store) -> None:
    for m in available():
        if m.version < 23:
            for statement in m.statements():
                store.command(statement)
    invoices = ["in_old_a", "in_old_b"]
    insert_spans(store, [inv(i, "billing", T) for i in invoices])
    _erp_batch_event(store, "ev_old", T + M, invoices)
    assert stats(store, T + 30 * M)["EU"]["stuck"] == 1  # 0015's view saw in_old_b only
    (m23,) = [m for m in available() if m.version == 23]
    for _ in range(2):
        for statement in m23.statements():
            store.command(statement)
    (eu,) = stats(store, T + 30 * M).values()
    assert (eu["completed"], eu["stuck"]) == (2, 0)
    _erp_batch_event(store, "ev_new", T + 2 * M, ["in_old_a", "in_new"])  # the new view, once
    rows = store.query_rows(
        "SELECT KeyValue AS k, count() AS n FROM $db.step_activity FINAL WHERE System = 'erp' GROUP BY k ORDER BY k"
    )
    assert {r["k"]: r["n"] for r in rows} == {"in_new": 1, "in_old_a": 2, "in_old_b": 1}


def _customer_event(store: Store, event_id: str, ts: int, system: str, customer: str, cdp_user: str) -> None:
    """A cdp_to_billing event: the CDP's identify (keyed by the CDP user until billing has an id) or billing's
    customer record naming the CDP user it came from (Stripe's metadata.cdp_user_id)."""
    store.command(
        "INSERT INTO $db.business_events (EventId, Source, Type, Time, ReceivedAt, System, Region, Step, CustomerId, "
        "KeyRefs) VALUES ({id:String}, {sys:String}, 'customer', fromUnixTimestamp64Nano({ts:Int64}), "
        "fromUnixTimestamp64Nano({ts:Int64}), {sys:String}, 'EU', 'cdp_to_billing', {cus:String}, "
        "{refs:Array(String)})",
        {"id": event_id, "ts": ts, "sys": system, "cus": customer,
         "refs": [f"customer:{customer}", f"cdp_user:{cdp_user}"]},
    )  # fmt: skip


def _customer_sync(store: Store, now: int) -> dict:
    (eu,) = q.step_stats(
        store, step="cdp_to_billing", key_type="customer", source="cdp", target="billing", threshold_s=30,
        now_ns=now, windows_s=[3600], period_s=3600, bounds_s=[60],
    )  # fmt: skip
    return eu


def test_a_new_customer_keyed_by_its_cdp_user_ends_when_billing_names_that_user(db: Store) -> None:
    _customer_event(db, "ev_identify", T, "cdp", "user-77", "user-77")  # no billing id yet
    _customer_event(db, "ev_created", T + 1500 * (S // 1000), "billing", "cus_77", "user-77")
    eu = _customer_sync(db, T + 10 * M)
    assert (eu["completed"], eu["stuck"], eu["q_ns"][0]) == (1, 0, 1500 * (S // 1000))


def test_migration_0024_reads_again_the_billing_customer_events_stored_before_it(store: Store) -> None:
    for m in available():
        if m.version < 24:
            for statement in m.statements():
                store.command(statement)
    _customer_event(store, "ev_identify", T, "cdp", "user-78", "user-78")
    _customer_event(store, "ev_created", T + S, "billing", "cus_78", "user-78")
    assert _customer_sync(store, T + 10 * M)["stuck"] == 1  # 0023's view: billing named cus_78 only
    (m24,) = [m for m in available() if m.version == 24]
    for _ in range(2):
        for statement in m24.statements():
            store.command(statement)
    eu = _customer_sync(store, T + 10 * M)
    assert (eu["completed"], eu["stuck"]) == (1, 0)
    names = store.query_rows(
        "SELECT name FROM system.tables WHERE database = {d:String} AND name LIKE 'step_activity_events%'",
        {"d": store.database},
    )
    assert [n["name"] for n in names] == ["step_activity_events_v3_mv"]


def test_failed_activity_neither_starts_nor_completes_an_item(db: Store) -> None:
    """A declined payment does not start payment_to_cash; a rejected ERP posting does not complete an invoice."""
    pay = {"revops.step": "payment_to_cash", "revops.system": "billing", "revops.payment.id": "pay_declined"}
    insert_spans(
        db,
        [
            {"ts": T, "attrs": pay, "status": "Error"},
            inv("in_r", "billing", T),
            {**inv("in_r", "erp", T + M), "status": "Error"},
        ],
    )
    for event_id, etype, system, step, key in (
        ("e1", "payment_intent.payment_failed", "billing", "payment_to_cash", "pay_failed"),
        ("e2", "erp.invoice.rejected", "erp", "invoice_to_ledger", "in_r"),
        ("e3", "payment_intent.succeeded", "billing", "payment_to_cash", "pay_ok"),
    ):
        db.command(
            "INSERT INTO $db.business_events (EventId, Source, Type, Time, ReceivedAt, System, Region, Step, "
            "InvoiceId, PaymentId) VALUES ({id:String}, 'test', {type:String}, fromUnixTimestamp64Nano({ts:Int64}), "
            "fromUnixTimestamp64Nano({ts:Int64}), {sys:String}, 'EU', {step:String}, {inv:String}, {pay:String})",
            {
                "id": event_id,
                "type": etype,
                "ts": T + 2 * M,
                "sys": system,
                "step": step,
                "inv": key if step == "invoice_to_ledger" else "",
                "pay": key if step == "payment_to_cash" else "",
            },
        )
    rows = db.query_rows("SELECT DISTINCT KeyValue AS k, System AS sys FROM $db.step_activity ORDER BY k, sys")
    assert [(r["k"], r["sys"]) for r in rows] == [("in_r", "billing"), ("pay_ok", "billing")]
    assert stats(db, T + 60 * M)["EU"]["stuck"] == 1  # in_r: its posting was rejected, so it is not in the ledger


def test_window_counts_stuck_and_latency_by_region(db: Store) -> None:
    scenario(db)
    by = stats(db, T + 60 * M)
    assert set(by) == {"EU", "NA", "APAC"}
    eu = by["EU"]
    # decided in (now-1h, now]: a (good), b, f, i2, c (late or stuck) and i1 (good): 6, of which 4 bad;
    # nothing decided in the last 5 minutes (d is in flight but not yet past its threshold).
    assert (eu["totals"], eu["bads"]) == ([0, 6, 6], [0, 4, 4])
    assert (eu["stuck"], eu["in_flight"], eu["completed"]) == (3, 4, 3)
    assert eu["q_ns"] == [600 * S, 2100 * S, 2100 * S]  # exact quantiles of 300, 600, 2100 s
    assert eu["buckets"] == [0, 2, 3] and eu["latency_sum_ns"] == 3000 * S
    assert (by["NA"]["totals"], by["NA"]["bads"]) == ([1, 1, 1], [0, 0, 0])  # decided at T+57m, in the 5m window
    assert by["APAC"]["completed"] == 1  # region taken from the ERP side when billing had none
    assert list(stats(db, T + 60 * M, regions=["NA"])) == ["NA"]


def test_evaluating_at_a_past_instant_ignores_later_activity(db: Store) -> None:
    scenario(db)
    eu = stats(db, T + 30 * M)["EU"]
    # at T+30m: a (good), f (late at T+16m), b (late at T+20m: posted only at T+40m), i1 (good at T+25m, which
    # is the 5m window's excluded lower bound)
    assert (eu["totals"], eu["bads"]) == ([0, 4, 4], [0, 2, 2])
    assert (eu["stuck"], eu["in_flight"]) == (2, 4)  # b and f stuck; c (starts at T+30m) and i2 not yet


def test_stuck_items_oldest_first(db: Store) -> None:
    scenario(db)
    common = dict(step="invoice_to_ledger", key_type="invoice", source="billing", target="erp", threshold_s=900)
    rows = q.stuck_items(db, **common, now_ns=T + 60 * M, lookback_s=86400)  # type: ignore[arg-type]
    assert [(r["key"], r["region"], r["age_ns"]) for r in rows] == [
        ("in_f", "EU", 59 * M),
        ("in_i2", "EU", 40 * M),
        ("in_c", "EU", 30 * M),
    ]
    rows = q.stuck_items(db, **common, now_ns=T + 60 * M, lookback_s=86400, regions=["NA"])  # type: ignore[arg-type]
    assert rows == []


def test_unreconciled_items_by_region_latest_state_only(db: Store) -> None:
    now = T + 30 * 86400 * S
    day = 86400 * S
    rows = [
        ("d1", "missing_in_erp", "EU", "new", now - 3 * day, 1),
        ("d2", "amount_mismatch", "EU", "new", now - 9 * day, 1),
        ("d2", "amount_mismatch", "EU", "resolved", now - 9 * day, 2),  # latest version wins
        ("d3", "missing_in_erp", "NA", "persisting", now - 1 * day, 1),  # too young
        ("d4", "missing_in_erp", "NA", "acknowledged", now - 5 * day, 1),
        ("d5", "orphan_payment", "", "new", now - 10 * day, 1),
    ]
    for drift, cls, region, state, first, version in rows:
        db.command(
            "INSERT INTO $db.drift_items (DriftId, Class, Region, State, FirstSeen, LastSeen, UpdatedAt, Version) "
            "VALUES ({d:String}, {c:String}, {r:String}, {s:String}, fromUnixTimestamp64Nano({f:Int64}), "
            "fromUnixTimestamp64Nano({f:Int64}), fromUnixTimestamp64Nano({f:Int64}), {v:UInt64})",
            {"d": drift, "c": cls, "r": region, "s": state, "f": first, "v": version},
        )
    excl = ["resolved", "acknowledged", "ignored"]
    got = q.unreconciled_by_region(db, now_ns=now, max_age_s=2 * 86400, exclude_states=excl)
    assert [(r["region"], r["items"], r["oldest_ns"]) for r in got] == [
        ("EU", 1, now - 3 * day),
        ("unknown", 1, now - 10 * day),
    ]
    got = q.unreconciled_by_region(db, now_ns=now, max_age_s=2 * 86400, exclude_states=excl, classes=["missing_in_erp"])
    assert [r["region"] for r in got] == ["EU"]
    assert (
        q.unreconciled_by_region(db, now_ns=now, max_age_s=2 * 86400, exclude_states=[], regions=["NA"])[0]["items"]
        == 1
    )


DEFS = parse_definitions(
    "objectives:\n  - {name: invoice_posted, step: invoice_to_ledger, target: 99%, threshold: 15m}\n"
)


def test_service_records_breaches_and_remembers_them_across_a_restart(db: Store) -> None:
    scenario(db)
    settings = Settings(database=db.database, sla_eval_interval_s=0)
    first = SlaService(settings, db, DEFS)
    t1 = T + 60 * M
    r1 = first.evaluate(t1)
    # EU: 4 of 6 late in the last hour (66.7x) but nothing decided in the last 5m -> the 1h/5m page is quiet;
    # 6h/30m: 30m window (T+30m, T+60m]: c and i2 late, 2 of 2 -> 100x, 6h: 66.7x -> page; 3d/6h -> ticket.
    assert sorted((b.region, b.severity) for b in r1.transitions.started) == [("EU", "page"), ("EU", "ticket")]
    restarted = SlaService(settings, db, DEFS)  # a new process: state comes from sla_breaches
    r2 = restarted.evaluate(t1 + M)
    assert r2.transitions.started == [] and len(r2.transitions.continuing) == 2
    assert {b.starts_ms for b in r2.transitions.continuing} == {t1 // 1_000_000}
    r3 = restarted.evaluate(T + 24 * 60 * M)  # a day later nothing happened any more: short windows are clean
    assert sorted(b.severity for b in r3.transitions.resolved) == ["page", "ticket"]
    history = q.list_breaches(db)
    assert len(history) == 2 and {h["status"] for h in history} == {"resolved"}
    assert {h["ends_ms"] for h in history} == {(T + 24 * 60 * M) // 1_000_000}
    assert q.list_breaches(db, status="firing") == [] and q.open_breaches(db) == []
    assert len(q.list_breaches(db, region="EU", step="invoice_to_ledger", sla="invoice_posted")) == 2
    assert q.list_breaches(db, region="NA") == []


def test_a_backfill_after_a_restart_reopens_nothing_and_sends_nothing(db: Store) -> None:
    """The last recorded evaluation instant comes from the store, so a restarted tower still answers an
    evaluation at an earlier instant with "recorded": false instead of reopening resolved breaches."""
    scenario(db)
    with Receiver() as rx:
        settings = Settings(database=db.database, sla_eval_interval_s=0, sla_webhook_urls=[rx.url])
        first = SlaService(settings, db, DEFS)
        assert len(first.evaluate(T + 60 * M).transitions.started) == 2
        assert len(first.evaluate(T + 24 * 60 * M).transitions.resolved) == 2
        first.close()
        told = len(rx.messages)
        assert told == 2  # the group's firing message, then its resolution
        restarted = SlaService(settings, db, DEFS)  # a new process: nothing open, no evaluation in memory
        past = restarted.evaluate(T + 61 * M)
        assert not past.recorded and past.delivery == {}
        assert q.open_breaches(db) == [] and {h["status"] for h in q.list_breaches(db)} == {"resolved"}
        assert len(q.list_breaches(db)) == 2 and len(rx.messages) == told
        live = restarted.evaluate(T + 24 * 60 * M + M)
        assert live.recorded and live.transitions.rows() == []
        restarted.close()
    assert q.last_evaluated_ms(db) == (T + 24 * 60 * M) // 1_000_000


def test_webhook_notifier_dedups_through_the_stored_log(db: Store) -> None:
    scenario(db)
    settings = Settings(database=db.database, sla_eval_interval_s=0)
    trans = SlaService(settings, db, DEFS).evaluate(T + 60 * M).transitions
    with Receiver() as rx:
        notifier = WebhookNotifier(db, [rx.url], "http://tower")
        sent, failures = notifier.deliver(trans.firing, [], version=1)
        assert (len(sent), failures) == (1, 0) and sent[0].alerts == 2
        assert notifier.deliver(trans.firing, [], version=2) == ([], 0)
        again = WebhookNotifier(db, [rx.url], "http://tower")  # restarted: reads the log
        assert again.deliver(trans.firing, [], version=3) == ([], 0)
        assert len(rx.messages) == 1 and rx.messages[0]["status"] == "firing"
    dead = WebhookNotifier(db, ["http://127.0.0.1:9/none"], "http://tower", timeout_s=0.5, attempts=1)
    assert dead.deliver(trans.firing, [], version=4) == ([], 1)  # failure: nothing recorded, retried next time
    assert q.notified(db, "http://127.0.0.1:9/none") == set()


def test_notification_log_keeps_every_group_of_one_delivery(db: Store) -> None:
    q.record_notifications(db, "http://r", "g1", [("fp1", 1000, "firing")], 200, version=7)
    q.record_notifications(db, "http://r", "g2", [("fp2", 1000, "firing")], 200, version=7)
    q.record_notifications(db, "http://r", "g1", [("fp1", 1000, "firing")], 200, version=7)  # a retried insert
    assert q.notified(db, "http://r") == {("fp1", 1000, "firing"), ("fp2", 1000, "firing")}
    assert db.query_rows("SELECT count() AS n FROM $db.sla_notifications FINAL")[0]["n"] == 2


def test_the_notification_log_names_receivers_by_hash_never_by_url(db: Store) -> None:
    """A receiver URL often carries a secret (a token in its path, basic-auth credentials): the log keeps its hash."""
    url = "https://ops:s3cret@hooks.example/T000/B000/XXXXtoken"
    q.record_notifications(db, url, "g1", [("fp1", 1000, "firing")], 200, version=1)
    assert q.notified(db, url) == {("fp1", 1000, "firing")}
    assert q.notified(db, "https://hooks.example/other") == set()
    stored = db.query_rows("SELECT Receiver AS r, GroupKey AS g FROM $db.sla_notifications")
    assert [r["r"] for r in stored] == [q.receiver_key(url)] and "s3cret" not in str(stored)


def test_migration_0020_hashes_the_receivers_logged_before_it_and_can_run_twice(store: Store) -> None:
    """A store at version 19 whose log names a receiver by its URL: after 0020 (run twice, as two starting
    processes would) the URL is gone and what that receiver was told is still known, so nothing is sent again."""
    for m in available():
        if m.version < 20:
            for statement in m.statements():
                store.command(statement)
    url = "https://hooks.example/services/T0/B0/secret-token"
    store.command(
        "INSERT INTO $db.sla_notifications VALUES ({u:String}, 'fp1', 1000, 'firing', 'g1', 2000, 200, 1), "
        "({u:String}, 'fp1', 1000, 'resolved', 'g1', 3000, 200, 2), ('http://other', 'fp2', 1000, 'firing', 'g2', 0, "
        "200, 1)",
        {"u": url},
    )
    (m20,) = [m for m in available() if m.version == 20]
    for _ in range(2):
        for statement in m20.statements():
            store.command(statement)
    # StartsAt 1000 above is seconds: 1,000,000 ms
    assert q.notified(store, url) == {("fp1", 1_000_000, "firing"), ("fp1", 1_000_000, "resolved")}
    assert q.notified(store, "http://other") == {("fp2", 1_000_000, "firing")}
    receivers = store.query_rows("SELECT DISTINCT Receiver AS r FROM $db.sla_notifications FINAL ORDER BY r")
    assert sorted(r["r"] for r in receivers) == sorted([q.receiver_key(url), q.receiver_key("http://other")])
    assert store.query_rows("SELECT count() AS n FROM $db.sla_notifications FINAL")[0]["n"] == 3


def test_an_item_ends_at_its_first_target_activity_after_its_start(db: Store) -> None:
    """A customer's later profile changes and an invoice's duplicate posting do not stretch the latency, and
    evaluating between two activities of one day-row still sees the first one."""
    cus = {"revops.step": "cdp_to_billing", "revops.customer.id": "cus_1"}
    insert_spans(
        db,
        [
            {"ts": T, "attrs": {**cus, "revops.system": "cdp", "revops.region": "EU"}},
            {"ts": T + S, "attrs": {**cus, "revops.system": "billing"}},  # created 1 s later
            {"ts": T + 19 * M, "attrs": {**cus, "revops.system": "cdp"}},  # the next change...
            {"ts": T + 19 * M + S, "attrs": {**cus, "revops.system": "billing"}},  # ...and its update
            inv("in_dup", "billing", T),
            inv("in_dup", "erp", T + 2 * M),
            inv("in_dup", "erp", T + 25 * M),  # a duplicate posting later
        ],
    )
    common = dict(now_ns=T + 30 * M, windows_s=[3600], period_s=3600, bounds_s=[60])
    (cust,) = q.step_stats(
        db, step="cdp_to_billing", key_type="customer", source="cdp", target="billing", threshold_s=30, **common
    )  # type: ignore[arg-type]
    assert (cust["totals"], cust["bads"], cust["q_ns"][0]) == ([1], [0], S)
    (eu,) = stats(db, T + 30 * M).values()
    assert (eu["completed"], eu["bads"], eu["q_ns"][0]) == (1, [0, 0, 0], 2 * M)
    early = dict(common, now_ns=T + 10 * M)  # the billing day-row reaches past now (T+19m): still ended at T+1s
    (cust,) = q.step_stats(
        db, step="cdp_to_billing", key_type="customer", source="cdp", target="billing", threshold_s=30, **early
    )  # type: ignore[arg-type]
    assert (cust["stuck"], cust["completed"], cust["bads"]) == (0, 1, [0])


def test_target_activity_in_the_start_second_ends_the_item_as_whole_second_systems_record_it(db: Store) -> None:
    """Stripe stamps a customer update with its whole second: 0.3 s after the CDP's change it reads as before it."""
    cus = {"revops.step": "cdp_to_billing", "revops.system": "cdp", "revops.region": "EU"}
    ms = S // 1000
    insert_spans(
        db,
        [
            {"ts": T + 300 * ms, "attrs": {**cus, "revops.customer.id": "cus_same_second"}},
            {"ts": T, "attrs": {"revops.step": "cdp_to_billing", "revops.system": "billing",
                                "revops.customer.id": "cus_same_second"}},
            {"ts": T + 300 * ms, "attrs": {**cus, "revops.customer.id": "cus_second_before"}},
            {"ts": T - S, "attrs": {"revops.step": "cdp_to_billing", "revops.system": "billing",
                                    "revops.customer.id": "cus_second_before"}},
        ],
    )  # fmt: skip
    args = dict(step="cdp_to_billing", key_type="customer", source="cdp", target="billing", threshold_s=30)
    (eu,) = q.step_stats(db, now_ns=T + 10 * M, windows_s=[3600], period_s=3600, bounds_s=[60], **args)  # type: ignore[arg-type]
    assert (eu["completed"], eu["stuck"], eu["q_ns"][0]) == (1, 1, 0)
    stuck = q.stuck_items(db, now_ns=T + 10 * M, lookback_s=3600, **args)  # type: ignore[arg-type]
    assert [r["key"] for r in stuck] == ["cus_second_before"]  # a whole second before is history


def test_a_latency_does_not_depend_on_background_merges(db: Store) -> None:
    """Billing touches the customer in the morning and the evening; the CDP change at 10:00 syncs at 10:05. Kept
    per day as min/max, a merge of the day's parts made the evening the end (8 h instead of 5 min)."""
    h = 3600 * S
    cdp = {"revops.step": "cdp_to_billing", "revops.customer.id": "cus_m", "revops.region": "EU"}
    insert_spans(db, [{"ts": T + 8 * h, "attrs": {**cdp, "revops.system": "billing"}}])
    insert_spans(db, [{"ts": T + 10 * h, "attrs": {**cdp, "revops.system": "cdp"}}])
    insert_spans(db, [{"ts": T + 10 * h + 5 * M, "attrs": {**cdp, "revops.system": "billing"}}])
    insert_spans(db, [{"ts": T + 18 * h, "attrs": {**cdp, "revops.system": "billing"}}])

    def p50_s() -> float:
        cdp_sync = {"step": "cdp_to_billing", "key_type": "customer", "source": "cdp", "target": "billing"}
        row = stats(db, T + 20 * h, **cdp_sync, windows_s=[86400])["EU"]
        assert row["bads"] == [0]
        return row["q_ns"][0] / S

    assert p50_s() == 300
    db.command("OPTIMIZE TABLE $db.step_activity FINAL")
    assert p50_s() == 300


def test_migration_0015_moves_the_activity_of_a_running_store_and_can_run_twice(store: Store) -> None:
    """A store at version 14 with spans and events under the old per-day table: 0015 rebuilds the activity from its
    sources, twice in a row as two starting processes would, and new spans then reach the new table only."""
    for m in available():
        if m.version < 15:
            for statement in m.statements():
                store.command(statement)
    scenario(store)
    old = store.query_rows("SELECT count() AS n FROM $db.step_events")[0]["n"]
    assert old > 0
    (m15,) = [m for m in available() if m.version == 15]
    for _ in range(2):
        for statement in m15.statements():
            store.command(statement)
    per_activity = "SELECT KeyValue, System, FirstSeen FROM $db.step_activity FINAL ORDER BY ALL"
    rows = store.query_rows(per_activity)
    assert len(rows) >= old and len({(r["KeyValue"], r["System"], r["FirstSeen"]) for r in rows}) == len(rows)
    tables = store.query_rows(
        "SELECT name FROM system.tables WHERE database = {d:String} AND name LIKE 'step_%' ORDER BY name",
        {"d": store.database},
    )
    assert [t["name"] for t in tables] == ["step_activity", "step_activity_events_mv", "step_activity_spans_mv"]
    insert_spans(store, [inv("in_after", "erp", T + 99 * M)])
    assert store.query_rows("SELECT count() AS n FROM $db.step_activity WHERE KeyValue = 'in_after'")[0]["n"] == 1


def test_an_erp_clock_behind_billings_still_ends_the_step_within_the_configured_skew(db: Store) -> None:
    """An ERP whose clock runs 2 min behind billing's stamps a posting made 60 s after the finalization a minute
    before it: the item never ended and stayed stuck (with a burn-rate alert), though both systems were seen (a
    time review). TOWER_SLA_CLOCK_SKEW_S lets target activity that much before the start end the step."""
    billing = {"revops.step": "invoice_to_ledger", "revops.system": "billing", "revops.region": "EU"}
    erp = {"revops.step": "invoice_to_ledger", "revops.system": "erp"}
    insert_spans(
        db,
        [
            {"ts": T, "attrs": {**billing, "revops.invoice.id": "in_skewed"}},
            {"ts": T - 60 * S, "attrs": {**erp, "revops.invoice.id": "in_skewed"}},  # 60 s later, on a slow clock
            {"ts": T, "attrs": {**billing, "revops.invoice.id": "in_history"}},
            {"ts": T - 10 * M, "attrs": {**erp, "revops.invoice.id": "in_history"}},  # older than any skew: history
        ],
    )
    args = dict(step="invoice_to_ledger", key_type="invoice", source="billing", target="erp", threshold_s=30)
    for skew_s, stuck_keys in ((0.0, ["in_history", "in_skewed"]), (180.0, ["in_history"])):
        stuck = q.stuck_items(db, now_ns=T + 10 * M, lookback_s=3600, skew_s=skew_s, **args)  # type: ignore[arg-type]
        assert sorted(r["key"] for r in stuck) == stuck_keys, skew_s
        (eu,) = q.step_stats(
            db,
            now_ns=T + 10 * M,
            windows_s=[3600],
            period_s=3600,
            bounds_s=[60],
            skew_s=skew_s,
            **args,  # type: ignore[arg-type]
        )
        assert eu["completed"] == 2 - len(stuck_keys) and eu["stuck"] == len(stuck_keys)


def test_the_transaction_view_ends_a_step_within_the_same_skew() -> None:
    from collector import correlation as corr

    assert corr.step_end(T, [(T - 60 * S, T - 60 * S)]) is None  # a minute before: history, by default
    assert corr.step_end(T, [(T - 60 * S, T - 60 * S)], skew_ns=180 * S) == T  # within the skew: at the start
    assert corr.step_end(T, [(T - 10 * M, T - 10 * M)], skew_ns=180 * S) is None
