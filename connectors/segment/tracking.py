"""Segment HTTP Tracking API payloads -> business events, with PII hashed or dropped first. Pure, no IO.

Segment's and RudderStack's SDKs post ``{"batch": [...]}`` to ``/v1/batch`` (single messages go to
``/v1/identify``, ``/v1/track``, ``/v1/group``), with the write key as the basic-auth user name.
``identify`` and ``group`` are customer profile changes (the start of the ``cdp_to_billing`` step); ``track``
calls are kept as usage events without a step. PII (configured trait/property names, anywhere in the
payload, plus a user id that is an e-mail address) is replaced by a keyed HMAC-SHA256 or removed before the
event exists, so nothing downstream — buffer, store, logs — ever holds the raw value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from collector.events import BusinessEvent, EventError, parse_time
from tower_core.settings import Settings

SOURCE = "cdp"
SYSTEM = "cdp"
MESSAGE_TYPES = ("identify", "track", "group", "page", "screen", "alias")
STORED_TYPES = ("identify", "group", "track")
MAX_MESSAGES = 10_000
MAX_ID = 512
HASH_PREFIX = "hmac-sha256:"
# A value holding an e-mail address is PII under any name (``customerEmail``, ``contact``, a list of them).
# Bounded (RFC 5321 lengths): unbounded runs made a long value with an '@' quadratic to search, under the GIL.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
# OpenTelemetry keys that contain a PII stem (``address``) but name the service's own side, never a person.
NOT_PII_KEYS = frozenset({"server.address", "network.local.address"})
# Configured names at least this long also match inside a longer name (``email`` in ``billing_email``, ``phone``
# in ``Phone Number``); shorter ones (``name``, ``ip``) only match whole, so ``product_name`` stays readable.
STEM_MIN = 5


def _norm(name: str) -> str:
    """``Phone Number``, ``phone_number`` and ``phoneNumber`` are one name."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


class TrackingError(ValueError):
    """The request or one message is unusable; the message says which field."""


@dataclass(frozen=True)
class PiiPolicy:
    mode: str  # "hash" | "drop"
    key: bytes
    fields: frozenset[str]  # lower-case names

    @classmethod
    def build(cls, mode: str, key: str | None, fields: Sequence[str]) -> PiiPolicy:
        """In drop mode without a key, a random one per process: message ids made from a message's content
        (``_content_id``) must not be a plain hash anyone could test guessed e-mail addresses against."""
        if mode not in ("hash", "drop"):
            raise ValueError("PII mode must be hash or drop")
        if mode == "hash" and not key:
            raise ValueError("hashing PII needs a key")
        secret = key.encode() if key else secrets.token_bytes(32)
        return cls(mode, secret, frozenset(_norm(f) for f in fields if _norm(f)))

    def is_field(self, name: str) -> bool:
        """A configured name of STEM_MIN letters or more inside the name, whatever its case and separators; a
        shorter one (``name``, ``ip``) only as the whole name, in any case."""
        if name.lower() in NOT_PII_KEYS:
            return False
        n = _norm(name)
        return any(f in n if len(f) >= STEM_MIN else f == name.lower() for f in self.fields)

    def digest(self, value: Any) -> str:
        """Normalized (trimmed, lower-case) so the same e-mail always gives the same pseudonym."""
        text = value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        mac = hmac.new(self.key, text.strip().lower().encode(), hashlib.sha256).hexdigest()
        return HASH_PREFIX + mac

    def scrub(self, value: Any) -> Any:
        """A copy of ``value`` with every PII field and every e-mail address hashed or dropped, at any depth."""
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for k, v in value.items():
                name = str(k)
                if self.is_field(name):
                    if self.mode == "hash" and v not in (None, ""):
                        out[name] = self.digest(v)
                    continue
                if EMAIL.search(name):  # an address as a key ({"carol@example.org": "primary"})
                    if self.mode == "drop":
                        continue
                    name = self.digest(name)
                kept = self.scrub(v)
                if kept is not None or v is None:
                    out[name] = kept
            return out
        if isinstance(value, list):
            return [kept for v in value if (kept := self.scrub(v)) is not None or v is None]
        if isinstance(value, str) and EMAIL.search(value):
            return self.digest(value) if self.mode == "hash" else None
        return value

    def redact_text(self, text: str) -> str:
        """Free text (an event or span name, a status message) with each e-mail address in it hashed, or replaced
        by ``[email]`` in drop mode; the rest stays readable."""
        if "@" not in text:
            return text
        return EMAIL.sub(lambda m: self.digest(m.group()) if self.mode == "hash" else "[email]", text)

    def identifier(self, value: str) -> str:
        """User ids are kept (they are the join key) unless they may be an e-mail address (hashed exactly as
        ``scrub`` hashes the same value found in the traits, so both name one pseudonym)."""
        if "@" in value:
            return self.digest(value) if self.mode == "hash" else ""
        return value


@lru_cache(maxsize=4)
def _policy(mode: str, key: str, fields: tuple[str, ...]) -> PiiPolicy:
    return PiiPolicy.build(mode, key or None, fields)  # once per process: drop mode draws its key here


def policy_from_settings(settings: Settings) -> PiiPolicy | None:
    """The CDP's PII policy; None when PII is to be hashed but no key is configured (nothing can be pseudonymized:
    each caller drops instead). Settings require the key once CDP write keys are set."""
    key = settings.cdp_pii_hmac_key.get_secret_value() if settings.cdp_pii_hmac_key else ""
    if settings.cdp_pii_mode == "hash" and not key:
        return None
    return _policy(settings.cdp_pii_mode, key, tuple(settings.cdp_pii_fields))


def write_key_from_basic(authorization: str | None) -> str | None:
    """The user name of ``Authorization: Basic base64(user:password)``."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except ValueError:  # binascii.Error, UnicodeDecodeError, and a non-ASCII header
        return None
    return decoded.split(":", 1)[0] or None


def known_write_key(candidate: str | None, keys: Sequence[str]) -> bool:
    if not candidate:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def messages_of(doc: Any, path_type: str | None) -> list[Any]:
    """The messages of a /v1/batch body, or the single message of a /v1/<type> body."""
    if not isinstance(doc, dict):
        raise TrackingError("the body must be a JSON object")
    if path_type is None:
        batch = doc.get("batch")
        if not isinstance(batch, list):
            raise TrackingError("a batch body needs a 'batch' array")
        if len(batch) > MAX_MESSAGES:
            raise TrackingError(f"a batch holds at most {MAX_MESSAGES} messages")
        return batch
    msg = dict(doc)
    msg.setdefault("type", path_type)
    if msg["type"] != path_type:
        raise TrackingError(f"message type {msg['type']!r} does not match the /v1/{path_type} endpoint")
    return [msg]


def _text(msg: Mapping[str, Any], name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TrackingError(f"{name} must be a string")
    text = str(value)
    if len(text) > MAX_ID:
        raise TrackingError(f"{name} is longer than {MAX_ID} characters")
    return text


def _time_field(msg: Mapping[str, Any], name: str) -> int | None:
    value = msg.get(name)
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_time(value)
    except EventError:
        raise TrackingError(f"{name} {value[:40]!r} is not an ISO 8601 / RFC 3339 time") from None


def _time_ns(msg: Mapping[str, Any], received_ns: int, batch_sent_at: int | None = None) -> int:
    """When the message happened. A ``timestamp`` the sender set (server libraries, the HTTP API, imports) is
    taken as sent. A device library's ``originalTimestamp`` is on the device's clock, which may be hours off: it
    is corrected as Segment and RudderStack correct it, receivedAt - (sentAt - originalTimestamp), with ``sentAt``
    from the message or else its batch, and never later than the message was received."""
    stamped = _time_field(msg, "timestamp")
    if stamped is not None:
        return stamped
    original = _time_field(msg, "originalTimestamp")
    if original is None:
        return received_ns
    sent = _time_field(msg, "sentAt")
    sent = batch_sent_at if sent is None else sent
    if sent is None:
        return original
    return min(received_ns, received_ns - (sent - original))


def _customer_id(traits: Mapping[str, Any], fallback: str, trait_names: Sequence[str]) -> str:
    for name in trait_names:
        value = traits.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return fallback


def _region(traits: Mapping[str, Any], context: Mapping[str, Any], default: str) -> str:
    ctx_traits = context.get("traits") if isinstance(context.get("traits"), Mapping) else {}
    for source in (traits, ctx_traits):
        value = source.get("region") if isinstance(source, Mapping) else None
        if isinstance(value, str) and value:
            return value
    return default


def _content_id(msg: Mapping[str, Any], policy: PiiPolicy) -> str:
    """An id for a message sent without messageId: the same message (a retry) gets the same id, two users'
    messages never do. Keyed (the message holds PII), over the whole message as sent."""
    canonical = orjson.dumps(msg, option=orjson.OPT_SORT_KEYS, default=str)
    return str(uuid.UUID(hex=hmac.new(policy.key, canonical, hashlib.sha256).hexdigest()[:32]))


def to_event(
    msg: Any,
    received_ns: int,
    policy: PiiPolicy,
    customer_traits: Sequence[str],
    default_region: str,
    batch_sent_at: int | None = None,
) -> BusinessEvent | None:
    """One tracking message -> a business event (None for page/screen/alias, which the tower ignores);
    ``batch_sent_at``: the ``sentAt`` of the batch holding it."""
    if not isinstance(msg, dict):
        raise TrackingError("a message must be a JSON object")
    mtype = msg.get("type")
    if mtype not in MESSAGE_TYPES:
        raise TrackingError(f"message type {mtype!r} is not one of {', '.join(MESSAGE_TYPES)}")
    user_id, anonymous_id = _text(msg, "userId"), _text(msg, "anonymousId")
    if not user_id and not anonymous_id and mtype != "group":
        raise TrackingError("a message needs a userId or an anonymousId")
    if mtype not in STORED_TYPES:
        return None
    group_id = _text(msg, "groupId")
    if mtype == "group" and not group_id:
        raise TrackingError("a group message needs a groupId")
    event_name = _text(msg, "event")
    if mtype == "track" and not event_name:
        raise TrackingError("a track message needs an event name")
    event_name = policy.redact_text(event_name)  # "Invite sent to bob@example.com"
    raw_traits = msg["traits"] if msg.get("traits") is not None else {}
    raw_props = msg["properties"] if msg.get("properties") is not None else {}
    context = msg.get("context") if isinstance(msg.get("context"), Mapping) else {}
    if not isinstance(raw_traits, Mapping) or not isinstance(raw_props, Mapping):
        raise TrackingError("traits and properties must be objects")
    # Keys and region are read before scrubbing (they are not PII); everything kept is scrubbed.
    cdp_user = policy.identifier(user_id or anonymous_id)
    region = _region(raw_traits, context, default_region)
    attrs: dict[str, str] = {"revops.system": SYSTEM, "cdp.message_type": mtype}
    if cdp_user:
        attrs["revops.cdp.user_id"] = cdp_user
    if region:
        attrs["revops.region"] = region
    if mtype in ("identify", "group"):
        # without a billing id trait, the profile's own id names the customer (its pseudonym when it is an address:
        # billing's cdp_user_id metadata gets the same pseudonym, so the SLA item closes when billing has it)
        fallback = group_id if mtype == "group" else user_id
        # RudderStack's SDK sends identify traits as context.traits; a group's context.traits are the user's
        ctx_traits = context.get("traits") if isinstance(context.get("traits"), Mapping) else {}
        lookup = {**ctx_traits, **raw_traits} if mtype == "identify" else raw_traits
        customer = _customer_id(lookup, fallback, customer_traits)
        if customer and (customer_key := policy.identifier(customer)):  # drop mode has no pseudonym to key by
            attrs["revops.customer.id"] = customer_key
        attrs["revops.step"] = "cdp_to_billing"
    if group_id and (group := policy.identifier(group_id)):  # an e-mail as group id is PII like any other
        attrs["cdp.group_id"] = group
    if event_name:
        attrs["cdp.event"] = event_name
    library = context.get("library") if isinstance(context.get("library"), Mapping) else {}
    data = {
        "type": mtype,
        "event": event_name,
        "traits": policy.scrub(raw_traits),
        "properties": policy.scrub(raw_props),
        "context_traits": policy.scrub(context.get("traits") or {}),
        "library": str(library.get("name") or ""),
    }
    # a client's message id holding an address is PII like any other value (drop mode: the keyed content id)
    message_id = policy.identifier(_text(msg, "messageId")) or _content_id(msg, policy)
    kind = {"identify": "cdp.profile.identified", "group": "cdp.account.grouped", "track": "cdp.track"}[mtype]
    return BusinessEvent(
        event_id=message_id,
        source=SOURCE,
        type=kind,
        subject=attrs.get("revops.customer.id") or cdp_user,
        time_ns=_time_ns(msg, received_ns, batch_sent_at),
        trace_id="",
        span_id="",
        attributes=attrs,
        data=orjson.dumps(data).decode(),
    )


@dataclass
class Parsed:
    events: list[BusinessEvent]
    ignored: int
    rejected: list[dict[str, Any]]


def parse_request(
    doc: Any,
    path_type: str | None,
    received_ns: int,
    policy: PiiPolicy,
    customer_traits: Sequence[str],
    default_region: str,
) -> Parsed:
    """Every message of a request: events to keep, how many were ignored, and which were bad (and why)."""
    out = Parsed([], 0, [])
    messages = messages_of(doc, path_type)
    try:
        batch_sent_at = _time_field(doc, "sentAt") if path_type is None else None
    except TrackingError as exc:  # the whole batch's clock is unknown: no message of it can be placed in time
        raise TrackingError(f"the batch's {exc}") from None
    for i, msg in enumerate(messages):
        try:
            event = to_event(msg, received_ns, policy, customer_traits, default_region, batch_sent_at)
        except TrackingError as exc:
            mid = msg.get("messageId") if isinstance(msg, dict) else None
            out.rejected.append({"index": i, "messageId": mid if isinstance(mid, str) else None, "error": str(exc)})
            continue
        if event is None:
            out.ignored += 1
        else:
            out.events.append(event)
    return out
