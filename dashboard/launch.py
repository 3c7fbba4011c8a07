"""Start Streamlit on the dashboard app as a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tower_core.settings import Settings

APP = Path(__file__).with_name("app.py")


def dashboard_command(settings: Settings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(settings.dashboard_port),
        "--server.address",
        settings.dashboard_host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]


def dashboard_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "TOWER_API_URL": settings.api_url}


def run_dashboard(settings: Settings) -> int:
    return subprocess.call(dashboard_command(settings), env=dashboard_env(settings))
