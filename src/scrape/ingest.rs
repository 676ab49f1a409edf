//! From exposition text to stored samples: keep billed samples that name a project,
//! add target labels, map label sets to series, store atomically.

use super::parse::{self, Sample};
use super::ScrapeError;
use crate::config::Settings;
use crate::store::samples::{self, SampleRow, StoreOutcome};
use crate::store::series::{write_series_key, NewSeries, SeriesCache, SeriesState};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// What decides which samples of a target are kept.
#[derive(Debug, Clone)]
pub struct IngestContext {
    /// Metric names that are billed; everything else is ignored.
    pub billed: HashSet<String>,
    /// The label naming the project.
    pub project_label: String,
    /// When set, only these projects are kept.
    pub whitelist: Option<BTreeSet<String>>,
    /// Labels added to every sample (an exposed label of the same name wins).
    pub target_labels: BTreeMap<String, String>,
}

impl IngestContext {
    /// The context for one target.
    pub fn new(settings: &Settings, target_labels: BTreeMap<String, String>) -> Self {
        Self {
            billed: settings
                .metrics_to_bill
                .keys()
                .map(|m| m.as_str().to_owned())
                .collect(),
            project_label: settings.project_label.clone(),
            whitelist: settings.project_whitelist.clone(),
            target_labels,
        }
    }
}

/// Billed samples that were not kept, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// No (or an empty) project label.
    pub no_project: u64,
    /// Project not on `OS_CREDITS_PROJECT_WHITELIST`.
    pub not_whitelisted: u64,
    /// NaN or infinite value: not usage.
    pub not_finite: u64,
    /// Series whose identity is too long to index (over 2 KiB of labels).
    pub too_long: u64,
}

/// A parsed body, split into samples of known series and of series still to create.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Samples of series the cache knows.
    pub rows: Vec<SampleRow>,
    /// Series seen for the first time.
    pub new_series: Vec<NewSeries>,
    /// Samples of new series: index into `new_series`, time, value.
    pub new_rows: Vec<(usize, DateTime<Utc>, f64)>,
    /// Samples not kept.
    pub skipped: Skipped,
    /// Parser statistics.
    pub stats: parse::ParseStats,
}

/// What one ingest did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Samples written.
    pub stored: u64,
    /// Samples already stored (same series and time) or repeated in the body.
    pub duplicates: u64,
    /// Samples not kept.
    pub skipped: Skipped,
}

/// Longest series identity that can be indexed (see `sql/0001_series_and_samples.sql`).
const MAX_SERIES_KEY_BYTES: usize = 2048;

/// Parses `body` and sorts its samples by whether their series is known. Pure CPU
/// work; samples without a timestamp get `scrape_time`.
pub fn prepare(
    body: &str,
    ctx: &IngestContext,
    state: &SeriesState,
    scrape_time: DateTime<Utc>,
) -> Result<Prepared, parse::ParseError> {
    let mut prepared = Prepared::default();
    let mut new_index: HashMap<String, usize> = HashMap::new();
    let mut key = String::with_capacity(256);
    let stats = parse::parse(
        body,
        |name| ctx.billed.contains(name),
        |mut sample: Sample<'_>| {
            sample.labels.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let project = label(&sample.labels, &ctx.project_label)
                .or_else(|| {
                    ctx.target_labels
                        .get(&ctx.project_label)
                        .map(String::as_str)
                })
                .unwrap_or_default();
            let skipped = &mut prepared.skipped;
            if project.is_empty() {
                skipped.no_project += 1;
                return;
            }
            if ctx.whitelist.as_ref().is_some_and(|w| !w.contains(project)) {
                skipped.not_whitelisted += 1;
                return;
            }
            if !sample.value.is_finite() {
                skipped.not_finite += 1;
                return;
            }
            let time = sample
                .timestamp_ms
                .and_then(DateTime::from_timestamp_millis)
                .unwrap_or(scrape_time);
            write_series_key(
                &mut key,
                sample.name,
                merged(&sample.labels, &ctx.target_labels),
            );
            if key.len() > MAX_SERIES_KEY_BYTES {
                skipped.too_long += 1;
                return;
            }
            if let Some(series_id) = state.id(&key) {
                prepared.rows.push(SampleRow {
                    series_id,
                    time,
                    value: sample.value,
                });
                return;
            }
            let index = *new_index.entry(key.clone()).or_insert_with(|| {
                prepared.new_series.push(NewSeries {
                    key: key.clone(),
                    metric: sample.name.to_owned(),
                    labels: merged(&sample.labels, &ctx.target_labels)
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    project: project.to_owned(),
                });
                prepared.new_series.len() - 1
            });
            prepared.new_rows.push((index, time, sample.value));
        },
    )?;
    prepared.stats = stats;
    Ok(prepared)
}

/// Parses and stores one body atomically: on a parse error nothing is stored.
pub async fn ingest(
    pool: &Pool,
    cache: &SeriesCache,
    ctx: Arc<IngestContext>,
    body: String,
    scrape_time: DateTime<Utc>,
) -> Result<IngestOutcome, ScrapeError> {
    let parse_cache = cache.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        parse_cache.read(|state| prepare(&body, &ctx, state, scrape_time))
    })
    .await
    .map_err(|e| ScrapeError::Store(anyhow::Error::new(e).context("parse task failed")))??;
    let skipped = prepared.skipped;
    let outcome = store_prepared(pool, cache, prepared)
        .await
        .map_err(ScrapeError::Store)?;
    Ok(IngestOutcome {
        stored: outcome.stored,
        duplicates: outcome.duplicates,
        skipped,
    })
}

/// Creates the new series, then stores all samples in one transaction.
pub async fn store_prepared(
    pool: &Pool,
    cache: &SeriesCache,
    prepared: Prepared,
) -> anyhow::Result<StoreOutcome> {
    let mut client = pool.get().await?;
    let Prepared {
        mut rows,
        new_series,
        new_rows,
        ..
    } = prepared;
    if !new_series.is_empty() {
        let ids = cache.resolve(&client, &new_series).await?;
        rows.reserve(new_rows.len());
        for (index, time, value) in new_rows {
            let key = &new_series[index].key;
            let series_id = *ids
                .get(key)
                .ok_or_else(|| anyhow::anyhow!("series {key} was not created"))?;
            rows.push(SampleRow {
                series_id,
                time,
                value,
            });
        }
    }
    samples::store(&mut client, cache, rows).await
}

fn label<'s>(labels: &'s [(&str, Cow<'_, str>)], name: &str) -> Option<&'s str> {
    labels
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_ref())
}

/// Sample labels and target labels, merged in name order; on a clash the sample's wins.
fn merged<'a>(
    sample: &'a [(&'a str, Cow<'a, str>)],
    target: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    let mut own = sample.iter().map(|(k, v)| (*k, v.as_ref())).peekable();
    let mut added = target
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .peekable();
    std::iter::from_fn(move || match (own.peek(), added.peek()) {
        (Some(a), Some(b)) if a.0 == b.0 => {
            added.next();
            own.next()
        }
        (Some(a), Some(b)) if b.0 < a.0 => added.next(),
        (Some(_), _) => own.next(),
        (None, _) => added.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_labels_merge_in_order_and_exposed_labels_win() {
        let sample = vec![("b", Cow::Borrowed("own")), ("d", Cow::Borrowed("4"))];
        let target: BTreeMap<String, String> =
            [("a", "1"), ("b", "target"), ("c", "3"), ("e", "5")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let merged: Vec<_> = merged(&sample, &target).collect();
        assert_eq!(
            merged,
            vec![("a", "1"), ("b", "own"), ("c", "3"), ("d", "4"), ("e", "5")]
        );
    }
}
