-- 0005: the SLA engine's tables (issue 6). Dedup mechanisms as in 0001 ("dedup:").

-- dedup: idempotent aggregate (min/max/anyLast). Per flow step and business item (the step's item key:
-- customer for cdp_to_billing, invoice for invoice_to_ledger, payment for payment_to_cash and
-- refund_to_ledger), the first and last activity seen in each system, per day. A step's latency is
-- min(FirstSeen) in its source system -> max(LastSeen) in its target system (collector/correlation.py STEPS),
-- computed set-based by grouping on KeyValue. Day (of the activity) is in the key so reads prune by time.
CREATE TABLE IF NOT EXISTS $db.step_events
(
    Step LowCardinality(String),
    Day Date,
    KeyType LowCardinality(String),
    KeyValue String,
    System LowCardinality(String),
    Region SimpleAggregateFunction(anyLast, LowCardinality(String)),
    FirstSeen SimpleAggregateFunction(min, DateTime64(9)),
    LastSeen SimpleAggregateFunction(max, DateTime64(9))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(Day)
ORDER BY (Step, Day, KeyType, KeyValue, System)
SETTINGS index_granularity = 8192;

-- Only successful activity counts: a span with status Error (a declined payment, a rejected ERP posting) or
-- a failed/rejected business event neither starts nor completes an item.
-- Spans -> step activity, one row per span and item (merges aggregate them; no GROUP BY keeps the insert path
-- cheap). An item key attribute may hold a JSON array of ids (one span for several items).
CREATE MATERIALIZED VIEW IF NOT EXISTS $db.step_events_spans_mv TO $db.step_events
AS WITH
    SpanAttributes['revops.step'] AS s,
    multiIf(s = 'cdp_to_billing', SpanAttributes['revops.customer.id'], s = 'invoice_to_ledger',
        SpanAttributes['revops.invoice.id'], SpanAttributes['revops.payment.id']) AS raw
SELECT
    s AS Step,
    toDate(Timestamp) AS Day,
    multiIf(s = 'cdp_to_billing', 'customer', s = 'invoice_to_ledger', 'invoice', 'payment') AS KeyType,
    arrayJoin(if(startsWith(raw, '['), arrayFilter(v -> v != '', JSONExtract(raw, 'Array(String)')), [raw]))
        AS KeyValue,
    if(SpanAttributes['revops.system'] != '', SpanAttributes['revops.system'], ResourceAttributes['revops.system'])
        AS System,
    if(SpanAttributes['revops.region'] != '', SpanAttributes['revops.region'], ResourceAttributes['revops.region'])
        AS Region,
    Timestamp AS FirstSeen,
    addNanoseconds(Timestamp, Duration) AS LastSeen
FROM $db.otel_traces
WHERE s IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger') AND raw != ''
    AND StatusCode != 'Error';

-- Business events (CloudEvents) -> step activity; their key columns already honour the attribute map.
CREATE MATERIALIZED VIEW IF NOT EXISTS $db.step_events_events_mv TO $db.step_events
AS SELECT
    Step,
    toDate(Time) AS Day,
    multiIf(Step = 'cdp_to_billing', 'customer', Step = 'invoice_to_ledger', 'invoice', 'payment') AS KeyType,
    multiIf(Step = 'cdp_to_billing', CustomerId, Step = 'invoice_to_ledger', InvoiceId, PaymentId) AS KeyValue,
    System,
    Region,
    Time AS FirstSeen,
    Time AS LastSeen
FROM $db.business_events
WHERE Step IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger') AND KeyValue != ''
    AND NOT match(Type, '(?i)(fail|reject|error)');

-- Back-fill what was stored before this migration (re-running it changes nothing: min/max aggregates).
INSERT INTO $db.step_events
WITH
    SpanAttributes['revops.step'] AS s,
    multiIf(s = 'cdp_to_billing', SpanAttributes['revops.customer.id'], s = 'invoice_to_ledger',
        SpanAttributes['revops.invoice.id'], SpanAttributes['revops.payment.id']) AS raw
SELECT
    s AS Step,
    toDate(Timestamp) AS Day,
    multiIf(s = 'cdp_to_billing', 'customer', s = 'invoice_to_ledger', 'invoice', 'payment') AS KeyType,
    arrayJoin(if(startsWith(raw, '['), arrayFilter(v -> v != '', JSONExtract(raw, 'Array(String)')), [raw]))
        AS KeyValue,
    if(SpanAttributes['revops.system'] != '', SpanAttributes['revops.system'], ResourceAttributes['revops.system'])
        AS System,
    if(SpanAttributes['revops.region'] != '', SpanAttributes['revops.region'], ResourceAttributes['revops.region'])
        AS Region,
    Timestamp AS FirstSeen,
    addNanoseconds(Timestamp, Duration) AS LastSeen
FROM $db.otel_traces
WHERE s IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger') AND raw != ''
    AND StatusCode != 'Error';

INSERT INTO $db.step_events
SELECT
    Step,
    toDate(Time) AS Day,
    multiIf(Step = 'cdp_to_billing', 'customer', Step = 'invoice_to_ledger', 'invoice', 'payment') AS KeyType,
    multiIf(Step = 'cdp_to_billing', CustomerId, Step = 'invoice_to_ledger', InvoiceId, PaymentId) AS KeyValue,
    System,
    Region,
    Time AS FirstSeen,
    Time AS LastSeen
FROM $db.business_events FINAL
WHERE Step IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger') AND KeyValue != ''
    AND NOT match(Type, '(?i)(fail|reject|error)');

-- dedup: replace. One row per breach (an alert's firing episode), rewritten at each evaluation while it
-- fires and once when it resolves. BreachId = hash(fingerprint of the alert's labels, StartsAt).
CREATE TABLE IF NOT EXISTS $db.sla_breaches
(
    BreachId String,
    Fingerprint String,
    Sla LowCardinality(String),
    Kind LowCardinality(String),
    Step LowCardinality(String),
    Region LowCardinality(String),
    Severity LowCardinality(String),
    Labels Map(String, String),
    Annotations Map(String, String),
    Status LowCardinality(String),
    StartsAt DateTime64(3),
    EndsAt DateTime64(3),
    Value Float64,
    PeakValue Float64,
    Details String,
    EvaluatedAt DateTime64(3),
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
PARTITION BY toYYYYMM(StartsAt)
ORDER BY BreachId;

-- dedup: replace on (Receiver, Fingerprint, StartsAt, Status): the webhook notifier's log of what each
-- receiver was told; a repeated record of the same notification collapses. Read before every send, so a
-- restart never notifies twice.
CREATE TABLE IF NOT EXISTS $db.sla_notifications
(
    Receiver String,
    Fingerprint String,
    StartsAt DateTime64(3),
    Status LowCardinality(String),
    GroupKey String,
    SentAt DateTime64(3),
    HttpStatus UInt16,
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY (Receiver, Fingerprint, StartsAt, Status);
