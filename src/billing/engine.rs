//! The billing run: for each project, ONE transaction writes the usage ledger rows,
//! the new used total, the advanced cursors and the recorded decreases and gaps.
//!
//! A crash anywhere leaves all or nothing of a project's run, so usage is billed
//! exactly once; after downtime the next run bills the whole gap from the stored
//! samples. Projects are claimed with `FOR UPDATE SKIP LOCKED`: replicas running at
//! the same time bill disjoint projects and never the same usage twice.

use super::charge::{self, Point};
use super::money::decimal_from_f64;
use super::rules::{DecreasePolicy, Rules};
use crate::config::Settings;
use anyhow::Context;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use tokio_postgres::Transaction;

/// What one billing run did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BillingSummary {
    /// When the run started.
    pub started_at: Option<DateTime<Utc>>,
    /// How long it took.
    pub duration_ms: u64,
    /// Projects whose transaction committed.
    pub projects_billed: u64,
    /// Projects another replica was billing at the time (skipped, not lost).
    pub projects_skipped: u64,
    /// Projects whose run failed (logged; retried next run, nothing written).
    pub projects_failed: u64,
    /// Samples consumed (cursors advanced past them).
    pub samples_billed: u64,
    /// Usage ledger rows written.
    pub ledger_rows: u64,
    /// Exact credits charged in this run.
    #[serde(with = "rust_decimal::serde::str")]
    pub credits_billed: Decimal,
}

/// What billing one project did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectBilled {
    /// Samples consumed.
    pub samples: u64,
    /// Usage ledger rows written.
    pub ledger_rows: u64,
    /// Exact credits charged.
    pub credits: Decimal,
    /// Granted credits at the time.
    pub granted: Decimal,
    /// Used credits after the run.
    pub used: Decimal,
}

/// Bills every project once, up to the newest stored sample not after `now`.
#[tracing::instrument(skip_all, err)]
pub async fn run(
    pool: &Pool,
    settings: &Settings,
    now: DateTime<Utc>,
) -> anyhow::Result<BillingSummary> {
    let clock = Instant::now();
    let projects: Vec<String> = pool
        .get()
        .await?
        .query("SELECT name FROM projects ORDER BY name", &[])
        .await
        .context("listing projects")?
        .iter()
        .map(|row| row.get(0))
        .filter(|name: &String| {
            settings
                .project_whitelist
                .as_ref()
                .is_none_or(|w| w.contains(name))
        })
        .collect();
    let mut summary = BillingSummary {
        started_at: Some(now),
        ..BillingSummary::default()
    };
    let mut results = futures::stream::iter(projects)
        .map(|project| async move {
            let result = bill_project(pool, &settings.rules, &project, now).await;
            (project, result)
        })
        .buffer_unordered(settings.workers);
    while let Some((project, result)) = results.next().await {
        match result {
            Ok(Some(billed)) => {
                summary.projects_billed += 1;
                summary.samples_billed += billed.samples;
                summary.ledger_rows += billed.ledger_rows;
                summary.credits_billed += billed.credits;
            }
            Ok(None) => summary.projects_skipped += 1,
            Err(e) => {
                summary.projects_failed += 1;
                tracing::error!(%project, error = %format!("{e:#}"), "billing the project failed; it is retried next run");
            }
        }
    }
    summary.duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        projects = summary.projects_billed,
        skipped = summary.projects_skipped,
        failed = summary.projects_failed,
        samples = summary.samples_billed,
        credits = %summary.credits_billed,
        "billing run done"
    );
    Ok(summary)
}

/// Bills one project in one transaction; `None` when another replica holds it.
#[tracing::instrument(skip(pool, rules, now), err)]
pub async fn bill_project(
    pool: &Pool,
    rules: &Rules,
    project: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<ProjectBilled>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT granted_credits, used_credits FROM projects WHERE name = $1 FOR UPDATE SKIP LOCKED",
            &[&project],
        )
        .await
        .context("locking the project")?
    else {
        return Ok(None);
    };
    let granted: Decimal = row.get(0);
    let used_before: Decimal = row.get(1);
    let metrics: Vec<&str> = rules.iter().map(|r| r.metric.as_str()).collect();
    let series = tx
        .query(
            "SELECT s.id, s.metric, s.labels, c.last_time, c.last_value
             FROM series s LEFT JOIN billing_cursors c ON c.series_id = s.id
             WHERE s.project = $1 AND s.metric = ANY($2::text[])
             ORDER BY s.id",
            &[&project, &metrics],
        )
        .await
        .context("reading the project's series")?;
    let ids: Vec<i64> = series.iter().map(|r| r.get(0)).collect();
    let after: Vec<Option<DateTime<Utc>>> = series.iter().map(|r| r.get(3)).collect();
    let samples = tx
        .query(
            "SELECT u.series_id, u.time, u.value
             FROM unnest($1::bigint[], $2::timestamptz[]) AS c(series_id, after)
             JOIN usage_samples u ON u.series_id = c.series_id
              AND u.time > coalesce(c.after, '-infinity') AND u.time <= $3
             ORDER BY u.series_id, u.time",
            &[&ids, &after, &now],
        )
        .await
        .context("reading unbilled samples")?;

    let mut writes = Writes::new(project, granted, used_before);
    let mut next = 0;
    for row in &series {
        let series_id: i64 = row.get(0);
        let metric: String = row.get(1);
        let Some(rule) = rules.get(&metric) else {
            continue;
        };
        let start = next;
        while next < samples.len() && samples[next].get::<_, i64>(0) == series_id {
            next += 1;
        }
        if start == next {
            continue;
        }
        let points = samples[start..next]
            .iter()
            .map(|s| {
                let value: f64 = s.get(2);
                Ok(Point {
                    time: s.get(1),
                    value: exact(value)
                        .with_context(|| format!("sample value {value} of series {series_id}"))?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let labels: BTreeMap<String, String> =
            serde_json::from_value(row.get::<_, serde_json::Value>(2)).context("series labels")?;
        let cursor = match (
            row.get::<_, Option<DateTime<Utc>>>(3),
            row.get::<_, Option<Decimal>>(4),
        ) {
            (Some(time), Some(value)) => Some(Point { time, value }),
            _ => None,
        };
        let charged = charge::charge_series(rule, &labels, cursor, &points)?;
        writes.samples += points.len() as u64;
        for line in charge::summarize(&rule.metric, &charged.steps)? {
            writes.usage(&metric, line)?;
        }
        for decrease in charged.decreases {
            writes.decreases.push((
                series_id,
                decrease.time,
                decrease.from_value,
                decrease.to_value,
                decrease.policy,
            ));
        }
        for gap in charged.gaps {
            writes.gaps.push((series_id, gap.from, gap.to));
        }
        if let Some(cursor) = charged.new_cursor {
            writes.cursors.push((series_id, cursor.time, cursor.value));
        }
    }
    let billed = writes.apply(&tx).await?;
    tx.commit().await.context("committing the billing run")?;
    Ok(Some(billed))
}

/// Converts a stored sample value to an exact decimal; magnitudes below what a
/// decimal can hold are zero usage.
fn exact(value: f64) -> anyhow::Result<Decimal> {
    match decimal_from_f64(value) {
        Some(decimal) => Ok(decimal),
        None if value.is_finite() && value.abs() < 1.0 => Ok(Decimal::ZERO),
        None => anyhow::bail!("cannot be billed exactly (too large)"),
    }
}

/// Everything one project's run writes, collected first and written in a few
/// statements.
struct Writes<'a> {
    project: &'a str,
    granted: Decimal,
    used: Decimal,
    credits: Decimal,
    samples: u64,
    ledger: Vec<charge::ChargeLine>,
    ledger_metrics: Vec<String>,
    ledger_used_after: Vec<Decimal>,
    decreases: Vec<(i64, DateTime<Utc>, Decimal, Decimal, DecreasePolicy)>,
    gaps: Vec<(i64, DateTime<Utc>, DateTime<Utc>)>,
    cursors: Vec<(i64, DateTime<Utc>, Decimal)>,
}

impl<'a> Writes<'a> {
    fn new(project: &'a str, granted: Decimal, used: Decimal) -> Self {
        Self {
            project,
            granted,
            used,
            credits: Decimal::ZERO,
            samples: 0,
            ledger: Vec::new(),
            ledger_metrics: Vec::new(),
            ledger_used_after: Vec::new(),
            decreases: Vec::new(),
            gaps: Vec::new(),
            cursors: Vec::new(),
        }
    }

    fn usage(&mut self, metric: &str, line: charge::ChargeLine) -> anyhow::Result<()> {
        self.used = self
            .used
            .checked_add(line.amount)
            .context("used credits overflow")?;
        self.credits = self
            .credits
            .checked_add(line.amount)
            .context("credits overflow")?;
        self.ledger_used_after.push(self.used);
        self.ledger_metrics.push(metric.to_owned());
        self.ledger.push(line);
        Ok(())
    }

    async fn apply(self, tx: &Transaction<'_>) -> anyhow::Result<ProjectBilled> {
        if !self.ledger.is_empty() {
            let times: Vec<DateTime<Utc>> = self.ledger.iter().map(|l| l.to).collect();
            let froms: Vec<DateTime<Utc>> = self.ledger.iter().map(|l| l.from).collect();
            let quantities: Vec<Decimal> = self.ledger.iter().map(|l| l.quantity).collect();
            let prices: Vec<Decimal> = self.ledger.iter().map(|l| l.price).collect();
            let amounts: Vec<Decimal> = self.ledger.iter().map(|l| l.amount).collect();
            tx.execute(
                "INSERT INTO ledger (project, time, kind, metric, usage_from, quantity, price,
                                     used_delta, used_after, granted_after)
                 SELECT $1, t, 'usage', m, f, q, p, a, u, $2
                 FROM unnest($3::timestamptz[], $4::text[], $5::timestamptz[], $6::numeric[],
                             $7::numeric[], $8::numeric[], $9::numeric[]) AS x(t, m, f, q, p, a, u)",
                &[
                    &self.project,
                    &self.granted,
                    &times,
                    &self.ledger_metrics,
                    &froms,
                    &quantities,
                    &prices,
                    &amounts,
                    &self.ledger_used_after,
                ],
            )
            .await
            .context("writing usage ledger rows")?;
        }
        if !self.decreases.is_empty() {
            let ids: Vec<i64> = self.decreases.iter().map(|d| d.0).collect();
            let times: Vec<DateTime<Utc>> = self.decreases.iter().map(|d| d.1).collect();
            let froms: Vec<Decimal> = self.decreases.iter().map(|d| d.2).collect();
            let tos: Vec<Decimal> = self.decreases.iter().map(|d| d.3).collect();
            let policies: Vec<&str> = self
                .decreases
                .iter()
                .map(|d| match d.4 {
                    DecreasePolicy::Rebase => "rebase",
                    DecreasePolicy::Restart => "restart",
                })
                .collect();
            tx.execute(
                "INSERT INTO counter_decreases (series_id, time, from_value, to_value, policy)
                 SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::numeric[], $4::numeric[], $5::text[])
                 ON CONFLICT DO NOTHING",
                &[&ids, &times, &froms, &tos, &policies],
            )
            .await
            .context("recording counter decreases")?;
        }
        if !self.gaps.is_empty() {
            let ids: Vec<i64> = self.gaps.iter().map(|g| g.0).collect();
            let froms: Vec<DateTime<Utc>> = self.gaps.iter().map(|g| g.1).collect();
            let tos: Vec<DateTime<Utc>> = self.gaps.iter().map(|g| g.2).collect();
            tx.execute(
                "INSERT INTO unbilled_gaps (series_id, from_time, to_time)
                 SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[])
                 ON CONFLICT DO NOTHING",
                &[&ids, &froms, &tos],
            )
            .await
            .context("recording unbilled gaps")?;
        }
        if !self.cursors.is_empty() {
            let ids: Vec<i64> = self.cursors.iter().map(|c| c.0).collect();
            let times: Vec<DateTime<Utc>> = self.cursors.iter().map(|c| c.1).collect();
            let values: Vec<Decimal> = self.cursors.iter().map(|c| c.2).collect();
            tx.execute(
                "INSERT INTO billing_cursors (series_id, last_time, last_value)
                 SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::numeric[])
                 ON CONFLICT (series_id) DO UPDATE
                 SET last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value, updated_at = now()",
                &[&ids, &times, &values],
            )
            .await
            .context("advancing billing cursors")?;
        }
        tx.execute(
            "UPDATE projects SET used_credits = $2, last_billed_at = now() WHERE name = $1",
            &[&self.project, &self.used],
        )
        .await
        .context("updating the project balance")?;
        Ok(ProjectBilled {
            samples: self.samples,
            ledger_rows: self.ledger.len() as u64,
            credits: self.credits,
            granted: self.granted,
            used: self.used,
        })
    }
}
