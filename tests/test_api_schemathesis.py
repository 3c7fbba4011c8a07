"""schemathesis against the API's own OpenAPI schema: every route, without a token, as viewer and as admin —
no input may produce a 5xx."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server import TowerServer

ADMIN = "twr_schemathesis_admin"
SEEN: dict[str, int] = {}
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TowerServer, dict[str, str]]]:
    with TowerServer(tmp_path_factory.mktemp("schemathesis"), TOWER_ADMIN_TOKEN=ADMIN) as srv:
        viewer = httpx.post(
            f"{srv.url}/api/tokens",
            json={"name": "fuzz-viewer", "role": "viewer"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        ).json()["token"]
        yield srv, {"none": "", "viewer": viewer, "admin": ADMIN}


@pytest.mark.slow
def test_no_input_gives_a_5xx(api: tuple[TowerServer, dict[str, str]]) -> None:
    srv, tokens = api
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            for who, token in tokens.items():
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                response = case.call(base_url=srv.url, headers=headers)
                SEEN[who] = SEEN.get(who, 0) + 1
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} as {who}: {response.status_code} {response.text[:200]}"
                    )

        run()
    print(f"schemathesis: {operations} operations, calls per role: {SEEN}")
    assert operations >= 30
    assert failures == []


def test_schema_covers_the_routes(api: tuple[TowerServer, dict[str, str]]) -> None:
    doc = httpx.get(f"{api[0].url}/openapi.json").json()
    assert {"/v1/traces", "/v1/events", "/api/transactions", "/api/tokens", "/api/drift"} <= set(doc["paths"])
