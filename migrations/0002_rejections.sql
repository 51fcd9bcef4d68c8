-- The audit log: one row per fenced request that fencegate refused.
CREATE TABLE rejections (
    id         INTEGER PRIMARY KEY,
    at         TEXT NOT NULL,
    resource   TEXT NOT NULL,
    reason     TEXT NOT NULL CHECK (reason IN ('stale', 'missing', 'invalid', 'jump')),
    token      INTEGER,          -- null when missing or unparsable; bit pattern as in resources
    highest    INTEGER,          -- null when the resource had never been seen
    method     TEXT NOT NULL,
    path       TEXT NOT NULL,
    client     TEXT NOT NULL,
    request_id TEXT
);
CREATE INDEX rejections_by_resource ON rejections (resource, id);
