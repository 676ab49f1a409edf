//! Account operations on the database: project balances, grants, adjustments and
//! the burn-rate forecast (the credits history is [`super::history`]).
//!
//! Plain functions over a client or a transaction; the caller owns the transaction.
//! Writes lock the project row (`FOR UPDATE`) so they serialise with the billing run,
//! and each writes exactly one append-only ledger row together with the new totals.

pub use crate::forecast::{burn_rate_per_hour, covered, describe_span, run_out_at};
use crate::notify::outbox::{self, Cause};
use crate::notify::thresholds::{Level, Threshold};
use crate::store::col;
use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use tokio_postgres::{Client, Row, Transaction};

/// How many recorded decreases and gaps a project detail shows.
pub const DETAIL_EVENTS: i64 = 100;

/// A project's totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    /// The project name.
    pub name: String,
    /// Credits granted in total.
    pub granted: Decimal,
    /// Exact credits used (usage charges and adjustments).
    pub used: Decimal,
    /// When the project row was created.
    pub created_at: DateTime<Utc>,
    /// When a billing run last committed for the project.
    pub last_billed_at: Option<DateTime<Utc>>,
}

impl Balance {
    /// Granted minus used; negative when the project used more than it was granted.
    pub fn remaining(&self) -> Decimal {
        // Saturates instead of panicking at the edge of the decimal range.
        self.granted.saturating_sub(self.used)
    }

    fn from_row(row: &Row) -> anyhow::Result<Self> {
        Ok(Self {
            name: col(row, "name")?,
            granted: col(row, "granted_credits")?,
            used: col(row, "used_credits")?,
            created_at: col(row, "created_at")?,
            last_billed_at: col(row, "last_billed_at")?,
        })
    }
}

const BALANCE_COLUMNS: &str = "name, granted_credits, used_credits, created_at, last_billed_at";

/// One project's totals, `None` when it does not exist.
pub async fn balance(
    client: &deadpool_postgres::Client,
    project: &str,
) -> anyhow::Result<Option<Balance>> {
    // the hottest read of the API: a cached prepared statement saves a round trip
    let statement = client
        .prepare_cached(&format!(
            "SELECT {BALANCE_COLUMNS} FROM projects WHERE name = $1"
        ))
        .await
        .context("preparing the project read")?;
    let row = client
        .query_opt(&statement, &[&project])
        .await
        .context("reading the project")?;
    row.as_ref().map(Balance::from_row).transpose()
}

/// Every project's totals, by name.
pub async fn balances(client: &Client) -> anyhow::Result<Vec<Balance>> {
    let rows = client
        .query(
            &format!("SELECT {BALANCE_COLUMNS} FROM projects ORDER BY name"),
            &[],
        )
        .await
        .context("listing projects")?;
    rows.iter().map(Balance::from_row).collect()
}

/// Locks a project's row for the rest of the transaction.
async fn lock(tx: &Transaction<'_>, project: &str) -> anyhow::Result<Option<Balance>> {
    let row = tx
        .query_opt(
            &format!("SELECT {BALANCE_COLUMNS} FROM projects WHERE name = $1 FOR UPDATE"),
            &[&project],
        )
        .await
        .context("locking the project")?;
    row.as_ref().map(Balance::from_row).transpose()
}

/// What setting a grant did.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantOutcome {
    /// The totals afterwards.
    pub balance: Balance,
    /// Whether the project was created by this grant.
    pub created: bool,
    /// Whether a `grant` ledger row was written (not when the grant was unchanged).
    pub changed: bool,
}

/// Sets the granted credits of a project to `granted` (zero or more), creating the
/// project when needed: a `grant` ledger row with the difference, then the new total.
/// An unchanged grant writes no ledger row (portals set it on every sync). A lowered
/// grant may cross one of `thresholds` (a notification in the same transaction).
pub async fn set_grant(
    tx: &Transaction<'_>,
    project: &str,
    granted: Decimal,
    reason: Option<&str>,
    actor: &str,
    now: DateTime<Utc>,
    thresholds: &[Threshold],
) -> anyhow::Result<GrantOutcome> {
    anyhow::ensure!(!granted.is_sign_negative(), "a grant cannot be negative");
    let created = tx
        .execute(
            "INSERT INTO projects (name) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&project],
        )
        .await
        .context("creating the project")?
        == 1;
    let before = lock(tx, project)
        .await?
        .context("the project vanished while locked")?;
    let delta = granted
        .checked_sub(before.granted)
        .context("the grant's change leaves the decimal range")?;
    if delta.is_zero() {
        return Ok(GrantOutcome {
            balance: before,
            created,
            changed: false,
        });
    }
    tx.execute(
        "INSERT INTO ledger (project, time, kind, granted_delta, used_after, granted_after, reason, actor)
         VALUES ($1, $2, 'grant', $3, $4, $5, $6, $7)",
        &[&project, &now, &delta, &before.used, &granted, &reason, &actor],
    )
    .await
    .context("writing the grant ledger row")?;
    tx.execute(
        "UPDATE projects SET granted_credits = $2 WHERE name = $1",
        &[&project, &granted],
    )
    .await
    .context("updating the grant")?;
    let level = |granted| Level {
        used: before.used,
        granted,
    };
    let (from, to) = (level(before.granted), level(granted));
    outbox::level_changed(tx, project, thresholds, from, to, Cause::Grant, now).await?;
    Ok(GrantOutcome {
        balance: Balance { granted, ..before },
        created,
        changed: true,
    })
}

/// A manual change of a project's used credits.
#[derive(Debug, Clone, PartialEq)]
pub struct Adjustment {
    /// Its ledger row id.
    pub id: i64,
    /// When it was made.
    pub time: DateTime<Utc>,
    /// The change of used credits: positive charges, negative gives credits back.
    pub credits: Decimal,
    /// The totals afterwards.
    pub balance: Balance,
}

/// Why an adjustment was not made.
#[derive(Debug, thiserror::Error)]
pub enum AdjustError {
    /// No such project.
    #[error("no project named {0:?}")]
    UnknownProject(String),
    /// The new total does not fit a decimal.
    #[error("the adjustment makes used credits too large")]
    Overflow,
    /// Anything else.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Adds `credits` (non-zero; positive charges the project, negative gives credits
/// back) to a project's used credits, with an `adjustment` ledger row. A charge may
/// cross one of `thresholds` (a notification in the same transaction).
pub async fn adjust(
    tx: &Transaction<'_>,
    project: &str,
    credits: Decimal,
    reason: &str,
    actor: &str,
    now: DateTime<Utc>,
    thresholds: &[Threshold],
) -> Result<Adjustment, AdjustError> {
    let before = lock(tx, project)
        .await?
        .ok_or_else(|| AdjustError::UnknownProject(project.to_owned()))?;
    let used = before
        .used
        .checked_add(credits)
        .ok_or(AdjustError::Overflow)?;
    let row = tx
        .query_one(
            "INSERT INTO ledger (project, time, kind, used_delta, used_after, granted_after, reason, actor)
             VALUES ($1, $2, 'adjustment', $3, $4, $5, $6, $7)
             RETURNING id, time",
            &[&project, &now, &credits, &used, &before.granted, &reason, &actor],
        )
        .await
        .context("writing the adjustment ledger row")?;
    tx.execute(
        "UPDATE projects SET used_credits = $2 WHERE name = $1",
        &[&project, &used],
    )
    .await
    .context("updating used credits")?;
    let level = |used| Level {
        used,
        granted: before.granted,
    };
    let (from, to) = (level(before.used), level(used));
    outbox::level_changed(tx, project, thresholds, from, to, Cause::Adjustment, now).await?;
    Ok(Adjustment {
        id: col(&row, "id")?,
        // As stored (microseconds), not the nanoseconds of `now`.
        time: col(&row, "time")?,
        credits,
        balance: Balance { used, ..before },
    })
}

/// When a metric of the project was last billed up to.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricCursor {
    /// The metric.
    pub metric: String,
    /// The newest billed sample over the metric's series.
    pub last_billed_sample_at: DateTime<Utc>,
}

/// A counter decrease recorded while billing.
#[derive(Debug, Clone, PartialEq)]
pub struct Decrease {
    /// The series' metric.
    pub metric: String,
    /// The series' labels.
    pub labels: serde_json::Value,
    /// The sample time of the lower value.
    pub time: DateTime<Utc>,
    /// The value before.
    pub from_value: Decimal,
    /// The lower value.
    pub to_value: Decimal,
    /// `rebase` or `restart`.
    pub policy: String,
}

/// A gauge step that was too long to bill.
#[derive(Debug, Clone, PartialEq)]
pub struct Gap {
    /// The series' metric.
    pub metric: String,
    /// The series' labels.
    pub labels: serde_json::Value,
    /// The step's first sample.
    pub from_time: DateTime<Utc>,
    /// The step's last sample.
    pub to_time: DateTime<Utc>,
}

/// Everything the project detail shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Detail {
    /// The totals.
    pub balance: Balance,
    /// Exact credits charged by usage in the forecast window before `now`.
    pub charged_in_window: Decimal,
    /// Start of the project's first billed usage (`None`: none was).
    pub first_usage: Option<DateTime<Utc>>,
    /// Until when `charged_in_window` holds without a new commit: when the oldest
    /// row in the window leaves it or the next future-dated row enters it.
    pub charged_until: Option<DateTime<Utc>>,
    /// Per metric, how far billing has come.
    pub cursors: Vec<MetricCursor>,
    /// The latest [`DETAIL_EVENTS`] decreases, newest first.
    pub decreases: Vec<Decrease>,
    /// The latest [`DETAIL_EVENTS`] unbilled gaps, newest first.
    pub gaps: Vec<Gap>,
}

/// The project detail, `None` when the project does not exist. The queries run
/// pipelined on one connection.
pub async fn detail(
    client: &deadpool_postgres::Client,
    project: &str,
    window: Duration,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<Detail>> {
    let since = now - window;
    let (balance, charged, cursors, decreases, gaps) = futures::try_join!(
        balance(client, project),
        async {
            client
                .query_one(
                    "SELECT coalesce(sum(used_delta) FILTER (WHERE time <= $3), 0) AS charged,
                            min(time) FILTER (WHERE time <= $3) AS oldest,
                            min(time) FILTER (WHERE time > $3) AS next_future,
                            (SELECT coalesce(usage_from, time) FROM ledger
                             WHERE project = $1 AND kind = 'usage' ORDER BY time LIMIT 1)
                                AS first_usage
                     FROM ledger
                     WHERE project = $1 AND kind = 'usage' AND time > $2",
                    &[&project, &since, &now],
                )
                .await
                .context("summing recent usage")
        },
        async {
            client
                .query(
                    "SELECT s.metric, max(c.last_time) AS last_time
                     FROM billing_cursors c JOIN series s ON s.id = c.series_id
                     WHERE s.project = $1
                     GROUP BY s.metric ORDER BY s.metric",
                    &[&project],
                )
                .await
                .context("reading billing cursors")
        },
        async {
            client
                .query(
                    "SELECT s.metric, s.series_key, d.time, d.from_value, d.to_value, d.policy
                     FROM counter_decreases d JOIN series s ON s.id = d.series_id
                     WHERE s.project = $1
                     ORDER BY d.time DESC, d.series_id LIMIT $2",
                    &[&project, &DETAIL_EVENTS],
                )
                .await
                .context("reading counter decreases")
        },
        async {
            client
                .query(
                    "SELECT s.metric, s.series_key, g.from_time, g.to_time
                     FROM unbilled_gaps g JOIN series s ON s.id = g.series_id
                     WHERE s.project = $1
                     ORDER BY g.from_time DESC, g.series_id LIMIT $2",
                    &[&project, &DETAIL_EVENTS],
                )
                .await
                .context("reading unbilled gaps")
        },
    )?;
    let Some(balance) = balance else {
        return Ok(None);
    };
    Ok(Some(Detail {
        balance,
        charged_in_window: col(&charged, "charged")?,
        first_usage: col(&charged, "first_usage")?,
        charged_until: {
            let leaves = col::<Option<DateTime<Utc>>>(&charged, "oldest")?
                .and_then(|oldest| oldest.checked_add_signed(window));
            let enters: Option<DateTime<Utc>> = col(&charged, "next_future")?;
            leaves.into_iter().chain(enters).min()
        },
        cursors: cursors
            .iter()
            .map(|r| {
                Ok(MetricCursor {
                    metric: col(r, "metric")?,
                    last_billed_sample_at: col(r, "last_time")?,
                })
            })
            .collect::<anyhow::Result<_>>()?,
        decreases: decreases
            .iter()
            .map(|r| {
                Ok(Decrease {
                    metric: col(r, "metric")?,
                    labels: crate::store::series::labels_json(Some(col(r, "series_key")?))?,
                    time: col(r, "time")?,
                    from_value: col(r, "from_value")?,
                    to_value: col(r, "to_value")?,
                    policy: col(r, "policy")?,
                })
            })
            .collect::<anyhow::Result<_>>()?,
        gaps: gaps
            .iter()
            .map(|r| {
                Ok(Gap {
                    metric: col(r, "metric")?,
                    labels: crate::store::series::labels_json(Some(col(r, "series_key")?))?,
                    from_time: col(r, "from_time")?,
                    to_time: col(r, "to_time")?,
                })
            })
            .collect::<anyhow::Result<_>>()?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0)
            .single()
            .unwrap_or_else(|| panic!("valid time"))
    }

    #[test]
    fn burn_rate_is_credits_per_hour_over_the_window() {
        let cases = [
            ("48 credits in a day", "48", 24 * 3600, "2"),
            ("nothing used", "0", 24 * 3600, "0"),
            ("one credit in half an hour", "1", 1800, "2"),
            ("an empty window burns nothing", "5", 0, "0"),
            ("refunds make it negative", "-24", 24 * 3600, "-1"),
        ];
        for (case, charged, seconds, expected) in cases {
            let got = burn_rate_per_hour(dec(charged), Duration::seconds(seconds));
            assert_eq!(got, dec(expected), "{case}");
        }
    }

    #[test]
    fn the_burn_rate_covers_the_time_since_the_first_usage_in_the_window() {
        let day = Duration::hours(24);
        let minutes = |m: i64| Some(now() - Duration::minutes(m));
        let cases = [
            ("billed for 6 minutes", minutes(6), Duration::minutes(6)),
            ("billed for two days", minutes(48 * 60), day),
            ("exactly the window", minutes(24 * 60), day),
            ("nothing billed", None, day),
            (
                "usage after now",
                Some(now() + Duration::minutes(5)),
                Duration::zero(),
            ),
        ];
        for (case, first, expected) in cases {
            assert_eq!(covered(day, now(), first), expected, "{case}");
        }
        assert_eq!(describe_span(day), "the last 24 hours");
        assert_eq!(describe_span(Duration::minutes(6)), "the last 6 minutes");
        assert_eq!(describe_span(Duration::seconds(50)), "the last 50 seconds");
        // The young project: 1.36 credits in its first 6 minutes is 13.6 per
        // hour, not 0.0567 (1.36 over 24 h).
        let rate = burn_rate_per_hour(dec("1.36"), covered(day, now(), minutes(6)));
        assert_eq!(rate, dec("13.6"));
    }

    #[test]
    fn run_out_is_now_plus_remaining_over_burn_rate() {
        let hours = |h: i64| Some(now() + Duration::hours(h));
        let cases = [
            ("100 left at 2/h", "1000", "100", "2", hours(50)),
            ("nothing burns", "1000", "100", "0", None),
            ("credits come back", "1000", "100", "-1", None),
            ("nothing granted", "0", "-5", "2", None),
            ("already out", "1000", "-3", "2", Some(now())),
            ("exactly out", "1000", "0", "2", Some(now())),
            (
                // Found by the API fuzzer: "+16143-01-20T00:15:38Z" is no RFC 3339.
                "beyond year 9999",
                "3080176590.65",
                "3080176590.65",
                "24.89244",
                None,
            ),
            // At 3600 per hour, one credit lasts a second: now + 251,606,959,199 s is
            // 9999-12-31T23:59:59Z, one more is the year 10000.
            (
                "the last second RFC 3339 writes",
                "1",
                "251606959199",
                "3600",
                DateTime::from_timestamp(253_402_300_799, 0),
            ),
            ("a second later", "1", "251606959200", "3600", None),
            (
                "beyond any timestamp",
                "1000",
                "79228162514264337593543950335",
                "0.0000001",
                None,
            ),
        ];
        for (case, granted, remaining, rate, expected) in cases {
            let got = run_out_at(now(), dec(granted), dec(remaining), dec(rate));
            assert_eq!(got, expected, "{case}");
        }
    }
}
