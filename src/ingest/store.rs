//! The one store step of every source: sorted samples into one transaction, new
//! series created in it, optimistic direct `COPY` with a merging retry.

use super::{IngestError, IngestOutcome, Prepared, Skipped};
use crate::store::samples::{self, SampleBatch, SampleRow};
use crate::store::series::{self, NewSeries, Resolved, SeriesCache};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Timeouts};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;

/// Stores samples sorted by [`prepare_samples`] atomically, through the same `COPY`
/// and merge as parsed bodies: samples already stored count as duplicates.
pub async fn store_prepared(
    pool: &Pool,
    cache: &SeriesCache,
    prepared: Prepared,
) -> Result<IngestOutcome, IngestError> {
    let (sender, receiver) = mpsc::channel(1);
    // The channel has room for this one message and the receiver is alive.
    let _ = sender.send(Ok(prepared)).await;
    drop(sender);
    store_stream(pool, cache, receiver).await
}

/// Everything a body yielded, kept for the cache update and a possible retry.
#[derive(Default)]
struct Collected {
    rows: Vec<SampleRow>,
    new_series: Vec<NewSeries>,
    new_index: HashMap<String, usize, foldhash::fast::RandomState>,
    new_rows: Vec<(usize, DateTime<Utc>, f64)>,
    skipped: Skipped,
    matched: u64,
}

impl Collected {
    /// Adds a chunk; returns where its series new to this body start in
    /// `new_series` (those after it are this chunk's, each key once per body), where
    /// its rows of new series start in `new_rows`, and how many new series the rest
    /// of the body will likely bring (see [`expected_later`]).
    fn add(&mut self, prepared: Prepared) -> Fresh {
        let fresh = Fresh {
            series: self.new_series.len(),
            rows: self.new_rows.len(),
            later: 0,
        };
        let (chunk_bytes, bytes_after) = prepared.share;
        let before = self.new_series.len();
        self.rows.extend_from_slice(&prepared.rows);
        self.matched += prepared.stats.matched as u64;
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
        s.not_utf8 += p.not_utf8;
        Fresh {
            later: expected_later(self.new_series.len() - before, chunk_bytes, bytes_after),
            ..fresh
        }
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

/// Where a chunk's new series and their rows start in [`Collected`], and how many
/// more new series the rest of its body likely brings.
#[derive(Debug, Clone, Copy)]
struct Fresh {
    series: usize,
    rows: usize,
    later: usize,
}

/// New series the `bytes_after` bytes of a body still to come likely bring, when a
/// chunk of `chunk_bytes` bytes brought `new` (as dense as this chunk, and an eighth
/// more): what a body's first scrape needs is then taken at once, instead of in
/// blocks that each pause the `COPY` (a 100,000-series body took six, and 180,000
/// ids). Never more than a line per 16 bytes still to come.
fn expected_later(new: usize, chunk_bytes: usize, bytes_after: usize) -> usize {
    if new == 0 || chunk_bytes == 0 {
        return 0;
    }
    let dense = usize::try_from(new as u128 * bytes_after as u128 / chunk_bytes as u128)
        .unwrap_or(usize::MAX);
    dense.saturating_add(dense / 8).min(bytes_after / 16)
}

/// New projects in one body from which [`Creating::create`] registers them on a
/// second connection: a big first scrape, whose series rows keep one backend busy
/// long enough for the other core to register its projects meanwhile. Remote-write
/// batches (at most a few thousand series, several at once) stay below: with the
/// cores busy already, the second connection made their first step slower (40,000
/// new series in 4 × 20 batches: 0.66–0.69 s against 0.58–0.64 s).
const APART_FROM: usize = 5_000;

/// How the first try creates the body's new series: each chunk's new series get
/// their ids and have their rows written while later chunks are parsed; the series
/// rows themselves and their projects are written at the end (see [`Creating::create`]).
#[derive(Default)]
struct Creating {
    /// Id taken for each of the body's new series (by index).
    ids: Vec<i64>,
    /// Ids taken but not given yet (handed out from the end).
    spare: Vec<i64>,
    /// Rows of the new series written so far.
    rows: Vec<SampleRow>,
}

impl Creating {
    /// Takes ids for a chunk's new series and writes the chunk's rows of new series.
    async fn chunk(
        &mut self,
        batch: &mut SampleBatch<'_>,
        collected: &Collected,
        fresh: Fresh,
    ) -> anyhow::Result<()> {
        let (fresh, fresh_rows, later) = (fresh.series, fresh.rows, fresh.later);
        let count = collected.new_series.len() - fresh;
        if self.spare.len() < count {
            // Ids are taken in blocks: what the rest of the body likely needs too,
            // and each at least as large as all taken before, so a body's series
            // take one or a few blocks rather than one per chunk: taking them ends
            // the samples' `COPY` and waits for the database to catch up with it.
            // Ids left over are never used (ids need not be dense).
            let block = count
                .saturating_add(later)
                .max(self.ids.len() + self.spare.len());
            let mut taken = series::take_ids(batch.transaction().await?, block).await?;
            taken.reverse();
            taken.append(&mut self.spare);
            self.spare = taken;
        }
        self.ids
            .extend(self.spare.drain(self.spare.len() - count..).rev());
        // (every new series so far has its id, and nothing stored: every row is newer)
        let start = self.rows.len();
        for &(index, time, value) in &collected.new_rows[fresh_rows..] {
            self.rows.push(SampleRow {
                series_id: self.ids[index],
                time,
                value,
            });
        }
        batch.push(&self.rows[start..], true).await
    }

    /// Registers the projects of the body's new series and writes the series rows,
    /// in key order (see [`series::copy_created`]). From [`APART_FROM`] new
    /// projects on, they are registered on a second pooled connection while the
    /// rows are written, when one is free at once (see
    /// [`series::register_projects_apart`]); otherwise, or when that fails, in the
    /// body's transaction.
    async fn create(
        &self,
        pool: &Pool,
        batch: &mut SampleBatch<'_>,
        collected: &Collected,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.ids.len() == collected.new_series.len(),
            "{} new series but {} ids",
            collected.new_series.len(),
            self.ids.len()
        );
        let mut projects: Vec<&str> = collected
            .new_series
            .iter()
            .map(|s| s.project.as_str())
            .collect();
        projects.sort_unstable();
        projects.dedup();
        let mut sorted: Vec<(&NewSeries, i64)> = collected
            .new_series
            .iter()
            .zip(self.ids.iter().copied())
            .collect();
        sorted.sort_unstable_by(|a, b| a.0.key.cmp(&b.0.key));
        let spare = match projects.len() >= APART_FROM {
            true => pool
                .timeout_get(&Timeouts {
                    wait: Some(Duration::ZERO),
                    ..pool.timeouts()
                })
                .await
                .ok(),
            false => None,
        };
        let tx = batch.transaction().await?;
        let Some(mut spare) = spare else {
            series::register_projects(tx, &projects).await?;
            return series::copy_created(tx, &sorted).await;
        };
        let (apart, copied) = tokio::join!(
            series::register_projects_apart(&mut spare, &projects),
            series::copy_created(tx, &sorted)
        );
        copied?;
        if let Err(e) = apart {
            tracing::debug!(error = %format!("{e:#}"), "registering projects apart failed; registering them with the series");
            series::register_projects(tx, &projects).await?;
        }
        Ok(())
    }
}

/// Receives parsed chunks and streams them into one transaction. When the optimistic
/// direct `COPY` meets a duplicate, or the new series meet one stored already (a
/// restart forgot it, another writer got there first), everything is stored again
/// through the merging path.
pub(crate) async fn store_stream(
    pool: &Pool,
    cache: &SeriesCache,
    mut receiver: mpsc::Receiver<Result<Prepared, super::parse::ParseError>>,
) -> Result<IngestOutcome, IngestError> {
    let mut client = pool.get().await.map_err(|e| IngestError::Store(e.into()))?;
    let mut collected = Collected::default();
    let mut batch = SampleBatch::begin(&mut client)
        .await
        .map_err(IngestError::Store)?;
    let mut failure = None;
    let mut creating = Creating::default();
    while let Some(chunk) = receiver.recv().await {
        let prepared = chunk?;
        if failure.is_none() {
            let newer = cache.all_newer(&prepared.rows);
            failure = batch.push(&prepared.rows, newer).await.err();
        }
        let fresh = collected.add(prepared);
        if failure.is_none() {
            failure = creating.chunk(&mut batch, &collected, fresh).await.err();
        }
    }
    let attempt = match failure {
        Some(e) => {
            drop(batch); // rolls back
            Err(e)
        }
        None => finish(pool, batch, &mut collected, Attempt::First(creating)).await,
    };
    let merged = attempt.as_ref().is_err();
    let (stored, resolved, new_rows) = match attempt {
        Ok(done) => done,
        Err(e) if is_conflict(&e) => {
            tracing::debug!("direct COPY met a stored sample or series; merging instead");
            crate::telemetry::metrics::ingest_merged();
            let batch = SampleBatch::begin(&mut client)
                .await
                .map_err(IngestError::Store)?;
            finish(pool, batch, &mut collected, Attempt::Merging)
                .await
                .map_err(IngestError::Store)?
        }
        Err(e) => return Err(IngestError::Store(e)),
    };
    cache.remember_stored(&collected.rows);
    cache.remember_stored(&new_rows);
    // (every new series has its id in `resolved`, or `finish` would have failed)
    let series = collected
        .rows
        .iter()
        .map(|r| r.series_id)
        .chain(resolved.ids.values().copied())
        .collect();
    cache.remember(resolved);
    Ok(IngestOutcome {
        stored,
        duplicates: collected.total() - stored,
        skipped: collected.skipped,
        series,
        merged,
        matched: collected.matched,
    })
}

/// Whether the first try failed only because another writer (or an earlier body) got
/// there first: a sample or series stored already, or two writers creating the same
/// series waiting for each other. The merging retry tolerates both.
fn is_conflict(error: &anyhow::Error) -> bool {
    samples::is_unique_violation(error)
        || error
            .chain()
            .filter_map(|e| e.downcast_ref::<tokio_postgres::Error>())
            .any(|e| e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED))
}

/// Which try [`finish`] ends.
enum Attempt {
    /// The stream's own transaction: the new series have their ids, projects and rows
    /// already; their series rows are still to be written.
    First(Creating),
    /// The retry in a new transaction: every row through the merging path, the new
    /// series created or found here.
    Merging,
}

/// Creates the new series in the batch's transaction, writes whatever rows are left
/// and commits; returns the rows stored, the new series' ids and their rows. After a
/// commit of the first try the new series' keys are moved into the ids returned.
async fn finish(
    pool: &Pool,
    mut batch: SampleBatch<'_>,
    collected: &mut Collected,
    attempt: Attempt,
) -> anyhow::Result<(u64, Resolved, Vec<SampleRow>)> {
    match attempt {
        Attempt::First(creating) => {
            creating.create(pool, &mut batch, collected).await?;
            let stored = batch.commit().await?;
            let mut resolved = Resolved::default();
            resolved.ids.reserve(creating.ids.len());
            for (series, &id) in collected.new_series.iter_mut().zip(&creating.ids) {
                resolved.ids.insert(std::mem::take(&mut series.key), id);
            }
            resolved.created = creating.ids;
            Ok((stored, resolved, creating.rows))
        }
        Attempt::Merging => {
            batch.push(&collected.rows, false).await?;
            let resolved =
                series::create_or_find(batch.transaction().await?, &collected.new_series).await?;
            let rows = collected.new_series_rows(&resolved)?;
            batch.push(&rows, false).await?;
            Ok((batch.commit().await?, resolved, rows))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::expected_later;

    #[test]
    fn the_rest_of_a_body_is_expected_as_dense_in_new_series_as_its_chunk() {
        // a first scrape: 5,000 new series in the first MiB of 18
        assert_eq!(
            expected_later(5_000, 1 << 20, 17 << 20),
            85_000 + 85_000 / 8
        );
        // nothing new, the last chunk, or a source that does not say: no guess
        assert_eq!(expected_later(0, 1 << 20, 17 << 20), 0);
        assert_eq!(expected_later(5_000, 1 << 20, 0), 0);
        assert_eq!(expected_later(5_000, 0, 0), 0);
        // never more than a line per 16 bytes still to come
        assert_eq!(expected_later(1_000, 1_000, 1_600), 100);
        // no overflow on absurd sizes
        assert_eq!(expected_later(usize::MAX, 1, usize::MAX), usize::MAX / 16);
    }
}
