//! "Charge held for review": the announcement of a held charge (see
//! `crate::billing::guard`) to the cloud governance, by mail to
//! `CLOUD_GOVERNANCE_MAIL` (or `NOTIFICATION_TO_OVERWRITE`) and by the portal
//! webhook with `limit_type` [`LIMIT_TYPE`]. It goes through the notification
//! outbox like a threshold crossing; the project's contacts are not mailed (an
//! operator decides first).

use super::email::Recipients;
use super::outbox::HeldNotice;
use super::templates::Rendered;
use super::MailSettings;
use crate::money::round_credits;
use rust_decimal::Decimal;

/// What the portal webhook's `limit_type` says.
pub const LIMIT_TYPE: &str = "charge held for review";

/// The cloud governance (or the overwrite address alone).
pub fn recipients(settings: &MailSettings) -> Recipients {
    if let Some(only) = &settings.to_overwrite {
        return Recipients {
            to: vec![only.clone()],
            cc: Vec::new(),
        };
    }
    Recipients {
        to: settings.governance.clone(),
        cc: Vec::new(),
    }
}

/// Subject, text and HTML of the announcement.
pub fn render(
    project: &str,
    held: &HeldNotice,
    precision: Decimal,
    history_url: Option<&str>,
) -> Rendered {
    let credits = round_credits(held.credits, precision);
    let subject = format!("{project}: charge held for review ({credits} credits)");
    let mut text = format!(
        "A usage step of project {project} was held for review instead of billed.\n\n\
         Metric: {}\n\
         Step: {} to {} (counter {} to {})\n\
         Usage: {}\n\
         Credits if approved: {credits}\n\
         Why: {}\n\n\
         Approve it: POST /api/held/{id}/approve with {{\"reason\": \"...\"}}\n\
         Reject it: POST /api/held/{id}/reject with {{\"reason\": \"...\"}}\n\
         It is rejected automatically when the counter drops back.\n",
        held.metric,
        held.from.to_rfc3339(),
        held.to.to_rfc3339(),
        held.from_value.normalize(),
        held.to_value.normalize(),
        held.quantity.normalize(),
        held.reason,
        id = held.id,
    );
    if let Some(url) = history_url {
        text.push_str(&format!("\nHistory: {url}\n"));
    }
    let html = format!(
        "<pre>{}</pre>",
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    );
    Rendered {
        subject: subject.replace(['\r', '\n'], " "),
        text,
        html,
    }
}
