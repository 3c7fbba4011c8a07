-- 0008: business-key links from spans by a materialized view on otel_traces, so the flusher parses each OTLP
-- request once. The attribute names that carry keys (DOMAIN.md §2 plus TOWER_KEY_ATTRIBUTE_MAP) live in
-- key_attribute_names, synced from settings at start; the view reads them at every insert.

-- dedup: replace (Version); a name dropped from the settings is kept with IsDeleted = 1.
CREATE TABLE IF NOT EXISTS $db.key_attribute_names
(
    AttrName String,
    KeyType LowCardinality(String),
    Version UInt64,
    IsDeleted UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY AttrName;

-- Target business_key_links is an idempotent aggregate, so a block seen twice changes nothing.
CREATE MATERIALIZED VIEW IF NOT EXISTS $db.otel_traces_key_links_mv TO $db.business_key_links
AS WITH (SELECT groupArray((AttrName, KeyType)) FROM $db.key_attribute_names FINAL WHERE NOT IsDeleted) AS names
SELECT
    k.1 AS KeyType,
    k.2 AS KeyValue,
    TraceId,
    if(SpanAttributes['revops.system'] != '', SpanAttributes['revops.system'], ResourceAttributes['revops.system'])
        AS System,
    any(if(SpanAttributes['revops.region'] != '', SpanAttributes['revops.region'],
           ResourceAttributes['revops.region'])) AS Region,
    min(Timestamp) AS FirstSeen,
    max(fromUnixTimestamp64Nano(toUnixTimestamp64Nano(Timestamp) + toInt64(Duration))) AS LastSeen
FROM $db.otel_traces
ARRAY JOIN arrayConcat(
    arrayFlatten(arrayMap(p -> arrayMap(v -> (p.2, v),
        if(startsWith(SpanAttributes[p.1], '['), JSONExtract(SpanAttributes[p.1], 'Array(String)'),
           [SpanAttributes[p.1]])), names)),
    arrayMap(l -> ('trace', l), arrayFilter(l -> l != TraceId, Links.TraceId))) AS k
WHERE k.2 != '' AND length(k.2) <= 256
GROUP BY KeyType, KeyValue, TraceId, System;
