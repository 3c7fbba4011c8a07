"""PII in the CDP's spans, hashed or dropped before a request is buffered, as the CDP's events are
(connectors/segment/tracking.py). Pure, no IO.

A span is the CDP's when its resource says so (``revops.system = cdp``: how a service names itself in OTel); a
span-level attribute alone is not looked at, since reading every span's attributes in Python would cost the
ingest path about as much as decoding it. Within those spans, and their events and links:
- a ``revops.*`` business key holding an e-mail address becomes its pseudonym (the one the CDP's events use for
  the same address, so correlation still joins them); other business keys are kept;
- an attribute whose name is a PII field (TOWER_CDP_PII_FIELDS) is hashed whatever its value type;
- any other string (or string in an array) holding an e-mail address is hashed.
In drop mode, or when no PII key is configured, those attributes are removed instead.
"""

from __future__ import annotations

from collections.abc import MutableSequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from connectors.segment.tracking import EMAIL, PiiPolicy
from tower_core.settings import Settings

CDP = "cdp"


def policy_for(settings: Settings) -> PiiPolicy:
    """The CDP's policy; without a key nothing can be pseudonymized consistently, so PII is dropped."""
    key = settings.cdp_pii_hmac_key.get_secret_value() if settings.cdp_pii_hmac_key else None
    mode = settings.cdp_pii_mode if key else "drop"
    return PiiPolicy.build(mode, key, settings.cdp_pii_fields)


def _is_cdp(attributes: Any) -> bool:
    return any(kv.key == "revops.system" and kv.value.string_value == CDP for kv in attributes)


def _text(value: Any) -> str:
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))


def _scrub(attributes: MutableSequence[Any], policy: PiiPolicy) -> int:
    """Scrub one attribute list in place; returns how many attributes were hashed or removed."""
    changed = 0
    for i in reversed(range(len(attributes))):
        kv = attributes[i]
        value = kv.value
        kind = value.WhichOneof("value")
        if kv.key.startswith("revops."):
            if kind != "string_value" or "@" not in value.string_value:
                continue
            pseudonym = policy.identifier(value.string_value)
        elif policy.is_field(kv.key):
            pseudonym = policy.digest(_text(value)) if policy.mode == "hash" and _text(value) else ""
        elif kind == "string_value" and EMAIL.search(value.string_value):
            pseudonym = policy.digest(value.string_value) if policy.mode == "hash" else ""
        elif kind == "array_value" and any(EMAIL.search(v.string_value) for v in value.array_value.values):
            for v in value.array_value.values:
                if EMAIL.search(v.string_value):
                    v.string_value = policy.digest(v.string_value) if policy.mode == "hash" else ""
            changed += 1
            continue
        else:
            continue
        changed += 1
        if pseudonym:
            value.Clear()
            value.string_value = pseudonym
        else:
            del attributes[i]
    return changed


def scrub_cdp_spans(req: ExportTraceServiceRequest, policy: PiiPolicy) -> int:
    """Hash or drop the PII of the CDP's spans in ``req``; returns how many attributes changed."""
    changed = 0
    for rs in req.resource_spans:
        if not _is_cdp(rs.resource.attributes):
            continue
        changed += _scrub(rs.resource.attributes, policy)
        for ss in rs.scope_spans:
            for span in ss.spans:
                changed += _scrub(span.attributes, policy)
                for event in span.events:
                    changed += _scrub(event.attributes, policy)
                for link in span.links:
                    changed += _scrub(link.attributes, policy)
    return changed
