-- 0015: step activity kept per start instant, not per day. step_events held, per item, system and day, the first
-- and the last activity (min/max): once ClickHouse merged a day's parts, a target system's activity before the
-- item's start and after its end became one row whose max was taken as the end, so a step's latency depended on
-- background merges (a 5-minute CDP -> billing sync read as 8 hours when billing also touched the customer in the
-- morning and the evening). step_activity has FirstSeen in its key: only activity starting at the same instant (a
-- replayed span) collapses, and the reads see every activity.
-- Safe to run while spans arrive and from two processes at once (tower serve and tower reconciler both migrate at
-- start): the new views exist before the back-fill, so nothing inserted meanwhile is missed; a row both wrote
-- collapses (same key, max/anyLast); nothing is renamed, and the old table goes last.

-- dedup: idempotent aggregate (anyLast/max) per (step, day, item, system, start instant).
CREATE TABLE IF NOT EXISTS $db.step_activity
(
    Step LowCardinality(String),
    Day Date,
    KeyType LowCardinality(String),
    KeyValue String,
    System LowCardinality(String),
    FirstSeen DateTime64(9),
    Region SimpleAggregateFunction(anyLast, LowCardinality(String)),
    LastSeen SimpleAggregateFunction(max, DateTime64(9))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(Day)
ORDER BY (Step, Day, KeyType, KeyValue, System, FirstSeen)
SETTINGS index_granularity = 8192;

CREATE MATERIALIZED VIEW IF NOT EXISTS $db.step_activity_spans_mv TO $db.step_activity
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

CREATE MATERIALIZED VIEW IF NOT EXISTS $db.step_activity_events_mv TO $db.step_activity
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

INSERT INTO $db.step_activity (Step, Day, KeyType, KeyValue, System, Region, FirstSeen, LastSeen)
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

INSERT INTO $db.step_activity (Step, Day, KeyType, KeyValue, System, Region, FirstSeen, LastSeen)
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

DROP VIEW IF EXISTS $db.step_events_spans_mv;

DROP VIEW IF EXISTS $db.step_events_events_mv;

DROP TABLE IF EXISTS $db.step_events;
