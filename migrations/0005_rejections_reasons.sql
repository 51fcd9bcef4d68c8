-- The audit log learns the reasons of the contract's later refusals (`collection`, and `forbidden`
-- and `unattributable` ahead of the features that give them), and an index per reason, which
-- retention walks to keep each reason's rows apart: requests without a token must not be able to
-- push the record of a refused zombie write out of the log.
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt; ids are kept.
CREATE TABLE rejections_next (
    id         INTEGER PRIMARY KEY,
    at         TEXT NOT NULL,
    resource   TEXT NOT NULL,
    reason     TEXT NOT NULL CHECK (reason IN
                   ('stale', 'missing', 'invalid', 'jump', 'collection', 'forbidden', 'unattributable')),
    token      INTEGER,
    highest    INTEGER,
    method     TEXT NOT NULL,
    path       TEXT NOT NULL,
    client     TEXT NOT NULL,
    request_id TEXT
);
INSERT INTO rejections_next (id, at, resource, reason, token, highest, method, path, client, request_id)
    SELECT id, at, resource, reason, token, highest, method, path, client, request_id FROM rejections;
DROP TABLE rejections;
ALTER TABLE rejections_next RENAME TO rejections;
CREATE INDEX rejections_by_resource ON rejections (resource, id);
CREATE INDEX rejections_by_at ON rejections (at);
CREATE INDEX rejections_by_reason ON rejections (reason, id);
