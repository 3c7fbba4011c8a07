-- 0003: customers and CDP profiles (issue 4), written by the simulator's bulk mode and by connector pulls.
-- Conventions as in 0001: money never appears here; times are UTC.

-- dedup: replace. Billing's customers (the join key CustomerId), with the account hierarchy (ParentCustomerId).
CREATE TABLE IF NOT EXISTS $db.billing_customers
(
    CustomerId String,
    CdpUserId String,
    ParentCustomerId String,
    Name String,
    Email String,
    Region LowCardinality(String),
    Currency LowCardinality(String),
    Plan LowCardinality(String),
    TaxRateBp UInt32,
    CreatedAt DateTime64(3),
    UpdatedAt DateTime64(3),
    SourceSystem LowCardinality(String),
    Attributes Map(LowCardinality(String), String),
    Version UInt64,
    IsDeleted UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY CustomerId
SETTINGS non_replicated_deduplication_window = 10000;

-- dedup: replace. The CDP's profiles (identity + hierarchy); CustomerId links a profile to billing.
CREATE TABLE IF NOT EXISTS $db.cdp_profiles
(
    CdpUserId String,
    CustomerId String,
    ParentCustomerId String,
    Name String,
    Email String,
    Region LowCardinality(String),
    UpdatedAt DateTime64(3),
    SourceSystem LowCardinality(String),
    Traits Map(LowCardinality(String), String),
    Version UInt64,
    IsDeleted UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY CdpUserId
SETTINGS non_replicated_deduplication_window = 10000;
