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
