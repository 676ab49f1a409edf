//! Charges: what one series' new samples cost, as plain values.
//!
//! A series (one metric, one full label set) is billed from its **cursor**, the last
//! sample already billed, through the new samples in time order. Every pair of
//! consecutive samples is a **step**; each step is charged on its own:
//!
//! - **Counters** hold cumulative usage. A step's usage is the increase from the
//!   previous sample; the charge is usage × price. A **decrease** is recorded and
//!   handled by the rule's policy: `rebase` bills nothing for the step and continues
//!   from the lower value (de.NBI's exporter recomputes its whole history when
//!   weights or start dates change, so a drop is not a restart); `restart` takes the
//!   new value as the step's usage, as Prometheus `increase()` does.
//! - **Gauges** hold an amount in use. A step bills the value at its start × its
//!   hours × price. A step longer than the rule's `max_gap` is not billed (a scrape
//!   outage is not guessed) and is recorded as a **gap**; one exactly `max_gap` long
//!   is billed.
//! - **The first sample ever** of a series (no cursor) only sets the cursor. What a
//!   counter counted before the service first saw it is not ours to bill, and a gauge
//!   has no step yet.
//! - Steps that use nothing are not emitted. A step at price zero is, with amount
//!   zero, so free usage stays visible.
//! - The cursor always advances to the last sample, across decreases and gaps.
//!
//! **Prices.** Usage is taken as spread evenly over its step. The price of usage at
//! an instant is the rule's version valid then, chosen by the series' labels. When a
//! price version starts strictly inside a step, the step is split there: a counter's
//! increase in proportion to time (each piece is `increase × elapsed / duration`,
//! the last piece takes the rest, so the pieces sum exactly to the increase), a
//! gauge's hours exactly. A change at a step's end applies only to later steps.
//!
//! **Exactness.** Amounts are exact `Decimal`s and are never rounded here; round only
//! the sums shown or stored as figures ([`crate::money::round_credits`]).
//! Counter amounts are products of the sampled values and prices, so billing a growth
//! in one step or in a thousand gives the same total exactly. Division happens in
//! two places only, both at the end of a computation: the proportional split of a
//! counter step at a price change, and a gauge's `value × seconds × price / 3600`.
//! `rust_decimal` keeps 28 significant digits, so such a quotient is off by at most
//! one unit in its 28th digit, far below any credit precision. Time is measured in
//! microseconds (PostgreSQL's resolution). An arithmetic overflow is an error, never
//! a panic and never a wrong amount.

use crate::billing::rules::{DecreasePolicy, MetricKind, Rule};
use crate::domain::MetricName;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::BTreeMap;

/// One sample of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Sample time.
    pub time: DateTime<Utc>,
    /// Sample value.
    pub value: Decimal,
}

/// The cost of usage between two instants at one price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// Start of the usage.
    pub from: DateTime<Utc>,
    /// End of the usage.
    pub to: DateTime<Utc>,
    /// Usage in the metric's unit: a counter's increase, or a gauge's value × hours.
    pub quantity: Decimal,
    /// Credits per unit.
    pub price: Decimal,
    /// Exact credits: quantity × price (for gauges computed as value × seconds ×
    /// price / 3600, dividing last).
    pub amount: Decimal,
}

/// A ledger line: the charges of one series and run at one price, summed; `from` and
/// `to` span them all.
pub type ChargeLine = Charge;

/// A counter value lower than the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Decrease {
    /// Time of the lower sample.
    pub time: DateTime<Utc>,
    /// The value before.
    pub from_value: Decimal,
    /// The lower value.
    pub to_value: Decimal,
    /// How the step was billed.
    pub policy: DecreasePolicy,
}

/// A gauge step longer than the rule's `max_gap`, not billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The last sample before the gap.
    pub from: DateTime<Utc>,
    /// The first sample after it.
    pub to: DateTime<Utc>,
}

/// What billing one series' new samples produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeriesCharge {
    /// Charges in time order, one per step and price.
    pub steps: Vec<Charge>,
    /// Counter decreases met.
    pub decreases: Vec<Decrease>,
    /// Gauge steps not billed.
    pub gaps: Vec<Gap>,
    /// The last sample, to bill from next time (the old cursor if there was none).
    pub new_cursor: Option<Point>,
}

/// Why a series could not be charged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeError {
    /// A product or sum left the `Decimal` range.
    #[error("metric {metric}: a credit amount overflowed the decimal range")]
    Overflow {
        /// The metric being billed.
        metric: String,
    },
    /// The samples were not strictly after the cursor and each other.
    #[error("metric {metric}: sample at {time} is not after the previous one at {previous}")]
    NotInTimeOrder {
        /// The metric being billed.
        metric: String,
        /// The sample (or cursor) before.
        previous: DateTime<Utc>,
        /// The offending sample.
        time: DateTime<Utc>,
    },
}

/// Charges the samples after `cursor` (in strictly increasing time order) of a series
/// with these labels by its rule.
pub fn charge_series(
    rule: &Rule,
    labels: &BTreeMap<String, String>,
    cursor: Option<Point>,
    samples: &[Point],
) -> Result<SeriesCharge, ChargeError> {
    let overflow = || ChargeError::Overflow {
        metric: rule.metric.to_string(),
    };
    let mut out = SeriesCharge {
        new_cursor: cursor,
        ..SeriesCharge::default()
    };
    for &sample in samples {
        let Some(previous) = out.new_cursor.replace(sample) else {
            continue;
        };
        if sample.time <= previous.time {
            return Err(ChargeError::NotInTimeOrder {
                metric: rule.metric.to_string(),
                previous: previous.time,
                time: sample.time,
            });
        }
        let step = Step {
            rule,
            labels,
            from: previous.time,
            to: sample.time,
        };
        match rule.kind {
            MetricKind::Counter => {
                let usage = if sample.value >= previous.value {
                    sample
                        .value
                        .checked_sub(previous.value)
                        .ok_or_else(overflow)?
                } else {
                    out.decreases.push(Decrease {
                        time: sample.time,
                        from_value: previous.value,
                        to_value: sample.value,
                        policy: rule.decrease_policy,
                    });
                    match rule.decrease_policy {
                        DecreasePolicy::Rebase => Decimal::ZERO,
                        DecreasePolicy::Restart => sample.value.max(Decimal::ZERO),
                    }
                };
                if usage > Decimal::ZERO {
                    step.counter(usage, &mut out.steps).ok_or_else(overflow)?;
                }
            }
            MetricKind::Gauge => {
                if sample.time - previous.time > rule.max_gap {
                    out.gaps.push(Gap {
                        from: previous.time,
                        to: sample.time,
                    });
                } else if previous.value > Decimal::ZERO {
                    step.gauge(previous.value, &mut out.steps)
                        .ok_or_else(overflow)?;
                }
            }
        }
    }
    Ok(out)
}

/// Sums charges of one series and run into one ledger line per price, in order of
/// first appearance.
pub fn summarize(metric: &MetricName, steps: &[Charge]) -> Result<Vec<ChargeLine>, ChargeError> {
    let mut lines: Vec<ChargeLine> = Vec::new();
    for step in steps {
        let Some(line) = lines.iter_mut().find(|line| line.price == step.price) else {
            lines.push(step.clone());
            continue;
        };
        let (quantity, amount) = line
            .quantity
            .checked_add(step.quantity)
            .zip(line.amount.checked_add(step.amount))
            .ok_or_else(|| ChargeError::Overflow {
                metric: metric.to_string(),
            })?;
        line.from = line.from.min(step.from);
        line.to = line.to.max(step.to);
        line.quantity = quantity;
        line.amount = amount;
    }
    Ok(lines)
}

/// One step of a series, split where prices change. Methods return `None` on overflow.
struct Step<'a> {
    rule: &'a Rule,
    labels: &'a BTreeMap<String, String>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

impl Step<'_> {
    /// Consecutive pieces `(start, end)` of the step with one price each (without
    /// allocating when no price changes inside, the usual case).
    fn pieces(&self) -> impl Iterator<Item = (DateTime<Utc>, DateTime<Utc>)> {
        let changes = self.rule.price_changes_between(self.from, self.to);
        let ends = changes.into_iter().chain(std::iter::once(self.to));
        ends.scan(self.from, |start, end| {
            let piece = (*start, end);
            *start = end;
            Some(piece)
        })
    }

    /// Bills a counter increase, spread evenly over the step.
    fn counter(&self, usage: Decimal, out: &mut Vec<Charge>) -> Option<()> {
        let duration = seconds(self.from, self.to)?;
        let mut billed = Decimal::ZERO;
        for (start, end) in self.pieces() {
            // Cumulative shares, the last being exactly `usage`, so pieces sum to it.
            let cumulative = if end == self.to {
                usage
            } else {
                usage
                    .checked_mul(seconds(self.from, end)?)?
                    .checked_div(duration)?
            };
            let quantity = cumulative.checked_sub(billed)?;
            billed = cumulative;
            let price = self.rule.price_at(start, self.labels).value();
            push(
                out,
                Charge {
                    from: start,
                    to: end,
                    quantity,
                    price,
                    amount: quantity.checked_mul(price)?,
                },
            );
        }
        Some(())
    }

    /// Bills a gauge value held over the step.
    fn gauge(&self, value: Decimal, out: &mut Vec<Charge>) -> Option<()> {
        let seconds_per_hour = Decimal::from(3600);
        for (start, end) in self.pieces() {
            let value_seconds = value.checked_mul(seconds(start, end)?)?;
            let price = self.rule.price_at(start, self.labels).value();
            // Division last, so it rounds (at the 28th digit) at most once.
            let quantity = value_seconds.checked_div(seconds_per_hour)?;
            let amount = value_seconds
                .checked_mul(price)?
                .checked_div(seconds_per_hour)?;
            push(
                out,
                Charge {
                    from: start,
                    to: end,
                    quantity,
                    price,
                    amount,
                },
            );
        }
        Some(())
    }
}

/// Keeps a charge that uses something, with trailing zeros dropped.
fn push(out: &mut Vec<Charge>, charge: Charge) {
    if charge.quantity.is_zero() {
        return;
    }
    out.push(Charge {
        quantity: charge.quantity.normalize(),
        amount: charge.amount.normalize(),
        ..charge
    });
}

/// Exact seconds from `from` to `to`, at microsecond resolution.
fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<Decimal> {
    let micros = (to - from).num_microseconds()?;
    Some(Decimal::new(micros, 6).normalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::rules::Rules;
    use crate::money::{decimal_from_f64, round_credits};
    use chrono::{Duration, TimeZone};
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// Minutes after the start of 2026.
    fn t(minutes: i64) -> DateTime<Utc> {
        let start = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_else(|| panic!("start of 2026"));
        start + Duration::minutes(minutes)
    }

    fn pt(minutes: i64, value: &str) -> Point {
        Point {
            time: t(minutes),
            value: dec(value),
        }
    }

    fn points(samples: Samples<'_>) -> Vec<Point> {
        samples.iter().map(|&(m, v)| pt(m, v)).collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The rule of metric `m` described by a TOML table body.
    fn rule(body: &str) -> Rule {
        let file = format!("[metrics.m]\n{body}");
        let rules = Rules::from_settings(&BTreeMap::new(), Some(&file), "toml")
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        rules
            .get("m")
            .cloned()
            .unwrap_or_else(|| panic!("metric m in {body}"))
    }

    fn charge(rule: &Rule, cursor: Option<Point>, samples: &[Point]) -> SeriesCharge {
        charge_series(rule, &labels(&[]), cursor, samples)
            .unwrap_or_else(|e| panic!("charging failed: {e}"))
    }

    /// `(from, to, quantity, amount)` in minutes and decimal text.
    fn steps_of(charged: &SeriesCharge) -> Vec<(DateTime<Utc>, DateTime<Utc>, Decimal, Decimal)> {
        charged
            .steps
            .iter()
            .map(|c| (c.from, c.to, c.quantity, c.amount))
            .collect()
    }

    fn expected_steps(steps: Steps<'_>) -> Vec<(DateTime<Utc>, DateTime<Utc>, Decimal, Decimal)> {
        steps
            .iter()
            .map(|&(from, to, q, a)| (t(from), t(to), dec(q), dec(a)))
            .collect()
    }

    fn total(steps: &[Charge]) -> Decimal {
        steps.iter().map(|c| c.amount).sum()
    }

    /// `(minutes, value)` samples.
    type Samples<'a> = &'a [(i64, &'a str)];
    /// `(from, to, quantity, amount)` charges, times in minutes.
    type Steps<'a> = &'a [(i64, i64, &'a str, &'a str)];
    /// Case name, cursor, samples, expected charges, expected `(minute, from, to)` decreases.
    type Case<'a> = (
        &'a str,
        Option<(i64, &'a str)>,
        Samples<'a>,
        Steps<'a>,
        &'a [(i64, &'a str, &'a str)],
    );

    fn check_counter(policy: &str, cases: &[Case<'_>]) {
        let rule = rule(&format!("price = 2\ndecrease_policy = \"{policy}\""));
        for &(case, cursor, samples, steps, decreases) in cases {
            let cursor = cursor.map(|(m, v)| pt(m, v));
            let samples = points(samples);
            let charged = charge(&rule, cursor, &samples);
            assert_eq!(
                steps_of(&charged),
                expected_steps(steps),
                "{policy}: {case}: steps"
            );
            let expected_decreases: Vec<Decrease> = decreases
                .iter()
                .map(|&(m, from, to)| Decrease {
                    time: t(m),
                    from_value: dec(from),
                    to_value: dec(to),
                    policy: rule.decrease_policy,
                })
                .collect();
            assert_eq!(
                charged.decreases, expected_decreases,
                "{policy}: {case}: decreases"
            );
            assert!(
                charged.gaps.is_empty(),
                "{policy}: {case}: counters have no gaps"
            );
            assert_eq!(
                charged.new_cursor,
                samples.last().copied().or(cursor),
                "{policy}: {case}: the cursor moves to the last sample"
            );
            assert!(
                charged
                    .steps
                    .iter()
                    .all(|c| c.price == dec("2") && c.amount == c.quantity * dec("2")),
                "{policy}: {case}: amount = quantity × price"
            );
        }
    }

    /// Cases both decrease policies bill alike.
    const COMMON_COUNTER_CASES: &[Case<'static>] = &[
        (
            "increases are billed per step",
            Some((0, "10")),
            &[(5, "12.5"), (10, "13")],
            &[(0, 5, "2.5", "5"), (5, 10, "0.5", "1")],
            &[],
        ),
        (
            "equal values emit nothing",
            Some((0, "3")),
            &[(5, "3"), (10, "4")],
            &[(5, 10, "1", "2")],
            &[],
        ),
        (
            "the first sample ever only sets the cursor",
            None,
            &[(0, "100"), (5, "101")],
            &[(0, 5, "1", "2")],
            &[],
        ),
        (
            "a lone first sample bills nothing",
            None,
            &[(0, "100")],
            &[],
            &[],
        ),
        (
            "no new samples keep the cursor",
            Some((0, "7")),
            &[],
            &[],
            &[],
        ),
        ("nothing at all", None, &[], &[], &[]),
        (
            "tiny increments stay exact",
            Some((0, "0.1")),
            &[(1, "0.1000001")],
            &[(0, 1, "0.0000001", "0.0000002")],
            &[],
        ),
    ];

    #[test]
    fn counters_bill_increases_under_either_policy() {
        check_counter("rebase", COMMON_COUNTER_CASES);
        check_counter("restart", COMMON_COUNTER_CASES);
    }

    #[test]
    fn charges_carry_no_trailing_zeros_into_the_ledger() {
        // NUMERIC keeps a value's scale: 13.000 − 10.500 would be stored and shown as
        // 2.500 unless each charge is normalized.
        let rule = rule("price = 2.00");
        let charged = charge(&rule, Some(pt(0, "10.500")), &[pt(5, "13.000")]);
        let texts: Vec<(String, String)> = charged
            .steps
            .iter()
            .map(|c| (c.quantity.to_string(), c.amount.to_string()))
            .collect();
        assert_eq!(texts, vec![("2.5".to_owned(), "5".to_owned())]);
    }

    #[test]
    fn rebase_bills_nothing_for_a_drop_and_continues_from_the_lower_value() {
        check_counter(
            "rebase",
            &[
                (
                    "one drop",
                    Some((0, "10")),
                    &[(5, "4"), (10, "6")],
                    &[(5, 10, "2", "4")],
                    &[(5, "10", "4")],
                ),
                (
                    "a drop to zero",
                    Some((0, "10")),
                    &[(5, "0"), (10, "1")],
                    &[(5, 10, "1", "2")],
                    &[(5, "10", "0")],
                ),
                (
                    "a drop right after the first sample",
                    None,
                    &[(0, "10"), (5, "9"), (10, "9.5")],
                    &[(5, 10, "0.5", "1")],
                    &[(5, "10", "9")],
                ),
                (
                    "several drops",
                    Some((0, "10")),
                    &[(5, "8"), (10, "9"), (15, "3"), (20, "5"), (25, "4.5")],
                    &[(5, 10, "1", "2"), (15, 20, "2", "4")],
                    &[(5, "10", "8"), (15, "9", "3"), (25, "5", "4.5")],
                ),
            ],
        );
    }

    #[test]
    fn restart_bills_the_new_value_after_a_drop() {
        check_counter(
            "restart",
            &[
                (
                    "one drop",
                    Some((0, "10")),
                    &[(5, "4"), (10, "6")],
                    &[(0, 5, "4", "8"), (5, 10, "2", "4")],
                    &[(5, "10", "4")],
                ),
                (
                    "a drop to zero bills nothing",
                    Some((0, "10")),
                    &[(5, "0"), (10, "1")],
                    &[(5, 10, "1", "2")],
                    &[(5, "10", "0")],
                ),
                (
                    "several drops",
                    Some((0, "10")),
                    &[(5, "8"), (10, "9"), (15, "3"), (20, "5"), (25, "4.5")],
                    &[
                        (0, 5, "8", "16"),
                        (5, 10, "1", "2"),
                        (10, 15, "3", "6"),
                        (15, 20, "2", "4"),
                        (20, 25, "4.5", "9"),
                    ],
                    &[(5, "10", "8"), (15, "9", "3"), (25, "5", "4.5")],
                ),
                (
                    "a drop below zero bills nothing",
                    Some((0, "1")),
                    &[(5, "-2")],
                    &[],
                    &[(5, "1", "-2")],
                ),
            ],
        );
    }

    #[test]
    fn gauges_bill_value_times_hours_and_skip_long_gaps() {
        // Case name, rule options, cursor, samples, expected charges, expected gaps.
        type GaugeCase<'a> = (
            &'a str,
            &'a str,
            Option<(i64, &'a str)>,
            Samples<'a>,
            Steps<'a>,
            &'a [(i64, i64)],
        );
        let cases: &[GaugeCase<'_>] = &[
            (
                "value at the step start × hours × price",
                "",
                Some((0, "4")),
                &[(15, "2"), (30, "0"), (45, "3")],
                &[(0, 15, "1", "2"), (15, 30, "0.5", "1")],
                &[],
            ),
            (
                "the first sample ever only sets the cursor",
                "",
                None,
                &[(0, "4"), (10, "4")],
                &[(
                    0,
                    10,
                    "0.6666666666666666666666666667",
                    "1.3333333333333333333333333333",
                )],
                &[],
            ),
            (
                "exactly max_gap is billed, beyond is not",
                "",
                Some((0, "4")),
                &[(15, "4"), (31, "4"), (40, "4")],
                &[(0, 15, "1", "2"), (31, 40, "0.6", "1.2")],
                &[(15, 31)],
            ),
            (
                "a configured max_gap",
                "max_gap_seconds = 3600",
                Some((0, "1")),
                &[(60, "1"), (121, "1")],
                &[(0, 60, "1", "2")],
                &[(60, 121)],
            ),
            (
                "several gaps in a row",
                "",
                Some((0, "1")),
                &[(20, "1"), (40, "1"), (50, "1")],
                &[(
                    40,
                    50,
                    "0.1666666666666666666666666667",
                    "0.3333333333333333333333333333",
                )],
                &[(0, 20), (20, 40)],
            ),
            (
                "zero and negative values bill nothing",
                "",
                Some((0, "0")),
                &[(10, "-3"), (20, "1")],
                &[],
                &[],
            ),
        ];
        for &(case, options, cursor, samples, steps, gaps) in cases {
            let rule = rule(&format!("kind = \"gauge\"\nprice = 2\n{options}"));
            let cursor = cursor.map(|(m, v)| pt(m, v));
            let samples = points(samples);
            let charged = charge(&rule, cursor, &samples);
            assert_eq!(steps_of(&charged), expected_steps(steps), "{case}: steps");
            let expected_gaps: Vec<Gap> = gaps
                .iter()
                .map(|&(from, to)| Gap {
                    from: t(from),
                    to: t(to),
                })
                .collect();
            assert_eq!(charged.gaps, expected_gaps, "{case}: gaps");
            assert!(
                charged.decreases.is_empty(),
                "{case}: gauges record no decreases"
            );
            assert_eq!(
                charged.new_cursor,
                samples.last().copied().or(cursor),
                "{case}: cursor"
            );
        }
    }

    #[test]
    fn a_gauge_gap_one_microsecond_over_max_gap_is_not_billed() {
        let rule = rule("kind = \"gauge\"\nprice = 1");
        let start = pt(0, "1");
        let over = Point {
            time: t(15) + Duration::microseconds(1),
            value: dec("1"),
        };
        let charged = charge(&rule, Some(start), &[over]);
        assert!(charged.steps.is_empty(), "not billed");
        assert_eq!(
            charged.gaps,
            vec![Gap {
                from: t(0),
                to: over.time
            }]
        );
    }

    #[test]
    fn label_prices_follow_the_series_labels() {
        let rule = rule("price = \"1.0\"\nlabel = \"location\"\nby_label = { Bielefeld = \"0.8\", Giessen = \"1.2\" }");
        let cases = [
            (
                "listed value",
                &[("location", "Bielefeld"), ("project_name", "p")][..],
                "0.8",
            ),
            (
                "another listed value",
                &[("location", "Giessen")][..],
                "1.2",
            ),
            (
                "unlisted value → default",
                &[("location", "Berlin")][..],
                "1.0",
            ),
            (
                "label missing → default",
                &[("project_name", "p")][..],
                "1.0",
            ),
        ];
        for (case, series_labels, price) in cases {
            let charged = charge_series(
                &rule,
                &labels(series_labels),
                Some(pt(0, "0")),
                &[pt(5, "10")],
            )
            .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(charged.steps.len(), 1, "{case}");
            assert_eq!(charged.steps[0].price, dec(price), "{case}: price");
            assert_eq!(
                charged.steps[0].amount,
                dec("10") * dec(price),
                "{case}: amount"
            );
        }
    }

    /// Price 1 before minute 60, 2 from minute 60, 3 from minute 90 (of 2026-01-01).
    const PRICE_CHANGES: &str = r#"
        price = 1
        [[metrics.m.price_changes]]
        valid_from = "2026-01-01T01:00:00Z"
        price = 2
        [[metrics.m.price_changes]]
        valid_from = "2026-01-01T01:30:00Z"
        price = 3
    "#;

    #[test]
    fn counter_steps_are_split_where_the_price_changes() {
        let rule = rule(PRICE_CHANGES);
        let sixth = "0.8571428571428571428571428571"; // 6/7, the one rounded share
        let sixth_rest = "0.1428571428571428571428571429"; // 1 − 6/7, so the pieces sum to 1
        let cases: &[(&str, (i64, &str), Samples<'_>, Steps<'_>)] = &[
            (
                "a change at a sample time does not split",
                (30, "0"),
                &[(60, "6"), (80, "10")],
                &[(30, 60, "6", "6"), (60, 80, "4", "8")],
            ),
            (
                "a change inside a step splits by time",
                (40, "0"),
                &[(80, "10")],
                &[(40, 60, "5", "5"), (60, 80, "5", "10")],
            ),
            (
                "several changes in one step",
                (0, "0"),
                &[(120, "12")],
                &[(0, 60, "6", "6"), (60, 90, "3", "6"), (90, 120, "3", "9")],
            ),
            (
                "an uneven split sums exactly to the increase",
                (0, "0"),
                &[(70, "1")],
                &[
                    (0, 60, sixth, sixth),
                    (60, 70, sixth_rest, "0.2857142857142857142857142858"),
                ],
            ),
            (
                "a restart's usage is split too",
                (50, "0"),
                &[(70, "4")],
                &[(50, 60, "2", "2"), (60, 70, "2", "4")],
            ),
        ];
        for &(case, cursor, samples, steps) in cases {
            let charged = charge(&rule, Some(pt(cursor.0, cursor.1)), &points(samples));
            assert_eq!(steps_of(&charged), expected_steps(steps), "{case}");
            let billed: Decimal = charged.steps.iter().map(|c| c.quantity).sum();
            let last = samples.last().map_or(Decimal::ZERO, |s| dec(s.1));
            assert_eq!(
                billed,
                last - dec(cursor.1),
                "{case}: quantities sum to the increase"
            );
        }
    }

    #[test]
    fn gauge_steps_are_split_where_the_price_changes() {
        let rule = rule(&format!(
            "kind = \"gauge\"\nmax_gap_seconds = 7200\n{PRICE_CHANGES}"
        ));
        let charged = charge(&rule, Some(pt(50, "6")), &[pt(100, "6")]);
        assert_eq!(
            steps_of(&charged),
            expected_steps(&[(50, 60, "1", "1"), (60, 90, "3", "6"), (90, 100, "1", "3")]),
        );
    }

    #[test]
    fn summaries_give_one_ledger_line_per_price() {
        let rule = rule(PRICE_CHANGES);
        let samples = points(&[(30, "3"), (50, "5"), (70, "7"), (90, "9"), (120, "12")]);
        let charged = charge(&rule, Some(pt(0, "0")), &samples);
        let lines = summarize(&rule.metric, &charged.steps).unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<_> = lines
            .iter()
            .map(|l| (l.from, l.to, l.quantity, l.price, l.amount))
            .collect();
        assert_eq!(
            got,
            vec![
                (t(0), t(60), dec("6"), dec("1"), dec("6")),
                (t(60), t(90), dec("3"), dec("2"), dec("6")),
                (t(90), t(120), dec("3"), dec("3"), dec("9")),
            ]
        );
        assert_eq!(
            total(&lines),
            total(&charged.steps),
            "lines keep the exact total"
        );
        assert_eq!(
            summarize(&rule.metric, &[]),
            Ok(vec![]),
            "no charges, no lines"
        );
    }

    #[test]
    fn overflow_and_disorder_are_errors_not_panics() {
        let counter = rule("price = 2");
        let gauge = rule("kind = \"gauge\"\nprice = 2");
        let huge = Point {
            time: t(1),
            value: Decimal::MAX,
        };
        let metric = || "m".to_owned();
        let overflow = Err(ChargeError::Overflow { metric: metric() });
        assert_eq!(
            charge_series(&counter, &labels(&[]), Some(pt(0, "0")), &[huge]),
            overflow,
            "counter"
        );
        assert_eq!(
            charge_series(
                &gauge,
                &labels(&[]),
                Some(Point {
                    time: t(0),
                    value: Decimal::MAX
                }),
                &[pt(1, "0")]
            ),
            overflow,
            "gauge"
        );
        let big = Charge {
            from: t(0),
            to: t(1),
            quantity: Decimal::MAX,
            price: Decimal::ONE,
            amount: Decimal::MAX,
        };
        assert_eq!(
            summarize(&counter.metric, &[big.clone(), big]),
            Err(ChargeError::Overflow { metric: metric() }),
            "summary"
        );

        for (case, cursor, samples, previous, time) in [
            (
                "same time as the cursor",
                Some(pt(5, "1")),
                points(&[(5, "2")]),
                5,
                5,
            ),
            (
                "before the cursor",
                Some(pt(5, "1")),
                points(&[(4, "2")]),
                5,
                4,
            ),
            (
                "samples out of order",
                None,
                points(&[(1, "1"), (3, "2"), (2, "3")]),
                3,
                2,
            ),
        ] {
            assert_eq!(
                charge_series(&counter, &labels(&[]), cursor, &samples),
                Err(ChargeError::NotInTimeOrder {
                    metric: metric(),
                    previous: t(previous),
                    time: t(time)
                }),
                "{case}"
            );
        }
    }

    /// A counter starting at `start` that grows by `increment` a minute, 1,000 times.
    fn counter_samples(start: Decimal, increment: Decimal) -> Vec<Point> {
        (1..=1000)
            .map(|i| Point {
                time: t(i),
                value: start + increment * Decimal::from(i),
            })
            .collect()
    }

    #[test]
    fn a_counter_billed_in_one_step_or_a_thousand_costs_exactly_the_same() {
        for (case, start, increment, price) in [
            ("0.1 increments", "0", "0.1", "0.3"),
            ("1e-7 increments", "5", "0.0000001", "1.1"),
            ("large values", "1000000000", "123.456789", "0.3"),
            ("awkward price", "17.3", "0.7", "0.333333"),
        ] {
            let rule = rule(&format!("price = \"{price}\""));
            let cursor = Point {
                time: t(0),
                value: dec(start),
            };
            let samples = counter_samples(dec(start), dec(increment));
            let many = charge(&rule, Some(cursor), &samples);
            let one = charge(&rule, Some(cursor), &samples[999..]);
            assert_eq!(many.steps.len(), 1000, "{case}");
            assert_eq!(
                total(&many.steps),
                total(&one.steps),
                "{case}: exact totals"
            );
            assert_eq!(
                total(&one.steps),
                dec(increment) * dec("1000") * dec(price),
                "{case}: increase × price"
            );
        }
    }

    #[test]
    fn float_counters_telescope_exactly() {
        // 0.1 added in f64 drifts (0.30000000000000004, …): each value converts to
        // its exact shortest text, and the increases sum back to last − first.
        let rule = rule("price = \"0.3\"");
        let mut value = 0.0_f64;
        let mut samples = Vec::new();
        for i in 1..=1000 {
            value += 0.1;
            let value = decimal_from_f64(value).unwrap_or_else(|| panic!("{value} converts"));
            samples.push(Point { time: t(i), value });
        }
        let cursor = pt(0, "0");
        let many = charge(&rule, Some(cursor), &samples);
        let one = charge(&rule, Some(cursor), &samples[999..]);
        assert_eq!(total(&many.steps), total(&one.steps));
        assert_eq!(total(&one.steps), samples[999].value * dec("0.3"));
    }

    #[test]
    fn a_counter_spanning_a_price_change_costs_the_same_in_one_step_or_a_thousand() {
        // Even growth and a change half-way through a minute: the proportional split
        // of the one step matches the thousand steps exactly.
        let file = "price = \"0.3\"\n[[metrics.m.price_changes]]\nvalid_from = \"2026-01-01T05:33:30Z\"\nprice = \"0.7\"";
        let rule = rule(file);
        let cursor = pt(0, "0");
        let samples = counter_samples(Decimal::ZERO, dec("0.1"));
        let many = charge(&rule, Some(cursor), &samples);
        let one = charge(&rule, Some(cursor), &samples[999..]);
        assert_eq!(one.steps.len(), 2, "split once");
        assert_eq!(many.steps.len(), 1001, "one step split");
        let expected = dec("33.35") * dec("0.3") + dec("66.65") * dec("0.7");
        assert_eq!(total(&many.steps), expected, "thousand steps");
        assert_eq!(total(&one.steps), expected, "one step");
    }

    #[test]
    fn a_gauge_billed_in_one_step_or_a_thousand_rounds_to_the_same_credits() {
        let precision = dec("0.01");
        for (case, value, step_seconds, price, exact) in [
            ("steps dividing the hour evenly", "3", 3.6, "0.5", true),
            ("steps of 7 s: repeating decimals", "16", 7.0, "0.3", false),
            ("fractional value and price", "2.5", 13.0, "1.7", false),
        ] {
            let rule = rule(&format!(
                "kind = \"gauge\"\nprice = \"{price}\"\nmax_gap_seconds = 86400"
            ));
            let step = Duration::microseconds((step_seconds * 1e6) as i64);
            let cursor = Point {
                time: t(0),
                value: dec(value),
            };
            let samples: Vec<Point> = (1..=1000)
                .map(|i| Point {
                    time: t(0) + step * i,
                    value: dec(value),
                })
                .collect();
            let many = total(&charge(&rule, Some(cursor), &samples).steps);
            let one = total(&charge(&rule, Some(cursor), &samples[999..]).steps);
            assert_eq!(
                round_credits(many, precision),
                round_credits(one, precision),
                "{case}: rounded"
            );
            assert!((many - one).abs() < dec("1e-20"), "{case}: {many} vs {one}");
            if exact {
                assert_eq!(many, one, "{case}: exact");
            }
        }
    }
}
