//! The jump guard: a counter step whose rate is implausible is **held for review**,
//! not billed.
//!
//! de.NBI's exporter recomputes its whole history when operators edit weights or
//! the machine inventory, so its cumulative counters can jump by months of usage in
//! one update (201.35 → 1006.79 vCPU-hours within 5 s, when the project burns about
//! 4 an hour). That step is a configuration edit, not usage. A step is judged by its
//! rate (increase per hour over the step) and held when
//!
//! - the rule's `max_rate_per_hour` is set and the rate exceeds it (any series, new
//!   ones too), or
//! - the series' **recent rate** is known and the rate exceeds
//!   `jump_factor × max(recent rate, jump_floor_per_hour)`.
//!
//! The recent rate is an exponentially weighted mean of the series' billed step
//! rates with a time constant of [`RATE_TIME_CONSTANT`] (a step of that length or
//! longer replaces it), so an exporter that updates less often than it is scraped
//! (steps of zero, then one larger step) still has its true mean. It is *known*
//! once billed steps cover [`WARM_UP`]: a new series bills normally (only the
//! absolute limit applies). Held steps and decreases do not change it.
//!
//! With the defaults (factor 100, floor 10 units/h) a series burning 4 an hour is
//! held above 1,000 an hour: the re-weighting above (≈ 580,000 an hour) is held, a
//! project growing from 4 to 88 an hour in one step (22×) is billed.
//!
//! A held step advances the cursor like any other, so usage after it bills from the
//! new value and nothing is billed twice; the held charge (its series, time range,
//! values, quantity and the exact credits it would cost) is billed only when an
//! operator approves it. A later drop of the counter that takes back at least half of
//! a held jump (the revert of the re-weighting) rejects it automatically.

use super::charge::{self, ChargeError, Point, SeriesCharge};
use super::rules::{DecreasePolicy, MetricKind, Rule};
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::BTreeMap;

/// Time constant of the recent-rate estimate.
pub const RATE_TIME_CONSTANT: Duration = Duration::hours(1);
/// Billed time a series needs before its recent rate is trusted.
pub const WARM_UP: Duration = Duration::minutes(10);
/// Default `jump_factor`.
pub const DEFAULT_FACTOR: Decimal = Decimal::from_parts(100, 0, 0, false, 0);
/// Default `jump_floor_per_hour`.
pub const DEFAULT_FLOOR: Decimal = Decimal::from_parts(10, 0, 0, false, 0);

/// A counter metric's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct JumpGuard {
    /// Any step faster than this (units per hour) is held; `None`: no absolute limit.
    pub max_rate_per_hour: Option<Decimal>,
    /// A step faster than this many times the recent rate is held; zero turns the
    /// relative test off.
    pub jump_factor: Decimal,
    /// The recent rate counts as at least this (units per hour), so a nearly idle
    /// series may still grow to `jump_factor × floor`.
    pub jump_floor_per_hour: Decimal,
}

impl Default for JumpGuard {
    fn default() -> Self {
        Self {
            max_rate_per_hour: None,
            jump_factor: DEFAULT_FACTOR,
            jump_floor_per_hour: DEFAULT_FLOOR,
        }
    }
}

/// What the guard remembers of a series between runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Recent rate, units per hour.
    pub rate_per_hour: Decimal,
    /// Billed time behind it, in whole seconds (capped at a year).
    pub covered_seconds: i64,
}

/// Why a step was held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// Faster than `max_rate_per_hour`.
    AboveMax {
        /// The step's rate (units per hour), `None` when it overflows.
        rate: Option<Decimal>,
        /// The limit.
        max: Decimal,
    },
    /// Faster than `jump_factor × max(recent, floor)`.
    Jump {
        /// The step's rate (units per hour), `None` when it overflows.
        rate: Option<Decimal>,
        /// The series' recent rate.
        recent: Decimal,
        /// The limit it exceeded.
        limit: Decimal,
    },
}

impl std::fmt::Display for HoldReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = |r: &Option<Decimal>| {
            r.map_or_else(
                || "beyond any number".to_owned(),
                |r| r.round_dp(2).normalize().to_string(),
            )
        };
        match self {
            Self::AboveMax { rate: r, max } => write!(
                f,
                "rate {} per hour is above max_rate_per_hour {}",
                rate(r),
                max.normalize()
            ),
            Self::Jump {
                rate: r,
                recent,
                limit,
            } => write!(
                f,
                "rate {} per hour is above {} (jump_factor × the recent rate {} per hour, or the floor): \
                 a re-weighting of history rather than usage?",
                rate(r),
                limit.round_dp(2).normalize(),
                recent.round_dp(4).normalize()
            ),
        }
    }
}

/// Units per hour of `usage` over `seconds`; `None` on overflow.
fn rate_per_hour(usage: Decimal, seconds: Decimal) -> Option<Decimal> {
    usage.checked_mul(Decimal::from(3600))?.checked_div(seconds)
}

/// Whether a step using `usage` units in `seconds` (> 0) is held.
pub fn judge(
    guard: &JumpGuard,
    state: Option<RateState>,
    usage: Decimal,
    seconds: Decimal,
) -> Option<HoldReason> {
    if usage <= Decimal::ZERO || seconds <= Decimal::ZERO {
        return None;
    }
    let rate = rate_per_hour(usage, seconds);
    // An overflowing rate is faster than any limit.
    let above = |limit: Decimal| rate.is_none_or(|r| r > limit);
    if let Some(max) = guard.max_rate_per_hour {
        if above(max) {
            return Some(HoldReason::AboveMax { rate, max });
        }
    }
    let state = state.filter(|s| s.covered_seconds >= WARM_UP.num_seconds())?;
    if guard.jump_factor.is_zero() {
        return None;
    }
    let limit = guard
        .jump_factor
        .checked_mul(state.rate_per_hour.max(guard.jump_floor_per_hour))?;
    above(limit).then_some(HoldReason::Jump {
        rate,
        recent: state.rate_per_hour,
        limit,
    })
}

/// The recent rate after a billed step of `usage` units over `seconds` (> 0).
/// Unchanged on overflow.
pub fn update(state: Option<RateState>, usage: Decimal, seconds: Decimal) -> Option<RateState> {
    let Some(rate) = rate_per_hour(usage.max(Decimal::ZERO), seconds) else {
        return state;
    };
    let whole_seconds = i64::try_from(seconds.ceil()).unwrap_or(i64::MAX);
    let covered = |before: i64| before.saturating_add(whole_seconds).min(365 * 24 * 3600);
    let Some(before) = state else {
        return Some(RateState {
            rate_per_hour: rate,
            covered_seconds: covered(0),
        });
    };
    let tau = Decimal::from(RATE_TIME_CONSTANT.num_seconds());
    let weight = (seconds / tau).min(Decimal::ONE);
    let next = rate
        .checked_sub(before.rate_per_hour)
        .and_then(|d| d.checked_mul(weight))
        .and_then(|d| d.checked_add(before.rate_per_hour));
    Some(match next {
        Some(next) => RateState {
            // Bounded: a weighted mean keeps 28 digits at most; keep 12 places.
            rate_per_hour: next.round_dp(12).normalize(),
            covered_seconds: covered(before.covered_seconds),
        },
        None => before,
    })
}

/// A counter step held for review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The sample before the step.
    pub from: Point,
    /// The sample after it.
    pub to: Point,
    /// Usage of the step in the metric's unit.
    pub quantity: Decimal,
    /// Exact credits it would cost.
    pub credits: Decimal,
    /// Its price, when one price covers the whole step.
    pub price: Option<Decimal>,
    /// Why it was held.
    pub reason: String,
}

/// A series' charges with the implausible steps held out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guarded {
    /// What is billed (the cursor moves past held steps too).
    pub charged: SeriesCharge,
    /// Steps held for review.
    pub held: Vec<Held>,
    /// The series' recent rate afterwards.
    pub state: Option<RateState>,
}

/// Exact seconds from `from` to `to` (microseconds); `None` when not after.
fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<Decimal> {
    let micros = (to - from).num_microseconds()?;
    (micros > 0).then(|| Decimal::new(micros, 6))
}

/// Charges a series like [`charge::charge_series`], holding the counter steps the
/// rule's guard finds implausible. Gauges are not guarded.
pub fn charge_guarded(
    rule: &Rule,
    labels: &BTreeMap<String, String>,
    cursor: Option<Point>,
    samples: &[Point],
    state: Option<RateState>,
) -> Result<Guarded, ChargeError> {
    if rule.kind != MetricKind::Counter {
        let charged = charge::charge_series(rule, labels, cursor, samples)?;
        return Ok(Guarded {
            charged,
            held: Vec::new(),
            state,
        });
    }
    let mut out = Guarded {
        charged: SeriesCharge {
            new_cursor: cursor,
            ..SeriesCharge::default()
        },
        held: Vec::new(),
        state,
    };
    // Samples from `start` on are not charged yet; `out.charged.new_cursor` is
    // where they continue from.
    let mut start = 0;
    let mut previous = cursor;
    for (i, &sample) in samples.iter().enumerate() {
        let Some(before) = previous.replace(sample) else {
            continue;
        };
        // Out of order: charging the segment reports it.
        let Some(secs) = seconds(before.time, sample.time) else {
            continue;
        };
        let usage = if sample.value >= before.value {
            sample.value.checked_sub(before.value)
        } else {
            match rule.decrease_policy {
                // Nothing billed, nothing learnt.
                DecreasePolicy::Rebase => continue,
                DecreasePolicy::Restart => Some(sample.value.max(Decimal::ZERO)),
            }
        };
        let Some(usage) = usage else {
            continue;
        };
        let Some(reason) = judge(&rule.guard, out.state, usage, secs) else {
            out.state = update(out.state, usage, secs);
            continue;
        };
        let segment =
            charge::charge_series(rule, labels, out.charged.new_cursor, &samples[start..i])?;
        merge(&mut out.charged, segment);
        let step = charge::charge_series(rule, labels, Some(before), &[sample])?;
        let credits = step
            .steps
            .iter()
            .try_fold(Decimal::ZERO, |sum, c| sum.checked_add(c.amount))
            .ok_or_else(|| ChargeError::Overflow {
                metric: rule.metric.to_string(),
            })?;
        let price = match step.steps.as_slice() {
            [one] => Some(one.price),
            _ => None,
        };
        out.held.push(Held {
            from: before,
            to: sample,
            quantity: usage.normalize(),
            credits: credits.normalize(),
            price,
            reason: reason.to_string(),
        });
        out.charged.decreases.extend(step.decreases);
        out.charged.new_cursor = Some(sample);
        start = i + 1;
    }
    let rest = charge::charge_series(rule, labels, out.charged.new_cursor, &samples[start..])?;
    merge(&mut out.charged, rest);
    Ok(out)
}

fn merge(into: &mut SeriesCharge, from: SeriesCharge) {
    into.steps.extend(from.steps);
    into.decreases.extend(from.decreases);
    into.gaps.extend(from.gaps);
    into.new_cursor = from.new_cursor.or(into.new_cursor);
}

/// Whether a counter decrease from `from_value` to `to_value` takes back a held jump
/// of `held_quantity`: it drops by at least half of it.
pub fn drop_cancels(held_quantity: Decimal, from_value: Decimal, to_value: Decimal) -> bool {
    match from_value.checked_sub(to_value) {
        Some(drop) => {
            drop > Decimal::ZERO
                && drop
                    .checked_mul(Decimal::TWO)
                    .is_none_or(|d| d >= held_quantity)
        }
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::rules::Rules;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn t(seconds: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_else(|| panic!("start of 2026"))
            + Duration::seconds(seconds)
    }

    fn pt(seconds: i64, value: &str) -> Point {
        Point {
            time: t(seconds),
            value: dec(value),
        }
    }

    fn rule(body: &str) -> Rule {
        let file = format!("[metrics.m]\nprice = 1\n{body}");
        Rules::from_settings(&BTreeMap::new(), Some(&file), "toml")
            .unwrap_or_else(|e| panic!("{body}: {e}"))
            .get("m")
            .cloned()
            .unwrap_or_else(|| panic!("metric m"))
    }

    /// A warmed-up series burning `rate` per hour.
    fn warm(rate: &str) -> Option<RateState> {
        Some(RateState {
            rate_per_hour: dec(rate),
            covered_seconds: 3600,
        })
    }

    fn charge(rule: &Rule, cursor: Point, samples: &[Point], state: Option<RateState>) -> Guarded {
        charge_guarded(rule, &BTreeMap::new(), Some(cursor), samples, state)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_defaults_hold_a_re_weighting_and_bill_growth_and_new_series() {
        let guard = JumpGuard::default();
        let cases = [
            // de.NBI: weight 1 → 5 moved 201.35 to 1006.79 within one 5 s update.
            ("re-weighting at 4/h", warm("4"), "805.44", 5, true),
            (
                "the same seen over a 5 min step",
                warm("4"),
                "805.44",
                300,
                true,
            ),
            ("4 → 88 per hour in one step", warm("4"), "88", 3600, false),
            (
                "4 → 88 per hour over a 30 s step",
                warm("4"),
                "0.7333",
                30,
                false,
            ),
            (
                "an idle series starting 500 vCPUs",
                warm("0"),
                "500",
                3600,
                false,
            ),
            (
                "an idle series jumping 2,000 in a minute",
                warm("0"),
                "2000",
                60,
                true,
            ),
            ("a new series bills normally", None, "805.44", 5, false),
            (
                "a series not yet warmed up bills normally",
                Some(RateState {
                    rate_per_hour: dec("4"),
                    covered_seconds: 599,
                }),
                "805.44",
                5,
                false,
            ),
            ("nothing used", warm("4"), "0", 5, false),
        ];
        for (case, state, usage, secs, held) in cases {
            let verdict = judge(&guard, state, dec(usage), Decimal::from(secs));
            assert_eq!(verdict.is_some(), held, "{case}: {verdict:?}");
        }
    }

    #[test]
    fn max_rate_per_hour_holds_new_series_too_and_a_zero_factor_turns_the_relative_test_off() {
        let guard = JumpGuard {
            max_rate_per_hour: Some(dec("1000")),
            jump_factor: Decimal::ZERO,
            jump_floor_per_hour: DEFAULT_FLOOR,
        };
        let at =
            |state, usage: &str, secs: i64| judge(&guard, state, dec(usage), Decimal::from(secs));
        assert!(matches!(
            at(None, "1001", 3600),
            Some(HoldReason::AboveMax { .. })
        ));
        assert_eq!(at(None, "1000", 3600), None, "exactly the limit is billed");
        assert_eq!(at(warm("1"), "999", 3600), None, "no relative test");
        assert!(
            matches!(
                at(None, "79228162514264337593543950335", 1),
                Some(HoldReason::AboveMax { rate: None, .. })
            ),
            "an overflowing rate is held"
        );
    }

    #[test]
    fn the_recent_rate_follows_billed_steps_with_a_one_hour_time_constant() {
        let first = update(None, dec("2"), dec("1800"));
        assert_eq!(
            first,
            Some(RateState {
                rate_per_hour: dec("4"),
                covered_seconds: 1800
            })
        );
        // Half an hour at 8/h moves 4 halfway to 8.
        let second = update(first, dec("4"), dec("1800"));
        assert_eq!(
            second,
            Some(RateState {
                rate_per_hour: dec("6"),
                covered_seconds: 3600
            })
        );
        // A step as long as the time constant replaces it.
        assert_eq!(
            update(second, dec("1"), dec("7200")).map(|s| s.rate_per_hour),
            Some(dec("0.5"))
        );
        // Alternating zero and catch-up steps average out.
        let mut state = warm("4");
        for i in 0..240 {
            let usage = if i % 2 == 0 {
                "0"
            } else {
                "0.0666666666666666666666666667"
            };
            state = update(state, dec(usage), dec("30"));
        }
        let rate = state.map(|s| s.rate_per_hour).unwrap_or_default();
        assert!(
            (rate - dec("4")).abs() < dec("0.1"),
            "mean of a chunky exporter: {rate}"
        );
    }

    #[test]
    fn a_held_step_is_left_out_and_the_cursor_moves_past_it() {
        let rule = rule("");
        let samples = [pt(60, "201.35"), pt(65, "1006.79"), pt(125, "1006.87")];
        let got = charge(&rule, pt(0, "201.28"), &samples, warm("4"));
        let billed: Vec<_> = got
            .charged
            .steps
            .iter()
            .map(|c| (c.from, c.to, c.quantity))
            .collect();
        assert_eq!(
            billed,
            vec![(t(0), t(60), dec("0.07")), (t(65), t(125), dec("0.08"))]
        );
        assert_eq!(got.held.len(), 1);
        let held = &got.held[0];
        assert_eq!((held.from, held.to), (pt(60, "201.35"), pt(65, "1006.79")));
        assert_eq!(
            (held.quantity, held.credits, held.price),
            (dec("805.44"), dec("805.44"), Some(dec("1")))
        );
        assert!(held.reason.contains("re-weighting"), "{}", held.reason);
        assert_eq!(got.charged.new_cursor, Some(pt(125, "1006.87")));
        // The estimate learnt from the billed steps only.
        assert!(got.state.map(|s| s.rate_per_hour).unwrap_or_default() < dec("6"));
    }

    #[test]
    fn a_revert_is_a_decrease_billed_by_the_policy_and_cancels_the_jump() {
        let rule = rule("");
        let samples = [pt(5, "1006.79"), pt(185, "1006.80"), pt(190, "201.58")];
        let got = charge(&rule, pt(0, "201.35"), &samples, warm("4"));
        assert_eq!(got.held.len(), 1);
        assert_eq!(got.charged.decreases.len(), 1, "the revert is a decrease");
        let d = got.charged.decreases[0];
        assert!(drop_cancels(got.held[0].quantity, d.from_value, d.to_value));
        assert_eq!(
            got.charged
                .steps
                .iter()
                .map(|c| c.quantity)
                .sum::<Decimal>(),
            dec("0.01")
        );
        assert!(
            !drop_cancels(dec("805.44"), dec("1006.80"), dec("900")),
            "a small drop does not"
        );
        assert!(
            !drop_cancels(dec("805.44"), dec("1"), dec("2")),
            "an increase does not"
        );
    }

    #[test]
    fn without_jumps_guarded_charges_equal_plain_ones() {
        for body in ["", "decrease_policy = \"restart\""] {
            let rule = rule(body);
            let samples = [pt(60, "1"), pt(120, "3"), pt(180, "2"), pt(240, "5")];
            let plain = charge::charge_series(&rule, &BTreeMap::new(), Some(pt(0, "0")), &samples)
                .unwrap_or_else(|e| panic!("{e}"));
            let guarded = charge(&rule, pt(0, "0"), &samples, warm("100"));
            assert_eq!(guarded.charged, plain, "{body}");
            assert!(guarded.held.is_empty());
        }
        let gauge = Rules::from_settings(
            &BTreeMap::new(),
            Some("[metrics.m]\nkind = \"gauge\"\nprice = 1"),
            "toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let gauge = gauge.get("m").cloned().unwrap_or_else(|| panic!("m"));
        let got = charge(&gauge, pt(0, "1"), &[pt(60, "100000")], warm("0"));
        assert!(got.held.is_empty(), "gauges are not guarded");
    }
}
