"""Security review, as tests: secrets stay out of logs and storage, SQL is parameterized, tokens are hashed."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from collector.access_log import REDACTED, redact_query
from connectors.stripe.signature import sign
from tests.conftest import migrated
from tests.server import ROOT, TowerServer
from tower_core.store import Store

ADMIN = "twr_admin_bootstrap_S3cr3t_value"
WEBHOOK_SECRET = "whsec_sup3r_s3cret_rotation_1"
WRITE_KEY = "wk_s3cret_write_key"
PII_KEY = "pii_hmac_k3y_never_logged"
EMAIL = "jane.doe.secret@example.com"
WRONG_TOKEN = "twr_wrong_token_presented_by_attacker"
INGEST = "ingest_t0ken_for_otel_exporters"


def test_secrets_never_reach_logs_or_storage(tmp_path: Path) -> None:
    env = {
        "TOWER_ADMIN_TOKEN": ADMIN,
        "TOWER_STRIPE_WEBHOOK_SECRETS": json.dumps([WEBHOOK_SECRET]),
        "TOWER_CDP_WRITE_KEYS": json.dumps([WRITE_KEY]),
        "TOWER_CDP_PII_HMAC_KEY": PII_KEY,
        "TOWER_INGEST_TOKENS": json.dumps([INGEST]),
        "TOWER_LOG_LEVEL": "DEBUG",
        # what the requests wrote stays in the buffer until the stop, so the buffer is read while it holds it
        "TOWER_FLUSH_INTERVAL_S": "120",
        "TOWER_FLUSH_ROWS": "1000000",
    }
    with TowerServer(tmp_path, **env) as srv:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        created = httpx.post(f"{srv.url}/api/tokens", json={"name": "alice", "role": "operator"}, headers=admin)
        assert created.status_code == 201
        operator_token = created.json()["token"]
        assert httpx.get(f"{srv.url}/api/tokens", headers={"Authorization": f"Bearer {WRONG_TOKEN}"}).status_code == 401
        listed = httpx.get(f"{srv.url}/api/tokens", headers=admin).text
        assert operator_token not in listed and "token_hash" not in listed.lower()
        body = orjson.dumps(
            {
                "id": "evt_sec_1",
                "object": "event",
                "type": "invoice.paid",
                "created": int(time.time()),
                "data": {
                    "object": {
                        "id": "in_sec",
                        "object": "invoice",
                        "customer": "cus_sec",
                        "currency": "usd",
                        "total": 100,
                        "amount_paid": 100,
                        "customer_email": EMAIL,
                    }
                },
            }
        )
        now = int(time.time())
        ok = httpx.post(
            f"{srv.url}/webhooks/stripe",
            content=body,
            headers={
                "Stripe-Signature": f"t={now},v1={sign(body, WEBHOOK_SECRET, now)}",
                "Content-Type": "application/json",
            },
        )
        assert ok.status_code == 200, ok.text
        bad = httpx.post(f"{srv.url}/webhooks/stripe", content=body, headers={"Stripe-Signature": f"t={now},v1=00"})
        assert bad.status_code == 400
        auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
        seg = httpx.post(
            f"{srv.url}/v1/identify",
            json={"userId": "u1", "traits": {"email": EMAIL, "name": "Jane"}},
            headers={"Authorization": f"Basic {auth}"},
        )
        assert seg.status_code == 200, seg.text
        event = {"specversion": "1.0", "id": "sec-1", "source": "billing", "type": "invoice.paid"}
        events = f"{srv.url}/v1/events"
        ce = {"Content-Type": "application/cloudevents+json"}
        assert httpx.post(events, json=event, headers={**ce, "Authorization": f"Bearer {INGEST}"}).status_code == 200
        assert (
            httpx.post(events, json=event, headers={**ce, "Authorization": f"Bearer {WRONG_TOKEN}"}).status_code == 401
        )
        buffered = b"".join(p.read_bytes() for p in (tmp_path / "wal").rglob("*") if p.is_file())
        assert b"evt_sec_1" in buffered and b"sec-1" in buffered  # the buffer holds what was sent
    logs = (tmp_path / "server.log").read_text(errors="replace")
    assert "POST /webhooks/stripe" in logs  # the log is the real one
    for secret in (ADMIN, WEBHOOK_SECRET, WRITE_KEY, PII_KEY, EMAIL, WRONG_TOKEN, operator_token, INGEST):
        assert secret not in logs, f"a secret reached the log: {secret[:8]}…"
    # the stop flushed the buffer: every row of every table of the store, as text
    stored = subprocess.run(
        [sys.executable, "-c", DUMP_STORE, str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "evt_sec_1" in stored and "sec-1" in stored and "u1" in stored  # the dump holds what was sent
    for secret in (ADMIN, WEBHOOK_SECRET, WRITE_KEY, PII_KEY, EMAIL, operator_token, INGEST):
        assert secret.encode() not in buffered, f"a secret reached the buffer: {secret[:8]}…"
        assert secret not in stored, f"a secret reached the store: {secret[:8]}…"


# every row of every table of the tower's database, as text (a separate process: one chDB path per process)
DUMP_STORE = """
import sys
from pathlib import Path
from tower_core.settings import Settings
from tower_core.store import open_store
s = open_store(Settings(data_dir=Path(sys.argv[1])))
for t in s.query_rows("SELECT name FROM system.tables WHERE database = {db:String} AND engine NOT LIKE '%View'",
                      {"db": s.database}):
    print(t["name"], s.query_rows(f"SELECT * FROM $db.`{t['name']}`"))
"""


def test_sql_is_parameterized_everywhere() -> None:
    """ruff's S608 flags SQL built from strings with variables; the project enables it for all its code."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--select",
            "S608",
            "--output-format",
            "concise",
            "tower_core",
            "collector",
            "reconciler",
            "connectors",
            "dashboard",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout
    # and the rule really fires on string-built SQL
    probe = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "S608", "--stdin-filename", "x.py", "-"],
        input='def f(v):\n    return f"SELECT * FROM t WHERE a = {v}"\n',
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 1 and "S608" in probe.stdout


def test_sql_lives_only_in_the_store() -> None:
    """Queries are built in tower_core/store only; elsewhere no code calls the store with SQL text."""
    offenders = []
    for pkg in ("collector", "reconciler", "connectors", "dashboard"):
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            for verb in ("SELECT ", "INSERT INTO", "ALTER TABLE", "CREATE TABLE"):
                if f'"{verb}' in text or f"'{verb}" in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {verb}")
    assert offenders == []


def test_cdp_profiles_pulled_by_the_reconciler_keep_no_raw_pii() -> None:
    import datetime as dt

    from connectors.segment.tracking import HASH_PREFIX, PiiPolicy
    from reconciler.runner import scrub_profile
    from tower_core.models import CdpProfile

    profile = CdpProfile(
        cdp_user_id="u1",
        customer_id="cus_1",
        name="Jane Doe",
        email=EMAIL,
        region="EU",
        updated_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        traits={"email": EMAIL, "plan": "pro"},
    )
    hashed = scrub_profile(profile, PiiPolicy.build("hash", PII_KEY, ["email", "name", "phone"]))
    assert EMAIL not in repr(hashed) and "Jane" not in repr(hashed)
    assert hashed.email.startswith(HASH_PREFIX)  # a stable keyed pseudonym, not the address
    assert hashed.email == scrub_profile(profile, PiiPolicy.build("hash", PII_KEY, ["email"])).email
    assert (hashed.cdp_user_id, hashed.customer_id, hashed.traits["plan"]) == ("u1", "cus_1", "pro")
    dropped = scrub_profile(profile, None)  # no key configured: dropped, never stored raw
    assert (dropped.email, dropped.name, dropped.traits) == ("", "", {})
    # a user id that is an address: the pseudonym the CDP's events carry for it, or nothing without a key
    addressed = dataclasses.replace(profile, cdp_user_id=EMAIL)
    policy = PiiPolicy.build("hash", PII_KEY, ["email"])
    assert scrub_profile(addressed, policy).cdp_user_id == policy.identifier(EMAIL)
    assert scrub_profile(addressed, None).cdp_user_id == ""


def test_billing_customers_pulled_by_the_reconciler_keep_no_raw_pii(embedded_store: Store) -> None:
    """Billing customers carry a name and an e-mail the reconciler never reads (it compares ids): they reach the
    store as the same keyed pseudonyms as CDP PII, or not at all without a key."""
    from connectors.segment.tracking import HASH_PREFIX, PiiPolicy
    from connectors.simulator import Estate, EstateConfig
    from reconciler.runner import pull

    migrated(embedded_store)
    estate = Estate.generate(EstateConfig(seed=3, customers=8, invoices=20))
    raw = estate.billing.pull_customers(None, 1000).items
    assert raw and all(c.name and "@" in c.email for c in raw)
    policy = PiiPolicy.build("hash", PII_KEY, ["email", "name"])
    assert pull(embedded_store, estate.billing, None, policy)["customers"] == len(raw)
    rows = embedded_store.query_rows("SELECT CustomerId AS id, Name AS n, Email AS e FROM $db.billing_customers")
    stored = {r["id"]: (r["n"], r["e"]) for r in rows}
    assert set(stored) == {c.customer_id for c in raw}  # the join keys stay
    for c in raw:
        name, email = stored[c.customer_id]
        assert name == policy.digest(c.name) and email == policy.digest(c.email) and email.startswith(HASH_PREFIX)
    kept = " ".join(f"{n} {e}" for n, e in stored.values())
    assert not any(c.email in kept or c.name in kept for c in raw)


def test_migration_0017_blanks_billing_pii_stored_before_the_pull_pseudonymized_it(store: Store) -> None:
    """Customers pulled before the change kept raw names and e-mails (their stream resumes from its cursor, so
    they are not pulled again): 0017 blanks them, keeps pseudonyms, and changes nothing when run again."""
    import datetime as dt

    from tower_core.models import Customer
    from tower_core.store import migrate as run_migrations
    from tower_core.store.migrate import available
    from tower_core.store.reconcile import write_customers

    for m in available():
        if m.version < 17:
            for statement in m.statements():
                store.command(statement)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    raw = Customer("cus_raw", "Jane Doe", EMAIL, "EU", "EUR", t0, t0)
    kept = Customer("cus_ok", "hmac-sha256:ab", "hmac-sha256:cd", "EU", "EUR", t0, t0)
    write_customers(store, [raw, kept])
    (m17,) = [m for m in available() if m.version == 17]
    for _ in range(2):
        for statement in m17.statements():
            store.command(statement)
    rows = store.query_rows("SELECT CustomerId AS id, Name AS n, Email AS e FROM $db.billing_customers ORDER BY id")
    assert [(r["id"], r["n"], r["e"]) for r in rows] == [
        ("cus_ok", "hmac-sha256:ab", "hmac-sha256:cd"),
        ("cus_raw", "", ""),
    ]
    run_migrations(store)  # the rest of the chain records it and applies nothing twice


def test_query_values_holding_an_address_are_redacted_from_access_log_lines() -> None:
    for sent in ("alice@example.com", "alice%40example.com", "Alice%40Example.COM", "a+b%40x.io"):
        assert redact_query(f"/api/cdp/events?user_id={sent}&limit=5") == f"/api/cdp/events?user_id={REDACTED}&limit=5"
    assert redact_query("/api/x?a%40b.com=1&k=v") == f"/api/x?{REDACTED}=&k=v"  # an address as a name
    for kept in ("/api/cdp/events?user_id=seg-user-1", "/api/drift?limit=50", "/healthz", "/api/x?q=%4"):
        assert redact_query(kept) == kept
