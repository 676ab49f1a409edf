//! When a project crosses a threshold: pure functions over exact values.
//!
//! A threshold is a fraction of the granted credits used (`0.5` = half). A project
//! crosses it when it goes from below `threshold × granted` to at or above it:
//! through usage (billing) or through a lowered grant. A project with no grant never
//! crosses anything. Crossing several thresholds at once crosses each of them.

use rust_decimal::Decimal;
use std::fmt;
use std::str::FromStr;

/// A fraction of the granted credits used that notifies: more than 0, at most 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Threshold(Decimal);

impl Threshold {
    /// Parses `0.5`, `1`, `0.75`: a decimal greater than 0 and at most 100.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let value = Decimal::from_str(raw.trim())
            .map_err(|_| format!("{raw:?} is not a decimal fraction such as 0.5"))?;
        Self::new(value)
    }

    /// Checks a fraction (e.g. one read back from the database).
    pub fn new(value: Decimal) -> Result<Self, String> {
        if value <= Decimal::ZERO || value > Decimal::ONE_HUNDRED {
            return Err(format!(
                "{value} is not a fraction of the grant greater than 0 and at most 100 (0.5 is half, 1 all of it)"
            ));
        }
        Ok(Self(value.normalize()))
    }

    /// The fraction.
    pub fn value(self) -> Decimal {
        self.0
    }

    /// The fraction in percent (`0.5` → `50`, `0.125` → `12.5`).
    pub fn percent(self) -> Decimal {
        (self.0 * Decimal::ONE_HUNDRED).normalize()
    }

    /// The old service's `limit_type` for the portal: `half limit reached` (0.5),
    /// `full limit reached` (1), else `"{percent}% limit reached"`.
    pub fn limit_type(self) -> String {
        if self.0 == Decimal::new(5, 1) {
            "half limit reached".into()
        } else if self.0 == Decimal::ONE {
            "full limit reached".into()
        } else {
            format!("{}% limit reached", self.percent())
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Parses `NOTIFICATION_THRESHOLDS`: comma-separated fractions, sorted, without
/// repetitions; at least one.
pub fn parse_list(raw: &str) -> Result<Vec<Threshold>, String> {
    let mut thresholds = raw
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(Threshold::parse)
        .collect::<Result<Vec<_>, _>>()?;
    if thresholds.is_empty() {
        return Err("expected at least one fraction, e.g. 0.5,1.0".into());
    }
    thresholds.sort();
    thresholds.dedup();
    Ok(thresholds)
}

/// A project's used and granted credits at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Credits used.
    pub used: Decimal,
    /// Credits granted.
    pub granted: Decimal,
}

impl Level {
    /// Whether this level is at or above `threshold` (never without a grant).
    pub fn reached(self, threshold: Threshold) -> bool {
        self.granted > Decimal::ZERO
            && threshold
                .value()
                .checked_mul(self.granted)
                .is_some_and(|limit| self.used >= limit)
    }
}

/// The thresholds that `after` has reached and `before` had not: one crossing
/// each, lowest first. Billing keeps the grant and raises `used`; a grant change
/// keeps `used` and changes the grant (raising it crosses nothing, it re-arms).
pub fn crossed(thresholds: &[Threshold], before: Level, after: Level) -> Vec<Threshold> {
    thresholds
        .iter()
        .copied()
        .filter(|&t| after.reached(t) && !before.reached(t))
        .collect()
}

/// Used credits in percent of the grant, one decimal place; `None` without a grant.
pub fn percent_used(level: Level) -> Option<Decimal> {
    if level.granted <= Decimal::ZERO {
        return None;
    }
    let percent = level
        .used
        .checked_mul(Decimal::ONE_HUNDRED)?
        .checked_div(level.granted)?;
    Some(percent.round_dp(1).normalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn level(used: &str, granted: &str) -> Level {
        Level {
            used: dec(used),
            granted: dec(granted),
        }
    }

    fn list(raw: &str) -> Vec<Threshold> {
        parse_list(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn shown(thresholds: Vec<Threshold>) -> Vec<String> {
        thresholds.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn crossing_is_going_from_below_to_at_or_above() {
        let defaults = list("0.5,1.0");
        let cases = [
            (
                "below stays below",
                level("10", "100"),
                level("49.99", "100"),
                vec![],
            ),
            (
                "exactly half crosses",
                level("49.99", "100"),
                level("50", "100"),
                vec!["0.5"],
            ),
            (
                "already above does not cross again",
                level("50", "100"),
                level("60", "100"),
                vec![],
            ),
            (
                "both at once",
                level("0", "100"),
                level("150", "100"),
                vec!["0.5", "1"],
            ),
            (
                "the full limit",
                level("99", "100"),
                level("100.01", "100"),
                vec!["1"],
            ),
            (
                "no grant never notifies",
                level("0", "0"),
                level("1000", "0"),
                vec![],
            ),
            (
                "a lowered grant crosses",
                level("60", "200"),
                level("60", "100"),
                vec!["0.5"],
            ),
            (
                "a raised grant re-arms, crosses nothing",
                level("60", "100"),
                level("60", "200"),
                vec![],
            ),
            (
                "a raised grant still above crosses nothing",
                level("150", "100"),
                level("150", "200"),
                vec![],
            ),
            (
                "a first grant below the usage crosses",
                level("150", "0"),
                level("150", "100"),
                vec!["0.5", "1"],
            ),
            (
                "a refund goes back below",
                level("60", "100"),
                level("40", "100"),
                vec![],
            ),
        ];
        for (case, before, after, expected) in cases {
            assert_eq!(shown(crossed(&defaults, before, after)), expected, "{case}");
        }
    }

    #[test]
    fn threshold_lists_are_sorted_fractions() {
        assert_eq!(shown(list("1.0, 0.5,0.75")), ["0.5", "0.75", "1"]);
        assert_eq!(
            shown(list("0.5,0.50")),
            ["0.5"],
            "repetitions are one threshold"
        );
        assert_eq!(shown(list("1.5")), ["1.5"], "beyond the grant is allowed");
        for bad in ["", " , ", "half", "0", "-0.5", "101", "0.5,x", "NaN"] {
            assert!(parse_list(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn limit_types_are_the_old_services_words() {
        let cases = [
            ("0.5", "half limit reached"),
            ("1.0", "full limit reached"),
            ("0.75", "75% limit reached"),
            ("0.125", "12.5% limit reached"),
            ("1.5", "150% limit reached"),
        ];
        for (raw, expected) in cases {
            let threshold = Threshold::parse(raw).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(threshold.limit_type(), expected, "{raw}");
        }
    }

    #[test]
    fn percent_used_has_one_place() {
        assert_eq!(percent_used(level("50", "100")), Some(dec("50")));
        assert_eq!(percent_used(level("1", "3")), Some(dec("33.3")));
        assert_eq!(percent_used(level("250", "100")), Some(dec("250")));
        assert_eq!(percent_used(level("5", "0")), None);
    }
}
