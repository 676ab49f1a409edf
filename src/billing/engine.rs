//! The billing run. Each project's usage ledger rows, new used total, advanced
//! cursors and recorded decreases and gaps commit in ONE transaction (projects are
//! batched, several per transaction, to save round trips; a project whose usage
//! cannot be charged is left out of the batch whole).
//!
//! A crash anywhere leaves all or nothing of a project's run, so usage is billed
//! exactly once; after downtime the next run bills the whole gap from the stored
//! samples. Projects are claimed with `FOR UPDATE SKIP LOCKED`: replicas running at
//! the same time bill disjoint projects and never the same usage twice.

use super::charge::{self, Point};
use super::quarantine;
use super::rules::{DecreasePolicy, Rules};
use crate::notify::outbox::{self, Cause};
use crate::notify::thresholds::{Level, Threshold};
use crate::store::col;
use anyhow::Context;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use deadpool_postgres::Transaction;
use futures::StreamExt;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

pub use crate::domain::BillingSummary;

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

/// Projects billed per transaction: one set of statements serves them all, while
/// each project's writes are still all or nothing.
const BATCH: usize = 256;

/// Samples one transaction reads at most when no setting says otherwise
/// (`BILLING_BATCH_SAMPLES`).
pub const DEFAULT_BATCH_SAMPLES: usize = 20_000;

/// What billing reads of the settings (`Settings::billing` lends it).
#[derive(Debug, Clone, Copy)]
pub struct BillingSettings<'a> {
    /// The billing rules (`METRICS_TO_BILL` plus `BILLING_RULES_FILE`).
    pub rules: &'a Rules,
    /// `NOTIFICATION_THRESHOLDS`, ascending.
    pub thresholds: &'a [Threshold],
    /// `OS_CREDITS_PROJECT_WHITELIST`: when set, only these projects are billed.
    pub project_whitelist: Option<&'a BTreeSet<String>>,
    /// `BILLING_BATCH_SAMPLES`: samples one billing transaction reads at most.
    pub batch_samples: usize,
    /// `OS_CREDITS_WORKERS`: how many batches of projects are billed at once.
    pub concurrency: usize,
}

/// Bills every project once, up to the newest stored sample not after `now`.
#[tracing::instrument(skip_all, fields(until = %now), err)]
pub async fn run(
    pool: &Pool,
    settings: BillingSettings<'_>,
    now: DateTime<Utc>,
) -> anyhow::Result<BillingSummary> {
    let clock = Instant::now();
    let projects = project_names(pool, settings.project_whitelist)
        .await
        .inspect_err(crate::telemetry::metrics::billing_run_failed)?;
    let mut summary = BillingSummary {
        started_at: Some(now),
        ..BillingSummary::default()
    };
    // Batch indices, not slices: a closure over borrowed items is not general enough
    // for the spawned billing loop.
    let projects = &projects;
    let mut batches = futures::stream::iter(0..projects.len().div_ceil(BATCH))
        .map(|batch| async move {
            let names = &projects[batch * BATCH..((batch + 1) * BATCH).min(projects.len())];
            (
                names,
                bill_projects(
                    pool,
                    settings.rules,
                    settings.thresholds,
                    names,
                    now,
                    settings.batch_samples,
                )
                .await,
            )
        })
        .buffer_unordered(settings.concurrency);
    while let Some((names, result)) = batches.next().await {
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::error!(projects = names.len(), error = %format!("{e:#}"), "billing a batch of projects failed; retried next run");
                summary.projects_failed += names.len() as u64;
                summary.first_error.get_or_insert_with(|| format!("{e:#}"));
                continue;
            }
        };
        for (project, outcome) in outcomes {
            match outcome {
                Outcome::Billed(billed) => {
                    summary.projects_billed += 1;
                    summary.samples_billed += billed.samples;
                    summary.ledger_rows += billed.ledger_rows;
                    // A statistic: at the edge of the decimal range it saturates,
                    // and says so, rather than stopping the run.
                    summary.credits_billed = match summary
                        .credits_billed
                        .checked_add(billed.credits)
                    {
                        Some(sum) => sum,
                        None => {
                            tracing::warn!("the credits billed in this run exceed the decimal range; the run's total saturates");
                            Decimal::MAX
                        }
                    };
                }
                Outcome::Skipped => summary.projects_skipped += 1,
                Outcome::Failed(e) => {
                    summary.projects_failed += 1;
                    tracing::error!(%project, error = %format!("{e:#}"), "billing the project failed; it is retried next run");
                    summary
                        .first_error
                        .get_or_insert_with(|| format!("{project}: {e:#}"));
                }
            }
        }
    }
    if summary.projects_billed > 0 {
        // The run returns once every replica answers what it billed.
        crate::store::changes::fence_pool(pool).await;
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
    crate::telemetry::metrics::billing_run_finished(&summary);
    Ok(summary)
}

/// Every project billing looks at, by name: all, or the whitelisted ones.
pub async fn project_names(
    pool: &Pool,
    whitelist: Option<&BTreeSet<String>>,
) -> anyhow::Result<Vec<String>> {
    let rows = pool
        .get()
        .await?
        .query("SELECT name FROM projects ORDER BY name", &[])
        .await
        .context("listing projects")?;
    let mut names = Vec::with_capacity(rows.len());
    for row in &rows {
        let name: String = col(row, "name")?;
        if whitelist.is_none_or(|w| w.contains(&name)) {
            names.push(name);
        }
    }
    Ok(names)
}

/// How billing one project ended.
#[derive(Debug)]
pub enum Outcome {
    /// Committed.
    Billed(ProjectBilled),
    /// Another replica holds the project; it bills it.
    Skipped,
    /// Its usage could not be charged (logged); nothing of it was written.
    Failed(anyhow::Error),
}

/// Bills one project; `None` when another replica holds it.
#[tracing::instrument(skip_all, fields(%project))]
pub async fn bill_project(
    pool: &Pool,
    rules: &Rules,
    thresholds: &[Threshold],
    project: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<ProjectBilled>> {
    let mut outcomes = bill_projects(
        pool,
        rules,
        thresholds,
        &[project.to_owned()],
        now,
        DEFAULT_BATCH_SAMPLES,
    )
    .await?;
    match outcomes.pop().map(|(_, outcome)| outcome) {
        Some(Outcome::Billed(billed)) => {
            crate::store::changes::fence_pool(pool).await;
            Ok(Some(billed))
        }
        Some(Outcome::Failed(e)) => Err(e),
        Some(Outcome::Skipped) | None => Ok(None),
    }
}

/// Bills the given projects up to `now`, reading at most `max_samples` samples per
/// transaction: a backlog is billed in passes (each one transaction per batch, all
/// or nothing per project, cursors advancing), so memory stays bounded by
/// `max_samples` whatever the backlog.
pub async fn bill_projects(
    pool: &Pool,
    rules: &Rules,
    thresholds: &[Threshold],
    names: &[String],
    now: DateTime<Utc>,
    max_samples: usize,
) -> anyhow::Result<Vec<(String, Outcome)>> {
    let mut merged: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut pending: Vec<String> = names.to_vec();
    while !pending.is_empty() {
        let (outcomes, more) =
            bill_pass(pool, rules, thresholds, &pending, now, max_samples).await?;
        for (project, outcome) in outcomes {
            let merged_outcome = match (merged.remove(&project), outcome) {
                (Some(Outcome::Billed(a)), Outcome::Billed(b)) => Outcome::Billed(a.then(b)?),
                (Some(Outcome::Billed(a)), Outcome::Skipped) => Outcome::Billed(a),
                (_, outcome) => outcome,
            };
            merged.insert(project, merged_outcome);
        }
        pending = more;
    }
    Ok(merged.into_iter().collect())
}

impl ProjectBilled {
    /// This pass followed by the next one of the same run.
    fn then(self, next: ProjectBilled) -> anyhow::Result<ProjectBilled> {
        Ok(ProjectBilled {
            samples: self.samples + next.samples,
            ledger_rows: self.ledger_rows + next.ledger_rows,
            credits: self
                .credits
                .checked_add(next.credits)
                .context("credits overflow")?,
            granted: next.granted,
            used: next.used,
        })
    }
}

/// What one pass did per project, and the projects with samples left for another.
type Pass = (Vec<(String, Outcome)>, Vec<String>);

/// One pass over the given projects in one transaction: locks those no other replica
/// holds, charges each one's next samples (at most `max_samples` in all, shared
/// evenly by their series) in memory, then writes everything in a few statements
/// and commits. Crossing one of `thresholds` writes a notification in the same
/// transaction. Also returns the billed projects with samples left for another pass.
#[tracing::instrument(skip_all, fields(projects = names.len(), first = names.first().map(String::as_str), last = names.last().map(String::as_str)), err)]
async fn bill_pass(
    pool: &Pool,
    rules: &Rules,
    thresholds: &[Threshold],
    names: &[String],
    now: DateTime<Utc>,
    max_samples: usize,
) -> anyhow::Result<Pass> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let locked = tx
        .query(
            &tx.prepare_cached(
                "SELECT name, granted_credits, used_credits FROM projects
                 WHERE name = ANY($1::text[]) ORDER BY name FOR UPDATE SKIP LOCKED",
            )
            .await?,
            &[&names],
        )
        .await
        .context("locking projects")?;
    let mut writes: BTreeMap<String, Writes> = locked
        .iter()
        .map(|r| {
            let writes = Writes::new(col(r, "granted_credits")?, col(r, "used_credits")?);
            Ok((col(r, "name")?, writes))
        })
        .collect::<anyhow::Result<_>>()?;
    let locked_names: Vec<&str> = writes.keys().map(String::as_str).collect();
    let metrics: Vec<&str> = rules.iter().map(|r| r.metric.as_str()).collect();
    let series = tx
        .query(
            &tx.prepare_cached(
                "SELECT s.id, s.metric, s.series_key, c.last_time, c.last_value, s.project
                 FROM series s LEFT JOIN billing_cursors c ON c.series_id = s.id
                 WHERE s.project = ANY($1::text[]) AND s.metric = ANY($2::text[])
                 ORDER BY s.id",
            )
            .await?,
            &[&locked_names, &metrics],
        )
        .await
        .context("reading the projects' series")?;
    let ids: Vec<i64> = series
        .iter()
        .map(|r| col(r, "id"))
        .collect::<anyhow::Result<_>>()?;
    let after: Vec<Option<DateTime<Utc>>> = series
        .iter()
        .map(|r| col(r, "last_time"))
        .collect::<anyhow::Result<_>>()?;
    // The batch's sample budget, shared by its series (at least one each).
    let per_series = i64::try_from((max_samples / ids.len().max(1)).max(1)).unwrap_or(i64::MAX);
    let samples = tx
        .query(
            &tx.prepare_cached(
                "SELECT c.series_id, u.time, u.value
                 FROM unnest($1::bigint[], $2::timestamptz[]) AS c(series_id, after)
                 CROSS JOIN LATERAL (
                     SELECT u.time, u.value FROM usage_samples u
                     WHERE u.series_id = c.series_id
                       AND u.time > coalesce(c.after, '-infinity') AND u.time <= $3
                     ORDER BY u.time LIMIT $4) u
                 ORDER BY c.series_id, u.time",
            )
            .await?,
            &[&ids, &after, &now, &per_series],
        )
        .await
        .context("reading unbilled samples")?;
    let mut more: Vec<String> = Vec::new();
    let rates = super::held::rates(&tx, &ids).await?;

    let mut failed: BTreeMap<String, anyhow::Error> = BTreeMap::new();
    let mut next = 0;
    for row in &series {
        let series_id: i64 = col(row, "id")?;
        let start = next;
        while next < samples.len() && col::<i64>(&samples[next], "series_id")? == series_id {
            next += 1;
        }
        let project: String = col(row, "project")?;
        if start == next || failed.contains_key(&project) {
            continue;
        }
        let Some(project_writes) = writes.get_mut(&project) else {
            continue;
        };
        let rate = rates.get(&series_id).copied();
        if let Err(e) = charge_into(project_writes, rules, row, &samples[start..next], rate) {
            failed.insert(project, e.context(format!("series {series_id}")));
            continue;
        }
        // Read up to its share: more may wait, worth another pass if the cursor moved.
        let truncated = i64::try_from(next - start).unwrap_or(i64::MAX) >= per_series;
        if truncated && project_writes.cursors.last().map(|c| c.0) == Some(series_id) {
            more.push(project);
        }
    }
    let mut outcomes: Vec<(String, Outcome)> = names
        .iter()
        .filter(|name| !writes.contains_key(*name))
        .map(|name| (name.clone(), Outcome::Skipped))
        .collect();
    for (project, error) in failed {
        writes.remove(&project);
        more.retain(|p| *p != project);
        outcomes.push((project, Outcome::Failed(error)));
    }
    more.sort();
    more.dedup();
    apply(&tx, &writes, thresholds, now).await?;
    tx.commit().await.context("committing the billing run")?;
    outcomes.extend(writes.into_iter().map(|(project, w)| {
        let billed = ProjectBilled {
            samples: w.samples,
            ledger_rows: w.ledger.len() as u64,
            credits: w.credits,
            granted: w.granted,
            used: w.used,
        };
        (project, Outcome::Billed(billed))
    }));
    Ok((outcomes, more))
}

/// Charges one series' new samples into its project's writes; samples that cannot
/// be billed are quarantined ([`quarantine`]).
fn charge_into(
    writes: &mut Writes,
    rules: &Rules,
    series: &tokio_postgres::Row,
    samples: &[tokio_postgres::Row],
    rate: Option<super::guard::RateState>,
) -> anyhow::Result<()> {
    let series_id: i64 = col(series, "id")?;
    let metric: String = col(series, "metric")?;
    let Some(rule) = rules.get(&metric) else {
        return Ok(());
    };
    let points: Vec<(DateTime<Utc>, f64)> = samples
        .iter()
        .map(|s| Ok((col(s, "time")?, col(s, "value")?)))
        .collect::<anyhow::Result<_>>()?;
    let (_, labels) = crate::store::series::labels_of_key(col(series, "series_key")?)?;
    let cursor = match (
        col::<Option<DateTime<Utc>>>(series, "last_time")?,
        col::<Option<Decimal>>(series, "last_value")?,
    ) {
        (Some(time), Some(value)) => Some(Point { time, value }),
        _ => None,
    };
    let totals = quarantine::Totals {
        used: writes.used,
        charged: writes.credits,
    };
    // The jump guard decides what is billed or held; the quarantine passes what
    // cannot be billed at all.
    let guarded = |cursor, points: &[Point], (state, mut held): (_, Vec<_>)| {
        let g = super::guard::charge_guarded(rule, &labels, cursor, points, state)?;
        held.extend(g.held);
        Ok((g.charged, (g.state, held)))
    };
    let (billed, (state, held)) =
        quarantine::charge_series(rule, cursor, &points, totals, (rate, Vec::new()), guarded)?;
    writes.guard.add(series_id, &metric, held, state, rate);
    writes.samples += points.len() as u64;
    for line in billed.lines {
        writes.usage(&metric, line)?;
    }
    for d in billed.charge.decreases {
        writes
            .decreases
            .push((series_id, d.time, d.from_value, d.to_value, d.policy));
    }
    for gap in billed.charge.gaps {
        writes.gaps.push((series_id, gap.from, gap.to));
    }
    for q in billed.quarantined {
        tracing::warn!(series_id, %metric, time = %q.time, value = q.value, reason = %q.reason, "sample quarantined: not billed, recorded");
        writes
            .quarantined
            .push((series_id, q.time, q.value, q.reason));
    }
    if let Some((time, value)) = billed.cursor {
        writes.cursors.push((series_id, time, value));
    }
    Ok(())
}

/// Everything one project's run writes, collected before anything is written.
struct Writes {
    granted: Decimal,
    used_before: Decimal,
    used: Decimal,
    credits: Decimal,
    samples: u64,
    ledger: Vec<charge::ChargeLine>,
    ledger_metrics: Vec<String>,
    ledger_used_after: Vec<Decimal>,
    decreases: Vec<(i64, DateTime<Utc>, Decimal, Decimal, DecreasePolicy)>,
    gaps: Vec<(i64, DateTime<Utc>, DateTime<Utc>)>,
    quarantined: Vec<(i64, DateTime<Utc>, f64, String)>,
    cursors: Vec<(i64, DateTime<Utc>, Option<Decimal>)>,
    guard: super::held::GuardWrites,
}

impl Writes {
    fn new(granted: Decimal, used: Decimal) -> Self {
        Self {
            granted,
            used_before: used,
            used,
            credits: Decimal::ZERO,
            samples: 0,
            ledger: Vec::new(),
            ledger_metrics: Vec::new(),
            ledger_used_after: Vec::new(),
            decreases: Vec::new(),
            gaps: Vec::new(),
            quarantined: Vec::new(),
            cursors: Vec::new(),
            guard: super::held::GuardWrites::default(),
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
}

/// Writes every project's ledger rows, decreases, gaps, cursors, totals and
/// threshold crossings.
async fn apply(
    tx: &Transaction<'_>,
    writes: &BTreeMap<String, Writes>,
    thresholds: &[Threshold],
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let mut ledger = LedgerColumns::default();
    let (mut decreases, mut gaps, mut cursors) = (Vec::new(), Vec::new(), Vec::new());
    let mut quarantined = Vec::new();
    for (project, w) in writes {
        for (i, line) in w.ledger.iter().enumerate() {
            ledger.project.push(project.as_str());
            ledger.time.push(line.to);
            ledger.metric.push(w.ledger_metrics[i].as_str());
            ledger.from.push(line.from);
            ledger.quantity.push(line.quantity);
            ledger.price.push(line.price);
            ledger.amount.push(line.amount);
            ledger.used_after.push(w.ledger_used_after[i]);
            ledger.granted_after.push(w.granted);
        }
        decreases.extend(w.decreases.iter().cloned());
        gaps.extend(w.gaps.iter().cloned());
        cursors.extend(w.cursors.iter().cloned());
        quarantined.extend(w.quarantined.iter().cloned());
    }
    if !quarantined.is_empty() {
        let ids: Vec<i64> = quarantined.iter().map(|q| q.0).collect();
        let times: Vec<DateTime<Utc>> = quarantined.iter().map(|q| q.1).collect();
        let values: Vec<f64> = quarantined.iter().map(|q| q.2).collect();
        let reasons: Vec<&str> = quarantined.iter().map(|q| q.3.as_str()).collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO quarantined_samples (series_id, time, value, reason)
                 SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::float8[], $4::text[])
                 ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&ids, &times, &values, &reasons],
        )
        .await
        .context("recording quarantined samples")?;
    }
    if !ledger.project.is_empty() {
        // The day rollup of these rows is written by the same statement (see
        // `crate::store::rollup`), not row by row by the ledger trigger.
        tx.execute(crate::store::rollup::BULK, &[])
            .await
            .context("taking over the ledger rollup")?;
        tx.execute(
            &tx.prepare_cached(&crate::store::rollup::with_rollup(
                "INSERT INTO ledger (project, time, kind, metric, usage_from, quantity, price,
                                     used_delta, used_after, granted_after)
                 SELECT p, t, 'usage', m, f, q, pr, a, u, g
                 FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::timestamptz[], $5::numeric[],
                             $6::numeric[], $7::numeric[], $8::numeric[], $9::numeric[])
                      AS x(p, t, m, f, q, pr, a, u, g)",
            ))
            .await?,
            &[
                &ledger.project,
                &ledger.time,
                &ledger.metric,
                &ledger.from,
                &ledger.quantity,
                &ledger.price,
                &ledger.amount,
                &ledger.used_after,
                &ledger.granted_after,
            ],
        )
        .await
        .context("writing usage ledger rows")?;
    }
    if !decreases.is_empty() {
        let ids: Vec<i64> = decreases.iter().map(|d| d.0).collect();
        let times: Vec<DateTime<Utc>> = decreases.iter().map(|d| d.1).collect();
        let froms: Vec<Decimal> = decreases.iter().map(|d| d.2).collect();
        let tos: Vec<Decimal> = decreases.iter().map(|d| d.3).collect();
        let policies: Vec<&str> = decreases
            .iter()
            .map(|d| match d.4 {
                DecreasePolicy::Rebase => "rebase",
                DecreasePolicy::Restart => "restart",
            })
            .collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO counter_decreases (series_id, time, from_value, to_value, policy)
                 SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::numeric[], $4::numeric[], $5::text[])
                 ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&ids, &times, &froms, &tos, &policies],
        )
        .await
        .context("recording counter decreases")?;
    }
    if !gaps.is_empty() {
        let ids: Vec<i64> = gaps.iter().map(|g| g.0).collect();
        let froms: Vec<DateTime<Utc>> = gaps.iter().map(|g| g.1).collect();
        let tos: Vec<DateTime<Utc>> = gaps.iter().map(|g| g.2).collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO unbilled_gaps (series_id, from_time, to_time)
                 SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[])
                 ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&ids, &froms, &tos],
        )
        .await
        .context("recording unbilled gaps")?;
    }
    if !cursors.is_empty() {
        let ids: Vec<i64> = cursors.iter().map(|c| c.0).collect();
        let times: Vec<DateTime<Utc>> = cursors.iter().map(|c| c.1).collect();
        let values: Vec<Option<Decimal>> = cursors.iter().map(|c| c.2).collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO billing_cursors (series_id, last_time, last_value)
                 SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::numeric[])
                 ON CONFLICT (series_id) DO UPDATE
                 SET last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value, updated_at = now()",
            )
            .await?,
            &[&ids, &times, &values],
        )
        .await
        .context("advancing billing cursors")?;
    }
    if !writes.is_empty() {
        let names: Vec<&str> = writes.keys().map(String::as_str).collect();
        let used: Vec<Decimal> = writes.values().map(|w| w.used).collect();
        tx.execute(
            &tx.prepare_cached(
                "UPDATE projects SET used_credits = x.used, last_billed_at = now()
                 FROM unnest($1::text[], $2::numeric[]) AS x(name, used) WHERE projects.name = x.name",
            )
            .await?,
            &[&names, &used],
        )
        .await
        .context("updating project balances")?;
    }
    // After the new totals, so a held charge's announcement carries them.
    super::held::GuardWrites::apply(
        tx,
        writes
            .iter()
            .map(|(p, w)| (p.as_str(), &w.guard, &w.decreases)),
        now,
    )
    .await?;
    let crossings: Vec<_> = writes
        .iter()
        .flat_map(|(project, w)| {
            let level = |used| Level {
                used,
                granted: w.granted,
            };
            outbox::crossings(project, thresholds, level(w.used_before), level(w.used))
        })
        .collect();
    outbox::record(tx, &crossings, Cause::Usage, now).await?;
    Ok(())
}

/// Column arrays of the usage ledger rows of one batch.
#[derive(Default)]
struct LedgerColumns<'a> {
    project: Vec<&'a str>,
    time: Vec<DateTime<Utc>>,
    metric: Vec<&'a str>,
    from: Vec<DateTime<Utc>>,
    quantity: Vec<Decimal>,
    price: Vec<Decimal>,
    amount: Vec<Decimal>,
    used_after: Vec<Decimal>,
    granted_after: Vec<Decimal>,
}
