-- 0004: the reconciler's tables and columns (issue 5). Dedup mechanisms as in 0001 ("dedup:").

-- Ingest time of every state row, set by the server when the writer omits it (the reconciler's pull and the
-- simulator's bulk writer both do). Incremental runs compare the keys of rows ingested since the last run's
-- watermark; Version stays the source's change time, so it cannot serve as a watermark (late arrivals).
ALTER TABLE $db.billing_invoices ADD COLUMN IF NOT EXISTS IngestedAt DateTime64(6) DEFAULT now64(6);
ALTER TABLE $db.billing_payments ADD COLUMN IF NOT EXISTS IngestedAt DateTime64(6) DEFAULT now64(6);
ALTER TABLE $db.erp_ledger_entries ADD COLUMN IF NOT EXISTS IngestedAt DateTime64(6) DEFAULT now64(6);
ALTER TABLE $db.billing_customers ADD COLUMN IF NOT EXISTS IngestedAt DateTime64(6) DEFAULT now64(6);
ALTER TABLE $db.cdp_profiles ADD COLUMN IF NOT EXISTS IngestedAt DateTime64(6) DEFAULT now64(6);
ALTER TABLE $db.billing_invoices ADD INDEX IF NOT EXISTS idx_ingested IngestedAt TYPE minmax GRANULARITY 1;
ALTER TABLE $db.billing_payments ADD INDEX IF NOT EXISTS idx_ingested IngestedAt TYPE minmax GRANULARITY 1;
ALTER TABLE $db.erp_ledger_entries ADD INDEX IF NOT EXISTS idx_ingested IngestedAt TYPE minmax GRANULARITY 1;

-- Drift items: the system the difference is observed in (erp, billing, cdp), the business day it belongs
-- to, the item's primary key (the class's identifying key), KeyType (invoice, payment or customer: which
-- comparison produced it, so a run resolves only items whose keys it compared) and which fields differ.
ALTER TABLE $db.drift_items ADD COLUMN IF NOT EXISTS System LowCardinality(String) DEFAULT '';
ALTER TABLE $db.drift_items ADD COLUMN IF NOT EXISTS Day Date DEFAULT toDate(FirstSeen);
ALTER TABLE $db.drift_items ADD COLUMN IF NOT EXISTS PrimaryKey String DEFAULT '';
ALTER TABLE $db.drift_items ADD COLUMN IF NOT EXISTS KeyType LowCardinality(String) DEFAULT '';
ALTER TABLE $db.drift_items ADD COLUMN IF NOT EXISTS DiffFields Array(String) DEFAULT [];
ALTER TABLE $db.drift_items ADD COLUMN IF NOT EXISTS ResolvedAt DateTime64(3) DEFAULT 0;

-- Actions: the operation and its parameters, approval, the next retry time and the dead-letter flag.
ALTER TABLE $db.actions ADD COLUMN IF NOT EXISTS Operation LowCardinality(String) DEFAULT '';
ALTER TABLE $db.actions ADD COLUMN IF NOT EXISTS Params String DEFAULT '{}';
ALTER TABLE $db.actions ADD COLUMN IF NOT EXISTS ApprovedBy String DEFAULT '';
ALTER TABLE $db.actions ADD COLUMN IF NOT EXISTS NextAttemptAt DateTime64(3) DEFAULT 0;
ALTER TABLE $db.actions ADD COLUMN IF NOT EXISTS DeadLetter UInt8 DEFAULT 0;

-- dedup: replace. One row per run, rewritten as the run advances (state, counts, error).
CREATE TABLE IF NOT EXISTS $db.reconcile_runs
(
    RunId String,
    Mode LowCardinality(String),
    Region LowCardinality(String),
    Trigger LowCardinality(String),
    RequestedBy String,
    State LowCardinality(String),
    Stage LowCardinality(String),
    AsOf DateTime64(3),
    Watermark DateTime64(6),
    StartedAt DateTime64(6),
    FinishedAt DateTime64(6),
    Pulled Map(String, UInt64),
    KeysCompared UInt64,
    DriftOpen UInt64,
    DriftNew UInt64,
    DriftResolved UInt64,
    ResidualMinor Int64,
    Error String,
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY RunId;

-- dedup: replace. Per run, region, currency and day: billing total, ERP total, the difference explained per
-- drift class, and the unexplained residual (0 when every difference is classified).
CREATE TABLE IF NOT EXISTS $db.reconciliation_statements
(
    RunId String,
    Region LowCardinality(String),
    Currency LowCardinality(String),
    Day Date,
    BillingTotalMinor Int64,
    ErpTotalMinor Int64,
    DifferenceMinor Int64,
    Explained Map(String, Int64),
    ResidualMinor Int64,
    CreatedAt DateTime64(3),
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY (Region, Currency, Day, RunId);

-- dedup: replace. Per invoice key whose sides differ: its contribution to the statement cells (billing side
-- and ERP side) and the class explaining it. Keys whose sides match exactly have no row (or a zero row once
-- they match again), so the table stays as small as the drift; statements aggregate it.
CREATE TABLE IF NOT EXISTS $db.reconcile_facts
(
    Key String,
    BillingRegion LowCardinality(String),
    BillingCurrency LowCardinality(String),
    ErpRegion LowCardinality(String),
    ErpCurrency LowCardinality(String),
    BillingDay Date,
    ErpDay Date,
    BillingMinor Int64,
    ErpMinor Int64,
    Class LowCardinality(String),
    RunId String,
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY Key;

-- dedup: replace. Connector cursors (opaque strings), one per connector and stream.
CREATE TABLE IF NOT EXISTS $db.connector_cursors
(
    Connector String,
    Stream LowCardinality(String),
    Cursor String,
    UpdatedAt DateTime64(3),
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY (Connector, Stream);

-- dedup: idempotent set. The keys one run compares (incremental scope); a repeated row changes no result
-- because every read goes through IN (SELECT ...). Rows expire after a day.
CREATE TABLE IF NOT EXISTS $db.reconcile_scope
(
    RunId String,
    KeyType LowCardinality(String),
    Key String,
    CreatedAt DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(CreatedAt)
ORDER BY (RunId, KeyType, Key)
TTL CreatedAt + INTERVAL 1 DAY
SETTINGS ttl_only_drop_parts = 1;

-- dedup: replace. A run's findings before they are merged into drift_items (scratch, expires after a day).
CREATE TABLE IF NOT EXISTS $db.reconcile_findings
(
    RunId String,
    DriftId String,
    Class LowCardinality(String),
    ReasonCode LowCardinality(String),
    System LowCardinality(String),
    Region LowCardinality(String),
    Currency LowCardinality(String),
    CustomerId String,
    InvoiceId String,
    PaymentId String,
    LedgerEntryId String,
    PrimaryKey String,
    KeyType LowCardinality(String),
    AmountMinor Int64,
    BillingValues Map(String, String),
    ErpValues Map(String, String),
    DiffFields Array(String),
    Day Date,
    CreatedAt DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(CreatedAt)
ORDER BY (RunId, DriftId)
TTL CreatedAt + INTERVAL 1 DAY
SETTINGS ttl_only_drop_parts = 1;

-- dedup: idempotent set. Full runs: hashes (cityHash64) of the keys whose sides do not match exactly, found by
-- a narrow first pass; the wide second pass reads only rows of these keys. Scratch, expires after a day.
CREATE TABLE IF NOT EXISTS $db.reconcile_hashes
(
    RunId String,
    KeyType LowCardinality(String),
    Hash UInt64,
    CreatedAt DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(CreatedAt)
ORDER BY (RunId, KeyType, Hash)
TTL CreatedAt + INTERVAL 1 DAY
SETTINGS ttl_only_drop_parts = 1;

-- dedup: none needed (scratch per run, read by RunId once). Both sides' facts of each candidate invoice key;
-- the classification (SQL mirror of reconciler/classify.py) reads them. Expires after a day.
CREATE TABLE IF NOT EXISTS $db.reconcile_invoice_facts
(
    RunId String,
    key String,
    b_n UInt64,
    b_customer String,
    b_region String,
    b_currency String,
    b_total Int64,
    b_tax Int64,
    b_subtotal Int64,
    b_status String,
    b_issued DateTime64(3),
    b_finalized DateTime64(3),
    b_day Date,
    e_n UInt64,
    e_currency String,
    e_amount Int64,
    e_sum Int64,
    e_status String,
    e_entry String,
    e_region String,
    e_party String,
    e_day Date,
    rejected String,
    e_applied Int64,
    b_alloc Int64,
    b_alloc_unposted Int64,
    b_credit_unposted UInt64,
    CreatedAt DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(CreatedAt)
ORDER BY (RunId, key)
TTL CreatedAt + INTERVAL 1 DAY
SETTINGS ttl_only_drop_parts = 1;

-- dedup: none needed (scratch per run). Both sides' facts of each candidate payment / refund / credit note.
CREATE TABLE IF NOT EXISTS $db.reconcile_payment_facts
(
    RunId String,
    key String,
    p_n UInt64,
    p_kind String,
    p_status String,
    p_amount Int64,
    p_currency String,
    p_region String,
    p_customer String,
    p_occurred DateTime64(3),
    p_alloc_n UInt64,
    p_alloc_refs String,
    e_n UInt64,
    e_memo_n UInt64,
    e_applied_n UInt64,
    e_sum Int64,
    e_type String,
    e_status String,
    e_currency String,
    e_region String,
    e_party String,
    e_entry String,
    e_day Date,
    e_applied_refs String,
    sum_match UInt8 DEFAULT 0,
    CreatedAt DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(CreatedAt)
ORDER BY (RunId, key)
TTL CreatedAt + INTERVAL 1 DAY
SETTINGS ttl_only_drop_parts = 1;

-- dedup: none needed (scratch per run). CDP profiles whose billing customer is missing.
CREATE TABLE IF NOT EXISTS $db.reconcile_customer_facts
(
    RunId String,
    key String,
    b_n UInt64,
    b_cdp_user String,
    b_updated DateTime64(3),
    c_n UInt64,
    c_cdp_user String,
    c_updated DateTime64(3),
    region String,
    CreatedAt DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(CreatedAt)
ORDER BY (RunId, key)
TTL CreatedAt + INTERVAL 1 DAY
SETTINGS ttl_only_drop_parts = 1;
