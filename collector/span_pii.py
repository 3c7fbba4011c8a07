"""PII in the CDP's spans, hashed or dropped before a request is buffered, as the CDP's events are
(connectors/segment/tracking.py). Pure, no IO.

A span is the CDP's when it says so (``revops.system = cdp``), or its resource does (how a service names itself in
OTel), as the store reads a span's system. Reading every span's attributes in Python would cost the ingest path
about as much as decoding it, so a block of another system's spans is walked only when its bytes hold that
attribute. Within the CDP's spans, and their events, links and scopes:
- a ``revops.*`` business key holding an e-mail address becomes its pseudonym (the one the CDP's events use for
  the same address, so correlation still joins them); other business keys are kept;
- an attribute whose name is a PII field (TOWER_CDP_PII_FIELDS) is hashed whatever its value type;
- any other string (or string in an array) holding an e-mail address is hashed;
- an address inside a name or a status message is hashed where it stands (``identify <hash>``).
In drop mode, or when no PII key is configured, those attributes are removed instead.
"""

from __future__ import annotations

import re
from collections.abc import MutableSequence
from functools import lru_cache
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from connectors.segment.tracking import EMAIL, NOT_PII_KEYS, STEM_MIN, PiiPolicy, policy_from_settings
from tower_core.settings import Settings

CDP = "cdp"


def policy_for(settings: Settings) -> PiiPolicy:
    """The CDP's policy; without a key nothing can be pseudonymized consistently, so PII is dropped."""
    return policy_from_settings(settings) or PiiPolicy.build("drop", None, settings.cdp_pii_fields)


_DOMAIN_AFTER_AT = re.compile(rb"@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
# bytes whose lower-casing differs between str.lower() (is_field) and bytes.lower() (this look): walk instead
_UNICODE_CASE = (b"\xc4\xb0", b"\xe2\x84\xaa")  # 'İ' (U+0130), the Kelvin sign (U+212A)
_LOCAL_PART = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")


_NOT_ALNUM = bytes(b for b in range(128) if not chr(b).isalnum()) + bytes(range(128, 256))


@lru_cache(maxsize=8)
def _markers(fields: frozenset[str]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """Where a PII key would show in lower-cased protobuf bytes: a short field as a whole key (KeyValue.key: tag
    0x0a, its length, the name); a long one anywhere once the bytes are squeezed to ASCII letters and digits, as
    PiiPolicy.is_field squeezes names (``first_name`` holds ``firstname``)."""
    short = tuple(b"\x0a" + bytes([len(f)]) + f.encode() for f in fields if len(f) < STEM_MIN)
    return short, tuple(f.encode() for f in fields if len(f) >= STEM_MIN)


def _has_address(blob: bytes) -> bool:
    """An e-mail address at one of the '@' (a bare '@' is common in binary fields: ids, timestamps): a local-part
    character before it and a domain after it, as tracking.EMAIL reads them."""
    at = blob.find(b"@")
    while at != -1:
        if at and blob[at - 1] in _LOCAL_PART and _DOMAIN_AFTER_AT.match(blob, at):
            return True
        at = blob.find(b"@", at + 1)
    return False


def may_hold_pii(blob: bytes, policy: PiiPolicy) -> bool:
    """False only when no attribute in these protobuf bytes (a CDP's resource spans) can need scrubbing: no e-mail
    address and no PII key. A look at the bytes first, since walking spans in Python costs ~6 ms per 1,000."""
    if _has_address(blob):
        return True
    if not all(f.isascii() for f in policy.fields):
        return True  # a field this look cannot spell in bytes: walk the spans
    if any(m in blob for m in _UNICODE_CASE):
        return True
    low = blob.lower()
    for key in NOT_PII_KEYS:  # as whole keys only (KeyValue.key: tag 0x0a, its length, the name)
        low = low.replace(b"\x0a" + bytes([len(key)]) + key.encode(), b"")
    short, long = _markers(policy.fields)
    if any(m in low for m in short):
        return True
    squeezed = low.translate(None, _NOT_ALNUM)
    return any(m in squeezed for m in long)


def _is_cdp(attributes: Any) -> bool:
    return any(kv.key == "revops.system" and kv.value.string_value == CDP for kv in attributes)


def _text(value: Any) -> str:
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))


# what an attribute key is to the scrubber, decided once per key (keys repeat across a CDP's spans)
_KEY, _FIELD, _OTHER = 0, 1, 2


def _scrub(attributes: MutableSequence[Any], policy: PiiPolicy, kinds: dict[str, int]) -> int:
    """Scrub one attribute list in place; returns how many attributes were hashed or removed. The common case,
    a string holding no '@' under a key that is no PII field, costs a dict look-up and a substring test."""
    changed = 0
    for i in reversed(range(len(attributes))):
        kv = attributes[i]
        key = kv.key
        kind = kinds.get(key)
        if kind is None:
            kind = kinds[key] = _FIELD if policy.is_field(key) else _KEY if key.startswith("revops.") else _OTHER
        value = kv.value
        text = value.string_value
        if kind != _FIELD and "@" not in text:
            if not text and value.WhichOneof("value") in _NESTED:
                changed += _scrub_nested(value, policy)
            continue
        if kind == _KEY:
            pseudonym = policy.identifier(text)
        elif kind == _FIELD:
            shown = _text(value)
            if not shown:
                continue
            pseudonym = policy.digest(shown) if policy.mode == "hash" else ""
        elif EMAIL.search(text):
            pseudonym = policy.digest(text) if policy.mode == "hash" else ""
        else:
            continue
        changed += 1
        if pseudonym:
            value.Clear()
            value.string_value = pseudonym
        else:
            del attributes[i]
    return changed


_NESTED = ("array_value", "kvlist_value")


def _scrub_nested(value: Any, policy: PiiPolicy) -> bool:
    """An array's or a map's members at any depth (the store keeps one level, as JSON; deeper ones are walked
    all the same): a string holding an address, and a map member named as a PII field whatever its value, are
    hashed (cleared in drop mode)."""
    kind = value.WhichOneof("value")
    members = (
        [(False, v) for v in value.array_value.values]
        if kind == "array_value"
        else [(policy.is_field(m.key), m.value) for m in value.kvlist_value.values]
    )
    changed = False
    for field, v in members:
        inner = v.WhichOneof("value")
        if not field and inner in _NESTED:
            changed |= _scrub_nested(v, policy)
            continue
        shown = _text(v) if field else v.string_value
        if not shown or (not field and not EMAIL.search(shown)):
            continue
        v.Clear()
        if policy.mode == "hash":
            v.string_value = policy.digest(shown)
        changed = True
    return changed


def _scrub_text(holder: Any, field: str, policy: PiiPolicy) -> int:
    """A free-text field (a span's or event's name, a status message, a scope's name): its addresses hashed."""
    text = getattr(holder, field)
    if "@" not in text or not EMAIL.search(text):
        return 0
    setattr(holder, field, policy.redact_text(text))
    return 1


def _scrub_span(span: Any, policy: PiiPolicy, kinds: dict[str, int]) -> int:
    changed = _scrub(span.attributes, policy, kinds) + _scrub_text(span, "name", policy)
    changed += _scrub_text(span.status, "message", policy)
    for event in span.events:
        changed += _scrub(event.attributes, policy, kinds) + _scrub_text(event, "name", policy)
    for link in span.links:
        changed += _scrub(link.attributes, policy, kinds)
    return changed


# the attribute revops.system = "cdp" as protobuf encodes a KeyValue (key: field 1; value: field 2, an AnyValue
# whose string_value is field 1), which is how this process itself encodes it (scrubbed_payload)
_CDP_ATTRIBUTE = b"\x0a\x0drevops.system\x12\x05\x0a\x03cdp"


def _scrub_block(rs: Any, policy: PiiPolicy, kinds: dict[str, int], blob: bytes) -> int:
    """One ResourceSpans (``blob``: its bytes); how many attributes changed."""
    if _is_cdp(rs.resource.attributes):
        if not may_hold_pii(blob, policy):
            return 0
        changed = _scrub(rs.resource.attributes, policy, kinds)
        for ss in rs.scope_spans:
            changed += _scrub(ss.scope.attributes, policy, kinds) + _scrub_text(ss.scope, "name", policy)
            for span in ss.spans:
                changed += _scrub_span(span, policy, kinds)
        return changed
    if _CDP_ATTRIBUTE not in blob:
        return 0
    return sum(
        _scrub_span(span, policy, kinds) for ss in rs.scope_spans for span in ss.spans if _is_cdp(span.attributes)
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def scrubbed_payload(req: ExportTraceServiceRequest, policy: PiiPolicy) -> tuple[bytes, int]:
    """``req`` with the PII of the CDP's spans hashed or dropped, and its protobuf bytes (each block encoded once:
    the look at the bytes reads the same bytes the payload is made of); returns (bytes, attributes changed)."""
    changed = 0
    kinds: dict[str, int] = {}
    parts: list[bytes] = []
    for rs in req.resource_spans:  # the request's one field: resource_spans = 1, length-delimited
        blob = rs.SerializeToString()
        if n := _scrub_block(rs, policy, kinds, blob):
            changed += n
            blob = rs.SerializeToString()
        parts += (b"\x0a", _varint(len(blob)), blob)
    return b"".join(parts), changed


def scrub_cdp_spans(req: ExportTraceServiceRequest, policy: PiiPolicy) -> int:
    """Hash or drop the PII of the CDP's spans in ``req``; returns how many attributes changed."""
    return scrubbed_payload(req, policy)[1]
