//! The text exposition source (scrape and `/federate` bodies): parsed chunk by chunk
//! in a blocking task while the chunks already parsed stream into `COPY`.

use super::parse;
use super::store::store_stream;
use super::{
    sample_time, sort_sample, IngestContext, IngestError, IngestOutcome, Prepared, Sample,
};
use crate::store::samples::SampleRow;
use crate::store::series::{SeriesCache, SeriesState};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Parses `body` and sorts its samples by whether their series is known. Pure CPU
/// work; samples without a timestamp get `scrape_time`.
pub fn prepare(
    body: &str,
    ctx: &IngestContext,
    state: &SeriesState,
    scrape_time: DateTime<Utc>,
) -> Result<Prepared, parse::ParseError> {
    prepare_matching(body, ctx, state, scrape_time, None)
}

/// [`prepare`], matching the body's series against the last body's layout first.
fn prepare_matching(
    body: &str,
    ctx: &IngestContext,
    state: &SeriesState,
    scrape_time: DateTime<Utc>,
    matching: Option<&mut Matching<'_>>,
) -> Result<Prepared, parse::ParseError> {
    let prepared = RefCell::new(Prepared::default());
    let matching = matching.map(RefCell::new);
    let mut new_index: HashMap<String, usize> = HashMap::new();
    let mut key = String::with_capacity(256);
    let stats = parse::parse_with_known(
        body,
        |name| ctx.billed.contains(name),
        |series, value, timestamp_ms| {
            let Some(matching) = matching.as_ref() else {
                return false;
            };
            let mut matching = matching.borrow_mut();
            let Some(series_id) = matching.next_is(series, state) else {
                return false;
            };
            // (the series passed every label check when it was matched last time:
            // only the value is left to check, as `sort_sample` checks it)
            let mut prepared = prepared.borrow_mut();
            if value.is_finite() {
                prepared.rows.push(SampleRow {
                    series_id,
                    time: sample_time(timestamp_ms, scrape_time),
                    value,
                });
            } else {
                prepared.skipped.not_finite += 1;
            }
            matching.matched += 1;
            true
        },
        |sample: Sample<'_>| {
            let series = sample.series;
            let mut prepared = prepared.borrow_mut();
            let known_before = prepared.rows.len();
            sort_sample(
                &mut prepared,
                &mut new_index,
                &mut key,
                ctx,
                state,
                sample,
                scrape_time,
            );
            if let (Some(matching), Some(row)) =
                (matching.as_ref(), prepared.rows.get(known_before))
            {
                matching.borrow_mut().next.push(series, row.series_id);
            }
        },
    )?;
    let mut prepared = prepared.into_inner();
    prepared.stats = stats;
    if let Some(matching) = matching {
        prepared.stats.matched = matching.into_inner().matched;
    }
    Ok(prepared)
}

/// The series of one target's last body in the order written, each with its id.
/// Exporters write their series in the same order and spelling scrape after scrape:
/// a line whose series text equals the one at the same place last time is that
/// series, found by one comparison of bytes read in order, instead of unescaping its
/// labels, building its key and looking that up among all series (most of a known
/// body's parse time). A line that differs goes the long way, and the next body
/// is matched against this one's layout. Bounded by [`MAX_LAYOUT_BYTES`] of series
/// text per target; past that, the rest of a body goes the long way.
#[derive(Default)]
pub struct Layout {
    /// The series cache whose ids these are ([`SeriesCache::identity`]).
    cache: usize,
    text: String,
    ends: Vec<usize>,
    ids: Vec<i64>,
}

/// Series text one target's [`Layout`] holds at most (about 450,000 series as the
/// demo exporter writes them).
pub const MAX_LAYOUT_BYTES: usize = 64 << 20;

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Layout({} series)", self.ids.len())
    }
}

impl Layout {
    fn get(&self, index: usize) -> Option<(&str, i64)> {
        let end = *self.ends.get(index)?;
        let start = index.checked_sub(1).map_or(0, |i| self.ends[i]);
        Some((&self.text[start..end], self.ids[index]))
    }

    fn push(&mut self, series: &str, id: i64) {
        if self.text.len() + series.len() <= MAX_LAYOUT_BYTES {
            self.text.push_str(series);
            self.ends.push(self.text.len());
            self.ids.push(id);
        }
    }
}

/// One body matched against the last body's layout, building its own.
pub(crate) struct Matching<'l> {
    last: &'l Layout,
    /// Where in `last` the next line should be.
    at: usize,
    next: Layout,
    /// Lines matched.
    matched: usize,
}

impl<'l> Matching<'l> {
    fn new(last: &'l Layout, cache: &SeriesCache) -> Self {
        static EMPTY: Layout = Layout {
            cache: 0,
            text: String::new(),
            ends: Vec::new(),
            ids: Vec::new(),
        };
        let cache = cache.identity();
        Self {
            // (a layout of another cache's ids matches nothing)
            last: if last.cache == cache { last } else { &EMPTY },
            at: 0,
            next: Layout {
                cache,
                ..Layout::default()
            },
            matched: 0,
        }
    }

    /// The id of `series` when it is the series expected next and one this cache
    /// knows (besides the cache's identity: a new cache may reuse a dropped one's
    /// address).
    fn next_is(&mut self, series: &str, state: &SeriesState) -> Option<i64> {
        let (expected, id) = self.last.get(self.at)?;
        if expected != series || !state.knows(id) {
            return None;
        }
        self.at += 1;
        self.next.push(series, id);
        Some(id)
    }
}

/// Bytes of exposition text parsed at a time: each chunk streams into `COPY` while
/// the next one is parsed, so parsing hides behind the database's work.
const CHUNK_BYTES: usize = 1 << 20;

/// Parses and stores one body atomically: all its kept samples, or (on a parse
/// error anywhere, or any failure) none.
pub async fn ingest_text(
    pool: &Pool,
    cache: &SeriesCache,
    ctx: Arc<IngestContext>,
    body: String,
    scrape_time: DateTime<Utc>,
) -> Result<IngestOutcome, IngestError> {
    let (sender, receiver) = mpsc::channel(2);
    let parse_cache = cache.clone();
    let parser = tokio::task::spawn_blocking(move || {
        parse_chunks(&body, &ctx, &parse_cache, scrape_time, &sender)
    });
    let stored = store_stream(pool, cache, receiver).await;
    parser
        .await
        .map_err(|e| IngestError::Store(anyhow::Error::new(e).context("parse task failed")))?;
    stored
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
    // (never waiting for the layout: a second body of the same target at once, if
    // ever, goes the long way; a panic elsewhere cannot leave it half-written, as
    // it is replaced whole)
    let mut layout = match ctx.layout.try_lock() {
        Ok(layout) => Some(layout),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    let mut matching = layout.as_deref().map(|last| Matching::new(last, cache));
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
            .read(|state| prepare_matching(chunk, ctx, state, scrape_time, matching.as_mut()))
            .map(|mut prepared| {
                prepared.share = (chunk.len(), rest.len());
                prepared
            })
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
    // The whole body parsed: its layout is the one to match the next against.
    let next = matching.map(|m| m.next);
    if let (Some(next), Some(layout)) = (next, layout.as_deref_mut()) {
        *layout = next;
    }
}
