//! Forecasts from usage: the time a burn rate covers, credits per hour, the run-out
//! instant. Pure arithmetic on exact decimals, shared by the project detail
//! (`api::projects`) and the notifications (`notify::worker`).

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;

/// The time a burn rate over `window` before `now` actually covers: from the start of
/// the project's first billed usage (a project billed for 6 minutes burns its
/// credits of 6 minutes, not of the whole window), at most the window.
pub fn covered(
    window: Duration,
    now: DateTime<Utc>,
    first_usage: Option<DateTime<Utc>>,
) -> Duration {
    match first_usage {
        Some(first) => (now - first).clamp(Duration::zero(), window),
        None => window,
    }
}

/// A span in words for people: `the last 24 hours`, `the last 6 minutes`.
pub fn describe_span(span: Duration) -> String {
    let (n, unit) = if span >= Duration::hours(2) {
        (span.num_minutes().saturating_add(30) / 60, "hours")
    } else if span >= Duration::minutes(2) {
        (span.num_minutes(), "minutes")
    } else {
        (span.num_seconds(), "seconds")
    };
    format!("the last {n} {unit}")
}

/// Credits per hour when `charged` credits were used over `window`.
pub fn burn_rate_per_hour(charged: Decimal, window: Duration) -> Decimal {
    let seconds = window.num_seconds();
    if seconds <= 0 {
        return Decimal::ZERO;
    }
    charged
        .checked_mul(Decimal::from(3600))
        .and_then(|c| c.checked_div(Decimal::from(seconds)))
        .unwrap_or(Decimal::ZERO)
}

/// When a project runs out at `burn_rate` credits per hour: `now` when nothing
/// remains, `None` when nothing burns, nothing was granted, or the instant lies after
/// 9999-12-31T23:59:59Z: RFC 3339 (the API's `date-time`) has four-digit years, and
/// a run-out that far away means "not in any time that matters".
pub fn run_out_at(
    now: DateTime<Utc>,
    granted: Decimal,
    remaining: Decimal,
    burn_rate: Decimal,
) -> Option<DateTime<Utc>> {
    if burn_rate <= Decimal::ZERO || granted <= Decimal::ZERO {
        return None;
    }
    if remaining <= Decimal::ZERO {
        return Some(now);
    }
    let seconds = remaining
        .checked_mul(Decimal::from(3600))?
        .checked_div(burn_rate)?
        .floor();
    let seconds = i64::try_from(seconds).ok()?;
    let at = now.checked_add_signed(Duration::try_seconds(seconds)?)?;
    (at.timestamp() <= LATEST_RFC3339).then_some(at)
}

/// The last second RFC 3339 can write, 9999-12-31T23:59:59Z, in Unix seconds.
const LATEST_RFC3339: i64 = 253_402_300_799;
