//! Values with rules, parsed once at the edge and trusted everywhere after.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// A Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetricName(String);

impl MetricName {
    /// Checks the Prometheus metric name syntax.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut chars = raw.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(format!(
                "{raw:?} is not a metric name (letters, digits, '_' and ':', not starting with a digit)"
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MetricName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Credits per unit of a metric: exact and never negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Price(Decimal);

impl Price {
    /// Parses a decimal number that is zero or more.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let value = Decimal::from_str(raw.trim())
            .or_else(|_| Decimal::from_scientific(raw.trim()))
            .map_err(|_| format!("{raw:?} is not a decimal number"))?;
        if value.is_sign_negative() && !value.is_zero() {
            return Err(format!("{raw:?} is negative; prices must be zero or more"));
        }
        Ok(Self(value.normalize()))
    }

    /// The price as a decimal.
    pub fn value(self) -> Decimal {
        self.0
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What one billing run did (made by `billing::engine`, shown by telemetry and
/// `/stats`: a plain value both read, so neither depends on the other).
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
    /// Why the first failed project failed (the billing worker shows it).
    #[serde(skip)]
    pub first_error: Option<String>,
}

/// A string that never shows in `Debug` output or logs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether nothing was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// Credentials a scrape sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAuth {
    /// No credentials.
    None,
    /// `Authorization: Bearer …`.
    Bearer(Secret),
    /// HTTP basic authentication.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
}

/// Whether `name` is a Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`).
pub fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_follow_prometheus_syntax() {
        for ok in ["project_vcpu_usage", "a", "_x", "ns:rule:rate5m", "A1"] {
            assert!(MetricName::parse(ok).is_ok(), "{ok} should be valid");
        }
        for bad in ["", "1abc", "a-b", "a b", "ä", "a.b"] {
            assert!(MetricName::parse(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn prices_are_exact_and_not_negative() {
        assert_eq!(
            Price::parse("0.3").map(Price::value),
            Ok(Decimal::new(3, 1))
        );
        assert_eq!(
            Price::parse("1e-2").map(Price::value),
            Ok(Decimal::new(1, 2))
        );
        assert_eq!(Price::parse("0").map(Price::value), Ok(Decimal::ZERO));
        assert!(Price::parse("-1").is_err());
        assert!(Price::parse("abc").is_err());
    }
}
