"""README, settings and docker-compose.yml agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tower_core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ENV_NAMES = {f"TOWER_{name.upper()}" for name in Settings.model_fields}


def test_every_setting_is_documented_in_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(TOWER_[A-Z0-9_]+)`", readme))
    assert ENV_NAMES - documented == set(), "settings missing from README"
    assert documented - ENV_NAMES == set(), "README documents settings that do not exist"


def test_readme_quickstart_has_exactly_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_compose_wires_clickhouse_api_and_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"clickhouse", "api", "dashboard"}
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server")
    assert "8123:8123" in services["clickhouse"]["ports"][0]
    assert services["clickhouse"]["healthcheck"]["test"]
    api = services["api"]
    assert api["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert "8000:8000" in api["ports"][0] and "readyz" in " ".join(api["healthcheck"]["test"])
    assert api["environment"]["TOWER_CLICKHOUSE_URL"].startswith("http://")
    assert "@clickhouse:8123/" in api["environment"]["TOWER_CLICKHOUSE_URL"]
    assert "8501:8501" in services["dashboard"]["ports"][0]
    for name in ("api", "dashboard"):
        unknown = set(services[name]["environment"]) - ENV_NAMES
        assert unknown == set(), f"{name} sets variables the settings do not know: {unknown}"
