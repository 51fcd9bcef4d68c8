-- Cluster mode's shared store. fencegate applies these files in order at start-up, each in a
-- transaction under an advisory lock (so replicas starting together migrate once), and records the
-- version in fencegate_schema. Append only: a released file is never edited.
--
-- Tokens are u64 stored as bigint's two's-complement bit pattern, exactly as in the SQLite store
-- (tokens above 2^63-1 read back as negative numbers here); fencegate compares tokens in Rust,
-- never in SQL.

-- The cluster itself: one row, its shard count fixed when the first replica created it.
CREATE TABLE cluster (
    id         smallint PRIMARY KEY CHECK (id = 1),
    shards     integer NOT NULL CHECK (shards > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Every replica that has joined: where its peer plane is, and when it last renewed anything.
CREATE TABLE replicas (
    replica text PRIMARY KEY,
    peer    text NOT NULL,
    seen_at timestamptz NOT NULL,
    leaving boolean NOT NULL DEFAULT false  -- stopping: give it no shards
);

-- One lease per shard. `epoch` rises with every change of owner; every write a replica makes is
-- conditional on (shard, owner, epoch) in the same transaction. `clean`: the last owner drained
-- the shard and let go of it, so the next owner need not wait for its requests to die out.
CREATE TABLE leases (
    shard      integer PRIMARY KEY,
    owner      text,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    clean      boolean NOT NULL DEFAULT true
);

-- Who owned what when: every acquire, takeover, handoff and release.
CREATE TABLE lease_history (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    shard    integer NOT NULL,
    epoch    bigint NOT NULL,
    owner    text,
    previous text,
    kind     text NOT NULL CHECK (kind IN ('acquire', 'takeover', 'release'))
);
CREATE INDEX lease_history_by_shard ON lease_history (shard, id);

-- The highest fencing token per resource.
-- Names compare byte by byte (COLLATE "C"), as in SQLite, whatever the database's locale: the
-- keyset pages of operators' reads walk them in that order.
CREATE TABLE resources (
    resource   text COLLATE "C" PRIMARY KEY,
    highest    bigint NOT NULL,
    updated_at timestamptz NOT NULL
);

-- The audit log: one row per fenced request that fencegate refused, and the replica that did.
CREATE TABLE rejections (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL,
    resource   text COLLATE "C" NOT NULL,
    reason     text NOT NULL CHECK (reason IN
                   ('stale', 'missing', 'invalid', 'jump', 'collection', 'forbidden', 'unattributable')),
    token      bigint,
    highest    bigint,
    method     text NOT NULL,
    path       text NOT NULL,
    client     text NOT NULL,
    request_id text,
    replica    text NOT NULL
);
CREATE INDEX rejections_by_resource ON rejections (resource, id);
CREATE INDEX rejections_by_at ON rejections (at);
CREATE INDEX rejections_by_reason ON rejections (reason, id);

-- The history of epoch advances, and the replica that made each.
CREATE TABLE epochs (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL,
    resource   text COLLATE "C" NOT NULL,
    from_token bigint,
    to_token   bigint NOT NULL,
    via        text NOT NULL CHECK (via IN ('write', 'fence', 'reset')),
    reason     text,
    replica    text NOT NULL
);
CREATE INDEX epochs_by_resource ON epochs (resource, id);
