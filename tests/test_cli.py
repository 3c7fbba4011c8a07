"""The ``tower`` CLI as a user runs it: real subprocesses, real chDB paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port
from tower_core.store.migrate import available

TOWER = [sys.executable, "-m", "tower_core.cli"]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    return subprocess.run(TOWER + args, cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("tower: error: ")
    return lines[0]


def test_migrate_twice_then_status(tmp_path: Path) -> None:
    first = run(["migrate"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_base" in first.stdout
    second = run(["migrate"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "nothing to apply" in second.stdout and "applied" not in second.stdout
    status = run(["status"], tmp_path)
    assert status.returncode == 0, status.stderr
    assert "backend: embedded" in status.stdout
    latest = available()[-1].version
    assert f"schema version: {latest}" in status.stdout
    assert "otel_traces" in status.stdout and "schema_migrations" in status.stdout
    assert (tmp_path / ".tower" / "data" / "metadata").is_dir()  # default TOWER_DATA_DIR


def test_unreachable_clickhouse_url(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    line = one_error_line(run(["status"], tmp_path, TOWER_CLICKHOUSE_URL=f"http://u:secret@127.0.0.1:{port}/tower"))
    assert f"127.0.0.1:{port}" in line and "refused" in line
    assert "secret" not in line  # the password is never printed


def test_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = one_error_line(run(["migrate"], tmp_path, TOWER_DATA_DIR=str(blocker / "data")))
    assert "not writable" in line and str(blocker) in line


def test_data_dir_owned_by_another_process(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        TOWER + ["serve", "--port", str(port)],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("TOWER_")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=60, proc=server)
        line = one_error_line(run(["status"], tmp_path))
        assert f"PID {server.pid}" in line and "owned" in line
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_invalid_setting_is_one_line(tmp_path: Path) -> None:
    line = one_error_line(run(["status"], tmp_path, TOWER_DATABASE="bad-name; DROP"))
    assert "TOWER_DATABASE" in line


def test_an_unwritable_manifest_is_one_line_before_any_estate_is_written(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for path in (tmp_path, tmp_path / "a-file" / "manifest.json"):
        line = one_error_line(
            run(["simulate", "bulk", "--invoices", "10", "--manifest", str(path)], tmp_path, TOWER_DATA_DIR="d")
        )
        assert "--manifest" in line
    assert not (tmp_path / "d").exists()  # nothing was loaded without its manifest


@pytest.mark.parametrize("cmd", [["--help"], ["serve", "--help"]])
def test_help(cmd: list[str], tmp_path: Path) -> None:
    proc = run(cmd, tmp_path)
    assert proc.returncode == 0 and "Usage" in proc.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["nope"], "No such command 'nope'"),
        (["simulate", "manifest", "--invoices", "abc"], "Invalid value for '--invoices'"),
        (["simulate", "manifest", "--nope"], "No such option: --nope"),
        (["simulate", "manifest", "--seed", "-1"], "Invalid value for '--seed'"),
        (["simulate", "manifest", "--seed", "18446744073709551616"], "Invalid value for '--seed'"),
        (["simulate", "bulk", "--as-of", "0001-01-05"], "--as-of '0001-01-05' is not an ISO date"),
        (["simulate", "bulk", "--days", "1000000"], "Invalid value for '--days'"),
        (["simulate", "run", "--port", "99999"], "Invalid value for '--port'"),
        (["simulate", "run", "--minutes", "0.5"], "Invalid value for '--minutes'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], says: str, tmp_path: Path) -> None:
    """typer >= 0.29 raises its own copy of click's usage errors: they printed a traceback (exit 1)."""
    assert says in one_error_line(run(args, tmp_path))


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"TOWER_CORS_ORIGINS": "[oops"}, "TOWER_CORS_ORIGINS"),
        ({"TOWER_INGEST_TOKENS": "secret123"}, "TOWER_INGEST_TOKENS"),
        ({"TOWER_RECONCILE_TOLERANCE_ABS_MINOR": '{"*":'}, "TOWER_RECONCILE_TOLERANCE_ABS_MINOR"),
        ({"TOWER_PORT": "70000"}, "TOWER_PORT"),
        ({"TOWER_STRIPE_WEBHOOK_TOLERANCE_S": "-1"}, "TOWER_STRIPE_WEBHOOK_TOLERANCE_S"),  # no replay window at all
        # each started and then broke the server: a busy loop, every request 413 (/readyz too)
        ({"TOWER_FLUSH_INTERVAL_S": "0"}, "TOWER_FLUSH_INTERVAL_S"),
        ({"TOWER_WAL_MAX_BYTES": "-5"}, "TOWER_WAL_MAX_BYTES"),
        ({"TOWER_API_MAX_BODY_BYTES": "-1"}, "TOWER_API_MAX_BODY_BYTES"),
        ({"TOWER_RECONCILE_GRACE_S": '{"*": -1}'}, "TOWER_RECONCILE_GRACE_S"),
        # the reconcile SQL reads them as Int64: 2**63 wrapped negative and made a 50-cent difference drift
        ({"TOWER_RECONCILE_TOLERANCE_REL_BP": '{"USD": 9223372036854775808}'}, "must be 0 to"),
        # a key that is no currency code was kept and never matched: USD kept the default tolerance
        ({"TOWER_RECONCILE_TOLERANCE_ABS_MINOR": '{"usd": 500}'}, "not an ISO 4217 currency code"),
        # a typo in a mapping's target dropped it without a word: its spans' invoices were never found
        ({"TOWER_KEY_ATTRIBUTE_MAP": '{"stripe.invoice_id": "revops.invoice_id"}'}, "revops.invoice.id"),
        # sent in a header: a 116-line traceback from the HTTP client (the token itself must not be echoed)
        ({"TOWER_API_TOKEN": "secret123-\u00e9"}, "TOWER_API_TOKEN"),
        # a '/' in the password ends the host part: urlparse's own error quoted the URL, password and all
        ({"TOWER_CLICKHOUSE_URL": "http://default:secret123/x@127.0.0.1:1/tower"}, "percent-encode"),
        # past what a wait or the scheduler's date arithmetic holds: the flusher's thread died while ingest said
        # 200; the scheduler's add_job overflowed (a traceback, or exit 139)
        ({"TOWER_FLUSH_INTERVAL_S": "1e10"}, "TOWER_FLUSH_INTERVAL_S"),
        ({"TOWER_RECONCILE_INTERVAL_S": "inf"}, "TOWER_RECONCILE_INTERVAL_S"),
        ({"TOWER_SLA_EVAL_INTERVAL_S": "1e12"}, "TOWER_SLA_EVAL_INTERVAL_S"),
        ({"TOWER_RECONCILE_FULL_INTERVAL_S": "nan"}, "TOWER_RECONCILE_FULL_INTERVAL_S"),
        # httpx refused them later, with a 100-line traceback
        ({"TOWER_ALERTMANAGER_URL": "http://user:secret123@127.0.0.1:notaport"}, "TOWER_ALERTMANAGER_URL"),
        ({"TOWER_SLA_WEBHOOK_URLS": '["https://hooks.example.com:xx/secret123"]'}, "entry 0 is not a valid URL"),
        # an empty secret is one anyone holds: a webhook signed with "" was accepted
        ({"TOWER_STRIPE_WEBHOOK_SECRETS": '["whsec_secret123", ""]'}, "entry 1 must be non-empty"),
        ({"TOWER_INGEST_TOKENS": '["secret123", " "]'}, "TOWER_INGEST_TOKENS"),
        # a misspelt class was kept and never matched: that class kept the default grace
        ({"TOWER_RECONCILE_GRACE_S": '{"missing-in-erp": 60}'}, "'missing-in-erp' is not a drift class"),
        # a class with no timing gap was accepted, and its grace had no effect (docs review)
        ({"TOWER_RECONCILE_GRACE_S": '{"*": 60, "missing_in_billing": 86400}'}, "'missing_in_billing' has no grace"),
        # a rule across settings named a variable that does not exist (TOWER_SETTINGS)
        ({"TOWER_CDP_WRITE_KEYS": '["secret123"]'}, "invalid settings: Value error, TOWER_CDP_PII_HMAC_KEY"),
    ],
)
def test_a_malformed_json_setting_or_port_is_one_line(env: dict[str, str], says: str, tmp_path: Path) -> None:
    """A typo in a JSON-typed variable failed before validation: a 138-line traceback, exit 1."""
    line = one_error_line(run(["status"], tmp_path, TOWER_DATA_DIR=str(tmp_path / "d"), **env))
    assert says in line and "secret123" not in line


def test_ports_out_of_range_or_taken_fail_with_one_line(tmp_path: Path) -> None:
    """`tower dashboard` on a taken port printed Streamlit's complaint and exited 0; --port -5 was a traceback."""
    import socket

    assert "TOWER_PORT" in one_error_line(run(["serve", "--port", "-5"], tmp_path))
    assert "TOWER_DASHBOARD_PORT" in one_error_line(run(["dashboard", "--port", "-1"], tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(run(["dashboard", "--port", str(port)], tmp_path, TOWER_DASHBOARD_HOST="127.0.0.1"))
    assert f"127.0.0.1:{port}" in line


@pytest.mark.parametrize("which", ["TOWER_PORT", "TOWER_SIMULATOR_PORT", "TOWER_DASHBOARD_PORT"])
def test_the_demo_with_a_port_taken_starts_nothing(which: str, tmp_path: Path) -> None:
    """With its API port taken by another tower, the demo's API child failed while the other answered the
    readiness check: the estate then sent its simulated telemetry there. Now it stops before starting anything."""
    import socket

    ports = {"TOWER_PORT": free_port(), "TOWER_SIMULATOR_PORT": free_port(), "TOWER_DASHBOARD_PORT": free_port()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports[which] = taken.getsockname()[1]
        env = {k: str(v) for k, v in ports.items()}
        line = one_error_line(run(["demo"], tmp_path, TOWER_DATA_DIR=str(tmp_path / ".tower" / "data"), **env))
    assert f"127.0.0.1:{ports[which]}" in line
    assert not (tmp_path / ".tower").exists()  # not even the run counter


def test_the_demo_refuses_an_api_url_that_is_not_its_own_api(tmp_path: Path) -> None:
    """TOWER_API_URL naming another tower: the demo's API started on TOWER_PORT while the estate sent its
    simulated telemetry to the other one. With only TOWER_PORT changed it waited 90 s on port 8000."""
    from tower_core.demo import demo_api_url
    from tower_core.settings import Settings

    api, other = free_port(), free_port()
    env = {"TOWER_PORT": str(api), "TOWER_SIMULATOR_PORT": str(free_port()), "TOWER_DASHBOARD_PORT": str(free_port())}
    env["TOWER_API_URL"] = f"http://127.0.0.1:{other}"
    line = one_error_line(run(["demo"], tmp_path, TOWER_DATA_DIR=str(tmp_path / ".tower" / "data"), **env))
    assert "TOWER_API_URL" in line and f"127.0.0.1:{api}" in line
    assert not (tmp_path / ".tower").exists()
    assert demo_api_url(Settings(port=api)) == f"http://127.0.0.1:{api}"  # only the port set: it follows
    assert demo_api_url(Settings(host="0.0.0.0", port=api, api_url=f"http://localhost:{api}/")) == (
        f"http://localhost:{api}"
    )


def test_serve_on_a_taken_port_is_one_line_before_the_store_is_opened(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(run(["serve", "--port", str(port)], tmp_path, TOWER_DATA_DIR=str(tmp_path / "d")))
    assert f"127.0.0.1:{port}" in line and not (tmp_path / "d").exists()


def test_a_token_name_with_markup_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    """The offline path accepted '[/x] alice', stored the token, then crashed printing it (rich markup): the
    secret was never shown and `token list` failed from then on."""
    env = {"TOWER_DATA_DIR": str(tmp_path / "d"), "TOWER_API_URL": f"http://127.0.0.1:{free_port()}"}
    assert "--name" in one_error_line(run(["token", "create", "--name", "[/x] alice"], tmp_path, **env))
    listed = run(["token", "list"], tmp_path, **env)
    assert listed.returncode == 0 and "alice" not in listed.stdout, listed.stderr


def test_revoking_an_empty_or_odd_token_id_is_one_line(tmp_path: Path) -> None:
    """An empty id reached the API as /api/tokens/ and came back as "the API answered 307"."""
    env = {"TOWER_DATA_DIR": str(tmp_path / "d"), "TOWER_API_URL": f"http://127.0.0.1:{free_port()}"}
    for token_id in ("", "../runs"):
        assert "not a token id" in one_error_line(run(["token", "revoke", token_id], tmp_path, **env))


def test_no_command_prints_the_help_without_an_empty_error(tmp_path: Path) -> None:
    proc = run([], tmp_path)
    assert proc.returncode == 2 and "Usage" in proc.stdout and "error" not in proc.stderr


class MisbehavingApi:
    """A loopback stand-in for an API behind a broken proxy (no real API answers HTML or a list like this):
    POST /api/runs starts run r1; GET /api/runs/r1 answers ``run_answer``; other GETs answer an HTML page."""

    def __init__(self, run_answer: tuple[int, str, str]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        answer = run_answer

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, ctype: str, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self._send(202, "application/json", '{"run_id": "r1"}')

            def do_GET(self) -> None:
                if self.path == "/readyz":
                    self._send(200, "application/json", "{}")
                elif self.path.startswith("/api/runs/r1"):
                    self._send(*answer)
                else:
                    self._send(200, "text/html", "<html>maintenance</html>")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ((502, "text/html", "<html>Bad Gateway</html>"), "502"),
        ((404, "application/json", '{"detail": "run r1 not found"}'), "not found"),  # it spun for an hour
        ((200, "text/html", "<html>ok</html>"), "JSON object"),
    ],
)
def test_the_cli_reports_an_api_answer_it_cannot_read_in_one_line(
    answer: tuple[int, str, str], says: str, tmp_path: Path
) -> None:
    api = MisbehavingApi(answer)
    try:
        env = {"TOWER_API_URL": api.url, "TOWER_API_TOKEN": "twr_x", "TOWER_ADMIN_TOKEN": "adm"}
        assert says in one_error_line(run(["reconcile"], tmp_path, **env))
        # the token and dead-letter commands through the same proxy: an HTML page is not a list of tokens
        assert "unexpected" in one_error_line(run(["token", "list"], tmp_path, **env))
        assert "unexpected" in one_error_line(run(["ingest", "dead-letters"], tmp_path, **env))
    finally:
        api.close()


@pytest.mark.parametrize("level", ["INFO", "warning"])
def test_the_towers_own_log_lines_carry_time_level_and_logger_at_the_chosen_level(level: str, tmp_path: Path) -> None:
    """Nothing configured the tower's loggers: its INFO lines were dropped and warnings printed bare."""
    import re

    from tests.server import TowerServer

    with TowerServer(tmp_path, TOWER_LOG_LEVEL=level) as srv:
        pass
    log = srv.log.read_text()
    line = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tower\.api: serving on the embedded store"
    started = re.search(line, log, re.M)
    assert (started is not None) == (level == "INFO"), log[-2000:]


def test_token_commands_go_through_an_api_whose_ingest_is_not_ready(tmp_path: Path) -> None:
    """Under ingest back-pressure /readyz answers 503: the token commands took that for "no API" and tried the
    store the API holds, so a leaked token could not be revoked with `tower token revoke`."""
    import httpx

    from tests.server import TowerServer
    from tests.test_wal import request

    env = {"TOWER_WAL_MAX_BYTES": "200000", "TOWER_FLUSH_INTERVAL_S": "3600", "TOWER_FLUSH_ROWS": "100000000"}
    with TowerServer(tmp_path / "srv", **env) as srv:
        for seed in range(30):  # ~17 kB each, until the buffer is 90% full
            body = request(200, seed=seed)
            httpx.post(f"{srv.url}/v1/traces", content=body, headers={"Content-Type": "application/x-protobuf"})
            if httpx.get(f"{srv.url}/readyz").status_code == 503:
                break
        assert httpx.get(f"{srv.url}/readyz").status_code == 503
        cli = {k: srv.env[k] for k in ("TOWER_DATA_DIR", "TOWER_API_URL", "TOWER_ADMIN_TOKEN")}
        created = run(["token", "create", "--name", "leaver", "--role", "operator"], tmp_path, **cli)
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip().splitlines()[-1]
        me = httpx.get(f"{srv.url}/api/tokens/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200
        tokens = httpx.get(f"{srv.url}/api/tokens", headers=srv.auth).json()
        token_id = next(t["token_id"] for t in tokens if t["name"] == "leaver")
        revoked = run(["token", "revoke", token_id], tmp_path, **cli)
        assert revoked.returncode == 0, revoked.stderr
        assert httpx.get(f"{srv.url}/api/tokens/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_the_store_and_the_buffer_are_private_to_the_user_the_tower_runs_as(tmp_path: Path) -> None:
    """chDB writes its parts world-readable (0644) under a usual umask: any local user could copy invoices,
    customers, the audit log and token hashes out of the data dir."""
    import stat

    old = os.umask(0o022)
    try:
        (tmp_path / "made-open").mkdir(mode=0o755)  # a dir that exists already, open to all
        for data in ("fresh/data", "made-open"):
            proc = run(["migrate"], tmp_path, TOWER_DATA_DIR=str(tmp_path / data))
            assert proc.returncode == 0, proc.stderr
            assert stat.S_IMODE((tmp_path / data).stat().st_mode) == 0o700
    finally:
        os.umask(old)
    from collector.wal import WriteAheadBuffer

    WriteAheadBuffer(tmp_path / "wal", max_bytes=1_000_000).close()
    assert stat.S_IMODE((tmp_path / "wal").stat().st_mode) == 0o700


def test_an_answer_or_run_error_holding_a_proxys_page_is_one_line() -> None:
    """A proxy's HTML 502 page (the API behind it, or a source a run pulls from) spread `tower: error: ...` over
    eight lines."""
    import httpx

    from reconciler.runner import RunFailed, _error_line
    from tower_core.api_answers import detail, json_answer
    from tower_core.errors import ConfigError

    page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<h1>502 Bad Gateway</h1>\r\n</body>\r\n"
    answer = httpx.Response(502, text=page)
    flat = "<html> <head><title>502 Bad Gateway</title></head> <body> <h1>502 Bad Gateway</h1> </body>"
    assert detail(answer) == flat
    with pytest.raises(ConfigError) as refused:
        json_answer(answer, "tokens")
    assert "\n" not in str(refused.value) and "502 Bad Gateway" in str(refused.value)
    assert _error_line(RunFailed(f"pull failed: HTTP 502 {page}")) == f"pull failed: HTTP 502 {detail(answer)}"


def test_a_stopped_dashboard_stops_streamlit_with_it(tmp_path: Path) -> None:
    """SIGTERM (a service manager's or `docker stop`'s) ended `tower dashboard` and left Streamlit serving on its
    port, so the next start failed on a taken port; as a container's PID 1 the command ignored SIGTERM."""
    import signal
    import socket
    import time

    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    env = {**clean, "TOWER_DASHBOARD_HOST": "127.0.0.1", "TOWER_API_URL": f"http://127.0.0.1:{free_port()}"}
    proc = subprocess.Popen([*TOWER, "dashboard", "--port", str(port)], cwd=tmp_path, env=env)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    break  # nothing serves the port any more
            assert time.monotonic() < deadline, "Streamlit still serves the dashboard's port"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dead_letters_without_an_api_names_a_buffer_directory_that_does_not_exist(tmp_path: Path) -> None:
    """A mistyped TOWER_WAL_DIR with no API up listed an empty box: '0 record(s) set aside'."""
    env = {"TOWER_API_URL": f"http://127.0.0.1:{free_port()}", "TOWER_WAL_DIR": str(tmp_path / "no-such-wal")}
    line = one_error_line(run(["ingest", "dead-letters"], tmp_path, **env))
    assert "no-such-wal" in line and "does not exist" in line
    (tmp_path / "wal").mkdir()  # a buffer with no dead-letter box yet: nothing set aside, said as such
    empty = run(["ingest", "dead-letters"], tmp_path, **{**env, "TOWER_WAL_DIR": str(tmp_path / "wal")})
    assert empty.returncode == 0 and "0 record(s) set aside" in empty.stdout, empty.stderr
