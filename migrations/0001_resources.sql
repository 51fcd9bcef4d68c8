-- The highest fencing token per resource. Tokens are u64; SQLite integers are i64, so a token is
-- stored as its two's-complement bit pattern (tokens above 2^63-1 read back as negative numbers
-- here). fencegate compares tokens in Rust, never in SQL.
CREATE TABLE resources (
    resource   TEXT PRIMARY KEY NOT NULL,
    highest    INTEGER NOT NULL,
    updated_at TEXT NOT NULL -- RFC 3339 UTC, fixed width, so text order is time order
) WITHOUT ROWID;
