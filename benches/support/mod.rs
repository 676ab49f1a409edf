//! Shared by the benchmarks: a fresh database on the test PostgreSQL, memory and
//! latency figures.
#![allow(dead_code)]

use os_credits::config::{DatabaseSettings, Secret};
use std::time::Duration;

/// A size from the environment (to shrink a bench), or its default.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory of this process.
pub fn peak_memory() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Flushes dirty buffers so one phase's writes do not slow the next (best effort:
/// it needs rights the bench user may lack).
pub async fn checkpoint(pool: &deadpool_postgres::Pool) -> anyhow::Result<()> {
    let _ = pool.get().await?.batch_execute("CHECKPOINT").await;
    Ok(())
}

/// The p-th percentile (0..=100) of sorted latencies.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A database created for one bench run and dropped after it.
pub struct BenchDb {
    pub settings: DatabaseSettings,
}

impl BenchDb {
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        let settings = DatabaseSettings {
            host: var("TEST_POSTGRES_HOST", "127.0.0.1"),
            port: var("TEST_POSTGRES_PORT", "5432").parse()?,
            user: var("TEST_POSTGRES_USER", "postgres"),
            password: Secret::new(var("TEST_POSTGRES_PASSWORD", "")),
            database: format!("osc_bench_{name}_{}", std::process::id()),
            pool_size: 16,
            pool_timeout: std::time::Duration::from_secs(10),
            lock_timeout: std::time::Duration::from_secs(2),
            statement_timeout: std::time::Duration::from_secs(300),
            idle_in_transaction_timeout: std::time::Duration::from_secs(60),
        };
        let admin = Self::admin(&settings).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", settings.database))
            .await?;
        Ok(Self { settings })
    }

    /// A pool on the bench database, migrated.
    pub fn pool(&self) -> anyhow::Result<deadpool_postgres::Pool> {
        os_credits::store::pool(&self.settings)
    }

    /// Environment variables that point the service at this database.
    pub fn vars(&self) -> Vec<(String, String)> {
        vec![
            ("POSTGRES_HOST".into(), self.settings.host.clone()),
            ("POSTGRES_PORT".into(), self.settings.port.to_string()),
            ("POSTGRES_USER".into(), self.settings.user.clone()),
            (
                "POSTGRES_PASSWORD".into(),
                self.settings.password.expose().to_owned(),
            ),
            ("POSTGRES_DB".into(), self.settings.database.clone()),
        ]
    }

    async fn admin(settings: &DatabaseSettings) -> anyhow::Result<tokio_postgres::Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&settings.host)
            .port(settings.port)
            .user(&settings.user)
            .dbname("postgres");
        if !settings.password.is_empty() {
            config.password(settings.password.expose());
        }
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
            anyhow::anyhow!(
                "no PostgreSQL at {}:{} ({e}); run `make bench`, which starts one",
                settings.host,
                settings.port
            )
        })?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn drop_database(self) -> anyhow::Result<()> {
        Self::admin(&self.settings)
            .await?
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.settings.database
            ))
            .await?;
        Ok(())
    }
}
