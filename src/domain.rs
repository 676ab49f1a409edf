//! Values with rules, parsed once at the edge and trusted everywhere after.

use rust_decimal::Decimal;
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
