"""``tower token create|list|revoke``: API token administration from the command line.

When an API answers at TOWER_API_URL it owns the store (only one process may open a chDB path), so the
commands go through its admin routes with TOWER_ADMIN_TOKEN (or TOWER_API_TOKEN) and are audited under that
token's name. When no API runs, they open the store directly and audit as ``cli:<os user>``. The plaintext
token is printed once, on the last line of ``create``'s output, and never stored.
"""

from __future__ import annotations

import getpass
import re
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from tower_core.api_answers import json_answer
from tower_core.errors import ConfigError
from tower_core.redact import redact_url
from tower_core.settings import Settings

app = typer.Typer(no_args_is_help=True, help="API tokens with roles viewer < operator < admin.")
out = Console(soft_wrap=True, highlight=False, markup=False)  # names and ids are data, not markup


def _settings() -> Settings:
    from tower_core.cli import load_settings

    return load_settings()


def api_is_up(settings: Settings) -> bool:
    """Whether an API answers (liveness): one whose ingest is not ready (a full buffer, a failing store) still
    owns the store and serves tokens and dead letters; its /readyz said no, and revoking a leaked token then
    tried to open the store the API holds."""
    try:
        return httpx.get(f"{settings.api_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class ViaApi:
    """The API's routes, with the admin (or API) token from settings."""

    def __init__(self, settings: Settings, purpose: str = "an admin token to manage tokens through it") -> None:
        secret = settings.admin_token or settings.api_token
        if secret is None:
            raise ConfigError(
                f"the API at {redact_url(settings.api_url)} owns the store: set TOWER_ADMIN_TOKEN "
                "(or TOWER_API_TOKEN) to " + purpose
            )
        self.url = settings.api_url
        self.headers = {"Authorization": f"Bearer {secret.get_secret_value()}"}
        self.where = f"through the API at {redact_url(self.url)}"

    def call(self, method: str, path: str, expect: type = dict, **kwargs: Any) -> Any:
        """The answer's JSON, of the ``expect``ed type; anything else (an error, a proxy's HTML page) is one
        line saying so."""
        try:
            r = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=30, **kwargs)
        except httpx.HTTPError as exc:
            raise ConfigError(f"the API at {redact_url(self.url)} did not answer: {type(exc).__name__}") from None
        return json_answer(r, f"{method} {path}", expect)

    def create(self, name: str, role: str) -> dict[str, str]:
        return self.call("POST", "/api/tokens", json={"name": name, "role": role})

    def list(self) -> list[dict[str, Any]]:
        return self.call("GET", "/api/tokens", expect=list)

    def revoke(self, token_id: str) -> None:
        self.call("DELETE", f"/api/tokens/{token_id}")


class Direct:
    """The store itself (no API runs), audited as the OS user."""

    def __init__(self, settings: Settings) -> None:
        from tower_core.store import migrate, open_store

        self.store = open_store(settings)  # ConfigError naming the owner if another process holds the path
        migrate(self.store)
        self.actor = f"cli:{getpass.getuser()}"
        self.where = f"directly in the store (no API answers at {redact_url(settings.api_url)})"

    def _audit(self, action: str, token_id: str, after: dict[str, Any]) -> None:
        from tower_core.store import reconcile as q

        q.write_audit(self.store, [q.audit_record(self.actor, action, "token", token_id, None, after)])

    def create(self, name: str, role: str) -> dict[str, str]:
        from collector.auth import create_token

        token_id, token = create_token(self.store, name, role)
        self._audit("token.create", token_id, {"name": name, "role": role})
        return {"token_id": token_id, "name": name, "role": role, "token": token}

    def list(self) -> list[dict[str, Any]]:
        from tower_core.store import tokens as token_store

        return token_store.list_tokens(self.store)

    def revoke(self, token_id: str) -> None:
        from tower_core.store import tokens as token_store

        if not token_store.revoke(self.store, token_id):
            raise ConfigError(f"token {token_id} not found")
        self._audit("token.revoke", token_id, {"revoked": True})


def backend(settings: Settings) -> ViaApi | Direct:
    return ViaApi(settings) if api_is_up(settings) else Direct(settings)


@app.command()
def create(
    name: Annotated[str, typer.Option(help="Who the token is for (audit records carry it).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
) -> None:
    """Create a token and print it once (only its hash is stored)."""
    import re

    from collector.auth import ROLES, TOKEN_NAME, TOKEN_NAME_MAX

    if role not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(name) > TOKEN_NAME_MAX or not re.fullmatch(TOKEN_NAME, name):
        raise ConfigError(
            f"--name must be words (letters, digits, . @ _ -) joined by single spaces, at most {TOKEN_NAME_MAX} "
            "characters"
        )
    b = backend(_settings())
    doc = b.create(name, role)
    if not doc.get("token"):
        raise ConfigError(f"the token was not created: the answer {b.where} carries no token")
    out.print(f"created token {doc.get('token_id')} for {doc.get('name')} ({doc.get('role')}) {b.where}")
    out.print("the token is shown once; store it now:")
    out.print(doc["token"])


@app.command("list")
def list_tokens() -> None:
    """Tokens with their names and roles (never the secrets)."""
    rows = backend(_settings()).list()
    table = Table("id", "name", "role", "created", "revoked")
    for r in (r for r in rows if isinstance(r, dict)):
        when, revoked = str(r.get("created_at", ""))[:19], "yes" if r.get("revoked") else ""
        table.add_row(*(str(r.get(k, "")) for k in ("token_id", "name", "role")), when, revoked)
    out.print(table)


@app.command()
def revoke(token_id: Annotated[str, typer.Argument(help="The token's id (from `tower token list`).")]) -> None:
    """Revoke a token: the API refuses it from then on."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", token_id):  # an empty one reached the API as /api/tokens/ (307)
        raise ConfigError("not a token id: give the id `tower token list` shows")
    b = backend(_settings())
    b.revoke(token_id)
    out.print(f"revoked token {token_id} {b.where}")
