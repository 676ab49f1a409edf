//! What was notified: a project's notifications with each channel's delivery
//! state, and queueing one again by hand.

use super::outbox::Channel;
use super::thresholds::{Level, Threshold};
use crate::store::col;
use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{Client, Row, Transaction};

/// One channel's delivery state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    /// The channel.
    pub channel: Channel,
    /// `pending`, `sending`, `sent`, `failed`, `skipped` or `unknown`.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// When it is tried next (pending only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed, or why it was skipped.
    pub last_error: Option<String>,
    /// When the server accepted it.
    pub sent_at: Option<DateTime<Utc>>,
}

/// A notification with its deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// Its id (for resending).
    pub id: i64,
    /// The project.
    pub project: String,
    /// The threshold crossed.
    pub threshold: Threshold,
    /// Used and granted at the crossing.
    pub level: Level,
    /// When.
    pub crossed_at: DateTime<Utc>,
    /// `usage`, `grant` or `adjustment`.
    pub cause: String,
    /// Per channel, by channel name.
    pub deliveries: Vec<Delivery>,
}

const NOTIFICATION_QUERY: &str =
    "SELECT n.id, n.project, coalesce(n.threshold, 1) AS threshold, n.used,
            coalesce(n.granted, 0) AS granted, n.crossed_at, n.cause,
            d.channel, d.status, d.attempts, d.next_attempt_at, d.last_error, d.sent_at
     FROM notifications n LEFT JOIN notification_deliveries d ON d.notification_id = n.id";

fn notifications_from(rows: &[Row]) -> anyhow::Result<Vec<Notification>> {
    let mut out: Vec<Notification> = Vec::new();
    for row in rows {
        let id: i64 = col(row, "id")?;
        if out.last().is_none_or(|n| n.id != id) {
            out.push(Notification {
                id,
                project: col(row, "project")?,
                threshold: Threshold::new(col(row, "threshold")?).map_err(anyhow::Error::msg)?,
                level: Level {
                    used: col(row, "used")?,
                    granted: col(row, "granted")?,
                },
                crossed_at: col(row, "crossed_at")?,
                cause: col(row, "cause")?,
                deliveries: Vec::new(),
            });
        }
        let Some(channel) = col::<Option<&str>>(row, "channel")? else {
            continue;
        };
        if let (Some(last), Some(channel)) = (out.last_mut(), Channel::parse(channel)) {
            last.deliveries.push(Delivery {
                channel,
                status: col(row, "status")?,
                attempts: col(row, "attempts")?,
                next_attempt_at: col(row, "next_attempt_at")?,
                last_error: col(row, "last_error")?,
                sent_at: col(row, "sent_at")?,
            });
        }
    }
    Ok(out)
}

/// A project's notifications, newest first (at most `limit`); `None` when the
/// project does not exist.
pub async fn list(
    client: &Client,
    project: &str,
    limit: i64,
) -> anyhow::Result<Option<Vec<Notification>>> {
    let exists = client
        .query_opt("SELECT 1 FROM projects WHERE name = $1", &[&project])
        .await
        .context("reading the project")?;
    if exists.is_none() {
        return Ok(None);
    }
    let rows = client
        .query(
            &format!(
                "{NOTIFICATION_QUERY}
                 WHERE n.id IN (SELECT id FROM notifications
                                WHERE project = $1 AND held_charge_id IS NULL
                                ORDER BY crossed_at DESC, id DESC LIMIT $2)
                 ORDER BY n.crossed_at DESC, n.id DESC, d.channel"
            ),
            &[&project, &limit],
        )
        .await
        .context("listing notifications")?;
    notifications_from(&rows).map(Some)
}

/// One notification.
pub async fn get(client: &Client, id: i64) -> anyhow::Result<Option<Notification>> {
    get_with(client, id).await
}

async fn get_with(
    client: &impl tokio_postgres::GenericClient,
    id: i64,
) -> anyhow::Result<Option<Notification>> {
    let rows = client
        .query(
            &format!("{NOTIFICATION_QUERY} WHERE n.id = $1 ORDER BY d.channel"),
            &[&id],
        )
        .await
        .context("reading a notification")?;
    Ok(notifications_from(&rows)?.pop())
}

/// Why a resend was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResendError {
    /// No such notification.
    #[error("no notification {0}")]
    Unknown(i64),
    /// A sender is talking to the server right now.
    #[error("the {0} delivery is being sent right now; try again when it has finished")]
    Sending(&'static str),
    /// Anything else.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Queues the given channels (all when empty) of a notification again, due at `now`
/// with a fresh attempt count, whatever their state except `sending`.
pub async fn resend(
    tx: &Transaction<'_>,
    id: i64,
    channels: &[Channel],
    now: DateTime<Utc>,
) -> Result<Notification, ResendError> {
    let exists = tx
        .query_opt(
            "SELECT 1 FROM notifications WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .context("locking the notification")?;
    if exists.is_none() {
        return Err(ResendError::Unknown(id));
    }
    let channels = if channels.is_empty() {
        &Channel::ALL[..]
    } else {
        channels
    };
    for channel in channels {
        let sending = tx
            .query_opt(
                "SELECT 1 FROM notification_deliveries
                 WHERE notification_id = $1 AND channel = $2 AND status = 'sending' FOR UPDATE",
                &[&id, &channel.as_str()],
            )
            .await
            .context("checking the delivery")?;
        if sending.is_some() {
            return Err(ResendError::Sending(channel.as_str()));
        }
        tx.execute(
            "INSERT INTO notification_deliveries (notification_id, channel, status, next_attempt_at, updated_at)
             VALUES ($1, $2, 'pending', $3, $3)
             ON CONFLICT (notification_id, channel) DO UPDATE
             SET status = 'pending', attempts = 0, next_attempt_at = $3, lease_until = NULL,
                 last_error = NULL, sent_at = NULL, updated_at = $3",
            &[&id, &channel.as_str(), &now],
        )
        .await
        .context("queueing the delivery again")?;
    }
    get_with(tx, id).await?.ok_or(ResendError::Unknown(id))
}
