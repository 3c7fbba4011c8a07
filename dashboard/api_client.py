"""The dashboard's only way to the tower: HTTP calls to the API with the bearer token (httpx).

Errors become two exceptions the pages handle without a traceback: ``ApiUnavailable`` (nothing answers, a
timeout, or 502/503/504: show the banner) and ``ApiError`` (the API refused: show its message). Each page's
reads are one ``load_*`` function that issues its calls side by side; bench/dashboard.py times the same
functions, so what it measures is what a page waits for.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx

from dashboard.views import link_without_credentials
from tower_core.api_answers import STORE_UNAVAILABLE_HEADER, reason_of

UNAVAILABLE = frozenset({502, 503, 504})
BULK_MAX = 500  # the most items one bulk request takes (the API's limit; it refuses more with a clear 409)
BULK_TIMEOUT_S = 120.0  # a bulk request's answer is waited for this long at least


class ApiUnavailable(Exception):
    """The API cannot answer now (down, unreachable, timed out, or its store is unavailable: ``store_down``)."""

    def __init__(self, message: str, store_down: bool = False) -> None:
        super().__init__(message)
        self.store_down = store_down


class ApiTimeout(ApiUnavailable):
    """The API did not answer in time: a change asked for may still have been made."""


class ApiError(Exception):
    """The API refused the request (4xx): ``status`` and the API's own message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def _detail(r: httpx.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        return r.text[:500] or r.reason_phrase
    return reason_of(doc)


def _seg(value: str) -> str:
    """One path segment, whatever the id holds (a pasted ``?drift=../x`` must not reach another route)."""
    return quote(str(value), safe="")


class TowerApi:
    """Thin typed wrapper of the routes the dashboard uses."""

    def __init__(
        self, base_url: str, token: str | None, timeout_s: float = 10.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        # what messages name: they reach every page's banner, the login page included
        self.shown_url = link_without_credentials(self.base_url)
        if token and not token.isascii():  # it could not even be sent as a header
            raise ApiError(401, "a tower token is ASCII text; this one is not (check for typographic quotes)")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self.client.close()

    # --- transport
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiTimeout(f"the API at {self.shown_url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"the API at {self.shown_url} is not reachable ({type(exc).__name__})") from None
        if r.status_code in UNAVAILABLE:
            store_down = r.headers.get(STORE_UNAVAILABLE_HEADER) == "store"
            raise ApiUnavailable(f"the API at {self.shown_url} is unavailable: {_detail(r)}", store_down)
        if r.status_code >= 400:
            raise ApiError(r.status_code, _detail(r))
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:  # a proxy's login page, another service on the port
            raise ApiUnavailable(f"the API at {self.shown_url} answered with something that is not JSON") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v not in (None, "", [])})

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=dict(body or {}))

    # --- identity and health
    def ready(self) -> dict[str, Any]:
        return self.get("/readyz")

    def whoami(self) -> dict[str, str]:
        return self.get("/api/tokens/me")

    # --- drift queue
    def drift(self, **params: Any) -> dict[str, Any]:
        return self.get("/api/drift", **params)

    def drift_item(self, drift_id: str) -> dict[str, Any]:
        return self.get(f"/api/drift/{_seg(drift_id)}")

    def aging(self, region: str = "") -> dict[str, Any]:
        return self.get("/api/overview/aging", region=region)

    def acknowledge(self, drift_id: str, note: str) -> dict[str, Any]:
        return self.post(f"/api/drift/{_seg(drift_id)}/acknowledge", {"note": note})

    def ignore(self, drift_id: str, note: str) -> dict[str, Any]:
        return self.post(f"/api/drift/{_seg(drift_id)}/ignore", {"note": note})

    def sync(self, drift_id: str, approve: bool = False) -> dict[str, Any]:
        return self.post(f"/api/drift/{_seg(drift_id)}/sync", {"approve": approve})

    def bulk(
        self,
        action: str,
        filters: Mapping[str, Any],
        expected_ids: Sequence[str],
        note: str = "",
        approve: bool = False,
    ) -> dict[str, Any]:
        """``expected_ids``: the items shown for the filter; the API refuses if the filter matches others now."""
        body = {
            "action": action,
            "filter": dict(filters),
            "expected_count": len(expected_ids),
            "expected_ids": list(expected_ids),
            "note": note,
            "approve": approve,
        }
        # up to 500 items: corrective syncs are created one by one, which takes longer than a page's timeout
        return self.request("POST", "/api/drift/bulk", json=body, timeout=max(self.timeout_s, BULK_TIMEOUT_S))

    # --- actions
    def actions(self, **params: Any) -> dict[str, Any]:
        return self.get("/api/actions", **params)

    def action(self, action_id: str) -> dict[str, Any]:
        return self.get(f"/api/actions/{_seg(action_id)}")

    def replay(self, action_id: str) -> dict[str, Any]:
        return self.post(f"/api/actions/{_seg(action_id)}/replay")

    def approve(self, action_id: str) -> dict[str, Any]:
        return self.post(f"/api/actions/{_seg(action_id)}/approve")

    def breakers(self) -> dict[str, Any]:
        return self.get("/api/actions/breakers")

    # --- runs
    def runs(self, limit: int = 1) -> dict[str, Any]:
        return self.get("/api/runs", limit=limit)

    def start_run(self, full: bool = False, region: str = "") -> dict[str, Any]:
        return self.post("/api/runs", {"full": full, "region": region})

    # --- SLAs
    def sla_definitions(self) -> dict[str, Any]:
        return self.get("/api/sla/definitions")

    def sla_compliance(self) -> dict[str, Any]:
        return self.get("/api/sla/compliance")

    def sla_breaches(self, status: str = "all", since: dt.datetime | None = None, limit: int = 1000) -> dict[str, Any]:
        return self.get("/api/sla/breaches", status=status, since=since.isoformat() if since else None, limit=limit)

    # --- audit
    def audit(self, **params: Any) -> dict[str, Any]:
        return self.get("/api/audit", **params)

    # --- intake: what ingest and the pulls set aside
    def ingest_dead_letters(self, limit: int = 100) -> dict[str, Any]:
        return self.get("/api/ingest/dead-letters", limit=limit)

    def requeue_dead_letter(self, name: str) -> dict[str, Any]:
        return self.post(f"/api/ingest/dead-letters/{_seg(name)}/requeue")

    def dismiss_skipped(self, connector: str, stream: str, ref: str, note: str) -> dict[str, Any]:
        body = {"connector": connector, "stream": stream, "ref": ref, "note": note}
        return self.post("/api/sources/skipped/dismiss", body)

    def skipped_sources(self, include_cleared: bool = False) -> dict[str, Any]:
        return self.get("/api/sources/skipped", include_cleared="true" if include_cleared else None)

    def audit_facets(self) -> dict[str, list[str]]:
        return self.get("/api/audit/facets")


# --- what each page loads ------------------------------------------------------------------------------------
_POOL = ThreadPoolExecutor(max_workers=6, thread_name_prefix="dashboard-api")


class Loaded(dict):
    """Results by name, plus ``errors``: name -> message of the calls that failed (the page shows the rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict[str, str] = {}


def gather(calls: Mapping[str, Callable[[], Any]]) -> Loaded:
    """Run the calls side by side. A refused call is reported in ``errors``; if every call found the API
    unavailable, raise ApiUnavailable (the page shows the banner instead)."""
    futures = {name: _POOL.submit(fn) for name, fn in calls.items()}
    out = Loaded()
    down: list[ApiUnavailable] = []
    for name, fut in futures.items():
        try:
            out[name] = fut.result()
        except ApiUnavailable as exc:
            down.append(exc)
            out.errors[name] = str(exc)
        except ApiError as exc:
            out.errors[name] = exc.detail
    if down and len(down) == len(calls):
        raise down[0]
    return out


def load_overview(api: TowerApi, now: dt.datetime | None = None, days: int = 7) -> Loaded:
    now = now or dt.datetime.now(dt.UTC)
    since = now - dt.timedelta(days=days)
    return gather(
        {
            "compliance": api.sla_compliance,
            "breaches": lambda: api.sla_breaches("all", since=since),
            "firing": lambda: api.sla_breaches("firing", limit=200),
            "aging": api.aging,
            "runs": lambda: api.runs(limit=1),
        }
    )


def load_unreconciled(api: TowerApi, params: Mapping[str, Any]) -> Loaded:
    return gather({"drift": lambda: api.drift(**params)})


def load_item(api: TowerApi, drift_id: str) -> Loaded:
    return gather({"item": lambda: api.drift_item(drift_id), "definitions": api.sla_definitions})


def load_actions(api: TowerApi, params: Mapping[str, Any], drift_params: Mapping[str, Any]) -> Loaded:
    return gather(
        {
            "actions": lambda: api.actions(**params),
            "dead_letters": lambda: api.get("/api/actions/dead-letters", limit=50),
            "breakers": api.breakers,
            # every matching item's id (a bulk action takes at most 500): the bulk request names the set it saw
            "matching": lambda: api.drift(**drift_params, limit=BULK_MAX),
        }
    )


def load_slas(api: TowerApi, now: dt.datetime | None = None, days: int = 30) -> Loaded:
    since = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=days)
    return gather(
        {
            "definitions": api.sla_definitions,
            "compliance": api.sla_compliance,
            "breaches": lambda: api.sla_breaches("all", since=since, limit=500),
        }
    )


def load_audit(api: TowerApi, params: Mapping[str, Any]) -> Loaded:
    return gather({"audit": lambda: api.audit(**params)})


def load_intake(api: TowerApi, include_cleared: bool = False, operator: bool = True) -> Loaded:
    """Skipped source records (viewers), and the ingest dead letters (operators: their payloads are raw data)."""
    calls: dict[str, Callable[[], Any]] = {"skipped": lambda: api.skipped_sources(include_cleared)}
    if operator:
        calls["dead_letters"] = api.ingest_dead_letters
    return gather(calls)


def first_item(api: TowerApi, **params: Any) -> str | None:
    items = api.drift(limit=1, **params)["items"]
    return items[0]["drift_id"] if items else None


def page_loads(api: TowerApi) -> dict[str, Callable[[], Any]]:
    """What each page waits for with its default filters, in the page's order (bench/dashboard.py times these).
    The item page opens the queue's first item (looked up once, as the list page already has it)."""
    drift_id = first_item(api) or "none"
    week_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=7)).isoformat()
    return {
        "overview": lambda: load_overview(api),
        "unreconciled": lambda: load_unreconciled(api, {"limit": 25, "offset": 0, "sort": "first_seen"}),
        "unreconciled_filtered": lambda: load_unreconciled(
            api, {"class": ["missing_in_erp"], "region": "EU", "sort": "amount", "order": "desc", "limit": 25}
        ),
        "unreconciled_item": lambda: load_item(api, drift_id),
        "actions": lambda: load_actions(api, {"limit": 25}, {}),
        "slas": lambda: load_slas(api),
        "audit": lambda: (api.audit_facets(), load_audit(api, {"since": week_ago, "limit": 50})),
        "intake": lambda: load_intake(api),
    }
