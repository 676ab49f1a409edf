//! PostgreSQL/TimescaleDB: the pool, migrations, and the storage mode.

pub mod changes;
pub mod migrations;
pub mod rollup;
pub mod samples;
pub mod series;
pub mod targets;

use crate::config::DatabaseSettings;
use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use std::time::Duration;

/// Whether samples live in TimescaleDB hypertables or plain tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// The `timescaledb` extension is installed: hypertables, compression, retention.
    Timescaledb,
    /// Plain PostgreSQL tables with the same schema.
    Postgresql,
}

/// Where and how to connect (the pool's connections and the change listener's).
pub fn pg_config(settings: &DatabaseSettings) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&settings.host)
        .port(settings.port)
        .user(&settings.user)
        .dbname(&settings.database)
        .application_name("os-credits")
        .connect_timeout(Duration::from_secs(5));
    if !settings.password.is_empty() {
        config.password(settings.password.expose());
    }
    config
}

/// Builds the connection pool. Connections are verified before reuse: the fast
/// recycling method can hand out a connection to a server that went away.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let config = pg_config(settings);
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .context("building the PostgreSQL connection pool")
}

/// Waits until the database answers, for at most `deadline` (the database may start
/// after the service, as in `docker compose`).
pub async fn wait_until_reachable(pool: &Pool, deadline: Duration) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match pool.get().await {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() + delay < deadline => {
                tracing::warn!(error = %e, "database not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("database not reachable")),
        }
    }
}

/// Reads which mode the schema runs in.
pub async fn storage_mode(client: &tokio_postgres::Client) -> anyhow::Result<StorageMode> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
            &[],
        )
        .await
        .context("reading the storage mode")?;
    Ok(if row.get::<_, bool>(0) {
        StorageMode::Timescaledb
    } else {
        StorageMode::Postgresql
    })
}

/// Keeps samples for `days` (0 keeps them all): a TimescaleDB retention policy (it
/// drops whole chunks: keep it well above any billing lag), or on plain PostgreSQL a
/// delete of older, already billed rows (called hourly by the scraper).
pub async fn apply_retention(
    client: &tokio_postgres::Client,
    mode: StorageMode,
    days: u32,
) -> anyhow::Result<u64> {
    let days = i32::try_from(days).context("retention days out of range")?;
    match mode {
        StorageMode::Timescaledb => {
            client
                .execute(
                    "SELECT remove_retention_policy('usage_samples', if_exists => true)",
                    &[],
                )
                .await
                .context("removing the old retention policy")?;
            if days > 0 {
                client
                    .execute(
                        "SELECT add_retention_policy('usage_samples', drop_after => make_interval(days => $1))",
                        &[&days],
                    )
                    .await
                    .context("adding the retention policy")?;
            }
            Ok(0)
        }
        StorageMode::Postgresql if days > 0 => client
            .execute(
                // never a sample billing has not consumed yet
                "DELETE FROM usage_samples u USING billing_cursors c
                 WHERE u.series_id = c.series_id AND u.time < c.last_time
                   AND u.time < now() - make_interval(days => $1)",
                &[&days],
            )
            .await
            .context("deleting samples past retention"),
        StorageMode::Postgresql => Ok(0),
    }
}
