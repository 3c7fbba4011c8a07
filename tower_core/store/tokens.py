"""API token records (hashed). The plaintext token never reaches the store or a log."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from tower_core.store.base import Store


def insert_token(store: Store, token_id: str, name: str, role: str, token_hash: str) -> None:
    now = dt.datetime.now(dt.UTC)
    store.command(
        "INSERT INTO $db.api_tokens (TokenId, Name, Role, TokenHash, CreatedAt, Version) VALUES "
        "({id:String}, {name:String}, {role:String}, {hash:String}, {now:DateTime64(3)}, {v:UInt64})",
        {"id": token_id, "name": name, "role": role, "hash": token_hash, "now": now, "v": time.time_ns()},
    )


def find_by_hash(store: Store, token_hash: str) -> dict[str, Any] | None:
    rows = store.query_rows(
        "SELECT TokenId AS token_id, Name AS name, Role AS role, TokenHash AS token_hash, "
        "toUnixTimestamp64Milli(RevokedAt) AS revoked_ms FROM $db.api_tokens FINAL "
        "WHERE TokenHash = {h:String} LIMIT 1",
        {"h": token_hash},
    )
    return rows[0] if rows else None


def list_tokens(store: Store) -> list[dict[str, Any]]:
    return store.query_rows(
        "SELECT TokenId AS token_id, Name AS name, Role AS role, CreatedAt AS created_at, "
        "toUnixTimestamp64Milli(RevokedAt) > 0 AS revoked FROM $db.api_tokens FINAL ORDER BY CreatedAt"
    )


def revoke(store: Store, token_id: str) -> bool:
    rows = store.query_rows(
        "SELECT TokenId, Name, Role, TokenHash, CreatedAt FROM $db.api_tokens FINAL WHERE TokenId = {id:String}",
        {"id": token_id},
    )
    if not rows:
        return False
    r = rows[0]
    store.command(
        "INSERT INTO $db.api_tokens (TokenId, Name, Role, TokenHash, CreatedAt, RevokedAt, Version) VALUES "
        "({id:String}, {name:String}, {role:String}, {hash:String}, {created:DateTime64(3)}, {now:DateTime64(3)}, "
        "{v:UInt64})",
        {
            "id": token_id,
            "name": r["Name"],
            "role": r["Role"],
            "hash": r["TokenHash"],
            "created": r["CreatedAt"],
            "now": dt.datetime.now(dt.UTC),
            "v": time.time_ns(),
        },
    )
    return True
