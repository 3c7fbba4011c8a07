"""What a replayed write-ahead segment still has to write (pure).

A segment left by an earlier process may have been flushed in part before it died. Retrying with the same
insert_deduplication_token is not enough: ClickHouse records a block's token in the table's deduplication log
before it renames the block's part into place, so a ``kill -9`` between the two leaves a token whose part never
landed, and the retry is dropped as a duplicate. Replays therefore look at what the store holds and write the
rest under a new token. Business events need none of this: their tables are idempotent by content.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

SpanKey = tuple[str, str]  # (TraceId, SpanId) as otel_traces stores them: lowercase hex


@dataclass(frozen=True)
class SpanIndex:
    """The spans of some OTLP requests: their keys and the days their start times fall on (the partitions)."""

    keys: frozenset[SpanKey]
    first_day: dt.date
    last_day: dt.date


def index(requests: Iterable[bytes]) -> SpanIndex | None:
    keys: set[SpanKey] = set()
    starts: list[int] = []
    for body in requests:
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    keys.add(_key(sp))
                    starts.append(int(sp.start_time_unix_nano))
    if not starts:
        return None
    return SpanIndex(frozenset(keys), _day(min(starts)), _day(max(starts)))


def _key(span: Span) -> SpanKey:
    return span.trace_id.hex(), span.span_id.hex()


def _day(ns: int) -> dt.date:
    return dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC).date()


def without(requests: Iterable[bytes], stored: set[SpanKey]) -> list[bytes]:
    """The requests minus the spans already stored (requests left with no span are dropped)."""
    out = []
    for body in requests:
        req = ExportTraceServiceRequest.FromString(body)
        kept = 0
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                keep = [sp for sp in ss.spans if _key(sp) not in stored]
                if len(keep) != len(ss.spans):
                    del ss.spans[:]
                    ss.spans.extend(keep)
                kept += len(keep)
        if kept:
            out.append(req.SerializeToString())
    return out
