//! The PostgreSQL schema: migrations applied at start-up, and the cluster's fixed shard count.

use tokio_postgres::Client;

use crate::cluster::ShardMap;
use crate::store::StoreError;

/// The schema history, oldest first. Append only: a released migration is never edited.
const MIGRATIONS: [&str; 2] = [
    include_str!("../../../migrations/postgres/0001_cluster.sql"),
    include_str!("../../../migrations/postgres/0002_rejections_identity.sql"),
];

/// The schema version of a fully migrated database.
pub const CURRENT_VERSION: i32 = MIGRATIONS.len() as i32;

/// The advisory lock that serialises migrations and cluster creation between replicas that start
/// together (an arbitrary constant: "fencegate" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x6665_6e63_6567_6174;

/// Applies the migrations this database lacks, all in one transaction. A database migrated by a
/// newer fencegate is refused: this version does not know what its tables mean.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS fencegate_schema (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM fencegate_schema",
            &[],
        )
        .await?
        .get(0);
    if found > CURRENT_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: CURRENT_VERSION,
        });
    }
    for (version, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO fencegate_schema (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tracing::info!(version, "PostgreSQL schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

/// Creates the cluster with `map`'s shard count and one free lease per shard, or checks that the
/// existing cluster has that count: resources are hashed into shards, so a different count would
/// put a resource under two owners.
pub(super) async fn join_cluster(client: &Client, map: ShardMap) -> Result<(), StoreError> {
    let shards = i32::try_from(map.shards()).unwrap_or(i32::MAX);
    client
        .execute(
            "INSERT INTO cluster (id, shards) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
            &[&shards],
        )
        .await?;
    let existing: i32 = client
        .query_one("SELECT shards FROM cluster WHERE id = 1", &[])
        .await?
        .get(0);
    if existing != shards {
        return Err(StoreError::ShardCount {
            database: existing,
            config: shards,
        });
    }
    client
        .execute(
            "INSERT INTO leases (shard) SELECT generate_series(0, $1 - 1) ON CONFLICT (shard) DO NOTHING",
            &[&shards],
        )
        .await?;
    Ok(())
}
