//! Samples billing cannot charge are quarantined, not allowed to stop a series.
//!
//! A value no exact decimal holds (`1e30`, `NaN`, `+Inf`) or a step whose charge
//! leaves the decimal range (alone, or added to the project's totals) is recorded
//! with its reason in `quarantined_samples`, and the cursor moves past it. Nothing is
//! billed across a quarantined sample: for a counter the next good sample is the new
//! baseline (as a `rebase` decrease), for a gauge the step is not billed (as a gap).
//! The rest of the series, and of the project, bills as usual.

use super::charge::{self, ChargeLine, Point, SeriesCharge};
use super::rules::Rule;
use crate::money::decimal_from_f64;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

/// A sample billing passed without charging it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quarantined {
    /// The sample's time.
    pub time: DateTime<Utc>,
    /// Its stored value.
    pub value: f64,
    /// Why it could not be billed.
    pub reason: String,
}

/// What charging one series' new samples produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Billed {
    /// Charges, decreases and gaps (its `new_cursor` is not used: see `cursor`).
    pub charge: SeriesCharge,
    /// The charges summed into ledger lines.
    pub lines: Vec<ChargeLine>,
    /// Samples passed without charging.
    pub quarantined: Vec<Quarantined>,
    /// The new cursor: the last sample's time, and its value unless it was
    /// quarantined (then the next sample is a new baseline); `None` without samples.
    pub cursor: Option<(DateTime<Utc>, Option<Decimal>)>,
}

/// The totals the charges of one series are added to: a charge that would take them
/// out of the decimal range is quarantined too.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    /// The project's used credits before this series.
    pub used: Decimal,
    /// Credits charged in this run before this series.
    pub charged: Decimal,
}

impl Totals {
    fn hold(&self, amount: Decimal) -> bool {
        self.used.checked_add(amount).is_some() && self.charged.checked_add(amount).is_some()
    }
}

/// Charges `samples` (time order) after `cursor` by `rule`, quarantining what cannot
/// be billed. `charge` charges exact points after a cursor (the plain charge, or the
/// jump guard's) and threads its own `state` (e.g. the guard's rate and held steps):
/// the usual case charges everything at once; when something cannot be billed,
/// sample by sample.
pub fn charge_series<S: Clone>(
    rule: &Rule,
    cursor: Option<Point>,
    samples: &[(DateTime<Utc>, f64)],
    totals: Totals,
    state: S,
    charge: impl Fn(Option<Point>, &[Point], S) -> Result<(SeriesCharge, S), charge::ChargeError>,
) -> Result<(Billed, S), charge::ChargeError> {
    let Some(&(last_time, _)) = samples.last() else {
        return Ok((Billed::default(), state));
    };
    // The usual case: every value exact, every sum in range.
    if let Some(points) = samples
        .iter()
        .map(|&(time, value)| {
            Some(Point {
                time,
                value: exact(value).ok()?,
            })
        })
        .collect::<Option<Vec<_>>>()
    {
        if let Ok((charged, after)) = charge(cursor, &points, state.clone()) {
            if let Ok(lines) = charge::summarize(&rule.metric, &charged.steps) {
                let total = lines
                    .iter()
                    .try_fold(Decimal::ZERO, |sum, line| sum.checked_add(line.amount));
                if total.is_some_and(|total| totals.hold(total)) {
                    let cursor = charged.new_cursor.map(|p| (p.time, Some(p.value)));
                    let billed = Billed {
                        charge: charged,
                        lines,
                        quarantined: Vec::new(),
                        cursor,
                    };
                    return Ok((billed, after));
                }
            }
        }
    }
    // Sample by sample: one that cannot be billed is quarantined and the next good
    // one starts anew.
    let mut out = Billed::default();
    let (mut previous, mut amount, mut quantity) = (cursor, Decimal::ZERO, Decimal::ZERO);
    let mut state = state;
    for &(time, value) in samples {
        let billed = exact(value).and_then(|value| {
            let (step, after) = charge(previous, &[Point { time, value }], state.clone())
                .map_err(|e| e.to_string())?;
            let sum = |start: Decimal, part: fn(&ChargeLine) -> Decimal| {
                step.steps
                    .iter()
                    .try_fold(start, |sum, s| sum.checked_add(part(s)))
            };
            match (sum(amount, |s| s.amount), sum(quantity, |s| s.quantity)) {
                (Some(a), Some(q)) if totals.hold(a) => Ok((step, after, a, q)),
                _ => Err("its charge leaves the exact decimal range".to_owned()),
            }
        });
        match billed {
            Ok((step, after, a, q)) => {
                (amount, quantity, state) = (a, q, after);
                previous = step.new_cursor;
                out.charge.steps.extend(step.steps);
                out.charge.decreases.extend(step.decreases);
                out.charge.gaps.extend(step.gaps);
            }
            Err(reason) => {
                out.quarantined.push(Quarantined {
                    time,
                    value,
                    reason,
                });
                previous = None;
            }
        }
    }
    out.lines = charge::summarize(&rule.metric, &out.charge.steps)?;
    out.cursor = Some(match previous {
        Some(p) if p.time == last_time => (p.time, Some(p.value)),
        _ => (last_time, None),
    });
    Ok((out, state))
}

/// A stored sample value as an exact decimal; magnitudes below what a decimal can
/// hold are zero usage.
fn exact(value: f64) -> Result<Decimal, String> {
    match decimal_from_f64(value) {
        Some(decimal) => Ok(decimal),
        None if value.is_finite() && value.abs() < 1.0 => Ok(Decimal::ZERO),
        None => Err(format!(
            "value {value:e} cannot be billed exactly (beyond the decimal range)"
        )),
    }
}

/// A quarantined sample as the project detail shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QuarantinedView {
    /// The sample's metric.
    #[schema(example = "project_vcpu_usage")]
    pub metric: String,
    /// The series' labels.
    #[schema(value_type = Object)]
    pub labels: serde_json::Value,
    /// The sample's time.
    pub time: DateTime<Utc>,
    /// Its stored value, as text (`1e30`, `NaN`).
    #[schema(example = "1e30")]
    pub value: String,
    /// Why it was not billed.
    pub reason: String,
    /// When billing met it.
    pub recorded_at: DateTime<Utc>,
}

/// The project's latest `limit` quarantined samples, newest first.
pub async fn latest(
    client: &tokio_postgres::Client,
    project: &str,
    limit: i64,
) -> anyhow::Result<Vec<QuarantinedView>> {
    use anyhow::Context;
    let rows = client
        .query(
            "SELECT s.metric, s.series_key, q.time, q.value, q.reason, q.recorded_at
             FROM quarantined_samples q JOIN series s ON s.id = q.series_id
             WHERE s.project = $1 ORDER BY q.time DESC, s.id LIMIT $2",
            &[&project, &limit],
        )
        .await
        .context("reading quarantined samples")?;
    use crate::store::col;
    rows.iter()
        .map(|row| {
            Ok(QuarantinedView {
                metric: col(row, "metric")?,
                labels: crate::store::series::labels_json(Some(col(row, "series_key")?))?,
                time: col(row, "time")?,
                value: format!("{:e}", col::<f64>(row, "value")?),
                reason: col(row, "reason")?,
                recorded_at: col(row, "recorded_at")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::rules::Rules;
    use chrono::TimeZone;
    use std::collections::BTreeMap;

    fn rule(body: &str) -> Rule {
        let file = format!("[metrics.m]\n{body}");
        let rules = Rules::from_settings(&BTreeMap::new(), Some(&file), "toml")
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        rules
            .get("m")
            .cloned()
            .unwrap_or_else(|| panic!("metric m"))
    }

    fn minute(m: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap() + chrono::Duration::minutes(m)
    }

    const ROOM: Totals = Totals {
        used: Decimal::ZERO,
        charged: Decimal::ZERO,
    };

    fn billed(rule: &Rule, cursor: Option<Point>, values: &[f64], totals: Totals) -> Billed {
        let samples: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (minute(i as i64 + 1), *v))
            .collect();
        let plain = |cursor, points: &[Point], ()| {
            charge::charge_series(rule, &BTreeMap::new(), cursor, points).map(|c| (c, ()))
        };
        charge_series(rule, cursor, &samples, totals, (), plain)
            .unwrap_or_else(|e| panic!("{values:?}: {e}"))
            .0
    }

    fn total(b: &Billed) -> Decimal {
        b.lines.iter().map(|l| l.amount).sum()
    }

    #[test]
    fn nothing_is_billed_across_a_quarantined_counter_value() {
        let counter = rule("kind = \"counter\"\nprice = \"1\"");
        let start = Some(Point {
            time: minute(0),
            value: Decimal::ONE,
        });
        // (case, values, credits billed, quarantined, the cursor's value)
        type Case<'a> = (&'a str, &'a [f64], i64, usize, Option<Option<i64>>);
        let cases: &[Case] = &[
            ("all good", &[2.0, 4.0], 3, 0, Some(Some(4))),
            (
                "a huge value in the middle",
                &[2.0, 1e30, 5.0, 7.0],
                1 + 2,
                1,
                Some(Some(7)),
            ),
            (
                "NaN and +Inf",
                &[f64::NAN, 3.0, f64::INFINITY, 4.0],
                0,
                2,
                Some(Some(4)),
            ),
            ("the last value is bad", &[2.0, 1e30], 1, 1, Some(None)),
        ];
        for (case, values, expected, quarantined, cursor) in cases {
            let b = billed(&counter, start, values, ROOM);
            assert_eq!(total(&b), Decimal::from(*expected), "{case}");
            assert_eq!(b.quarantined.len(), *quarantined, "{case}");
            assert_eq!(
                b.cursor
                    .map(|(_, v)| v.map(|v| v.try_into().unwrap_or(-1i64))),
                *cursor,
                "{case}"
            );
            assert_eq!(
                b.cursor.map(|(t, _)| t),
                Some(minute(values.len() as i64)),
                "{case}"
            );
        }
    }

    #[test]
    fn a_charge_beyond_the_totals_range_is_quarantined() {
        let counter = rule("kind = \"counter\"\nprice = \"1\"");
        let nearly_full = Totals {
            used: Decimal::MAX - Decimal::from(100),
            charged: Decimal::ZERO,
        };
        let b = billed(&counter, None, &[0.0, 5.0, 1e28, 13.0, 21.0], nearly_full);
        assert_eq!(total(&b), Decimal::from(5 + 8), "{b:?}");
        assert_eq!(b.quarantined.len(), 1, "{b:?}");
        assert!(b.quarantined[0].reason.contains("decimal range"), "{b:?}");
    }
}
