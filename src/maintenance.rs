//! The maintenance worker: sample retention, and a fresh look at the storage (mode and
//! policy drift, for `/health` and the log). `os-credits maintain` runs one round.
//!
//! Retention never removes a sample billing has not passed, in either mode:
//! - plain PostgreSQL: rows older than `SAMPLES_RETENTION_DAYS` and before their
//!   series' billing cursor are deleted;
//! - TimescaleDB: whole chunks are dropped (`drop_chunks(older_than => horizon)`), the
//!   horizon being the retention cut-off or, when earlier, the oldest sample any
//!   series has not been billed past. A series billing lags behind (a held jump, a
//!   quarantined value, a database outage) holds retention back; the round says which.
//!
//! TimescaleDB's own `add_retention_policy` is not used: it drops chunks whatever
//! billing has reached. `os-credits migrate` removes one if it finds it.

use crate::store::storage::{self, SharedReport};
use crate::store::{col, StorageMode};
use anyhow::Context;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

/// Fixed key of the advisory lock that lets one replica at a time run a round.
const MAINTENANCE_LOCK_KEY: i64 = 0x6f73_6372_6d61_696e;

/// What one maintenance round did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Round {
    /// Another replica was running a round: this one did nothing.
    pub skipped: bool,
    /// Retention in force (days, 0 keeps all), as `migrate` applied it.
    pub retention_days: Option<i64>,
    /// Samples older than this may go (now − retention).
    pub cutoff: Option<DateTime<Utc>>,
    /// TimescaleDB: chunks entirely older than this were dropped.
    pub horizon: Option<DateTime<Utc>>,
    /// The series whose unbilled samples hold the horizon before the cut-off.
    pub held_by_series: Option<i64>,
    /// TimescaleDB chunks dropped.
    pub chunks_dropped: u64,
    /// Plain PostgreSQL rows deleted.
    pub rows_deleted: u64,
    /// Policy drift found (also in `/health`).
    pub drift: Vec<String>,
}

/// Runs one round: retention, then refreshes `report` (mode, drift).
#[tracing::instrument(skip_all, err)]
pub async fn round(
    pool: &Pool,
    retention_days: u32,
    report: Option<&SharedReport>,
    now: DateTime<Utc>,
) -> anyhow::Result<Round> {
    let mut client = pool.get().await.context("connecting for maintenance")?;
    let mut found = storage::inspect(&client).await?;
    found.drift = storage::drift(&client, &found, retention_days).await?;
    if let Some(shared) = report {
        if let Ok(mut shared) = shared.write() {
            *shared = found.clone();
        }
    }
    let mut done = Round {
        drift: found.drift.clone(),
        retention_days: storage::applied_retention_days(&client).await?,
        ..Round::default()
    };
    let tx = client.transaction().await?;
    let locked: bool = col(
        &tx.query_one(
            "SELECT pg_try_advisory_xact_lock($1) AS locked",
            &[&MAINTENANCE_LOCK_KEY],
        )
        .await?,
        "locked",
    )?;
    if !locked {
        done.skipped = true;
        return Ok(done);
    }
    let days = match done.retention_days {
        Some(days) if days > 0 => days,
        _ => {
            tx.commit().await?;
            return Ok(done);
        }
    };
    let cutoff = now - chrono::Duration::days(days);
    done.cutoff = Some(cutoff);
    match found.mode {
        StorageMode::Timescaledb => {
            let held = tx
                .query_opt(
                    // per series, its oldest sample billing has not passed (at or after
                    // its cursor; all of them without one), through the (series_id,
                    // time) key
                    "SELECT f.time, s.id
                     FROM series s
                     LEFT JOIN billing_cursors c ON c.series_id = s.id
                     CROSS JOIN LATERAL (
                         SELECT u.time FROM usage_samples u
                         WHERE u.series_id = s.id
                           AND u.time >= coalesce(c.last_time, '-infinity') AND u.time < $1
                         ORDER BY u.time LIMIT 1) f
                     ORDER BY f.time LIMIT 1",
                    &[&cutoff],
                )
                .await
                .context("finding the oldest unbilled sample")?;
            let horizon = match &held {
                Some(row) => {
                    done.held_by_series = Some(col(row, "id")?);
                    col::<DateTime<Utc>>(row, "time")?
                }
                None => cutoff,
            };
            done.horizon = Some(horizon);
            let dropped = tx
                .query(
                    "SELECT drop_chunks('usage_samples', older_than => $1::timestamptz)",
                    &[&horizon],
                )
                .await
                .context("dropping chunks past retention")?;
            done.chunks_dropped = dropped.len() as u64;
        }
        StorageMode::Postgresql => {
            done.rows_deleted = tx
                .execute(
                    "DELETE FROM usage_samples u USING billing_cursors c
                     WHERE u.series_id = c.series_id AND u.time < c.last_time AND u.time < $1",
                    &[&cutoff],
                )
                .await
                .context("deleting samples past retention")?;
        }
    }
    tx.commit()
        .await
        .context("committing the maintenance round")?;
    Ok(done)
}

/// Logs what a round did (at info when it removed something or something is off).
pub fn log_round(done: &Round) {
    if done.skipped {
        tracing::debug!("maintenance round skipped: another replica runs one");
        return;
    }
    if let (Some(series), Some(horizon), Some(cutoff)) =
        (done.held_by_series, done.horizon, done.cutoff)
    {
        tracing::warn!(
            series,
            %horizon,
            %cutoff,
            "sample retention held back: series {series} has samples billing has not passed since {horizon}; chunks after that are kept until it is billed"
        );
    }
    if done.chunks_dropped + done.rows_deleted > 0 {
        tracing::info!(
            chunks_dropped = done.chunks_dropped,
            rows_deleted = done.rows_deleted,
            horizon = ?done.horizon,
            "applied sample retention"
        );
    }
    for drift in &done.drift {
        tracing::warn!(drift = %drift, "storage policy drift");
    }
}

/// One supervised step of the maintenance worker (`crate::workers` runs it every
/// `MAINTENANCE_INTERVAL` and retries a failure after a backoff).
pub async fn step(pool: Pool, retention_days: u32, report: SharedReport) -> anyhow::Result<()> {
    let done = round(&pool, retention_days, Some(&report), Utc::now()).await?;
    log_round(&done);
    Ok(())
}
