//! Completeness: which billed series each target returned last time and now.
//!
//! A federating Prometheus answers `200` with **no** series of an exporter that is
//! down, and a single series can vanish while the rest keep coming. Both stop
//! billing without an error, so both are reported: per target the number of billed
//! series of the last scrape and the one before (a target that returned some and
//! now returns none makes `/health` `degraded`), and each series that a target
//! returned in one scrape and not in the next is recorded in `stale_series` (listed
//! per project, counted in `os_credits_stale_series`) until it appears again.
//!
//! The series of the previous scrape are kept in memory per target, so the first
//! scrape after a start (or after the target moved to this replica) only sets them.

use crate::store::col;
use anyhow::Context;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;

/// When a target was scraped and the (sorted) series it returned.
type Seen = (DateTime<Utc>, Vec<i64>);

/// The series each target returned in its last successful scrape.
#[derive(Debug, Default)]
pub struct Completeness {
    last: Mutex<HashMap<String, Seen>>,
}

/// What changed between two scrapes of a target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Returned last time, not now.
    pub gone: Vec<i64>,
    /// Returned now, not last time (new, or back after being missing).
    pub appeared: Vec<i64>,
    /// When the target last returned the gone ones; `None` on the first scrape.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Billed series returned now.
    pub count: u64,
}

/// Series in sorted, deduplicated `before` but not in `after`, and the other way round.
pub fn diff(before: &[i64], after: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let (mut gone, mut appeared) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < before.len() || j < after.len() {
        match (before.get(i), after.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                gone.push(*a);
                i += 1;
            }
            (Some(a), None) => {
                gone.push(*a);
                i += 1;
            }
            (_, Some(b)) => {
                appeared.push(*b);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (gone, appeared)
}

impl Completeness {
    /// Remembers the series (any order) a target returned in a scrape at `at`;
    /// answers what changed since its previous one.
    pub fn observe(&self, target: &str, at: DateTime<Utc>, mut series: Vec<i64>) -> Change {
        series.sort_unstable();
        series.dedup();
        let count = series.len() as u64;
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = last.insert(target.to_owned(), (at, series));
        let Some((seen_at, before)) = previous else {
            let appeared = last.get(target).map(|(_, s)| s.clone()).unwrap_or_default();
            return Change {
                appeared,
                count,
                ..Change::default()
            };
        };
        let now = last
            .get(target)
            .map(|(_, s)| s.as_slice())
            .unwrap_or_default();
        let (gone, appeared) = diff(&before, now);
        Change {
            gone,
            appeared,
            last_seen_at: Some(seen_at),
            count,
        }
    }
}

/// Records a successful scrape's completeness: the target's billed-series counts,
/// series gone missing, series back. Returns the target's stale series now.
pub async fn record(
    client: &tokio_postgres::Client,
    target: &str,
    at: DateTime<Utc>,
    change: &Change,
) -> anyhow::Result<i64> {
    let count = i64::try_from(change.count).unwrap_or(i64::MAX);
    client
        .execute(
            "UPDATE scrape_targets SET billed_series_before = billed_series, billed_series = $2::bigint,
                 billed_series_last_nonzero = CASE WHEN $2::bigint > 0 THEN $2::bigint ELSE billed_series_last_nonzero END,
                 billed_series_nonzero_at = CASE WHEN $2::bigint > 0 THEN $3::timestamptz ELSE billed_series_nonzero_at END
             WHERE name = $1",
            &[&target, &count, &at],
        )
        .await
        .context("recording the target's billed series")?;
    // Rows written to stale_series change project details answered from memory.
    let mut changed = 0;
    if !change.appeared.is_empty() {
        changed += client
            .execute(
                "DELETE FROM stale_series WHERE series_id = ANY($1::bigint[])",
                &[&change.appeared],
            )
            .await
            .context("clearing series that are back")?;
    }
    if let (false, Some(seen)) = (change.gone.is_empty(), change.last_seen_at) {
        changed += client
            .execute(
                "INSERT INTO stale_series (series_id, target, last_seen_at, missing_since)
                 SELECT id, $2, $3, $4 FROM unnest($1::bigint[]) AS id
                 ON CONFLICT (series_id) DO NOTHING",
                &[&change.gone, &target, &seen, &at],
            )
            .await
            .context("recording series gone missing")?;
        tracing::warn!(
            %target,
            series = change.gone.len(),
            "billed series stopped appearing: billing for them has stopped"
        );
    }
    if changed > 0 {
        crate::store::changes::fence(client).await;
    }
    let row = client
        .query_one(
            "SELECT count(*) AS stale FROM stale_series WHERE target = $1",
            &[&target],
        )
        .await
        .context("counting stale series")?;
    col(&row, "stale")
}

/// A series that stopped appearing.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct StaleSeries {
    /// The series' metric.
    pub metric: String,
    /// Its full label set.
    #[schema(value_type = Object)]
    pub labels: serde_json::Value,
    /// The target that returned it.
    pub target: String,
    /// The last scrape that returned it.
    pub last_seen_at: DateTime<Utc>,
    /// The first scrape that did not.
    pub missing_since: DateTime<Utc>,
}

/// A project's stale series, longest missing first.
pub async fn of_project(
    client: &tokio_postgres::Client,
    project: &str,
) -> anyhow::Result<Vec<StaleSeries>> {
    let rows = client
        .query(
            "SELECT s.metric, s.series_key, x.target, x.last_seen_at, x.missing_since
             FROM stale_series x JOIN series s ON s.id = x.series_id
             WHERE s.project = $1 ORDER BY x.missing_since, s.metric, s.id LIMIT 1000",
            &[&project],
        )
        .await
        .context("reading stale series")?;
    rows.iter()
        .map(|r| {
            Ok(StaleSeries {
                metric: col(r, "metric")?,
                labels: crate::store::series::labels_json(Some(col(r, "series_key")?))?,
                target: col(r, "target")?,
                last_seen_at: col(r, "last_seen_at")?,
                missing_since: col(r, "missing_since")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_finds_series_gone_and_appeared() {
        type Case<'a> = (&'a str, &'a [i64], &'a [i64], &'a [i64], &'a [i64]);
        let cases: [Case<'_>; 5] = [
            ("same", &[1, 2, 3], &[1, 2, 3], &[], &[]),
            ("one gone", &[1, 2, 3], &[1, 3], &[2], &[]),
            ("target empty", &[1, 2], &[], &[1, 2], &[]),
            ("new ones", &[2], &[1, 2, 5], &[], &[1, 5]),
            ("mixed", &[1, 4, 6], &[2, 4, 7], &[1, 6], &[2, 7]),
        ];
        for (case, before, after, gone, appeared) in cases {
            assert_eq!(
                diff(before, after),
                (gone.to_vec(), appeared.to_vec()),
                "{case}"
            );
        }
    }

    #[test]
    fn the_first_scrape_only_sets_what_a_target_returns() {
        let c = Completeness::default();
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        let t1 = t0 + chrono::Duration::seconds(60);
        let first = c.observe("a", t0, vec![3, 1, 2, 2]);
        assert_eq!(
            (first.gone, first.last_seen_at, first.count),
            (vec![], None, 3)
        );
        let second = c.observe("a", t1, vec![1]);
        assert_eq!(second.gone, vec![2, 3]);
        assert_eq!(second.last_seen_at, Some(t0));
        let other = c.observe("b", t1, vec![2]);
        assert!(other.gone.is_empty(), "targets are apart");
    }
}
