"""Times are bound and read as UTC whatever the process's time zone: a tower on a machine set to New York used
to read every bound time 5 hours off, so incremental runs compared none of the keys that had just changed.
Run in a subprocess with TZ set (the zone is fixed when chDB starts), on the real chDB engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.server import ROOT

SCRIPT = """
import datetime as dt, json, sys, time
from pathlib import Path
from tower_core.models import Invoice
from tower_core.settings import Settings
from tower_core.store import migrate, open_store
from tower_core.store import reconcile as q

store = open_store(Settings(data_dir=Path(sys.argv[1]), database="tz", clickhouse_url=None))
migrate(store)
now = dt.datetime.now(dt.UTC)
row = store.query_rows("SELECT toUnixTimestamp64Micro({t:DateTime64(6)}) AS us, timezone() AS tz", {"t": now})[0]
inv = Invoice("in_tz_1", "cus_1", "EU", "EUR", 1000, 0, 1000, "open", now, now)
q.write_invoices(store, [inv])
scope = q.build_scope(store, "run-tz", now - dt.timedelta(seconds=30), customers=False)
day = store.query_rows("SELECT toString(toDate(IssuedAt)) AS d FROM $db.billing_invoices")[0]["d"]
print(json.dumps({"bound_us": row["us"], "sent_us": int(now.timestamp() * 1e6), "tz": row["tz"],
                  "scope": scope, "day": day, "utc_day": now.date().isoformat()}))
"""


def test_times_are_utc_in_a_process_set_to_another_zone(tmp_path: Path) -> None:
    env = {**os.environ, "TZ": "America/New_York", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "chdb")], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["tz"] == "UTC"
    assert got["bound_us"] == got["sent_us"]  # the instant sent is the instant bound
    assert got["scope"] == {"invoice": 1}  # a change 0 s ago is after a watermark 30 s ago
    assert got["day"] == got["utc_day"]
