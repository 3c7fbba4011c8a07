"""Start Streamlit on the dashboard app as a child process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from tower_core.children import run_forwarding_sigterm
from tower_core.errors import ConfigError
from tower_core.ports import check_port_free
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
        "--client.toolbarMode",
        "minimal",
    ]


def dashboard_env(settings: Settings, token: str | None = None) -> dict[str, str]:
    env = {**os.environ, "TOWER_API_URL": settings.api_url}
    if token:
        env["TOWER_DASHBOARD_TOKEN"] = token
    return env


def demo_token(settings: Settings, admin_token: str, name: str = "demo-operator") -> str | None:
    """An operator token for the demo's dashboard, minted through the API with the bootstrap admin token;
    None when the user configured one (TOWER_DASHBOARD_TOKEN or TOWER_API_TOKEN)."""
    if settings.dashboard_token or settings.api_token:
        return None
    try:
        r = httpx.post(
            f"{settings.api_url}/api/tokens",
            json={"name": name, "role": "operator"},
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        raise ConfigError(f"could not create the dashboard's token at {settings.api_url}: {exc}") from None
    if r.status_code != 201:
        raise ConfigError(f"the API refused to create the dashboard's token ({r.status_code}): {r.text[:200]}")
    return r.json()["token"]


def run_dashboard(settings: Settings) -> int:
    check_port_free(settings.dashboard_host, settings.dashboard_port)
    return run_forwarding_sigterm(dashboard_command(settings), env=dashboard_env(settings))
