//! PostgreSQL/TimescaleDB: the pool, migrations, and the storage mode.

pub mod changes;
pub mod copy;
pub mod migrations;
pub mod rollup;
pub mod samples;
pub mod series;
pub mod storage;
pub mod targets;

use crate::config::DatabaseSettings;
use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use std::time::Duration;
use tokio_postgres::types::FromSql;
use tokio_postgres::Row;

/// Whether samples live in TimescaleDB hypertables or plain tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// `usage_samples` is a hypertable (see [`storage::inspect`]).
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
        .connect_timeout(Duration::from_secs(5))
        // Every wait bounded on the server side too: a lock wait (the API answers 503
        // instead of hanging), a statement, and a session idle inside a transaction
        // (a frozen replica's locks are freed).
        .options(format!(
            "-c lock_timeout={} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            millis(settings.lock_timeout),
            millis(settings.statement_timeout),
            millis(settings.idle_in_transaction_timeout)
        ));
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
        .wait_timeout(Some(settings.pool_timeout))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .context("building the PostgreSQL connection pool")
}

/// One column of a row, by name. A column that is missing or no longer has the
/// expected type is an error naming the column, not a panic as with `Row::get`: a
/// schema change fails the request or the run, not the process.
pub fn col<'a, T: FromSql<'a>>(row: &'a Row, name: &str) -> anyhow::Result<T> {
    row.try_get(name)
        .with_context(|| format!("reading column {name}"))
}

/// A duration as whole milliseconds for a PostgreSQL setting (at least 1: 0 would
/// mean no limit).
fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
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

/// Reads which mode the schema runs in: from what the tables are.
pub async fn storage_mode(client: &tokio_postgres::Client) -> anyhow::Result<StorageMode> {
    Ok(storage::inspect(client).await?.mode)
}
