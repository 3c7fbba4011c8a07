"""PII in the CDP's CloudEvents, hashed or dropped before they are buffered, as the CDP's tracking calls and
spans are (connectors/segment/tracking.py, collector/span_pii.py). Pure, no IO.

An event is the CDP's when its ``revops.system`` says so. Within it: a ``revops.*`` key holding an address
becomes its pseudonym (the one the CDP's spans and tracking calls carry, so correlation still joins them), a PII
field is hashed, any other value holding an e-mail address is hashed; the same in ``data``, at any depth, and in
the subject and the event id. In drop mode those values are removed (an id is hashed with the process's key).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from collector.events import BusinessEvent
from connectors.segment.tracking import EMAIL, PiiPolicy

CDP = "cdp"


def _value(key: str, value: str, policy: PiiPolicy) -> str:
    """One attribute or top-level data value as kept ('' = removed)."""
    if policy.is_field(key):
        return policy.digest(value) if policy.mode == "hash" and value else ""
    if "@" not in value:
        return value
    if key.startswith("revops."):
        return policy.identifier(value)
    if EMAIL.search(value):
        return policy.digest(value) if policy.mode == "hash" else ""
    return value


def _data(text: str, policy: PiiPolicy) -> str:
    doc: Any = orjson.loads(text)
    if isinstance(doc, dict):
        keys = {k: v for k, v in doc.items() if k.startswith("revops.") and isinstance(v, str)}
        doc = policy.scrub({k: v for k, v in doc.items() if k not in keys})
        for k, v in keys.items():
            if kept := _value(k, v, policy):
                doc[k] = kept
    else:
        doc = policy.scrub(doc)
    return orjson.dumps(doc).decode()


def scrubbed(event: BusinessEvent, policy: PiiPolicy) -> BusinessEvent:
    """``event`` with its PII hashed or dropped when it is the CDP's; any other system's event as it came."""
    if event.attributes.get("revops.system", "").strip().lower() != CDP:
        return event
    attrs = {k: kept for k, v in event.attributes.items() if (kept := _value(k, v, policy))}
    subject = policy.identifier(event.subject) if "@" in event.subject else event.subject
    event_id = policy.digest(event.event_id) if "@" in event.event_id else event.event_id
    data = _data(event.data, policy) if event.data else event.data
    return dataclasses.replace(event, attributes=attrs, subject=subject, event_id=event_id, data=data)
