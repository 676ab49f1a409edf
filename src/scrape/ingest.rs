//! From exposition text to stored samples: keep billed samples that name a project,
//! add target labels, map label sets to series, store atomically.

use super::parse::{self, Sample};
use super::ScrapeError;
use crate::config::Settings;
use crate::store::samples::{self, SampleBatch, SampleRow};
use crate::store::series::{self, write_series_key, NewSeries, Resolved, SeriesCache, SeriesState};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;

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
            billed: settings.rules.metric_names().map(str::to_owned).collect(),
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
    /// A project name the API could never serve: blank, over 255 bytes, or with a
    /// NUL.
    pub bad_project: u64,
    /// A label value with a NUL character, which PostgreSQL text cannot store.
    pub nul_label: u64,
}

impl Skipped {
    /// The counts by reason, as the `reason` label of the dropped-samples metric.
    pub fn by_reason(&self) -> [(&'static str, u64); 6] {
        [
            ("no_project", self.no_project),
            ("not_whitelisted", self.not_whitelisted),
            ("not_finite", self.not_finite),
            ("too_long", self.too_long),
            ("bad_project", self.bad_project),
            ("nul_label", self.nul_label),
        ]
    }
}

/// Longest project name the API serves, in bytes (as `ProjectName` in the API).
const MAX_PROJECT_BYTES: usize = 255;

/// Whether the API could serve `project` (see `api::input::ProjectName`).
fn servable_project(project: &str) -> bool {
    !project.trim().is_empty()
        && project.len() <= MAX_PROJECT_BYTES
        && !project.chars().any(|c| c == '\0')
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Samples written.
    pub stored: u64,
    /// Samples already stored (same series and time) or repeated in the body.
    pub duplicates: u64,
    /// Samples not kept.
    pub skipped: Skipped,
    /// The billed series the body held (for completeness: see `super::completeness`).
    pub series: Vec<i64>,
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
        |sample: Sample<'_>| {
            sort_sample(
                &mut prepared,
                &mut new_index,
                &mut key,
                ctx,
                state,
                sample,
                scrape_time,
            )
        },
    )?;
    prepared.stats = stats;
    Ok(prepared)
}

/// Samples decoded elsewhere (a remote-write batch) sorted as [`prepare`] sorts parsed
/// ones: the same filters, series keys and skip reasons. Samples of metrics that are
/// not billed are ignored, as the parser ignores them.
pub fn prepare_samples<'a>(
    samples: impl IntoIterator<Item = Sample<'a>>,
    ctx: &IngestContext,
    state: &SeriesState,
    default_time: DateTime<Utc>,
) -> Prepared {
    let mut prepared = Prepared::default();
    let mut new_index: HashMap<String, usize> = HashMap::new();
    let mut key = String::with_capacity(256);
    for sample in samples {
        if ctx.billed.contains(sample.name) {
            sort_sample(
                &mut prepared,
                &mut new_index,
                &mut key,
                ctx,
                state,
                sample,
                default_time,
            );
        }
    }
    prepared
}

/// Where one billed sample goes: a row of a known series, a row of a new series, or a
/// skip reason. The one place where samples of every source become rows.
fn sort_sample(
    prepared: &mut Prepared,
    new_index: &mut HashMap<String, usize>,
    key: &mut String,
    ctx: &IngestContext,
    state: &SeriesState,
    mut sample: Sample<'_>,
    scrape_time: DateTime<Utc>,
) {
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
    if !servable_project(project) {
        skipped.bad_project += 1;
        return;
    }
    if merged(&sample.labels, &ctx.target_labels).any(|(_, v)| v.contains('\0')) {
        skipped.nul_label += 1;
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
    write_series_key(key, sample.name, merged(&sample.labels, &ctx.target_labels));
    if key.len() > MAX_SERIES_KEY_BYTES {
        skipped.too_long += 1;
        return;
    }
    if let Some(series_id) = state.id(key) {
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
}

/// Bytes of exposition text parsed at a time: each chunk streams into `COPY` while
/// the next one is parsed, so parsing hides behind the database's work.
const CHUNK_BYTES: usize = 1 << 20;

/// Parses and stores one body atomically: all its kept samples, or (on a parse
/// error anywhere, or any failure) none.
pub async fn ingest(
    pool: &Pool,
    cache: &SeriesCache,
    ctx: Arc<IngestContext>,
    body: String,
    scrape_time: DateTime<Utc>,
) -> Result<IngestOutcome, ScrapeError> {
    let (sender, receiver) = mpsc::channel(2);
    let parse_cache = cache.clone();
    let parser = tokio::task::spawn_blocking(move || {
        parse_chunks(&body, &ctx, &parse_cache, scrape_time, &sender)
    });
    let stored = store_stream(pool, cache, receiver).await;
    parser
        .await
        .map_err(|e| ScrapeError::Store(anyhow::Error::new(e).context("parse task failed")))?;
    stored
}

/// Stores samples sorted by [`prepare_samples`] atomically, through the same `COPY`
/// and merge as parsed bodies: samples already stored count as duplicates.
pub async fn store_prepared(
    pool: &Pool,
    cache: &SeriesCache,
    prepared: Prepared,
) -> Result<IngestOutcome, ScrapeError> {
    let (sender, receiver) = mpsc::channel(1);
    // The channel has room for this one message and the receiver is alive.
    let _ = sender.send(Ok(prepared)).await;
    drop(sender);
    store_stream(pool, cache, receiver).await
}

/// Parses `body` chunk by chunk (chunks end at line ends), sending each result; stops
/// at the first error or when the receiver is gone.
fn parse_chunks(
    body: &str,
    ctx: &IngestContext,
    cache: &SeriesCache,
    scrape_time: DateTime<Utc>,
    sender: &mpsc::Sender<Result<Prepared, parse::ParseError>>,
) {
    let mut lines_before = 0;
    let mut rest = body;
    while !rest.is_empty() {
        let cut = match rest.len() > CHUNK_BYTES {
            true => rest[CHUNK_BYTES..]
                .find('\n')
                .map_or(rest.len(), |i| CHUNK_BYTES + i + 1),
            false => rest.len(),
        };
        let (chunk, tail) = rest.split_at(cut);
        rest = tail;
        let result = cache
            .read(|state| prepare(chunk, ctx, state, scrape_time))
            .map_err(|mut e| {
                e.line += lines_before;
                e
            });
        lines_before += chunk.bytes().filter(|&b| b == b'\n').count();
        let failed = result.is_err();
        if sender.blocking_send(result).is_err() || failed {
            return;
        }
    }
}

/// Everything a body yielded, kept for the cache update and a possible retry.
#[derive(Default)]
struct Collected {
    rows: Vec<SampleRow>,
    new_series: Vec<NewSeries>,
    new_index: HashMap<String, usize>,
    new_rows: Vec<(usize, DateTime<Utc>, f64)>,
    skipped: Skipped,
}

impl Collected {
    fn add(&mut self, prepared: Prepared) {
        self.rows.extend_from_slice(&prepared.rows);
        let mut local_to_global = Vec::with_capacity(prepared.new_series.len());
        for series in prepared.new_series {
            let next = self.new_series.len();
            let index = *self.new_index.entry(series.key.clone()).or_insert(next);
            if index == next {
                self.new_series.push(series);
            }
            local_to_global.push(index);
        }
        self.new_rows.extend(
            prepared
                .new_rows
                .into_iter()
                .map(|(i, time, value)| (local_to_global[i], time, value)),
        );
        let (s, p) = (&mut self.skipped, prepared.skipped);
        s.no_project += p.no_project;
        s.not_whitelisted += p.not_whitelisted;
        s.not_finite += p.not_finite;
        s.too_long += p.too_long;
        s.bad_project += p.bad_project;
        s.nul_label += p.nul_label;
    }

    fn total(&self) -> u64 {
        (self.rows.len() + self.new_rows.len()) as u64
    }

    /// Rows of the new series, now that their ids are known.
    fn new_series_rows(&self, resolved: &Resolved) -> anyhow::Result<Vec<SampleRow>> {
        self.new_rows
            .iter()
            .map(|&(index, time, value)| {
                let key = &self.new_series[index].key;
                let series_id = *resolved
                    .ids
                    .get(key)
                    .ok_or_else(|| anyhow::anyhow!("series {key} was neither created nor found"))?;
                Ok(SampleRow {
                    series_id,
                    time,
                    value,
                })
            })
            .collect()
    }
}

/// Receives parsed chunks and streams them into one transaction. When the optimistic
/// direct `COPY` meets a duplicate (another writer got there first), everything is
/// stored again through the merging path.
async fn store_stream(
    pool: &Pool,
    cache: &SeriesCache,
    mut receiver: mpsc::Receiver<Result<Prepared, parse::ParseError>>,
) -> Result<IngestOutcome, ScrapeError> {
    let mut client = pool.get().await.map_err(|e| ScrapeError::Store(e.into()))?;
    let mut collected = Collected::default();
    let mut batch = SampleBatch::begin(&mut client)
        .await
        .map_err(ScrapeError::Store)?;
    let mut failure = None;
    while let Some(chunk) = receiver.recv().await {
        let prepared = chunk?;
        if failure.is_none() {
            let newer = cache.all_newer(&prepared.rows);
            failure = batch.push(&prepared.rows, newer).await.err();
        }
        collected.add(prepared);
    }
    let attempt = match failure {
        Some(e) => {
            drop(batch); // rolls back
            Err(e)
        }
        None => finish(batch, &collected, false).await,
    };
    let (stored, resolved) = match attempt {
        Ok(done) => done,
        Err(e) if samples::is_unique_violation(&e) => {
            tracing::debug!("direct COPY met a stored sample; merging instead");
            let batch = SampleBatch::begin(&mut client)
                .await
                .map_err(ScrapeError::Store)?;
            finish(batch, &collected, true)
                .await
                .map_err(ScrapeError::Store)?
        }
        Err(e) => return Err(ScrapeError::Store(e)),
    };
    cache.remember(&resolved);
    samples::remember_stored(cache, &collected.rows);
    samples::remember_stored(
        cache,
        &collected
            .new_series_rows(&resolved)
            .map_err(ScrapeError::Store)?,
    );
    let series = collected
        .rows
        .iter()
        .map(|r| r.series_id)
        .chain(
            collected
                .new_series
                .iter()
                .filter_map(|s| resolved.ids.get(&s.key).copied()),
        )
        .collect();
    Ok(IngestOutcome {
        stored,
        duplicates: collected.total() - stored,
        skipped: collected.skipped,
        series,
    })
}

/// Creates the new series in the batch's transaction, writes their rows (and, when
/// `merge_all`, every row through the merging path) and commits.
async fn finish(
    mut batch: SampleBatch<'_>,
    collected: &Collected,
    merge_all: bool,
) -> anyhow::Result<(u64, Resolved)> {
    if merge_all {
        batch.push(&collected.rows, false).await?;
    }
    let resolved = match collected.new_series.is_empty() {
        true => Resolved::default(),
        false => series::create_or_find(batch.transaction().await?, &collected.new_series).await?,
    };
    let new_rows = collected.new_series_rows(&resolved)?;
    let created: HashSet<i64> = resolved.created.iter().copied().collect();
    let all_created = !merge_all && new_rows.iter().all(|r| created.contains(&r.series_id));
    batch.push(&new_rows, all_created).await?;
    Ok((batch.commit().await?, resolved))
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
