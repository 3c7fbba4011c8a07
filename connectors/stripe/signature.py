"""Stripe-Signature verification (pure): HMAC-SHA256 of ``"{t}.{body}"`` with the endpoint secret.

The header is ``t=<unix seconds>,v1=<hex>[,v1=<hex>...]``; during secret rotation Stripe sends one ``v1`` per
active secret, and the tower may hold several secrets itself, so any (secret, v1) pair may match. A timestamp
older (or further in the future) than the tolerance is refused: it stops replays of captured deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

SCHEME = "v1"
# ASCII only: str.isdigit() also accepts "²", and compare_digest refuses non-ASCII str (both were 500s)
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


class SignatureError(ValueError):
    """The delivery is not provably from Stripe; the message says why (safe to return to the caller)."""


def parse_header(header: str | None) -> tuple[int, list[str]]:
    if not header or not header.strip():
        raise SignatureError("missing Stripe-Signature header")
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            timestamps.append(value.strip())
        elif key == SCHEME:
            signatures.append(value.strip().lower())
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
        raise SignatureError("Stripe-Signature has no valid timestamp (t=)")
    signatures = [s for s in signatures if _HEX_SHA256.fullmatch(s)]  # anything else can never match
    if not signatures:
        raise SignatureError("Stripe-Signature has no v1 signature")
    return int(timestamps[0]), signatures


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """The v1 signature Stripe computes (used by tests and by verify)."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()


def verify(payload: bytes, header: str | None, secrets: Sequence[str], tolerance_s: int, now: float) -> int:
    """Return the signed timestamp, or raise SignatureError. Constant-time comparison of every pair."""
    if not secrets:
        raise SignatureError("no Stripe webhook secret is configured (TOWER_STRIPE_WEBHOOK_SECRETS)")
    timestamp, signatures = parse_header(header)
    if tolerance_s > 0 and abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"Stripe-Signature timestamp is outside the {tolerance_s} s tolerance")
    matched = False
    for secret in secrets:
        if not secret.strip():  # settings refuse it; a blank secret is a key anyone holds
            continue
        expected = sign(payload, secret, timestamp)
        for candidate in signatures:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("no Stripe-Signature v1 signature matches a configured endpoint secret")
    return timestamp
