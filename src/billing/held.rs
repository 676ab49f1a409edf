//! Held charges on the database: what the billing run holds (with the guard's
//! per-series state), automatic rejection when a counter drops back, and an
//! operator's approval or rejection. See [`crate::billing::guard`].

use super::guard::{self, Held, RateState};
use crate::notify::outbox::{self, Cause};
use crate::notify::thresholds::{Level, Threshold};
use crate::store::col;
use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use std::collections::HashMap;
use tokio_postgres::{Client, Row, Transaction};

/// Who rejects a held charge when its counter drops back.
pub const AUTO_ACTOR: &str = "os-credits";

/// A held step of one series, ready to be written.
#[derive(Debug, Clone)]
pub struct NewHeld {
    /// The series.
    pub series_id: i64,
    /// Its metric.
    pub metric: String,
    /// The held step.
    pub held: Held,
}

/// A counter decrease of one series, for automatic rejection.
#[derive(Debug, Clone, Copy)]
pub struct SeriesDrop {
    /// The series.
    pub series_id: i64,
    /// Time of the lower sample.
    pub time: DateTime<Utc>,
    /// Value before.
    pub from_value: Decimal,
    /// The lower value.
    pub to_value: Decimal,
}

/// The guard's state of these series.
pub async fn rates(
    tx: &deadpool_postgres::Transaction<'_>,
    ids: &[i64],
) -> anyhow::Result<HashMap<i64, RateState>> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT series_id, rate_per_hour, covered_seconds FROM series_rates
                 WHERE series_id = ANY($1::bigint[])",
            )
            .await?,
            &[&ids],
        )
        .await
        .context("reading the series' recent rates")?;
    rows.iter()
        .map(|r| {
            let state = RateState {
                rate_per_hour: col(r, "rate_per_hour")?,
                covered_seconds: col(r, "covered_seconds")?,
            };
            Ok((col(r, "series_id")?, state))
        })
        .collect()
}

/// What one project's billing run gives the guard to write.
#[derive(Debug, Default)]
pub struct GuardWrites {
    held: Vec<NewHeld>,
    rates: Vec<(i64, RateState)>,
}

impl GuardWrites {
    /// Adds one series' held steps and its guard state (written when it changed).
    pub fn add(
        &mut self,
        series_id: i64,
        metric: &str,
        held: Vec<Held>,
        state: Option<RateState>,
        before: Option<RateState>,
    ) {
        self.held.extend(held.into_iter().map(|held| NewHeld {
            series_id,
            metric: metric.to_owned(),
            held,
        }));
        if let Some(state) = state.filter(|s| Some(*s) != before) {
            self.rates.push((series_id, state));
        }
    }

    /// Writes the held steps and guard states of the projects of a billing batch,
    /// and rejects held charges their counter's decreases took back.
    pub async fn apply<'a, D>(
        tx: &deadpool_postgres::Transaction<'_>,
        projects: impl Iterator<Item = (&'a str, &'a GuardWrites, &'a Vec<D>)>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()>
    where
        D: 'a + Into<SeriesDrop> + Copy,
    {
        let (mut held, mut rates, mut drops) = (Vec::new(), Vec::new(), Vec::new());
        for (project, w, decreases) in projects {
            held.extend(w.held.iter().map(|h| (project, h)));
            rates.extend(w.rates.iter().copied());
            drops.extend(decreases.iter().map(|&d| d.into()));
        }
        let (written, rejected) = record(tx, &held, &rates, &drops, now).await?;
        if written > 0 {
            tracing::warn!(
                held = written,
                "charges held for review (implausible counter steps)"
            );
        }
        crate::telemetry::metrics::charges_held(written, rejected);
        Ok(())
    }
}

impl
    From<(
        i64,
        DateTime<Utc>,
        Decimal,
        Decimal,
        super::rules::DecreasePolicy,
    )> for SeriesDrop
{
    fn from(
        d: (
            i64,
            DateTime<Utc>,
            Decimal,
            Decimal,
            super::rules::DecreasePolicy,
        ),
    ) -> Self {
        Self {
            series_id: d.0,
            time: d.1,
            from_value: d.2,
            to_value: d.3,
        }
    }
}

/// Writes held steps and guard states, and rejects held charges that a decrease of
/// their counter took back. Returns `(held, auto_rejected)`.
async fn record(
    tx: &deadpool_postgres::Transaction<'_>,
    held: &[(&str, &NewHeld)],
    rates: &[(i64, RateState)],
    drops: &[SeriesDrop],
    now: DateTime<Utc>,
) -> anyhow::Result<(u64, u64)> {
    let mut written = 0;
    for (project, h) in held {
        // Held and announced together: the notification (one delivery per channel)
        // commits with the held charge.
        let row = tx
            .query_one(
                &tx.prepare_cached(
                    "WITH held AS (
                         INSERT INTO held_charges (project, series_id, metric, from_time, to_time,
                             from_value, to_value, quantity, price, credits, reason, held_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                         ON CONFLICT (series_id, to_time) DO NOTHING
                         RETURNING id, project
                     ), notice AS (
                         INSERT INTO notifications (project, used, crossed_at, cause, held_charge_id)
                         SELECT held.project, p.used_credits, $12, 'held', held.id
                         FROM held JOIN projects p ON p.name = held.project
                         RETURNING id
                     ), deliveries AS (
                         INSERT INTO notification_deliveries (notification_id, channel, status, next_attempt_at)
                         SELECT notice.id, c, 'pending', $12
                         FROM notice CROSS JOIN unnest(ARRAY['email', 'webhook']) AS c
                     )
                     SELECT count(*) AS n FROM held",
                )
                .await?,
                &[
                    project,
                    &h.series_id,
                    &h.metric,
                    &h.held.from.time,
                    &h.held.to.time,
                    &h.held.from.value,
                    &h.held.to.value,
                    &h.held.quantity,
                    &h.held.price,
                    &h.held.credits,
                    &h.held.reason,
                    &now,
                ],
            )
            .await
            .context("recording a held charge")?;
        written += u64::try_from(col::<i64>(&row, "n")?).unwrap_or_default();
    }
    if !rates.is_empty() {
        let ids: Vec<i64> = rates.iter().map(|r| r.0).collect();
        let rate: Vec<Decimal> = rates.iter().map(|r| r.1.rate_per_hour).collect();
        let covered: Vec<i64> = rates.iter().map(|r| r.1.covered_seconds).collect();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO series_rates (series_id, rate_per_hour, covered_seconds)
                 SELECT * FROM unnest($1::bigint[], $2::numeric[], $3::bigint[])
                 ON CONFLICT (series_id) DO UPDATE
                 SET rate_per_hour = EXCLUDED.rate_per_hour, covered_seconds = EXCLUDED.covered_seconds",
            )
            .await?,
            &[&ids, &rate, &covered],
        )
        .await
        .context("storing the series' recent rates")?;
    }
    let rejected = reject_dropped(tx, drops, now).await?;
    Ok((written, rejected))
}

/// Rejects open held charges of series that dropped back after them.
async fn reject_dropped(
    tx: &deadpool_postgres::Transaction<'_>,
    drops: &[SeriesDrop],
    now: DateTime<Utc>,
) -> anyhow::Result<u64> {
    if drops.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = drops.iter().map(|d| d.series_id).collect();
    let open = tx
        .query(
            "SELECT id, series_id, to_time, quantity FROM held_charges
             WHERE status = 'held' AND series_id = ANY($1::bigint[])",
            &[&ids],
        )
        .await
        .context("reading open held charges")?;
    let mut rejected = 0;
    for row in &open {
        let (id, series_id, to_time, quantity): (i64, i64, DateTime<Utc>, Decimal) = (
            col(row, "id")?,
            col(row, "series_id")?,
            col(row, "to_time")?,
            col(row, "quantity")?,
        );
        let Some(drop) = drops.iter().find(|d| {
            d.series_id == series_id
                && d.time > to_time
                && guard::drop_cancels(quantity, d.from_value, d.to_value)
        }) else {
            continue;
        };
        let why = format!(
            "the counter dropped back from {} to {} at {}",
            drop.from_value.normalize(),
            drop.to_value.normalize(),
            drop.time.to_rfc3339()
        );
        rejected += tx
            .execute(
                "UPDATE held_charges SET status = 'rejected', decided_at = $2, decided_by = $3,
                     decision_reason = $4
                 WHERE id = $1 AND status = 'held'",
                &[&id, &now, &AUTO_ACTOR, &why],
            )
            .await
            .context("rejecting a held charge")?;
        tracing::info!(held = id, series = series_id, reason = %why, "held charge rejected automatically");
    }
    Ok(rejected)
}

/// A held charge as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldCharge {
    /// Its id.
    pub id: i64,
    /// The project.
    pub project: String,
    /// The series' metric.
    pub metric: String,
    /// The series' labels.
    pub labels: serde_json::Value,
    /// The step's first sample time.
    pub from: DateTime<Utc>,
    /// The step's last sample time.
    pub to: DateTime<Utc>,
    /// Counter value before.
    pub from_value: Decimal,
    /// Counter value after.
    pub to_value: Decimal,
    /// Usage of the step.
    pub quantity: Decimal,
    /// Its price when one price covers it.
    pub price: Option<Decimal>,
    /// Exact credits it costs.
    pub credits: Decimal,
    /// Why it was held.
    pub reason: String,
    /// When it was held.
    pub held_at: DateTime<Utc>,
    /// `held`, `approved` or `rejected`.
    pub status: String,
    /// When it was approved or rejected.
    pub decided_at: Option<DateTime<Utc>>,
    /// Who approved or rejected it.
    pub decided_by: Option<String>,
    /// Why.
    pub decision_reason: Option<String>,
    /// Approved: the ledger row that billed it.
    pub ledger_id: Option<i64>,
}

const COLUMNS: &str =
    "h.id, h.project, h.metric, s.series_key, h.from_time, h.to_time, h.from_value,
     h.to_value, h.quantity, h.price, h.credits, h.reason, h.held_at, h.status, h.decided_at,
     h.decided_by, h.decision_reason, h.ledger_id";

fn from_row(r: &Row) -> anyhow::Result<HeldCharge> {
    Ok(HeldCharge {
        id: col(r, "id")?,
        project: col(r, "project")?,
        metric: col(r, "metric")?,
        labels: crate::store::series::labels_json(col(r, "series_key")?)?,
        from: col(r, "from_time")?,
        to: col(r, "to_time")?,
        from_value: col(r, "from_value")?,
        to_value: col(r, "to_value")?,
        quantity: col(r, "quantity")?,
        price: col(r, "price")?,
        credits: col(r, "credits")?,
        reason: col(r, "reason")?,
        held_at: col(r, "held_at")?,
        status: col(r, "status")?,
        decided_at: col(r, "decided_at")?,
        decided_by: col(r, "decided_by")?,
        decision_reason: col(r, "decision_reason")?,
        ledger_id: col(r, "ledger_id")?,
    })
}

/// A project's held charges (open, approved and rejected), newest first; at most `limit`.
pub async fn list(client: &Client, project: &str, limit: i64) -> anyhow::Result<Vec<HeldCharge>> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM held_charges h LEFT JOIN series s ON s.id = h.series_id
                 WHERE h.project = $1 ORDER BY h.to_time DESC, h.id DESC LIMIT $2"
            ),
            &[&project, &limit],
        )
        .await
        .context("reading held charges")?;
    rows.iter().map(from_row).collect()
}

/// Exact credits of a project's open held charges and how many there are.
pub async fn open_total(client: &Client, project: &str) -> anyhow::Result<(i64, Decimal)> {
    let row = client
        .query_one(
            "SELECT count(*) AS n, coalesce(sum(credits), 0) AS credits FROM held_charges
             WHERE project = $1 AND status = 'held'",
            &[&project],
        )
        .await
        .context("summing open held charges")?;
    Ok((col(&row, "n")?, col(&row, "credits")?))
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No held charge with this id.
    #[error("no held charge {0}")]
    Unknown(i64),
    /// It was approved or rejected before.
    #[error("held charge {id} is already {status}")]
    Decided {
        /// Its id.
        id: i64,
        /// `approved` or `rejected`.
        status: String,
    },
    /// Billing it makes used credits too large.
    #[error("approving the held charge makes used credits too large")]
    Overflow,
    /// Anything else.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// An operator's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Bill it.
    Approve,
    /// Drop it.
    Reject,
}

/// Approves (bills: a usage ledger row booked now, naming `actor`, with the new used
/// total; a threshold crossed notifies) or rejects a held charge, in the caller's
/// transaction. The project row is locked first, so this serialises with billing.
pub async fn decide(
    tx: &Transaction<'_>,
    id: i64,
    decision: Decision,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
    thresholds: &[Threshold],
) -> Result<HeldCharge, DecideError> {
    let found = tx
        .query_opt("SELECT project FROM held_charges WHERE id = $1", &[&id])
        .await
        .context("finding the held charge")?
        .ok_or(DecideError::Unknown(id))?;
    let project: String = col(&found, "project")?;
    let totals = tx
        .query_opt(
            "SELECT granted_credits, used_credits FROM projects WHERE name = $1 FOR UPDATE",
            &[&project],
        )
        .await
        .context("locking the project")?
        .context("the held charge's project is gone")?;
    let (granted, used): (Decimal, Decimal) = (
        col(&totals, "granted_credits")?,
        col(&totals, "used_credits")?,
    );
    let row = tx
        .query_one(
            &format!(
                "SELECT {COLUMNS} FROM held_charges h LEFT JOIN series s ON s.id = h.series_id
                 WHERE h.id = $1 FOR UPDATE OF h"
            ),
            &[&id],
        )
        .await
        .context("locking the held charge")?;
    let held = from_row(&row)?;
    if held.status != "held" {
        return Err(DecideError::Decided {
            id,
            status: held.status,
        });
    }
    let ledger_id: Option<i64> = match decision {
        Decision::Reject => None,
        Decision::Approve => {
            let used_after = used
                .checked_add(held.credits)
                .ok_or(DecideError::Overflow)?;
            let row = tx
                .query_one(
                    "INSERT INTO ledger (project, time, kind, metric, usage_from, quantity, price,
                                         used_delta, used_after, granted_after, reason, actor)
                     VALUES ($1, $2, 'usage', $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     RETURNING id",
                    &[
                        &project,
                        &now,
                        &held.metric,
                        &held.from,
                        &held.quantity,
                        &held.price,
                        &held.credits,
                        &used_after,
                        &granted,
                        &format!("held charge {id} approved: {reason}"),
                        &actor,
                    ],
                )
                .await
                .context("writing the ledger row")?;
            tx.execute(
                "UPDATE projects SET used_credits = $2 WHERE name = $1",
                &[&project, &used_after],
            )
            .await
            .context("updating used credits")?;
            let level = |used| Level { used, granted };
            outbox::level_changed(
                tx,
                &project,
                thresholds,
                level(used),
                level(used_after),
                Cause::Usage,
                now,
            )
            .await?;
            Some(col(&row, "id")?)
        }
    };
    let status = match decision {
        Decision::Approve => "approved",
        Decision::Reject => "rejected",
    };
    let row = tx
        .query_one(
            "UPDATE held_charges SET status = $2, decided_at = $3, decided_by = $4,
                 decision_reason = $5, ledger_id = $6
             WHERE id = $1 RETURNING decided_at",
            &[&id, &status, &now, &actor, &reason, &ledger_id],
        )
        .await
        .context("recording the decision")?;
    Ok(HeldCharge {
        status: status.to_owned(),
        decided_at: col(&row, "decided_at")?,
        decided_by: Some(actor.to_owned()),
        decision_reason: Some(reason.to_owned()),
        ledger_id,
        ..held
    })
}
