-- 0011: a run's scratch copy of the ERP ledger rows its compared keys need. The invoice and the payment
-- comparison (stage B) both need ledger rows, and reading the ledger with FINAL is a full pass over its widest
-- columns whatever the filter (the keys are spread over every granule); the run now makes that pass once and both
-- comparisons read this table. Only live rows (latest version, not deleted, not cancelled) are copied.

-- dedup: none needed (scratch; a run writes its rows once, readers filter by RunId). Rows expire after a day.
CREATE TABLE IF NOT EXISTS $db.reconcile_ledger_rows
(
    RunId String,
    LinkHash UInt64,
    RefHash UInt64,
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
    Rejection String,
    CreatedAt DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(CreatedAt)
ORDER BY RunId
TTL CreatedAt + INTERVAL 1 DAY
SETTINGS ttl_only_drop_parts = 1;
