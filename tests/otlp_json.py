"""OTLP/JSON request parts the HTTP tests send (the specification's JSON encoding, built by hand)."""

from __future__ import annotations


def step_span(trace_id: str, n: int, system: str, step: str, start_ns: int, **keys: str) -> dict:
    """A ResourceSpans of one 1 ms span of a flow step: ``revops.system``, ``revops.step``, region EU and the
    given business keys as attributes; span id ``n + 1``."""
    attrs = {"revops.system": system, "revops.step": step, "revops.region": "EU", **keys}
    return {
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": system}}]},
        "scopeSpans": [
            {
                "spans": [
                    {
                        "traceId": trace_id,
                        "spanId": f"{n + 1:016x}",
                        "name": f"{system} {step}",
                        "startTimeUnixNano": str(start_ns),
                        "endTimeUnixNano": str(start_ns + 10**6),
                        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()],
                    }
                ]
            }
        ],
    }
