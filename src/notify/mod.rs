//! Low-credit notifications: each threshold crossing is told once, by email and to
//! the portal.
//!
//! - [`thresholds`]: when a project crosses a threshold (pure).
//! - [`outbox`]: the billing transaction (or grant change, or adjustment) that
//!   crosses a threshold writes a notification row in the same transaction, unique
//!   per (project, threshold, grant), with one delivery per channel (`email`,
//!   `webhook`), each with its own state.
//! - [`worker`]: the sender claims due deliveries, renders ([`templates`]), sends
//!   ([`email`], [`webhook`]) and records the outcome.
//! - [`contacts`]: the addresses of each project; [`history`]: what was notified,
//!   and queueing a notification again by hand.
//!
//! # Never sent twice, never lost
//!
//! A delivery is `pending` until due. Claiming it (`FOR UPDATE SKIP LOCKED`, so
//! replicas claim different ones) commits `sending` with a lease *before* the server
//! is contacted; the outcome is committed right after the server answered:
//!
//! - accepted (SMTP `250` after the data, HTTP `200`) → `sent`, never sent again;
//! - refused for good (SMTP `5xx`) → `failed` with the server's reason;
//! - anything else (unreachable, `4xx`, timeout, another HTTP status) → `pending`
//!   again after 1, 2, 4, … minutes (at most an hour apart), `failed` after
//!   [`outbox::MAX_ATTEMPTS`] attempts.
//!
//! If the sender dies between handing the message over and committing the outcome,
//! the delivery stays `sending`; when its lease has run out, the next sender marks it
//! `unknown` instead of sending it again — the server may well have accepted it.
//! `POST /api/notifications/{id}/resend` sends it again when someone has checked
//! that it did not arrive. The same holds when the whole message went out over SMTP
//! but its final reply did not come (within RFC 5321's 10 minutes, or before
//! shutdown): `unknown`, never resent automatically.
//!
//! Re-billing, a restart or a second replica write no second notification (the
//! unique key), and the claim makes sure only one sender sends each delivery.

pub mod contacts;
pub mod email;
pub mod held_notice;
pub mod history;
pub mod outbox;
pub mod templates;
pub mod thresholds;
pub mod webhook;
pub mod worker;

pub use worker::{Notifier, SendSummary};

use crate::domain::Secret;
use lettre::message::Mailbox;
use rust_decimal::Decimal;
use std::path::PathBuf;
use std::time::Duration;

/// How the SMTP connection is secured (`MAIL_SMTP_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// `starttls` (default): plain connect, then STARTTLS, required (no downgrade).
    Starttls,
    /// `implicit`: TLS from the first byte (SMTPS, usually port 465).
    Implicit,
    /// `none`: no TLS at all, for a local relay or tests (`MAIL_NOT_STARTTLS`).
    None,
}

/// Email and portal notifications.
#[derive(Debug, Clone)]
pub struct MailSettings {
    /// `MAIL_SMTP_SERVER`: SMTP host; unset writes `.eml` files into `file_dir` instead.
    pub smtp_server: Option<String>,
    /// `MAIL_SMTP_PORT`.
    pub smtp_port: u16,
    /// `MAIL_SMTP_USER`: log in with this user (and `smtp_password`) when set.
    pub smtp_user: Option<String>,
    /// `MAIL_SMTP_PASSWORD`.
    pub smtp_password: Secret,
    /// `MAIL_SMTP_TLS` / `MAIL_NOT_STARTTLS`: how the connection is secured.
    pub tls: SmtpTls,
    /// `MAIL_SMTP_TIMEOUT`: connecting and each send may take this long.
    pub timeout: Duration,
    /// `MAIL_FROM`: the sender of every notification.
    pub from: Mailbox,
    /// `MAIL_FILE_DIR`: where mail goes as `.eml` files without an SMTP server.
    pub file_dir: PathBuf,
    /// `NOTIFICATION_TO_OVERWRITE`: when set, every mail goes to this address only.
    pub to_overwrite: Option<Mailbox>,
    /// `CLOUD_GOVERNANCE_MAIL`: copied (`Cc`) on every mail.
    pub governance: Vec<Mailbox>,
    /// `MAIL_CONTACT_URL`: the portal; when set, crossings are also posted to
    /// `{MAIL_CONTACT_URL}/credits-limit/`.
    pub contact_url: Option<url::Url>,
    /// `MAIL_TEMPLATE_DIR`: `subject.txt`, `body.txt`, `body.html` found here replace
    /// the built-in templates.
    pub template_dir: Option<PathBuf>,
}

/// What the notification sender reads of the settings (`Settings::notify`).
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// Mail transport, sender, recipients and templates; the portal's webhook URL.
    pub mail: MailSettings,
    /// `FORECAST_WINDOW`: the usage a mail's run-out forecast is based on.
    pub forecast_window: Duration,
    /// `PUBLIC_BASE_URL`: where a mail links to the project's history page.
    pub public_base_url: Option<url::Url>,
    /// `CREDITS_PRECISION`: credits are shown rounded to this.
    pub precision: Decimal,
    /// `API_CONTACT_KEY`: sent to the portal's webhook.
    pub api_contact_key: Secret,
}

/// Why a message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: unreachable, slow, SMTP `4xx`, an HTTP status other than 200.
    #[error("{0}")]
    Transient(String),
    /// Retrying will not help: SMTP `5xx`, or the message cannot be built.
    #[error("{0}")]
    Permanent(String),
    /// The message went out but no answer came: it may have been delivered, so it
    /// is not sent again automatically.
    #[error("{0}")]
    Unknown(String),
}
