"""The store contract: the same calls behave the same on chDB and on a ClickHouse server over HTTP."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest

from collector.correlation import key_attribute_names
from tests import conftest
from tests.conftest import new_database
from tower_core.errors import ConfigError, StoreError
from tower_core.settings import Settings
from tower_core.store import Store, migrate, open_store, schema_version, table_counts
from tower_core.store.arrow_schemas import BILLING_INVOICES, OTEL_TRACES
from tower_core.store.migrate import available
from tower_core.store.otlp_sql import sync_key_attributes

T0 = 1_767_225_600_123_456_789  # 2026-01-01T00:00:00.123456789Z in ns


def spans(n: int, trace: str = "ab" * 16, start_ns: int = T0) -> pa.Table:
    rows = {
        "Timestamp": [start_ns + i for i in range(n)],
        "TraceId": [trace] * n,
        "SpanId": [f"{i:016x}" for i in range(n)],
        "ParentSpanId": [""] * n,
        "TraceState": [""] * n,
        "SpanName": ["post invoice"] * n,
        "SpanKind": ["Server"] * n,
        "ServiceName": ["erp"] * n,
        "ResourceAttributes": [[("service.name", "erp")]] * n,
        "ScopeName": ["test"] * n,
        "ScopeVersion": ["1"] * n,
        "SpanAttributes": [[("revops.invoice.id", f"in_{i}"), ("quote", "it's \\ \t")] for i in range(n)],
        "Duration": [1000 + i for i in range(n)],
        "StatusCode": ["Ok"] * n,
        "StatusMessage": [""] * n,
        "Events.Timestamp": [[start_ns]] * n,
        "Events.Name": [["posted"]] * n,
        "Events.Attributes": [[[("k", "v")]]] * n,
        "Links.TraceId": [[]] * n,
        "Links.SpanId": [[]] * n,
        "Links.TraceState": [[]] * n,
        "Links.Attributes": [[]] * n,
    }
    return pa.Table.from_pydict(rows, schema=OTEL_TRACES)


def test_migrations_twice_second_is_noop(store: Store) -> None:
    first = migrate(store)
    assert [m.version for m in first] == [m.version for m in available()]
    assert migrate(store) == []
    assert schema_version(store) == available()[-1].version
    counts = table_counts(store)
    for table in (
        "otel_traces",
        "otel_traces_trace_id_ts",
        "business_key_links",
        "business_events",
        "billing_invoices",
        "billing_payments",
        "erp_ledger_entries",
        "drift_items",
        "actions",
        "audit_log",
        "schema_migrations",
    ):
        assert table in counts
    assert counts["schema_migrations"] == len(available())


# A run's scratch tables (a run lost is run again) and tables the tower rebuilds at start.
UNSYNCED_BY_DESIGN = {
    "reconcile_scope",
    "reconcile_findings",
    "reconcile_hashes",
    "reconcile_invoice_facts",
    "reconcile_payment_facts",
    "reconcile_customer_facts",
    "reconcile_ledger_rows",
    "key_attribute_names",
}


def test_every_table_of_acknowledged_writes_fsyncs_the_parts_an_insert_writes(store: Store) -> None:
    """A disk that failed before the page cache reached it lost the trace-id index and trace links of acknowledged
    spans (their buffer segment already removed), and the queue and audit log after the API's 200."""
    migrate(store)
    tables = store.query_rows(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree'",
        {"db": store.database},
    )
    assert len(tables) > 20
    unsynced = {t["name"] for t in tables if "fsync_after_insert = 1" not in t["engine_full"]}
    assert unsynced - UNSYNCED_BY_DESIGN == set()


def test_the_test_fixtures_copy_of_the_schema_is_what_migrate_builds(store: Store, sibling_store: Store) -> None:
    """Most tests start from `migrated()`, a copy of the schema a first database got from migrate(): the copy
    must be that schema, every table and view, and leave migrate() nothing to do."""
    migrate(store)
    conftest._MIGRATED_SCHEMA.setdefault(type(store), conftest.schema_record(store))
    conftest.migrated(sibling_store)
    built, copied = conftest.schema_record(store), conftest.schema_record(sibling_store)
    assert len(built[0]) > 30 and any(d.startswith("CREATE MATERIALIZED VIEW") for d in built[0])
    assert copied[0] == built[0]
    assert copied[1].select(["Version", "Checksum"]).equals(built[1].select(["Version", "Checksum"]))
    assert migrate(sibling_store) == []
    sibling_store.insert_arrow("otel_traces", spans(3))  # the copied views fire as the migrated ones do
    store.insert_arrow("otel_traces", spans(3))
    counts = table_counts(store)
    assert counts["otel_traces"] == 3 and counts["otel_traces_trace_id_ts"] > 0
    assert table_counts(sibling_store) == counts


def test_insert_and_parameterized_read(store: Store) -> None:
    migrate(store)
    assert store.insert_arrow("otel_traces", spans(50)) == 50
    rows = store.query_rows(
        "SELECT SpanId, SpanAttributes['revops.invoice.id'] AS inv FROM $db.otel_traces "
        "WHERE TraceId = {t:String} AND SpanAttributes['revops.invoice.id'] IN {ids:Array(String)} ORDER BY SpanId",
        {"t": "ab" * 16, "ids": ["in_3", "in_7", "in_'x"]},
    )
    assert [r["inv"] for r in rows] == ["in_3", "in_7"]
    # the trace-id -> time range lookup is fed by the materialized view
    rng = store.query_rows(
        "SELECT min(Start) AS s, max(End) AS e FROM $db.otel_traces_trace_id_ts WHERE TraceId = {t:String}",
        {"t": "ab" * 16},
    )[0]
    assert rng["s"].value == T0 and rng["e"].value == T0 + 49


def test_every_view_of_a_table_fires_for_an_arrow_insert(chdb_data_dir: Path) -> None:
    """Regression: chDB's streaming Arrow insert skipped otel_traces' materialized views in about one fresh
    database in three (it depended on the order the views were registered in) and never ran the step view.
    The order is random per database (a copy of the schema too: its views get new ids), so a dozen fresh
    databases cover it all but certainly."""
    attrs = pa.array(
        [[("revops.invoice.id", f"in_{i}"), ("revops.step", "invoice_to_ledger")] for i in range(10)],
        type=OTEL_TRACES.field("SpanAttributes").type,
    )
    batch = spans(10)
    batch = batch.set_column(batch.schema.get_field_index("SpanAttributes"), "SpanAttributes", attrs)
    for _ in range(12):
        st = open_store(Settings(data_dir=chdb_data_dir, database=new_database(), clickhouse_url=None))
        try:
            conftest.migrated(st)
            sync_key_attributes(st, key_attribute_names())
            st.insert_arrow("otel_traces", batch, dedup_token="views_1")
            counts = {
                t: st.query_rows(f"SELECT count() AS n FROM $db.{t}")[0]["n"]
                for t in ("otel_traces_trace_id_ts", "business_key_links", "trace_key_links", "step_activity")
            }
            assert counts == {
                "otel_traces_trace_id_ts": 1,
                "business_key_links": 10,
                "trace_key_links": 10,
                "step_activity": 10,
            }, counts
        finally:
            st.command("DROP DATABASE IF EXISTS $db")


def test_a_batch_that_cannot_be_spooled_is_a_store_error(embedded_store: Store) -> None:
    """The embedded backend spools each batch under the data dir; a disk that refuses it fails the insert like
    any other store failure (callers retry StoreError), and nothing is written."""
    migrate(embedded_store)
    spool = embedded_store.data_dir.resolve() / "input_spool"  # type: ignore[attr-defined]
    aside = spool.with_name("input_spool.aside")
    if spool.exists():
        spool.rename(aside)
    spool.write_text("not a directory")
    try:
        with pytest.raises(StoreError, match="cannot spool the batch"):
            embedded_store.insert_arrow("otel_traces", spans(5))
    finally:
        spool.unlink()
        if aside.exists():
            aside.rename(spool)
    assert embedded_store.query_rows("SELECT count() AS n FROM $db.otel_traces")[0]["n"] == 0
    assert embedded_store.insert_arrow("otel_traces", spans(5)) == 5


def test_retried_insert_with_same_token_is_deduplicated(store: Store) -> None:
    migrate(store)
    batch = spans(100)
    store.insert_arrow("otel_traces", batch, dedup_token="wal_0001_0")
    store.insert_arrow("otel_traces", batch, dedup_token="wal_0001_0")  # the retry after a crash
    store.insert_arrow("otel_traces", spans(10, trace="cd" * 16), dedup_token="wal_0001_1")
    n = store.query_rows("SELECT count() AS n FROM $db.otel_traces")[0]["n"]
    assert n == 110
    # the token, not the content, is the identity: equal rows under two tokens are two inserts
    store.insert_arrow("otel_traces", spans(10, trace="ef" * 16), dedup_token="wal_0002_0")
    store.insert_arrow("otel_traces", spans(10, trace="ef" * 16), dedup_token="wal_0002_1")
    assert store.query_rows("SELECT count() AS n FROM $db.otel_traces")[0]["n"] == 130


def invoices(total: int, version: int, n: int = 3, currency: str = "USD") -> pa.Table:
    ts = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    return pa.Table.from_pydict(
        {
            "InvoiceId": [f"in_{i}" for i in range(n)],
            "CustomerId": ["cus_1"] * n,
            "Region": ["EU"] * n,
            "Currency": [currency] * n,
            "SubtotalMinor": [total] * n,
            "TaxMinor": [0] * n,
            "TotalMinor": [total] * n,
            "AmountPaidMinor": [0] * n,
            "AmountCreditedMinor": [0] * n,
            "Status": ["open"] * n,
            "IssuedAt": [ts] * n,
            "DueAt": [ts] * n,
            "FinalizedAt": [ts] * n,
            "PaidAt": [ts] * n,
            "UpdatedAt": [ts] * n,
            "SourceSystem": ["stripe"] * n,
            "Attributes": [[]] * n,
            "Version": [version] * n,
        },
        schema=BILLING_INVOICES,
    )


def test_replacing_tables_read_latest_version_despite_unmerged_duplicates(store: Store) -> None:
    migrate(store)
    store.insert_arrow("billing_invoices", invoices(100, version=1), dedup_token="pull_1")
    store.insert_arrow("billing_invoices", invoices(100, version=1), dedup_token="pull_2")  # pulled again
    store.insert_arrow("billing_invoices", invoices(250, version=2))
    raw = store.query_rows("SELECT count() AS n FROM $db.billing_invoices")[0]["n"]
    assert raw == 9  # parts are not merged yet: reads must tolerate it
    rows = store.query_rows(
        "SELECT count() AS n, sum(TotalMinor) AS total FROM $db.billing_invoices FINAL WHERE NOT IsDeleted"
    )[0]
    assert rows == {"n": 3, "total": 750}


def test_chunks_with_different_dictionaries_insert_on_both_backends(store: Store) -> None:
    """The simulator's bulk tables are dictionary-encoded per chunk, then concatenated: clickhouse-connect writes
    Arrow's IPC file format, one dictionary per column, and refused them ("Dictionary replacement detected")
    after the bulk load had emptied the state tables."""
    migrate(store)

    def encoded(table: pa.Table) -> pa.Table:
        cols = [
            c.dictionary_encode() if n in ("Region", "Currency") else c
            for n, c in zip(table.column_names, table.columns, strict=True)
        ]
        return pa.Table.from_arrays(cols, names=table.column_names)

    eur = invoices(100, version=1, currency="EUR").set_column(2, "Region", pa.array(["NA"] * 3))
    eur = eur.set_column(0, "InvoiceId", pa.array(["in_7", "in_8", "in_9"]))
    both = pa.concat_tables([encoded(invoices(100, version=1)), encoded(eur)], promote_options="permissive")
    assert both.column("Region").num_chunks == 2
    assert store.insert_arrow("billing_invoices", both) == 6
    rows = store.query_rows(
        "SELECT Region AS r, Currency AS c, count() AS n FROM $db.billing_invoices GROUP BY r, c ORDER BY r"
    )
    assert rows == [{"r": "EU", "c": "USD", "n": 3}, {"r": "NA", "c": "EUR", "n": 3}]


def test_map_and_datetime64_ns_round_trip(store: Store) -> None:
    migrate(store)
    store.insert_arrow("otel_traces", spans(1))
    row = store.query_rows("SELECT Timestamp, SpanAttributes, Events.Timestamp AS et FROM $db.otel_traces")[0]
    assert row["Timestamp"].value == T0  # nanoseconds survive
    assert row["et"][0].value == T0
    assert dict(row["SpanAttributes"]) == {"revops.invoice.id": "in_0", "quote": "it's \\ \t"}
    # a DateTime64(9) bound as a parameter keeps its nanoseconds too
    got = store.query_rows(
        "SELECT count() AS n FROM $db.otel_traces WHERE Timestamp = toDateTime64({ts:String}, 9)",
        {"ts": "2026-01-01 00:00:00.123456789"},
    )[0]["n"]
    assert got == 1


def test_money_stays_exact(store: Store) -> None:
    migrate(store)
    big = 2**61 + 7  # far beyond float's 2**53 exact range
    store.insert_arrow("billing_invoices", invoices(big, version=1, n=2, currency="JPY"))
    row = store.query_rows(
        "SELECT sum(TotalMinor) AS s, toTypeName(sum(TotalMinor)) AS t, max(TotalMinor) AS m "
        "FROM $db.billing_invoices FINAL"
    )[0]
    assert row["m"] == big and isinstance(row["m"], int)
    assert row["s"] == 2 * big and row["t"] == "Int64"
    assert float(big) * 2 != 2 * big  # the same sum in floats would be wrong
    one = store.query_rows("SELECT {a:Int64} + 1 AS v", {"a": big})[0]["v"]
    assert one == big + 1


def test_bad_sql_is_a_store_error(store: Store) -> None:
    with pytest.raises(StoreError):
        store.query_rows("SELECT * FROM $db.no_such_table")
    assert store.ping()


def test_http_fixture_takes_chunked_native_inserts(clickhouse_http: str) -> None:
    """The server path also works with clickhouse-connect's own Native insert (chunked body)."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(host="127.0.0.1", port=int(clickhouse_http.rsplit(":", 1)[1]))
    client.command("CREATE DATABASE IF NOT EXISTS native_t")
    client.command("CREATE TABLE IF NOT EXISTS native_t.x (a Int64, s String) ENGINE = MergeTree ORDER BY a")
    client.insert("native_t.x", [[i, f"s{i}"] for i in range(20_000)], column_names=["a", "s"])
    assert client.query("SELECT count(), sum(a) FROM native_t.x").result_rows == [(20_000, sum(range(20_000)))]
    client.command("DROP DATABASE native_t")


def test_both_backends_bind_the_same_values_and_refuse_the_same_ones(store: Store) -> None:
    """Found by a review: clickhouse-connect wrote a nested bool as ``True`` (refused by ClickHouse), and a value
    that cannot be bound was a (retried) StoreError on one backend and a TypeError on the other."""
    sql = "SELECT {x:Array(UInt8)} AS v, mapKeys({m:Map(String, UInt8)}) AS k, mapValues({m:Map(String, UInt8)}) AS w"
    got = store.query_rows(sql, {"x": [True, False], "m": {"a": True}})
    assert got == [{"v": [1, 0], "k": ["a"], "w": [1]}]
    with pytest.raises(TypeError):
        store.query_rows("SELECT {x:String} AS v", {"x": None})


def test_a_data_dir_path_with_a_quote_or_backslash_is_read_from(embedded_store: Store, tmp_path: Path) -> None:
    """The embedded backend reads spooled batches with file('<path>'): a path holding a quote or a backslash was
    refused at every write (a ValueError the flusher retried for ever) once it had opened and migrated fine."""
    from tower_core.store.base import file_source

    folder = tmp_path / "o'neil \\ data"
    folder.mkdir()
    batch = pa.table({"n": pa.array([1, 2, 3], pa.int64())})
    with pa.ipc.new_stream(folder / "batch.arrows", batch.schema) as writer:
        writer.write_table(batch)
    sql = f"SELECT sum(n) AS s FROM {file_source(str(folder / 'batch.arrows'), 'ArrowStream')}"
    assert embedded_store.query_rows(sql) == [{"s": 6}]


def test_a_clickhouse_url_naming_another_database_than_tower_database_is_refused(clickhouse_http: str) -> None:
    """The URL's database was silently replaced by TOWER_DATABASE (default ``tower``); switching to it silently
    would move an upgraded deployment to an empty database. Different names are a configuration error now."""
    named = new_database()
    st = open_store(Settings(clickhouse_url=f"{clickhouse_http}/{named}", database=named))  # the same: fine
    try:
        assert st.database == named
    finally:
        st.command("DROP DATABASE IF EXISTS $db")
        st.close()
    for url, database in ((f"{clickhouse_http}/{named}", "tower"), (f"{clickhouse_http}/{named}", "other")):
        with pytest.raises(ConfigError, match="set TOWER_DATABASE"):
            open_store(Settings(clickhouse_url=url, database=database))
    with pytest.raises(ConfigError, match="not a plain identifier"):
        open_store(Settings(clickhouse_url=f"{clickhouse_http}/my-db"))


@pytest.mark.parametrize("folder", ["tower-{prod}", "tower-{1..2}", "data*", "a?b", "x[1]", "costs$db"])
def test_a_data_dir_that_file_would_read_as_a_pattern_is_refused(tmp_path: Path, folder: str) -> None:
    """file() reads its path as a glob and statements carry $db: a data dir holding those characters made every
    spooled write read nothing, silently (or fail for ever). It is refused when the store opens."""
    from tower_core.store.embedded import EmbeddedStore

    with pytest.raises(ConfigError, match="choose another TOWER_DATA_DIR"):
        EmbeddedStore(tmp_path / folder, "db")


@pytest.mark.parametrize("name", ["tower\n", "tower\r\n", "to wer", "`tower`", ""])
def test_identifiers_with_a_trailing_newline_or_other_characters_are_refused(name: str) -> None:
    from pydantic import ValidationError

    from tower_core.store.base import check_identifier

    with pytest.raises(ValueError, match="not a safe identifier"):
        check_identifier(name)
    with pytest.raises(ValidationError):
        Settings(database=name)


def test_large_parameters_bind_on_both_backends(store: Store) -> None:
    """clickhouse-connect sends a query with large parameters as a multipart form (a replayed chunk's span ids
    are 50,000 of them): the same answer on both backends."""
    ids = [f"{i:032x}" for i in range(20_000)]
    rows = store.query_rows("SELECT length({ids:Array(String)}) AS n, {ids:Array(String)}[20000] AS last", {"ids": ids})
    assert rows == [{"n": 20_000, "last": ids[-1]}]


def test_one_insert_may_span_more_partitions_than_clickhouses_default_limit(store: Store) -> None:
    """otel_traces is partitioned by day: a backfill of 101 days in one acknowledged request is one insert, which
    ClickHouse's default (100 partitions per insert) refused on every retry."""
    migrate(store)
    sync_key_attributes(store, key_attribute_names())
    day = 86_400 * 10**9
    table = pa.concat_tables([spans(1, trace=f"{d + 1:032x}", start_ns=T0 - d * day) for d in range(101)])
    store.insert_arrow("otel_traces", table)
    assert store.query_rows("SELECT count() AS n, uniqExact(toDate(Timestamp)) AS d FROM $db.otel_traces")[0] == {
        "n": 101,
        "d": 101,
    }


def test_spool_files_a_killed_process_left_are_removed_when_the_store_opens(tmp_path: Path) -> None:
    """Each kill -9 during a flush left its spooled chunk (up to tens of MB) under the data dir for good."""
    import subprocess
    import sys

    data = tmp_path / "data"
    left = data / "input_spool" / "input-killed.bin"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"\0" * 100_000)
    opens = (
        "import sys; from pathlib import Path; from tower_core.settings import Settings; "
        "from tower_core.store import open_store; "
        "open_store(Settings(data_dir=Path(sys.argv[1]))).query_rows('SELECT 1')"
    )
    subprocess.run([sys.executable, "-c", opens, str(data)], check=True, timeout=120, capture_output=True)
    assert not left.exists() and left.parent.is_dir()


def test_the_server_backend_gives_up_on_a_server_that_stops_answering(clickhouse_http: str) -> None:
    """Only the connect timeout was set: a server that took the request and never answered held a request thread
    (or a run) for clickhouse-connect's default 300 s. TOWER_CLICKHOUSE_QUERY_TIMEOUT_S bounds the wait."""
    import socket
    import threading
    import time

    db = new_database()
    store = open_store(Settings(clickhouse_url=f"{clickhouse_http}/{db}", database=db, clickhouse_query_timeout_s=1))
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="(?i)timed? ?out"):
        store.query_rows("SELECT sleep(3)")  # the real server, answering later than the bound
    assert time.monotonic() - t0 < 2.5
    assert store.query_rows("SELECT 1 AS one") == [{"one": 1}]  # the next query goes through

    # a server that accepts the connection and never answers: refused at start, not after 300 s
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        mute.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(mute.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="cannot reach ClickHouse"):
            open_store(
                Settings(clickhouse_url=f"http://127.0.0.1:{mute.getsockname()[1]}", clickhouse_query_timeout_s=1)
            )
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        acceptor.join()
        for conn in held:
            conn.close()
        mute.close()
