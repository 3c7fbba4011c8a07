"""Source records a pull could not map: kept in source_skips (chDB and the ClickHouse HTTP fixture) while the
pull goes on, cleared when a later pull maps them, listed by the API to viewers. The pages come from a scripted
fetch function (a fake source, named as such: the Tryton test makes a real unmappable record on real trytond)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from collector.app import create_app
from collector.auth import create_token
from reconciler.runner import _pull_stream
from tests.conftest import migrated
from tower_core.models import LedgerEntry, Page, Skipped
from tower_core.settings import Settings
from tower_core.store import Store
from tower_core.store import reconcile as q
from tower_core.store import source_skips as skips


def scripted(pages: list[Page[Any]], start: str | None = None) -> Callable[[str | None, int], Page[Any]]:
    """A fake source: answers the given pages in order, checking that each call resumes from the cursor the
    previous page gave (the first from ``start``, the cursor stored by an earlier pull)."""
    calls = iter(pages)
    last: list[str | None] = [start]

    def fetch(cursor: str | None, limit: int) -> Page[Any]:
        assert cursor == last[0]
        page = next(calls)
        last[0] = page.next_cursor or cursor
        return page

    return fetch


def posting(n: int) -> LedgerEntry:
    now = dt.datetime.now(dt.UTC)
    return LedgerEntry(f"erp:{n}", "invoice", f"in_{n}", "cus_1", "EU", "EUR", 100 * n, "open", now, now)


def stored_entries(store: Store) -> list[str]:
    rows = store.query_rows("SELECT DISTINCT EntryId AS e FROM $db.erp_ledger_entries ORDER BY e")
    return [r["e"] for r in rows]


def test_a_pull_moves_past_skipped_records_keeps_them_and_clears_them_when_they_map(store: Store) -> None:
    migrated(store)
    bad = Skipped("erp:2", "currency 'XBT' has no ISO 4217 exponent")
    fetch = scripted(
        [
            Page([posting(1)], "c1", False, (bad,)),
            Page([], "c2", False, (Skipped("erp:3", "more decimals than the currency"),)),  # only skips: go on
            Page([posting(4)], "c3", True),
        ]
    )
    assert _pull_stream(store, "erp", "ledger_entries", fetch, q.write_ledger) == (2, 2)
    assert stored_entries(store) == ["erp:1", "erp:4"]
    assert q.get_cursor(store, "erp", "ledger_entries") == "c3"
    listed = {s["ref"]: s for s in skips.list_skips(store)}
    assert sorted(listed) == ["erp:2", "erp:3"] and listed["erp:2"]["reason"] == bad.reason
    assert skips.open_skip_count(store) == 2

    # skipped again later (changed at the source, still bad): one row, counted twice, first time kept
    first_at = listed["erp:2"]["first_skipped_at"]
    again = scripted([Page([], "c4", True, (Skipped("erp:2", "still XBT"),))], start="c3")
    assert _pull_stream(store, "erp", "ledger_entries", again, q.write_ledger) == (0, 1)
    listed = {s["ref"]: s for s in skips.list_skips(store)}
    assert listed["erp:2"]["times"] == 2 and listed["erp:2"]["first_skipped_at"] == first_at
    assert listed["erp:2"]["reason"] == "still XBT"

    # fixed at the source: the next pull maps it, and its skip is cleared (another connector's is not touched)
    skips.record_skips(store, "billing", "invoices", [Skipped("erp:3", "same id, other stream")])
    fixed = scripted([Page([posting(2), posting(3)], "c5", True)], start="c4")
    assert _pull_stream(store, "erp", "ledger_entries", fixed, q.write_ledger) == (2, 0)
    open_refs = {(s["connector"], s["ref"]) for s in skips.list_skips(store)}
    assert open_refs == {("billing", "erp:3")}
    every = {(s["connector"], s["ref"]): s for s in skips.list_skips(store, include_cleared=True)}
    assert every[("erp", "erp:2")]["cleared"] and every[("erp", "erp:3")]["cleared"]
    assert every[("erp", "erp:2")]["times"] == 2

    # skipped again after it was cleared: a new episode (count and first time start over)
    relapse = scripted([Page([], "c6", True, (Skipped("erp:2", "XBT again"),))], start="c5")
    _pull_stream(store, "erp", "ledger_entries", relapse, q.write_ledger)
    (row,) = [s for s in skips.list_skips(store) if s["ref"] == "erp:2"]
    assert row["times"] == 1 and not row["cleared"] and row["first_skipped_at"] > first_at


def test_viewers_list_skipped_source_records(embedded_store: Store, tmp_path: Path) -> None:
    migrated(embedded_store)
    skips.record_skips(embedded_store, "tryton", "ledger_entries", [Skipped("tryton:invoice:7", "XBT")])
    skips.record_skips(embedded_store, "stripe", "invoices", [Skipped("in_1", "no currency")])
    skips.clear_skips(embedded_store, "stripe", "invoices", ["in_1"])
    settings = Settings(
        database=embedded_store.database, wal_dir=tmp_path / "wal", sla_eval_interval_s=0, reconcile_scheduler=False
    )
    with TestClient(create_app(settings, embedded_store)) as client:
        assert client.get("/api/sources/skipped").status_code == 401
        _, viewer = create_token(embedded_store, "vera", "viewer")
        auth = {"Authorization": f"Bearer {viewer}"}
        body = client.get("/api/sources/skipped", headers=auth).json()
        assert body["open"] == 1 and [i["ref"] for i in body["items"]] == ["tryton:invoice:7"]
        assert body["items"][0]["reason"] == "XBT" and body["items"][0]["connector"] == "tryton"
        every = client.get("/api/sources/skipped", params={"include_cleared": "true"}, headers=auth).json()
        assert sorted(i["ref"] for i in every["items"]) == ["in_1", "tryton:invoice:7"]
        assert client.get("/api/sources/skipped", params={"limit": 0}, headers=auth).status_code == 422

        # one no pull will map (cancelled at its source, still in XBT): an operator dismisses it, with a note
        target = {"connector": "tryton", "stream": "ledger_entries", "ref": "tryton:invoice:7"}
        why = {**target, "note": "cancelled in Tryton; re-issued in EUR as invoice 8"}
        assert client.post("/api/sources/skipped/dismiss", json=why, headers=auth).status_code == 403  # a viewer
        _, operator = create_token(embedded_store, "otto", "operator")
        as_op = {"Authorization": f"Bearer {operator}"}
        assert client.post("/api/sources/skipped/dismiss", json={**why, "note": " "}, headers=as_op).status_code == 422
        done = client.post("/api/sources/skipped/dismiss", json=why, headers=as_op)
        assert done.status_code == 200 and done.json()["cleared"]
        assert client.get("/api/sources/skipped", headers=auth).json() == {"items": [], "open": 0}
        assert client.post("/api/sources/skipped/dismiss", json=why, headers=as_op).status_code == 404  # once
        audit = client.get("/api/audit", params={"action": "source.dismiss"}, headers=as_op).json()["items"]
        assert [(a["actor"], a["object_id"], a["note"]) for a in audit] == [
            ("otto", "tryton/ledger_entries/tryton:invoice:7", why["note"])
        ]
