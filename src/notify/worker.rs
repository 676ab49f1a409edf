//! The sender: claims due deliveries, renders, sends, records — and the loop that
//! runs it inside `serve`.

use super::email::{self, Mailer, Recipients};
use super::outbox::{self, Channel, Claimed, Outcome};
use super::templates::{MailValues, Templates};
use super::thresholds;
use super::webhook::{self, LimitForm};
use super::NotifySettings;
use super::SendError;
use crate::forecast;
use crate::money::round_credits;
use anyhow::Context;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rust_decimal::Decimal;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Deliveries one `send_due` call handles at most (the loop calls again at once).
pub const BATCH: u64 = 50;
/// How often the loop looks for due deliveries.
pub const POLL: Duration = Duration::from_secs(10);
/// Shortest lease of a claimed delivery; longer when the SMTP timeout is longer.
const MIN_LEASE: Duration = Duration::from_secs(300);

/// What one `send_due` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendSummary {
    /// Accepted by the SMTP server or the portal.
    pub sent: u64,
    /// Failed, tried again later.
    pub retried: u64,
    /// Given up.
    pub failed: u64,
    /// Nothing to send to.
    pub skipped: u64,
    /// Sends without an answer, and interrupted sends found (lease expired),
    /// marked `unknown`.
    pub unknown: u64,
}

impl SendSummary {
    /// Deliveries claimed.
    pub fn claimed(&self) -> u64 {
        self.sent + self.retried + self.failed + self.skipped + self.unknown
    }
}

/// Everything needed to deliver notifications.
pub struct Notifier {
    pool: Pool,
    settings: NotifySettings,
    mailer: Mailer,
    templates: Templates,
    http: reqwest::Client,
    lease: chrono::Duration,
}

impl Notifier {
    /// Compiles and checks the templates (a broken one is an error naming its file)
    /// and prepares the mail transport.
    pub fn new(pool: Pool, settings: NotifySettings) -> anyhow::Result<Self> {
        let templates = Templates::load(settings.mail.template_dir.as_deref())
            .context("loading the mail templates (MAIL_TEMPLATE_DIR)")?;
        let mailer = Mailer::new(&settings.mail)?;
        match &mailer {
            Mailer::Files { .. } => tracing::info!(
                "MAIL_SMTP_SERVER is not set: notification mail is written as {}",
                mailer.describe()
            ),
            Mailer::Smtp { .. } => {
                tracing::info!("notification mail goes to the {}", mailer.describe())
            }
        }
        // Longer than a send can take: the steps before the body, then the wait for
        // the final reply. A lease running out marks the delivery `unknown`.
        let lease = chrono::Duration::from_std(
            MIN_LEASE.max(email::FINAL_REPLY_WAIT + settings.mail.timeout * 12),
        )
        .context("MAIL_SMTP_TIMEOUT out of range")?;
        Ok(Self {
            pool,
            settings,
            mailer,
            templates,
            http: crate::outbound::portal_client().context("building the portal's HTTP client")?,
            lease,
        })
    }

    /// Sends what is due at `now` (at most [`BATCH`] deliveries), after marking
    /// interrupted sends `unknown`. Tests drive it with their own clock.
    pub async fn send_due(&self, now: DateTime<Utc>) -> anyhow::Result<SendSummary> {
        self.send_batch(now, None).await
    }

    async fn send_batch(
        &self,
        now: DateTime<Utc>,
        cancel: Option<&CancellationToken>,
    ) -> anyhow::Result<SendSummary> {
        let client = self.pool.get().await.context("connecting to send")?;
        let expired = outbox::expire_leases(&client, now).await?;
        let mut summary = SendSummary::default();
        let window = chrono::Duration::from_std(self.settings.forecast_window)
            .context("forecast window out of range")?;
        while summary.claimed() < BATCH && !cancel.is_some_and(|c| c.is_cancelled()) {
            let Some(claimed) = outbox::claim(&client, now, now + self.lease, window).await? else {
                break;
            };
            let outcome = self.deliver(&claimed, now, cancel).await;
            log(&claimed, &outcome);
            match &outcome {
                Outcome::Sent(_) => summary.sent += 1,
                Outcome::Retry(..) => summary.retried += 1,
                Outcome::Failed(_) => summary.failed += 1,
                Outcome::Skipped(_) => summary.skipped += 1,
                Outcome::Unknown(_) => summary.unknown += 1,
            }
            record(&self.pool, &client, &claimed, &outcome, now).await;
        }
        summary.unknown += expired;
        Ok(summary)
    }

    /// Sends one claimed delivery; never errors, every failure is an outcome.
    async fn deliver(
        &self,
        claimed: &Claimed,
        now: DateTime<Utc>,
        cancel: Option<&CancellationToken>,
    ) -> Outcome {
        let never = CancellationToken::new();
        let result = match claimed.channel {
            Channel::Email => self.email(claimed, cancel.unwrap_or(&never)).await,
            Channel::Webhook => self.webhook(claimed).await,
        };
        match result {
            Ok(outcome) => outcome,
            Err(SendError::Permanent(e)) => Outcome::Failed(e),
            Err(SendError::Unknown(e)) => Outcome::Unknown(e),
            Err(SendError::Transient(e)) => match outbox::retry_at(now, claimed.attempts) {
                Some(at) => Outcome::Retry(e, at),
                None => {
                    Outcome::Failed(format!("gave up after {} attempts: {e}", claimed.attempts))
                }
            },
        }
    }

    async fn email(
        &self,
        claimed: &Claimed,
        cancel: &CancellationToken,
    ) -> Result<Outcome, SendError> {
        let mail = &self.settings.mail;
        if let Some(held) = &claimed.held {
            let recipients = super::held_notice::recipients(mail);
            if recipients.is_empty() {
                return Ok(Outcome::Skipped("CLOUD_GOVERNANCE_MAIL is not set".into()));
            }
            let url = history_url(self.settings.public_base_url.as_ref(), &claimed.project);
            let rendered = super::held_notice::render(
                &claimed.project,
                held,
                self.settings.precision,
                url.as_deref(),
            );
            let id = format!("os-credits-notification-{}", claimed.id);
            let message = email::compose(&mail.from, &recipients, &rendered, &id)?;
            self.mailer.send(message, cancel).await?;
            return Ok(Outcome::Sent(Some(recipients.addresses())));
        }
        let recipients = Recipients::new(mail, &claimed.contacts);
        if recipients.is_empty() {
            return Ok(Outcome::Skipped(
                "no recipients: the project has no contacts (PUT /api/projects/{project_name}/contacts) \
                 and CLOUD_GOVERNANCE_MAIL is not set"
                    .into(),
            ));
        }
        let rendered = self
            .templates
            .render(&self.values(claimed))
            .map_err(|e| SendError::Permanent(format!("{e:#}")))?;
        let id = format!("os-credits-notification-{}", claimed.id);
        let message = email::compose(&mail.from, &recipients, &rendered, &id)?;
        self.mailer.send(message, cancel).await?;
        Ok(Outcome::Sent(Some(recipients.addresses())))
    }

    async fn webhook(&self, claimed: &Claimed) -> Result<Outcome, SendError> {
        let Some(base) = &self.settings.mail.contact_url else {
            return Ok(Outcome::Skipped("MAIL_CONTACT_URL is not set".into()));
        };
        let precision = self.settings.precision;
        let form = LimitForm {
            project_name: claimed.project.clone(),
            granted_credits: round_credits(claimed.level.granted, precision).to_string(),
            used_credits: round_credits(claimed.level.used, precision).to_string(),
            timestamp: claimed.crossed_at.timestamp(),
            limit_type: match claimed.held {
                Some(_) => super::held_notice::LIMIT_TYPE.to_owned(),
                None => claimed.threshold.limit_type(),
            },
        };
        let key = self.settings.api_contact_key.expose();
        webhook::post(&self.http, base, key, &form).await?;
        Ok(Outcome::Sent(None))
    }

    /// The template values of a notification, as of its crossing.
    fn values(&self, claimed: &Claimed) -> MailValues {
        let settings = &self.settings;
        let credits = |value: Decimal| round_credits(value, settings.precision).to_string();
        let level = claimed.level;
        let remaining = level.granted.saturating_sub(level.used);
        let window = chrono::Duration::from_std(settings.forecast_window).unwrap_or_default();
        let covered = forecast::covered(window, claimed.crossed_at, claimed.first_usage);
        let burn_rate = forecast::burn_rate_per_hour(claimed.charged_in_window, covered);
        let run_out = forecast::run_out_at(claimed.crossed_at, level.granted, remaining, burn_rate);
        MailValues {
            project: claimed.project.clone(),
            used: credits(level.used),
            granted: credits(level.granted),
            remaining: credits(remaining),
            percent_used: thresholds::percent_used(level)
                .unwrap_or_default()
                .to_string(),
            threshold: claimed.threshold.to_string(),
            threshold_percent: claimed.threshold.percent().to_string(),
            limit_type: claimed.threshold.limit_type(),
            forecast_run_out: run_out.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()),
            forecast_window_hours: settings.forecast_window.as_secs() / 3600,
            forecast_basis: forecast::describe_span(covered),
            history_url: history_url(settings.public_base_url.as_ref(), &claimed.project),
        }
    }
}

/// `{PUBLIC_BASE_URL}/credits_history/{project}`, the project name percent-encoded
/// byte by byte (the URL parser would drop CR/LF instead of encoding them).
pub fn history_url(base: Option<&url::Url>, project: &str) -> Option<String> {
    let base = base?;
    let segment: String = project
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut url = base.clone();
    url.set_path(&format!(
        "{}/credits_history/{segment}",
        base.path().trim_end_matches('/')
    ));
    Some(url.to_string())
}

fn log(claimed: &Claimed, outcome: &Outcome) {
    let (id, channel, project) = (claimed.id, claimed.channel.as_str(), &claimed.project);
    let counted = match outcome {
        Outcome::Sent(_) => "sent",
        Outcome::Retry(..) => "retry",
        Outcome::Failed(_) => "failed",
        Outcome::Skipped(_) => "skipped",
        Outcome::Unknown(_) => "unknown",
    };
    crate::telemetry::metrics::notification_attempt(channel, counted);
    match outcome {
        Outcome::Sent(_) => tracing::info!(id, channel, %project, "notification sent"),
        Outcome::Retry(error, at) => {
            tracing::warn!(id, channel, %project, %error, retry_at = %at, "notification not sent; retrying")
        }
        Outcome::Failed(error) => {
            tracing::error!(id, channel, %project, %error, "notification failed; resend it by hand")
        }
        Outcome::Skipped(reason) => {
            tracing::info!(id, channel, %project, %reason, "notification skipped")
        }
        Outcome::Unknown(error) => {
            tracing::error!(id, channel, %project, %error, "notification outcome unknown; check and resend it by hand")
        }
    }
}

/// Records an outcome, retrying while the database is away: once the server has
/// the message, the record must not be lost (else the lease runs out and the
/// delivery shows as `unknown`).
async fn record(
    pool: &Pool,
    held: &deadpool_postgres::Client,
    claimed: &Claimed,
    outcome: &Outcome,
    now: DateTime<Utc>,
) {
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=6 {
        // The connection held through a long send (up to the SMTP final-reply wait)
        // may be gone by now: after a failure, each retry takes a fresh one.
        let fresh = match attempt {
            1 => None,
            _ => pool.get().await.ok(),
        };
        let client: &tokio_postgres::Client = match &fresh {
            Some(fresh) => fresh,
            None => held,
        };
        match outbox::finish(client, claimed, outcome, now).await {
            Ok(true) => return,
            Ok(false) => {
                tracing::warn!(
                    id = claimed.id,
                    channel = claimed.channel.as_str(),
                    "the delivery was re-queued while sending; its outcome is not recorded"
                );
                return;
            }
            Err(e) if attempt < 6 => {
                tracing::warn!(error = %format!("{e:#}"), "could not record a delivery; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(id = claimed.id, channel = claimed.channel.as_str(), error = %format!("{e:#}"), "could not record a delivery; it will show as unknown");
            }
        }
    }
}

/// The notification worker's step (run every [`POLL`]): sends every due
/// notification, batch after batch, until none is left or `cancel` fires; a send in
/// progress finishes and is recorded first.
pub async fn send_pending(
    notifier: Arc<Notifier>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    while !cancel.is_cancelled() {
        let summary = notifier.send_batch(Utc::now(), Some(&cancel)).await?;
        if summary.claimed() < BATCH {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_links_encode_the_project() {
        let base =
            url::Url::parse("https://credits.example.org/os").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            history_url(Some(&base), "a/b c<script>\r\n(1)").as_deref(),
            Some(
                "https://credits.example.org/os/credits_history/a%2Fb%20c%3Cscript%3E%0D%0A%281%29"
            )
        );
        assert_eq!(history_url(None, "a"), None);
    }
}
