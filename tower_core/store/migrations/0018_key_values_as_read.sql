-- 0018: span attribute values are read as business keys the way events' are (collector/correlation.py
-- extract_keys): a value is a JSON list of ids only when it is one ('[EU]-INV-7' is an id, not an empty list),
-- and the 256 limit counts characters, not bytes (a 200-character Cyrillic id was never indexed). The views of
-- 0009 and 0015 are replaced under new names, the new one created before the old one is dropped: spans arriving
-- meanwhile reach at least one of them, and a row both wrote collapses (idempotent aggregates). Spans stored
-- before, whose values the old views misread, are read again at the end (the same aggregates: running this
-- twice, or from two starting processes, writes nothing twice).
CREATE MATERIALIZED VIEW IF NOT EXISTS $db.otel_traces_key_links_v2_mv TO $db.business_key_links
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
    arrayFlatten(arrayMap((n, v) -> arrayMap(x -> (transform(n, names.1, names.2, ''), x),
            if(startsWith(v, '[') AND endsWith(v, ']') AND isValidJSON(v), JSONExtract(v, 'Array(String)'), [v])),
        mapKeys(mapFilter((n, v) -> has(names.1, n), SpanAttributes)),
        mapValues(mapFilter((n, v) -> has(names.1, n), SpanAttributes)))),
    arrayMap(l -> ('trace', l), arrayFilter(l -> l != TraceId, Links.TraceId))) AS k
WHERE k.2 != '' AND lengthUTF8(k.2) <= 256
GROUP BY KeyType, KeyValue, TraceId, System;

DROP VIEW IF EXISTS $db.otel_traces_key_links_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS $db.step_activity_spans_v2_mv TO $db.step_activity
AS WITH
    SpanAttributes['revops.step'] AS s,
    multiIf(s = 'cdp_to_billing', SpanAttributes['revops.customer.id'], s = 'invoice_to_ledger',
        SpanAttributes['revops.invoice.id'], SpanAttributes['revops.payment.id']) AS raw
SELECT
    s AS Step,
    toDate(Timestamp) AS Day,
    multiIf(s = 'cdp_to_billing', 'customer', s = 'invoice_to_ledger', 'invoice', 'payment') AS KeyType,
    arrayJoin(if(startsWith(raw, '[') AND endsWith(raw, ']') AND isValidJSON(raw),
        arrayFilter(v -> v != '', JSONExtract(raw, 'Array(String)')), [raw])) AS KeyValue,
    if(SpanAttributes['revops.system'] != '', SpanAttributes['revops.system'], ResourceAttributes['revops.system'])
        AS System,
    if(SpanAttributes['revops.region'] != '', SpanAttributes['revops.region'], ResourceAttributes['revops.region'])
        AS Region,
    Timestamp AS FirstSeen,
    addNanoseconds(Timestamp, Duration) AS LastSeen
FROM $db.otel_traces
WHERE s IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger') AND raw != ''
    AND StatusCode != 'Error';

DROP VIEW IF EXISTS $db.step_activity_spans_mv;

INSERT INTO $db.business_key_links (KeyType, KeyValue, TraceId, System, Region, FirstSeen, LastSeen)
WITH (SELECT groupArray((AttrName, KeyType)) FROM $db.key_attribute_names FINAL WHERE NOT IsDeleted) AS names
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
FROM (
    SELECT * FROM $db.otel_traces
    WHERE arrayExists(v -> (startsWith(v, '[') AND NOT (endsWith(v, ']') AND isValidJSON(v)))
        OR (length(v) > 256 AND lengthUTF8(v) <= 256), mapValues(SpanAttributes))
)
ARRAY JOIN arrayConcat(
    arrayFlatten(arrayMap((n, v) -> arrayMap(x -> (transform(n, names.1, names.2, ''), x),
            if(startsWith(v, '[') AND endsWith(v, ']') AND isValidJSON(v), JSONExtract(v, 'Array(String)'), [v])),
        mapKeys(mapFilter((n, v) -> has(names.1, n), SpanAttributes)),
        mapValues(mapFilter((n, v) -> has(names.1, n), SpanAttributes)))),
    arrayMap(l -> ('trace', l), arrayFilter(l -> l != TraceId, Links.TraceId))) AS k
WHERE k.2 != '' AND lengthUTF8(k.2) <= 256
GROUP BY KeyType, KeyValue, TraceId, System;

INSERT INTO $db.step_activity (Step, Day, KeyType, KeyValue, System, Region, FirstSeen, LastSeen)
WITH
    SpanAttributes['revops.step'] AS s,
    multiIf(s = 'cdp_to_billing', SpanAttributes['revops.customer.id'], s = 'invoice_to_ledger',
        SpanAttributes['revops.invoice.id'], SpanAttributes['revops.payment.id']) AS raw
SELECT
    s AS Step,
    toDate(Timestamp) AS Day,
    multiIf(s = 'cdp_to_billing', 'customer', s = 'invoice_to_ledger', 'invoice', 'payment') AS KeyType,
    arrayJoin(if(startsWith(raw, '[') AND endsWith(raw, ']') AND isValidJSON(raw),
        arrayFilter(v -> v != '', JSONExtract(raw, 'Array(String)')), [raw])) AS KeyValue,
    if(SpanAttributes['revops.system'] != '', SpanAttributes['revops.system'], ResourceAttributes['revops.system'])
        AS System,
    if(SpanAttributes['revops.region'] != '', SpanAttributes['revops.region'], ResourceAttributes['revops.region'])
        AS Region,
    Timestamp AS FirstSeen,
    addNanoseconds(Timestamp, Duration) AS LastSeen
FROM $db.otel_traces
WHERE s IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger') AND raw != ''
    AND StatusCode != 'Error'
    AND ((startsWith(raw, '[') AND NOT (endsWith(raw, ']') AND isValidJSON(raw)))
        OR (length(raw) > 256 AND lengthUTF8(raw) <= 256));
