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
