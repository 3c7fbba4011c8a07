-- 0002: API tokens. Only a SHA-256 of each token is stored; dedup: replace (revocation is a new version).
CREATE TABLE IF NOT EXISTS $db.api_tokens
(
    TokenId String,
    Name String,
    Role LowCardinality(String),
    TokenHash String,
    CreatedAt DateTime64(3),
    RevokedAt DateTime64(3) DEFAULT toDateTime64(0, 3),
    Version UInt64
)
ENGINE = ReplacingMergeTree(Version)
ORDER BY TokenId;
