-- 0001: the tower's first tables.
-- Duplicate-tolerance (DOMAIN.md §6) is stated per table as "dedup:":
--   token   = MergeTree with non_replicated_deduplication_window + insert_deduplication_token per batch;
--             a retried batch with the same token is dropped by ClickHouse.
--   replace = ReplacingMergeTree(Version): a row is a versioned state; reads take argMax / FINAL, so
--             unmerged duplicates never double count.
--   idempotent aggregate = AggregatingMergeTree of min/max/any: inserting a row twice changes nothing.

-- dedup: token (the collector's flusher derives the token from its write-ahead segment and offset).
-- Columns are the OpenTelemetry Collector clickhouseexporter's, so Grafana and other OTel tools read them.
CREATE TABLE IF NOT EXISTS $db.otel_traces
(
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested
    (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested
    (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000,
    fsync_after_insert = 1, fsync_part_directory = 1;

-- dedup: idempotent aggregate (min/max). Trace id -> time range, so trace-by-id reads one partition range.
CREATE TABLE IF NOT EXISTS $db.otel_traces_trace_id_ts
(
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime64(9)) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime64(9)) CODEC(ZSTD(1))
)
ENGINE = AggregatingMergeTree
ORDER BY TraceId
SETTINGS index_granularity = 1024;

CREATE MATERIALIZED VIEW IF NOT EXISTS $db.otel_traces_trace_id_ts_mv TO $db.otel_traces_trace_id_ts
AS SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End
FROM $db.otel_traces
WHERE TraceId != ''
GROUP BY TraceId;

-- dedup: idempotent aggregate. Business key -> trace: the correlation index (beats attribute search).
-- KeyType is one of customer, cdp_user, invoice, payment, ledger_entry, or trace (an OTel span link).
CREATE TABLE IF NOT EXISTS $db.business_key_links
(
    KeyType LowCardinality(String),
    KeyValue String,
    TraceId String,
    System LowCardinality(String),
    Region SimpleAggregateFunction(anyLast, LowCardinality(String)),
    FirstSeen SimpleAggregateFunction(min, DateTime64(9)),
    LastSeen SimpleAggregateFunction(max, DateTime64(9))
)
ENGINE = AggregatingMergeTree
ORDER BY (KeyType, KeyValue, TraceId, System)
SETTINGS index_granularity = 1024, fsync_after_insert = 1, fsync_part_directory = 1;

-- dedup: idempotent aggregate. The same links ordered by trace, to expand a trace into its keys.
CREATE TABLE IF NOT EXISTS $db.trace_key_links
(
    TraceId String,
    KeyType LowCardinality(String),
    KeyValue String,
    System LowCardinality(String),
    FirstSeen SimpleAggregateFunction(min, DateTime64(9)),
    LastSeen SimpleAggregateFunction(max, DateTime64(9))
)
ENGINE = AggregatingMergeTree
ORDER BY (TraceId, KeyType, KeyValue, System)
SETTINGS index_granularity = 1024;

CREATE MATERIALIZED VIEW IF NOT EXISTS $db.trace_key_links_mv TO $db.trace_key_links
AS SELECT TraceId, KeyType, KeyValue, System, FirstSeen, LastSeen
FROM $db.business_key_links;

-- dedup: replace on (Source, EventId) — CloudEvents' identity — plus a token per flushed batch.
CREATE TABLE IF NOT EXISTS $db.business_events
(
    EventId String,
    Source String,
    Type LowCardinality(String),
    Subject String,
    Time DateTime64(9),
    ReceivedAt DateTime64(9),
    TraceId String,
    SpanId String,
    System LowCardinality(String),
    Region LowCardinality(String),
    Step LowCardinality(String),
    CustomerId String,
    InvoiceId String,
    PaymentId String,
    LedgerEntryId String,
    AmountMinor Int64,
    Currency LowCardinality(String),
    Attributes Map(LowCardinality(String), String),
    Data String CODEC(ZSTD(3)),
    INDEX idx_trace TraceId TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_customer CustomerId TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_invoice InvoiceId TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_payment PaymentId TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_ledger LedgerEntryId TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(ReceivedAt)
PARTITION BY toYYYYMM(Time)
ORDER BY (Source, EventId)
SETTINGS non_replicated_deduplication_window = 10000, fsync_after_insert = 1, fsync_part_directory = 1;

-- dedup: replace. Billing's invoice states; money is Int64 minor units + ISO currency.
CREATE TABLE IF NOT EXISTS $db.billing_invoices
(
    InvoiceId String,
    CustomerId String,
    Region LowCardinality(String),
    Currency LowCardinality(String),
    SubtotalMinor Int64,
    TaxMinor Int64,
    TotalMinor Int64,
    AmountPaidMinor Int64,
    AmountCreditedMinor Int64,
    Status LowCardinality(String),
    IssuedAt DateTime64(3),
    DueAt DateTime64(3),
    FinalizedAt DateTime64(3),
    PaidAt DateTime64(3),
    UpdatedAt DateTime64(3),
    SourceSystem LowCardinality(String),
    Attributes Map(LowCardinality(String), String),
    Version UInt64,
    IsDeleted UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY InvoiceId
SETTINGS non_replicated_deduplication_window = 10000;

-- dedup: replace. Payments, refunds and credit notes from billing (Kind); allocations map invoice -> minor.
CREATE TABLE IF NOT EXISTS $db.billing_payments
(
    PaymentId String,
    Kind LowCardinality(String),
    CustomerId String,
    Region LowCardinality(String),
    Currency LowCardinality(String),
    AmountMinor Int64,
    Method LowCardinality(String),
    Status LowCardinality(String),
    Allocations Map(String, Int64),
    RelatedPaymentId String,
    OccurredAt DateTime64(3),
    UpdatedAt DateTime64(3),
    SourceSystem LowCardinality(String),
    Attributes Map(LowCardinality(String), String),
    Version UInt64,
    IsDeleted UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY PaymentId
SETTINGS non_replicated_deduplication_window = 10000;

-- dedup: replace. ERP postings (invoice, payment application, credit memo, journal); ExternalRef = billing id.
CREATE TABLE IF NOT EXISTS $db.erp_ledger_entries
(
    EntryId String,
    EntryType LowCardinality(String),
    ExternalRef String,
    PartyRef String,
    Region LowCardinality(String),
    Currency LowCardinality(String),
    AmountMinor Int64,
    Status LowCardinality(String),
    AppliedToRef String,
    PostedAt DateTime64(3),
    PeriodDate Date,
    UpdatedAt DateTime64(3),
    SourceSystem LowCardinality(String),
    Attributes Map(LowCardinality(String), String),
    Version UInt64,
    IsDeleted UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY EntryId
SETTINGS non_replicated_deduplication_window = 10000;

-- dedup: replace. Exception queue items; DriftId is a hash of (class, keys) so a re-detection updates it.
CREATE TABLE IF NOT EXISTS $db.drift_items
(
    DriftId String,
    Class LowCardinality(String),
    ReasonCode LowCardinality(String),
    Region LowCardinality(String),
    Currency LowCardinality(String),
    CustomerId String,
    InvoiceId String,
    PaymentId String,
    LedgerEntryId String,
    AmountMinor Int64,
    BillingValues Map(String, String),
    ErpValues Map(String, String),
    State LowCardinality(String),
    StateNote String,
    FirstSeen DateTime64(3),
    LastSeen DateTime64(3),
    UpdatedAt DateTime64(3),
    RunId String,
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY DriftId
SETTINGS non_replicated_deduplication_window = 10000;

-- dedup: replace. Corrective syncs and replays; IdempotencyKey = hash(class, keys, target).
CREATE TABLE IF NOT EXISTS $db.actions
(
    ActionId String,
    IdempotencyKey String,
    Kind LowCardinality(String),
    DriftId String,
    Class LowCardinality(String),
    TargetSystem LowCardinality(String),
    TargetRef String,
    State LowCardinality(String),
    Attempts UInt32,
    LastError String,
    Result String,
    OriginalActionId String,
    RequestedBy String,
    CreatedAt DateTime64(3),
    UpdatedAt DateTime64(3),
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY ActionId
SETTINGS non_replicated_deduplication_window = 10000;

-- dedup: token (each audit record carries its own id, used as the token).
CREATE TABLE IF NOT EXISTS $db.audit_log
(
    AuditId String,
    EventTime DateTime64(6),
    Actor String,
    Action LowCardinality(String),
    ObjectType LowCardinality(String),
    ObjectId String,
    Before String,
    After String,
    Note String,
    Outcome LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(EventTime)
ORDER BY (EventTime, AuditId)
SETTINGS non_replicated_deduplication_window = 10000;
