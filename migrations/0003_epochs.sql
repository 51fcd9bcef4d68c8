-- The history of epoch advances: every time a resource's highest token changed, and why.
CREATE TABLE epochs (
    id         INTEGER PRIMARY KEY,
    at         TEXT NOT NULL,
    resource   TEXT NOT NULL,
    from_token INTEGER,          -- null for the first token a resource ever saw
    to_token   INTEGER NOT NULL,
    via        TEXT NOT NULL CHECK (via IN ('write', 'fence', 'reset')),
    reason     TEXT              -- the operator's reason, for resets
);
CREATE INDEX epochs_by_resource ON epochs (resource, id);
