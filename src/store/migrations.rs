//! Ordered SQL migrations from `sql/`, applied once each, under an advisory lock so
//! that replicas starting together do not race.

use anyhow::Context;

/// A migration: its version (the file's number), name and SQL.
pub struct Migration {
    /// Ordering number; applied in ascending order.
    pub version: i32,
    /// File name, for the log and the migrations table.
    pub name: &'static str,
    /// The SQL, run in one transaction.
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_series_and_samples.sql",
        sql: include_str!("../../sql/0001_series_and_samples.sql"),
    },
    Migration {
        version: 2,
        name: "0002_timescaledb.sql",
        sql: include_str!("../../sql/0002_timescaledb.sql"),
    },
    Migration {
        version: 3,
        name: "0003_billing.sql",
        sql: include_str!("../../sql/0003_billing.sql"),
    },
    Migration {
        version: 4,
        name: "0004_timescaledb_ledger.sql",
        sql: include_str!("../../sql/0004_timescaledb_ledger.sql"),
    },
    Migration {
        version: 5,
        name: "0005_notifications.sql",
        sql: include_str!("../../sql/0005_notifications.sql"),
    },
    Migration {
        version: 9,
        name: "0009_quarantine.sql",
        sql: include_str!("../../sql/0009_quarantine.sql"),
    },
    Migration {
        version: 10,
        name: "0010_held_charges.sql",
        sql: include_str!("../../sql/0010_held_charges.sql"),
    },
    Migration {
        version: 11,
        name: "0011_policies.sql",
        sql: include_str!("../../sql/0011_policies.sql"),
    },
    Migration {
        version: 12,
        name: "0012_ledger_rollup_and_change_notifications.sql",
        sql: include_str!("../../sql/0012_ledger_rollup_and_change_notifications.sql"),
    },
    Migration {
        version: 13,
        name: "0013_detail_change_notifications.sql",
        sql: include_str!("../../sql/0013_detail_change_notifications.sql"),
    },
    Migration {
        version: 14,
        name: "0014_integrity.sql",
        sql: include_str!("../../sql/0014_integrity.sql"),
    },
    Migration {
        version: 15,
        name: "0015_created_projects_do_not_notify.sql",
        sql: include_str!("../../sql/0015_created_projects_do_not_notify.sql"),
    },
    Migration {
        version: 16,
        name: "0016_series_by_project_hash.sql",
        sql: include_str!("../../sql/0016_series_by_project_hash.sql"),
    },
    Migration {
        version: 17,
        name: "0017_labels_from_the_key.sql",
        sql: include_str!("../../sql/0017_labels_from_the_key.sql"),
    },
    Migration {
        version: 18,
        name: "0018_change_fences.sql",
        sql: include_str!("../../sql/0018_change_fences.sql"),
    },
];

/// Arbitrary but fixed key of the advisory lock that serialises migrations.
const MIGRATION_LOCK_KEY: i64 = 0x6f73_6372_6564_6974;

/// Applies every migration not applied yet; returns how many were applied now.
#[tracing::instrument(skip_all, err)]
pub async fn run(client: &mut tokio_postgres::Client) -> anyhow::Result<usize> {
    // Migrations may wait for another replica's migrations and take long on big
    // tables: no lock or statement limit here (the session's own limits return
    // afterwards, see below).
    client
        .batch_execute("SET lock_timeout = 0; SET statement_timeout = 0")
        .await
        .context("lifting the time limits for migrations")?;
    // The lock comes first: two replicas starting on an empty database would otherwise
    // race on creating the bookkeeping table (a unique violation in the catalogue).
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("taking the migration lock")?;
    let result = apply_pending(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("releasing the migration lock")?;
    client
        .batch_execute("RESET lock_timeout; RESET statement_timeout")
        .await
        .context("restoring the time limits after migrations")?;
    result
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> anyhow::Result<usize> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS os_credits_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .context("creating the migrations table")?;
    let applied: Vec<i32> = client
        .query("SELECT version FROM os_credits_migrations", &[])
        .await
        .context("reading applied migrations")?
        .iter()
        .map(|row| super::col(row, "version"))
        .collect::<anyhow::Result<_>>()?;
    let mut count = 0;
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let tx = client.transaction().await?;
        tx.batch_execute(migration.sql)
            .await
            .with_context(|| format!("applying migration {}", migration.name))?;
        tx.execute(
            "INSERT INTO os_credits_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = migration.name, "applied migration");
        count += 1;
    }
    Ok(count)
}
