//! A project's credits history, oldest first: each usage row (or, with a step, each
//! metric's sum per bucket) with the project's used and granted totals after it, as
//! the old service answered. Totals are running sums in time order over every ledger
//! row (adjustments and grants included), so a range that starts mid-history still
//! counts what came before it. Whole days come from the day rollup.

use crate::store::col;
use crate::store::rollup::ORIGIN;
use anyhow::Context;
use chrono::{DateTime, Duration, DurationRound, TimeZone, Utc};
use deadpool_postgres::Client;
use rust_decimal::Decimal;

/// One history point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The row's time, or the bucket's start.
    pub time: DateTime<Utc>,
    /// The billed metric.
    pub metric: String,
    /// Exact credits charged by the row (or the metric in the bucket).
    pub charge: Decimal,
    /// The project's used credits after the row (or at the bucket's end).
    pub used_after: Decimal,
    /// The project's granted credits after the row (or at the bucket's end).
    pub granted_after: Decimal,
}

/// Later than any ledger row; stands for "no end".
fn far_future() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn day() -> Duration {
    Duration::days(1)
}

/// Midnight UTC at or before `t`.
fn day_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(day()).unwrap_or(t)
}

/// Midnight UTC at or after `t`.
fn day_ceil(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = day_floor(t);
    if floor == t {
        t
    } else {
        floor + day()
    }
}

/// The history of `project` with `from <= time <= to` (no end when `to` is `None`),
/// per row or, with `step`, per bucket of that length aligned to 2001-01-01T00:00Z
/// (days start at midnight UTC, weeks on Mondays).
pub async fn read(
    client: &Client,
    project: &str,
    from: DateTime<Utc>,
    to: Option<DateTime<Utc>>,
    step: Option<Duration>,
) -> anyhow::Result<Vec<Point>> {
    let to = to.unwrap_or_else(far_future);
    let (base, items) = futures::try_join!(
        totals_before(client, project, from),
        items(client, project, from, to, step)
    )?;
    running_totals(base, &items, step.is_some())
}

/// (used, granted) of the project before `from`: whole days from the rollup, the
/// rest of `from`'s day from the ledger.
async fn totals_before(
    client: &Client,
    project: &str,
    from: DateTime<Utc>,
) -> anyhow::Result<(Decimal, Decimal)> {
    let day_start = day_floor(from);
    let row = client
        .query_one(
            &client
                .prepare_cached(
                    "SELECT coalesce(sum(u), 0) AS used, coalesce(sum(g), 0) AS granted FROM (
                         SELECT used_delta AS u, granted_delta AS g FROM ledger_daily
                         WHERE project = $1 AND day < $2
                         UNION ALL
                         SELECT used_delta, granted_delta FROM ledger
                         WHERE project = $1 AND time >= $2 AND time < $3) x",
                )
                .await?,
            &[&project, &day_start, &from],
        )
        .await
        .context("summing the history before the range")?;
    Ok((col(&row, "used")?, col(&row, "granted")?))
}

/// A row or bucket as read: time, metric (`''` for grants and adjustments), and the
/// changes of used and granted credits.
type Item = (DateTime<Utc>, String, Decimal, Decimal);

async fn items(
    client: &Client,
    project: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Option<Duration>,
) -> anyhow::Result<Vec<Item>> {
    let rows = match step {
        None => client
            .query(
                &client
                    .prepare_cached(
                        "SELECT time, CASE WHEN kind = 'usage' THEN coalesce(metric, '') ELSE '' END AS metric,
                                used_delta, granted_delta
                         FROM ledger WHERE project = $1 AND time >= $2 AND time <= $3
                         ORDER BY time, id",
                    )
                    .await?,
                &[&project, &from, &to],
            )
            .await
            .context("reading the credits history")?,
        Some(step) => {
            // Whole days inside the range come from the rollup when buckets are whole
            // days (so a day never straddles two buckets); the partial first and
            // last day, and every row for shorter steps, from the ledger.
            let (mut whole_from, mut whole_to) = (day_ceil(from), day_floor(to));
            if step.num_seconds() % 86_400 != 0 || whole_from >= whole_to {
                (whole_from, whole_to) = (from, from);
            }
            // Exact: steps are whole seconds, far below 2^53.
            let seconds = step.num_seconds() as f64;
            client
                .query(
                    &client
                        .prepare_cached(&format!(
                            "SELECT date_bin(make_interval(secs => $6), t, {ORIGIN}) AS time, m AS metric,
                                    sum(u) AS used_delta, sum(g) AS granted_delta
                             FROM (
                                 SELECT day AS t, metric AS m, used_delta AS u, granted_delta AS g
                                 FROM ledger_daily
                                 WHERE project = $1 AND day >= $4 AND day < $5
                                 UNION ALL
                                 SELECT time, CASE WHEN kind = 'usage' THEN coalesce(metric, '') ELSE '' END,
                                        used_delta, granted_delta
                                 FROM ledger
                                 WHERE project = $1
                                   AND ((time >= $2 AND time < $4) OR (time >= $5 AND time <= $3))
                             ) x
                             GROUP BY 1, 2 ORDER BY 1, 2"
                        ))
                        .await?,
                    &[&project, &from, &to, &whole_from, &whole_to, &seconds],
                )
                .await
                .context("reading the bucketed credits history")?
        }
    };
    rows.iter()
        .map(|r| {
            Ok((
                col(r, "time")?,
                col(r, "metric")?,
                col(r, "used_delta")?,
                col(r, "granted_delta")?,
            ))
        })
        .collect()
}

/// Turns rows (or, `bucketed`, per-metric bucket sums) in time order into usage
/// points with the totals after each row; all points of one bucket share the totals
/// at its end. Grants and adjustments (metric `''`) count but are not points.
pub fn running_totals(
    (mut used, mut granted): (Decimal, Decimal),
    items: &[Item],
    bucketed: bool,
) -> anyhow::Result<Vec<Point>> {
    let overflow = || anyhow::anyhow!("the credits history does not fit a decimal");
    let mut points = Vec::with_capacity(items.len());
    let mut start = 0;
    while start < items.len() {
        let mut end = start + 1;
        while bucketed && end < items.len() && items[end].0 == items[start].0 {
            end += 1;
        }
        let group = &items[start..end];
        for (_, _, used_delta, granted_delta) in group {
            used = used.checked_add(*used_delta).ok_or_else(overflow)?;
            granted = granted.checked_add(*granted_delta).ok_or_else(overflow)?;
        }
        points.extend(
            group
                .iter()
                .filter(|(_, metric, ..)| !metric.is_empty())
                .map(|(time, metric, charge, _)| Point {
                    time: *time,
                    metric: metric.clone(),
                    charge: *charge,
                    used_after: used,
                    granted_after: granted,
                }),
        );
        start = end;
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 20, hour, 0, 0)
            .single()
            .unwrap_or_else(|| panic!("valid time"))
    }

    fn item(hour: u32, metric: &str, used: i64, granted: i64) -> Item {
        (
            at(hour),
            metric.to_owned(),
            Decimal::from(used),
            Decimal::from(granted),
        )
    }

    #[test]
    fn each_row_carries_the_totals_after_it_counting_grants_and_adjustments() {
        let items = [
            item(1, "cpu", 2, 0),
            item(1, "mb", 3, 0),
            item(2, "", -1, 100),
            item(3, "cpu", 4, 0),
        ];
        let points = running_totals((Decimal::from(10), Decimal::ZERO), &items, false)
            .unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<(u32, &str, i64, i64, i64)> = points
            .iter()
            .map(|p| {
                (
                    chrono::Timelike::hour(&p.time),
                    p.metric.as_str(),
                    i64::try_from(p.charge).unwrap_or(0),
                    i64::try_from(p.used_after).unwrap_or(0),
                    i64::try_from(p.granted_after).unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (1, "cpu", 2, 12, 0),
                (1, "mb", 3, 15, 0),
                (3, "cpu", 4, 18, 100)
            ]
        );
    }

    #[test]
    fn a_bucket_shares_the_totals_at_its_end() {
        let items = [
            item(1, "", 0, 50),
            item(1, "cpu", 2, 0),
            item(1, "mb", 3, 0),
        ];
        let points = running_totals((Decimal::ZERO, Decimal::ZERO), &items, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(points.len(), 2);
        assert!(points
            .iter()
            .all(|p| p.used_after == Decimal::from(5) && p.granted_after == Decimal::from(50)));
    }

    #[test]
    fn partial_days_are_cut_at_midnight_utc() {
        let t = Utc
            .with_ymd_and_hms(2026, 11, 20, 10, 30, 0)
            .single()
            .unwrap_or_else(|| panic!("t"));
        assert_eq!(
            day_floor(t),
            Utc.with_ymd_and_hms(2026, 11, 20, 0, 0, 0)
                .single()
                .unwrap_or_else(|| panic!("t"))
        );
        assert_eq!(
            day_ceil(t),
            Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 0)
                .single()
                .unwrap_or_else(|| panic!("t"))
        );
        assert_eq!(day_ceil(day_floor(t)), day_floor(t));
    }
}
