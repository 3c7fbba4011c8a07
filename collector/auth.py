"""Bearer-token authentication with roles viewer < operator < admin.

Tokens are random secrets shown once at creation; the store keeps their SHA-256 only. A bootstrap admin
token may come from ``TOWER_ADMIN_TOKEN`` (compared in constant time). Routers declare what they need with
``Depends(require("operator"))``; mutations are audited under the principal's name.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request

from tower_core.store import Store
from tower_core.store import tokens as token_store

ROLES = ("viewer", "operator", "admin")
# A token's name: words joined by single spaces. A name of spaces only (or padded with them) would make the audit
# trail's "who" blank or ambiguous; brackets and other markup would be rendered by terminals and pages.
TOKEN_NAME = r"^[\w.@-]+( [\w.@-]+)*$"
TOKEN_NAME_MAX = 100
_CACHE_TTL_S = 5.0
_CACHE_MAX = 10_000  # tokens remembered (a hit or a miss) for _CACHE_TTL_S


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def has(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "twr_" + secrets.token_urlsafe(32)


def create_token(store: Store, name: str, role: str) -> tuple[str, str]:
    """Store a new token's hash; return (token_id, plaintext token) — the only time it is seen."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = new_token()
    token_id = uuid.uuid4().hex[:16]
    token_store.insert_token(store, token_id, name, role, hash_token(token))
    return token_id, token


class TokenVerifier:
    """Resolves bearer tokens to principals, caching store lookups briefly."""

    def __init__(self, store: Store, admin_token: str | None) -> None:
        self.store = store
        self._admin_hash = hash_token(admin_token) if admin_token else None
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._cache_lock = threading.Lock()  # verify runs in the threadpool
        self._generation = 0  # bumped by forget(): a lookup read before it is not cached after it

    def verify(self, token: str) -> Principal | None:
        h = hash_token(token)
        if self._admin_hash is not None and hmac.compare_digest(h, self._admin_hash):
            return Principal("admin (bootstrap)", "admin")
        hit = self._cache.get(h)
        now = time.monotonic()
        if hit and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        generation = self._generation
        row = token_store.find_by_hash(self.store, h)
        principal = None
        if row and not row["revoked_ms"] and hmac.compare_digest(row["token_hash"], h):
            principal = Principal(row["name"], row["role"])
        with self._cache_lock:
            if generation != self._generation:
                # a revocation landed while this lookup read the token: its answer is not kept (a revoked token
                # cached after forget() passed for the cache's 5 s); this request was already under way
                return principal
            self._cache.pop(h, None)
            while len(self._cache) >= _CACHE_MAX:  # random tokens must not grow it without bound: drop the oldest
                self._cache.pop(next(iter(self._cache)))
            self._cache[h] = (now, principal)
        return principal

    def forget(self) -> None:
        with self._cache_lock:
            self._generation += 1
            self._cache.clear()


def is_loopback(host: str | None) -> bool:
    """Whether a peer address is this machine's loopback (IPv4, IPv6, or IPv4 mapped into IPv6)."""
    try:
        addr = ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def ingest_refusal(authorization: str | None, tokens: Sequence[str], peer: str | None, open_ingest: bool) -> str:
    """OTLP and CloudEvents ingest: why a request is refused ('' = allowed). With tokens configured, any of them
    (several during rotation, compared in constant time) from anywhere. Without, only loopback peers, unless
    ingest is opened explicitly (TOWER_INGEST_OPEN, an OTel Collector receiver's default): a tower bound to a
    public address does not take unauthenticated writes by accident."""
    if not tokens:
        if open_ingest or is_loopback(peer):
            return ""
        return "ingest from other hosts needs a bearer token (set TOWER_INGEST_TOKENS, or TOWER_INGEST_OPEN=true)"
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return "a valid ingest bearer token is required (TOWER_INGEST_TOKENS)"
    matches = [hmac.compare_digest(presented.strip().encode(), t.encode()) for t in tokens]  # every token, always
    return "" if any(matches) else "a valid ingest bearer token is required (TOWER_INGEST_TOKENS)"


def get_principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    principal = request.app.state.verifier.verify(authorization[7:].strip())
    if principal is None:
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    request.state.principal = principal  # collector/audit.py names it in the audit of a refused mutation
    return principal


def route_role(route: Any) -> str | None:
    """The role a route's dependencies require (``require``), or None for a route without a role check."""
    pending = list(getattr(getattr(route, "dependant", None), "dependencies", []))
    while pending:
        dep = pending.pop()
        if (role := getattr(dep.call, "required_role", None)) is not None:
            return role
        pending.extend(dep.dependencies)
    return None


def require(role: str) -> Callable[[Principal], Principal]:
    """Dependency: the caller's principal, if its role is at least ``role`` (else 403)."""

    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.has(role):
            raise HTTPException(403, f"this action needs the {role} role; {principal.name} is {principal.role}")
        return principal

    check.required_role = role  # type: ignore[attr-defined]  # read by the route-security test
    return check
