"""A Stripe webhook delivery -> a business event (pure): verify the signature, then map the event."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from collector.events import BusinessEvent
from connectors.stripe import mapping
from connectors.stripe.signature import SignatureError, verify


class DeliveryError(ValueError):
    """A delivery refused with 400; nothing of it is stored."""


@dataclass(frozen=True)
class Delivery:
    event_id: str
    event_type: str
    event: BusinessEvent | None  # None: a valid event of a type the tower does not track


def read_delivery(
    body: bytes,
    signature: str | None,
    secrets: Sequence[str],
    tolerance_s: int,
    now: float,
    default_region: str,
    cdp_user: Callable[[str], str] = mapping.without_address,
) -> Delivery:
    try:
        verify(body, signature, secrets, tolerance_s, now)
    except SignatureError as exc:
        raise DeliveryError(str(exc)) from None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DeliveryError(f"malformed JSON: {exc}") from None
    try:
        event = mapping.to_business_event(doc, default_region, cdp_user)
    except mapping.MappingError as exc:
        raise DeliveryError(str(exc)) from None
    return Delivery(str(doc["id"]), str(doc["type"]), event)
