-- 0016: source records a connector pulled but could not map (e.g. a Tryton invoice in a currency without an
-- ISO 4217 exponent). The pull moves past them so one bad record does not stop every later change; each stays
-- here, open, until a later pull maps it (Cleared = 1). Dedup: replace, latest Version per record.
CREATE TABLE IF NOT EXISTS $db.source_skips
(
    Connector LowCardinality(String),
    Stream LowCardinality(String),
    Ref String,
    Reason String,
    FirstSkippedAt DateTime64(3),
    LastSkippedAt DateTime64(3),
    Times UInt32,
    Cleared UInt8,
    ClearedAt DateTime64(3),
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY (Connector, Stream, Ref);
