//! Scrape target status and leases.

use super::col;
use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

/// Status of one target as `/health` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetStatus {
    /// Target name.
    pub name: String,
    /// URL scraped (without credentials).
    pub url: String,
    /// Whether the last attempt succeeded.
    pub up: bool,
    /// Start of the last attempt.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// Start of the last successful scrape.
    pub last_success_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed (absent after a success).
    pub last_error: Option<String>,
    /// Duration of the last attempt.
    pub last_duration_ms: Option<i64>,
    /// Samples stored by the last successful scrape.
    pub last_samples: Option<i64>,
    /// Samples stored since the target was first scraped.
    pub samples_stored_total: i64,
    /// Scrape attempts.
    pub scrapes_total: i64,
    /// Failed attempts.
    pub failures_total: i64,
    /// Billed series returned by the last successful scrape.
    pub billed_series: Option<i64>,
    /// Billed series returned by the successful scrape before it.
    pub billed_series_before: Option<i64>,
    /// Set when the target returns no billed series although it did before (a
    /// federating Prometheus whose exporter is down): billing has stopped for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The outcome of one scrape attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub duration: Duration,
    /// Samples stored, or why it failed.
    pub result: Result<u64, String>,
}

/// Makes sure a status row exists for each configured target (and keeps its URL current).
pub async fn register(
    client: &tokio_postgres::Client,
    name: &str,
    url: &str,
) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO scrape_targets (name, url) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url",
            &[&name, &url],
        )
        .await
        .context("registering a scrape target")?;
    Ok(())
}

/// Claims the target for `owner` until `lease` from now, unless another live replica
/// holds it. Returns whether this replica may scrape it now.
pub async fn claim(
    client: &tokio_postgres::Client,
    name: &str,
    owner: &str,
    lease: Duration,
) -> anyhow::Result<bool> {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let claimed = client
        .execute(
            "UPDATE scrape_targets
             SET lease_owner = $2, lease_until = now() + make_interval(secs => $3::bigint / 1000.0)
             WHERE name = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < now())",
            &[&name, &owner, &lease_ms],
        )
        .await
        .context("claiming a scrape target")?;
    Ok(claimed == 1)
}

/// Releases a lease at shutdown so another replica takes over at once.
pub async fn release(client: &tokio_postgres::Client, owner: &str) -> anyhow::Result<()> {
    client
        .execute(
            "UPDATE scrape_targets SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
            &[&owner],
        )
        .await
        .context("releasing scrape leases")?;
    Ok(())
}

/// Records one attempt.
pub async fn record(
    client: &tokio_postgres::Client,
    name: &str,
    attempt: &Attempt,
) -> anyhow::Result<()> {
    let duration_ms = i64::try_from(attempt.duration.as_millis()).unwrap_or(i64::MAX);
    match &attempt.result {
        Ok(stored) => {
            let stored = i64::try_from(*stored).unwrap_or(i64::MAX);
            client
                .execute(
                    "UPDATE scrape_targets SET last_attempt_at = $2, last_success_at = $2, last_error = NULL,
                        last_duration_ms = $3, last_samples = $4, samples_stored_total = samples_stored_total + $4,
                        scrapes_total = scrapes_total + 1
                     WHERE name = $1",
                    &[&name, &attempt.started_at, &duration_ms, &stored],
                )
                .await
        }
        Err(reason) => {
            client
                .execute(
                    "UPDATE scrape_targets SET last_attempt_at = $2, last_error = $3, last_duration_ms = $4,
                        scrapes_total = scrapes_total + 1, failures_total = failures_total + 1
                     WHERE name = $1",
                    &[&name, &attempt.started_at, reason, &duration_ms],
                )
                .await
        }
    }
    .context("recording a scrape attempt")?;
    Ok(())
}

/// Why a target that returns `now` billed series is a problem: it returned
/// `last_nonzero` (at `nonzero_at`) before and none now.
fn empty_problem(
    now: Option<i64>,
    last_nonzero: Option<i64>,
    nonzero_at: Option<DateTime<Utc>>,
) -> Option<String> {
    match (now, last_nonzero) {
        (Some(0), Some(before)) if before > 0 => Some(format!(
            "returns no billed series, {before} until {}: is the exporter behind it down? \
             Their usage is not billed until they return",
            nonzero_at.map_or_else(|| "recently".to_owned(), |t| t.to_rfc3339())
        )),
        _ => None,
    }
}

/// Status of every target, by name.
pub async fn statuses(client: &tokio_postgres::Client) -> anyhow::Result<Vec<TargetStatus>> {
    let rows = client
        .query(
            "SELECT name, url, last_attempt_at, last_success_at, last_error, last_duration_ms, last_samples,
                    samples_stored_total, scrapes_total, failures_total,
                    billed_series, billed_series_before, billed_series_last_nonzero,
                    billed_series_nonzero_at
             FROM scrape_targets ORDER BY name",
            &[],
        )
        .await
        .context("reading scrape target status")?;
    rows.iter()
        .map(|row| {
            let last_attempt_at: Option<DateTime<Utc>> = col(row, "last_attempt_at")?;
            let last_success_at: Option<DateTime<Utc>> = col(row, "last_success_at")?;
            let billed_series: Option<i64> = col(row, "billed_series")?;
            Ok(TargetStatus {
                name: col(row, "name")?,
                url: col(row, "url")?,
                up: last_attempt_at.is_some() && last_attempt_at == last_success_at,
                last_attempt_at,
                last_success_at,
                last_error: col(row, "last_error")?,
                last_duration_ms: col(row, "last_duration_ms")?,
                last_samples: col(row, "last_samples")?,
                samples_stored_total: col(row, "samples_stored_total")?,
                scrapes_total: col(row, "scrapes_total")?,
                failures_total: col(row, "failures_total")?,
                billed_series,
                billed_series_before: col(row, "billed_series_before")?,
                problem: empty_problem(
                    billed_series,
                    col(row, "billed_series_last_nonzero")?,
                    col(row, "billed_series_nonzero_at")?,
                ),
            })
        })
        .collect()
}
