//! One ingest path for every source. A source turns what it received into
//! [`Sample`]s: scraping and `/federate` through the text exposition parser
//! ([`text`]), remote write by decoding its protobuf (`crate::receive`). Here each
//! sample goes through the same filters (billed metric, project label, whitelist,
//! storable labels, finite value), gets its series key, and all of a body or batch is
//! stored atomically by [`store`]: the same `COPY`/merge, the same outcomes, never a
//! sample twice. [`completeness`] then follows which billed series each source still
//! delivers.

pub mod completeness;
pub mod parse;
pub mod store;
pub mod text;

pub use parse::Sample;
pub use store::store_prepared;
pub use text::{ingest_text, prepare};

use crate::billing::rules::Rules;
use crate::store::samples::SampleRow;
use crate::store::series::{write_series_key, NewSeries, SeriesState};
use chrono::{DateTime, Utc};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Why a body or batch was not stored. Nothing of it was.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The text is not a valid exposition.
    #[error("unparseable exposition, nothing stored: {0}")]
    Parse(#[from] parse::ParseError),
    /// The database could not store the samples; a later attempt may.
    #[error("storing samples failed: {0:#}")]
    Store(#[source] anyhow::Error),
}

impl IngestError {
    /// A few fixed words for metric labels, never the message.
    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::Parse(_) => "unparseable",
            IngestError::Store(_) => "store_failed",
        }
    }
}

/// What ingest reads of the settings, whatever the source.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// `PROJECT_LABEL`: the label whose value names the project.
    pub project_label: String,
    /// `OS_CREDITS_PROJECT_WHITELIST`: when set, only these projects are stored (and
    /// billed).
    pub project_whitelist: Option<BTreeSet<String>>,
}

/// What decides which samples of a target are kept.
#[derive(Debug)]
pub struct IngestContext {
    /// Metric names that are billed; everything else is ignored.
    pub billed: HashSet<String, foldhash::fast::RandomState>,
    /// The label naming the project.
    pub project_label: String,
    /// When set, only these projects are kept.
    pub whitelist: Option<BTreeSet<String>>,
    /// Labels added to every sample (an exposed label of the same name wins).
    pub target_labels: BTreeMap<String, String>,
    /// The series of the last text body parsed with this context, in order (see
    /// [`text::Layout`]).
    pub(crate) layout: std::sync::Mutex<text::Layout>,
}

impl IngestContext {
    /// The context for one target (or sender): the billed metrics come from the
    /// rules, the one source of truth for them.
    pub fn new(
        settings: &IngestSettings,
        rules: &Rules,
        target_labels: BTreeMap<String, String>,
    ) -> Self {
        Self {
            billed: rules.metric_names().map(str::to_owned).collect(),
            project_label: settings.project_label.clone(),
            whitelist: settings.project_whitelist.clone(),
            target_labels,
            layout: Default::default(),
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
    /// A label name or value that is not UTF-8 (remote write carries bytes): it can
    /// be neither keyed nor stored as text, and the sender's other series are kept.
    pub not_utf8: u64,
}

impl Skipped {
    /// The counts by reason, as the `reason` label of the dropped-samples metric.
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("no_project", self.no_project),
            ("not_whitelisted", self.not_whitelisted),
            ("not_finite", self.not_finite),
            ("too_long", self.too_long),
            ("bad_project", self.bad_project),
            ("nul_label", self.nul_label),
            ("not_utf8", self.not_utf8),
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
    /// Bytes of the body this chunk was parsed from, and bytes of the body still to
    /// come after it (both 0 where a source does not know: then nothing is
    /// guessed about later chunks).
    pub share: (usize, usize),
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
    /// Whether the direct `COPY` met a sample or series stored already and the body
    /// was stored again through the merging path (see [`store`]).
    pub merged: bool,
    /// Samples whose series was found by its place in the target's last body (see
    /// [`text::Layout`]) rather than by its key.
    pub matched: u64,
}

impl IngestOutcome {
    /// The plain figures metrics record.
    pub fn counts(&self) -> crate::telemetry::metrics::IngestCounts {
        crate::telemetry::metrics::IngestCounts {
            stored: self.stored,
            duplicates: self.duplicates,
            dropped: self.skipped.by_reason(),
        }
    }
}

/// Longest series identity that can be indexed (see `sql/0001_series_and_samples.sql`).
const MAX_SERIES_KEY_BYTES: usize = 2048;

/// Sorts samples one at a time, as they are decoded: the same filters, series keys
/// and skip reasons for every source. Samples of metrics that are not billed are
/// ignored, as the parser ignores them.
pub struct Sorter<'c> {
    prepared: Prepared,
    new_index: HashMap<String, usize>,
    key: String,
    ctx: &'c IngestContext,
    state: &'c SeriesState,
    default_time: DateTime<Utc>,
}

impl<'c> Sorter<'c> {
    /// A sorter for one body or batch; samples without a time get `default_time`.
    pub fn new(
        ctx: &'c IngestContext,
        state: &'c SeriesState,
        default_time: DateTime<Utc>,
    ) -> Self {
        Self {
            prepared: Prepared::default(),
            new_index: HashMap::new(),
            key: String::with_capacity(256),
            ctx,
            state,
            default_time,
        }
    }

    /// Sorts one sample; `true` when it became a row (of a known or a new series),
    /// whose series key is then [`Sorter::key`].
    pub fn add(&mut self, sample: Sample<'_>) -> bool {
        self.ctx.billed.contains(sample.name)
            && sort_sample(
                &mut self.prepared,
                &mut self.new_index,
                &mut self.key,
                self.ctx,
                self.state,
                sample,
                self.default_time,
            )
    }

    /// The series key of the last sample that became a row.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Adds a sample of a series this source delivered before and that was stored
    /// then: its labels passed every filter, so only the value is checked, as
    /// [`Sorter::add`] checks it.
    pub fn add_known(&mut self, series_id: i64, value: f64, timestamp_ms: i64) {
        if !value.is_finite() {
            self.prepared.skipped.not_finite += 1;
            return;
        }
        self.prepared.rows.push(SampleRow {
            series_id,
            time: sample_time(Some(timestamp_ms), self.default_time),
            value,
        });
    }

    /// Counts `samples` samples of a series whose labels are not all UTF-8 as
    /// dropped, when `metric` (its name, if that one was UTF-8) is billed.
    pub fn skip_not_utf8(&mut self, metric: &str, samples: usize) {
        if self.wants(metric) {
            self.prepared.skipped.not_utf8 += samples as u64;
        }
    }

    /// Whether samples of `metric` are kept at all (a billed metric).
    pub fn wants(&self, metric: &str) -> bool {
        self.ctx.billed.contains(metric)
    }

    /// Everything sorted.
    pub fn finish(self) -> Prepared {
        self.prepared
    }
}

/// Samples decoded elsewhere sorted as [`prepare`] sorts parsed ones (see [`Sorter`]).
pub fn prepare_samples<'a>(
    samples: impl IntoIterator<Item = Sample<'a>>,
    ctx: &IngestContext,
    state: &SeriesState,
    default_time: DateTime<Utc>,
) -> Prepared {
    let mut sorter = Sorter::new(ctx, state, default_time);
    for sample in samples {
        sorter.add(sample);
    }
    sorter.finish()
}

/// Where one billed sample goes: a row of a known series, a row of a new series, or a
/// skip reason (then `false`). The one place where samples of every source become
/// rows.
pub(crate) fn sort_sample(
    prepared: &mut Prepared,
    new_index: &mut HashMap<String, usize>,
    key: &mut String,
    ctx: &IngestContext,
    state: &SeriesState,
    mut sample: Sample<'_>,
    scrape_time: DateTime<Utc>,
) -> bool {
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
        return false;
    }
    if ctx.whitelist.as_ref().is_some_and(|w| !w.contains(project)) {
        skipped.not_whitelisted += 1;
        return false;
    }
    if !servable_project(project) {
        skipped.bad_project += 1;
        return false;
    }
    if merged(&sample.labels, &ctx.target_labels).any(|(_, v)| v.contains('\0')) {
        skipped.nul_label += 1;
        return false;
    }
    if !sample.value.is_finite() {
        skipped.not_finite += 1;
        return false;
    }
    let time = sample_time(sample.timestamp_ms, scrape_time);
    write_series_key(key, sample.name, merged(&sample.labels, &ctx.target_labels));
    if key.len() > MAX_SERIES_KEY_BYTES {
        skipped.too_long += 1;
        return false;
    }
    if let Some(series_id) = state.id(key) {
        prepared.rows.push(SampleRow {
            series_id,
            time,
            value: sample.value,
        });
        return true;
    }
    let index = *new_index.entry(key.clone()).or_insert_with(|| {
        prepared.new_series.push(NewSeries {
            key: key.clone(),
            metric: sample.name.to_owned(),
            project: project.to_owned(),
        });
        prepared.new_series.len() - 1
    });
    prepared.new_rows.push((index, time, sample.value));
    true
}

/// A sample's own time, or `default_time` when it has none (or one out of range).
pub(crate) fn sample_time(timestamp_ms: Option<i64>, default_time: DateTime<Utc>) -> DateTime<Utc> {
    timestamp_ms
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or(default_time)
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
