//! The outbox: notifications written in the transaction that crossed a threshold,
//! and each channel's delivery state (claimed, recorded, expired, re-queued).

use super::thresholds::{self, Level, Threshold};
use crate::store::col;
use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use tokio_postgres::{Client, Row, Transaction};

/// Attempts per delivery before it is given up.
pub const MAX_ATTEMPTS: i32 = 8;
/// Wait after the first failed attempt; doubled after each further one.
pub const BACKOFF_BASE: Duration = Duration::minutes(1);
/// Longest wait between two attempts.
pub const BACKOFF_CAP: Duration = Duration::hours(1);

/// What made a project cross a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A billing run charged usage.
    Usage,
    /// The grant was lowered.
    Grant,
    /// A manual adjustment charged credits.
    Adjustment,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Self::Usage => "usage",
            Self::Grant => "grant",
            Self::Adjustment => "adjustment",
        }
    }
}

/// A delivery channel: email and the portal webhook are independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Mail to the project's contacts.
    Email,
    /// `POST {MAIL_CONTACT_URL}/credits-limit/`.
    Webhook,
}

impl Channel {
    /// Every channel; each notification gets a delivery per channel.
    pub const ALL: [Channel; 2] = [Channel::Email, Channel::Webhook];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Webhook => "webhook",
        }
    }

    /// From the stored name.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == raw)
    }
}

/// One threshold one project crossed.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossing {
    /// The project.
    pub project: String,
    /// The threshold crossed.
    pub threshold: Threshold,
    /// Used and granted credits right after.
    pub after: Level,
}

/// The crossings of one project going from `before` to `after`.
pub fn crossings(
    project: &str,
    thresholds: &[Threshold],
    before: Level,
    after: Level,
) -> Vec<Crossing> {
    thresholds::crossed(thresholds, before, after)
        .into_iter()
        .map(|threshold| Crossing {
            project: project.to_owned(),
            threshold,
            after,
        })
        .collect()
}

/// Writes the crossings in the caller's transaction, one notification each with a
/// pending delivery per channel due at `now`. A crossing already recorded at the same
/// grant is skipped. Returns how many notifications were written.
pub async fn record(
    tx: &Transaction<'_>,
    crossings: &[Crossing],
    cause: Cause,
    now: DateTime<Utc>,
) -> anyhow::Result<u64> {
    if crossings.is_empty() {
        return Ok(0);
    }
    let projects: Vec<&str> = crossings.iter().map(|c| c.project.as_str()).collect();
    let levels: Vec<Decimal> = crossings.iter().map(|c| c.threshold.value()).collect();
    let granted: Vec<Decimal> = crossings.iter().map(|c| c.after.granted).collect();
    let used: Vec<Decimal> = crossings.iter().map(|c| c.after.used).collect();
    let channels: Vec<&str> = Channel::ALL.iter().map(|c| c.as_str()).collect();
    let row = tx
        .query_one(
            "WITH written AS (
                 INSERT INTO notifications (project, threshold, granted, used, crossed_at, cause)
                 SELECT p, t, g, u, $5, $6
                 FROM unnest($1::text[], $2::numeric[], $3::numeric[], $4::numeric[]) AS x(p, t, g, u)
                 ON CONFLICT (project, threshold, granted) DO NOTHING
                 RETURNING id
             ), deliveries AS (
                 INSERT INTO notification_deliveries (notification_id, channel, status, next_attempt_at)
                 SELECT w.id, c, 'pending', $5 FROM written w CROSS JOIN unnest($7::text[]) AS c
             )
             SELECT count(*) AS n FROM written",
            &[
                &projects,
                &levels,
                &granted,
                &used,
                &now,
                &cause.as_str(),
                &channels,
            ],
        )
        .await
        .context("writing notifications")?;
    let written: i64 = col(&row, "n")?;
    if written > 0 {
        tracing::info!(
            notifications = written,
            cause = cause.as_str(),
            "thresholds crossed"
        );
    }
    Ok(u64::try_from(written).unwrap_or_default())
}

/// Records the crossings of one project whose level changed from `before` to
/// `after` (a grant change or an adjustment), in the caller's transaction.
pub async fn level_changed(
    tx: &Transaction<'_>,
    project: &str,
    thresholds: &[Threshold],
    before: Level,
    after: Level,
    cause: Cause,
    now: DateTime<Utc>,
) -> anyhow::Result<u64> {
    record(
        tx,
        &crossings(project, thresholds, before, after),
        cause,
        now,
    )
    .await
}

/// When a delivery that failed its `attempts`-th attempt is tried again; `None`
/// when it is given up.
pub fn retry_at(now: DateTime<Utc>, attempts: i32) -> Option<DateTime<Utc>> {
    if attempts >= MAX_ATTEMPTS {
        return None;
    }
    let doublings = u32::try_from(attempts.clamp(1, 30) - 1).unwrap_or_default();
    let wait = BACKOFF_BASE
        .checked_mul(2_i32.saturating_pow(doublings))
        .map_or(BACKOFF_CAP, |w| w.min(BACKOFF_CAP));
    Some(now + wait)
}

/// A delivery claimed for sending, with what it needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The notification.
    pub id: i64,
    /// The channel to deliver on.
    pub channel: Channel,
    /// Attempts including this one.
    pub attempts: i32,
    /// The project.
    pub project: String,
    /// The threshold crossed.
    pub threshold: Threshold,
    /// Used and granted at the crossing.
    pub level: Level,
    /// When it was crossed.
    pub crossed_at: DateTime<Utc>,
    /// The project's contact addresses now.
    pub contacts: Vec<String>,
    /// Usage credits charged in the forecast window before the crossing.
    pub charged_in_window: Decimal,
    /// Start of the project's first billed usage.
    pub first_usage: Option<DateTime<Utc>>,
    /// Set when this announces a held charge rather than a threshold crossing.
    pub held: Option<HeldNotice>,
}

/// Marks deliveries whose sender vanished mid-send (lease expired) as `unknown`:
/// the server may have accepted the message, so it is never resent automatically.
pub async fn expire_leases(client: &Client, now: DateTime<Utc>) -> anyhow::Result<u64> {
    let rows = client
        .query(
            "UPDATE notification_deliveries
             SET status = 'unknown', lease_until = NULL, updated_at = $1,
                 last_error = 'the sender stopped while sending: it may have been delivered; \
resend it by hand if it was not'
             WHERE status = 'sending' AND lease_until < $1
             RETURNING notification_id, channel",
            &[&now],
        )
        .await
        .context("expiring delivery leases")?;
    for row in &rows {
        let notification: i64 = col(row, "notification_id")?;
        let channel: &str = col(row, "channel")?;
        tracing::warn!(
            notification,
            channel,
            "a delivery was interrupted while sending; marked unknown (resend by hand if needed)"
        );
    }
    Ok(rows.len() as u64)
}

/// Claims the delivery due first (`FOR UPDATE SKIP LOCKED`: replicas claim
/// different ones): it becomes `sending` until `lease_until`, one attempt more.
pub async fn claim(
    client: &Client,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    forecast_window: Duration,
) -> anyhow::Result<Option<Claimed>> {
    // Whole seconds, exact in a float.
    let window_seconds = forecast_window.num_seconds() as f64;
    let row = client
        .query_opt(
            "WITH claimed AS (
                 UPDATE notification_deliveries d
                 SET status = 'sending', attempts = d.attempts + 1, lease_until = $2,
                     next_attempt_at = NULL, updated_at = $1
                 WHERE (d.notification_id, d.channel) = (
                     SELECT notification_id, channel FROM notification_deliveries
                     WHERE status = 'pending' AND next_attempt_at <= $1
                     ORDER BY next_attempt_at, notification_id, channel
                     LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING d.notification_id, d.channel, d.attempts
             )
             SELECT c.notification_id, c.channel, c.attempts, n.project,
                    -- a held-charge notice has no threshold: 1 is a placeholder, never shown
                    coalesce(n.threshold, 1) AS threshold,
                    n.used, coalesce(n.granted, p.granted_credits, 0) AS granted, n.crossed_at,
                    coalesce(pc.emails, '{}') AS contacts,
                    (SELECT coalesce(sum(l.used_delta), 0) FROM ledger l
                     WHERE l.project = n.project AND l.kind = 'usage'
                       AND l.time > n.crossed_at - make_interval(secs => $3)
                       AND l.time <= n.crossed_at) AS charged_in_window,
                    (SELECT coalesce(l.usage_from, l.time) FROM ledger l
                     WHERE l.project = n.project AND l.kind = 'usage'
                     ORDER BY l.time LIMIT 1) AS first_usage,
                    h.id AS held_id, h.metric, h.quantity, h.credits, h.reason, h.from_time, h.to_time,
                    h.from_value, h.to_value
             FROM claimed c
             JOIN notifications n ON n.id = c.notification_id
             LEFT JOIN project_contacts pc ON pc.project = n.project
             LEFT JOIN projects p ON p.name = n.project
             LEFT JOIN held_charges h ON h.id = n.held_charge_id",
            &[&now, &lease_until, &window_seconds],
        )
        .await
        .context("claiming a due notification")?;
    row.map(|row| claimed_from(&row)).transpose()
}

fn claimed_from(row: &Row) -> anyhow::Result<Claimed> {
    let channel: &str = col(row, "channel")?;
    let held = match col::<Option<i64>>(row, "held_id")? {
        None => None,
        Some(id) => Some(HeldNotice {
            id,
            metric: col(row, "metric")?,
            quantity: col(row, "quantity")?,
            credits: col(row, "credits")?,
            reason: col(row, "reason")?,
            from: col(row, "from_time")?,
            to: col(row, "to_time")?,
            from_value: col(row, "from_value")?,
            to_value: col(row, "to_value")?,
        }),
    };
    Ok(Claimed {
        id: col(row, "notification_id")?,
        channel: Channel::parse(channel).with_context(|| format!("unknown channel {channel}"))?,
        attempts: col(row, "attempts")?,
        project: col(row, "project")?,
        threshold: Threshold::new(col(row, "threshold")?).map_err(anyhow::Error::msg)?,
        level: Level {
            used: col(row, "used")?,
            granted: col(row, "granted")?,
        },
        crossed_at: col(row, "crossed_at")?,
        contacts: col(row, "contacts")?,
        charged_in_window: col(row, "charged_in_window")?,
        first_usage: col(row, "first_usage")?,
        held,
    })
}

/// A held charge announced to the cloud governance (see `crate::billing::guard`).
#[derive(Debug, Clone, PartialEq)]
pub struct HeldNotice {
    /// The held charge.
    pub id: i64,
    /// Its series' metric.
    pub metric: String,
    /// Usage of the held step.
    pub quantity: Decimal,
    /// Exact credits it costs when approved.
    pub credits: Decimal,
    /// Why it was held.
    pub reason: String,
    /// The step's first sample time.
    pub from: DateTime<Utc>,
    /// The step's last sample time.
    pub to: DateTime<Utc>,
    /// Counter value before the step.
    pub from_value: Decimal,
    /// Counter value after it.
    pub to_value: Decimal,
}

/// How a claimed delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Accepted by the server (email: by these addresses).
    Sent(Option<Vec<String>>),
    /// Failed; tried again at the given time.
    Retry(String, DateTime<Utc>),
    /// Given up.
    Failed(String),
    /// Nothing to do, for the given reason.
    Skipped(String),
    /// Handed over without an answer: may have arrived, never resent automatically.
    Unknown(String),
}

/// Records the outcome of a claimed delivery. It matches only while the delivery
/// is still this claim (`sending`, or `unknown` when the lease ran out meanwhile:
/// the real outcome replaces the guess); `false` when someone re-queued it since.
pub async fn finish(
    client: &Client,
    claimed: &Claimed,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let status = match outcome {
        Outcome::Sent(_) => "sent",
        Outcome::Retry(..) => "pending",
        Outcome::Failed(_) => "failed",
        Outcome::Skipped(_) => "skipped",
        Outcome::Unknown(_) => "unknown",
    };
    let (next, recipients) = match outcome {
        Outcome::Retry(_, at) => (Some(*at), None),
        Outcome::Sent(recipients) => (None, recipients.as_ref()),
        _ => (None, None),
    };
    let error = match outcome {
        Outcome::Sent(_) => None,
        Outcome::Retry(error, _)
        | Outcome::Failed(error)
        | Outcome::Skipped(error)
        | Outcome::Unknown(error) => Some(error.as_str()),
    };
    let sent_at = matches!(outcome, Outcome::Sent(_)).then_some(now);
    let updated = client
        .execute(
            "UPDATE notification_deliveries
             SET status = $4, next_attempt_at = $5, last_error = $6, sent_at = $7,
                 recipients = coalesce($8, recipients), lease_until = NULL, updated_at = $9
             WHERE notification_id = $1 AND channel = $2 AND attempts = $3
               AND status IN ('sending', 'unknown')",
            &[
                &claimed.id,
                &claimed.channel.as_str(),
                &claimed.attempts,
                &status,
                &next,
                &error,
                &sent_at,
                &recipients,
                &now,
            ],
        )
        .await
        .context("recording a delivery")?;
    Ok(updated == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap_and_a_limit() {
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let waits: Vec<Option<i64>> = (1..=MAX_ATTEMPTS)
            .map(|attempts| retry_at(now, attempts).map(|at| (at - now).num_minutes()))
            .collect();
        assert_eq!(
            waits,
            [
                Some(1),
                Some(2),
                Some(4),
                Some(8),
                Some(16),
                Some(32),
                Some(60),
                None
            ]
        );
    }

    #[test]
    fn channels_round_trip_their_names() {
        for channel in Channel::ALL {
            assert_eq!(Channel::parse(channel.as_str()), Some(channel));
        }
        assert_eq!(Channel::parse("sms"), None);
    }
}
