//! The text exposition source (scrape and `/federate` bodies): parsed chunk by chunk
//! in a blocking task while the chunks already parsed stream into `COPY`.

use super::parse;
use super::store::store_stream;
use super::{sort_sample, IngestContext, IngestError, IngestOutcome, Prepared, Sample};
use crate::store::series::{SeriesCache, SeriesState};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
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
            );
        },
    )?;
    prepared.stats = stats;
    Ok(prepared)
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
