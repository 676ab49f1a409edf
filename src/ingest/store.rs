//! The one store step of every source: sorted samples into one transaction, new
//! series created in it, optimistic direct `COPY` with a merging retry.

use super::{IngestError, IngestOutcome, Prepared, Skipped};
use crate::store::samples::{self, SampleBatch, SampleRow};
use crate::store::series::{self, NewSeries, Race, Resolved, SeriesCache, Staging};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use std::collections::{HashMap, HashSet};
use tokio::sync::mpsc;

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
    new_index: HashMap<String, usize>,
    new_rows: Vec<(usize, DateTime<Utc>, f64)>,
    skipped: Skipped,
}

impl Collected {
    /// Adds a chunk; returns where its series new to this body start in
    /// `new_series` (those after it are this chunk's, each key once per body).
    fn add(&mut self, prepared: Prepared) -> usize {
        let fresh = self.new_series.len();
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
        s.not_utf8 += p.not_utf8;
        fresh
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
/// direct `COPY` meets a duplicate, or the plain insert of new series meets a series
/// created meanwhile (another writer got there first), everything is stored again
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
    // The body's new series, staged chunk by chunk while later chunks are parsed.
    let mut staging: Option<Staging> = None;
    while let Some(chunk) = receiver.recv().await {
        let prepared = chunk?;
        if failure.is_none() {
            let newer = cache.all_newer(&prepared.rows);
            failure = batch.push(&prepared.rows, newer).await.err();
        }
        let fresh = collected.add(prepared);
        if failure.is_none() && fresh < collected.new_series.len() {
            failure = stage(&mut batch, &mut staging, &collected.new_series[fresh..])
                .await
                .err();
        }
    }
    let attempt = match failure {
        Some(e) => {
            drop(batch); // rolls back
            Err(e)
        }
        None => finish(batch, &collected, Attempt::First(staging)).await,
    };
    let (stored, resolved, new_rows) = match attempt {
        Ok(done) => done,
        Err(e) if samples::is_unique_violation(&e) => {
            tracing::debug!("direct COPY met a stored sample; merging instead");
            let batch = SampleBatch::begin(&mut client)
                .await
                .map_err(IngestError::Store)?;
            finish(batch, &collected, Attempt::Merging)
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
    })
}

/// Stages `series` in the batch's transaction, beginning the staging at the first.
async fn stage(
    batch: &mut SampleBatch<'_>,
    staging: &mut Option<Staging>,
    series: &[NewSeries],
) -> anyhow::Result<()> {
    let tx = batch.transaction().await?;
    let staging = match staging {
        Some(staging) => staging,
        None => staging.insert(Staging::begin(tx).await?),
    };
    staging.add(tx, series).await
}

/// Which try [`finish`] ends.
enum Attempt {
    /// The stream's own transaction, with the body's new series staged as they came
    /// (`None` when the body had none).
    First(Option<Staging>),
    /// The retry in a new transaction: every row through the merging path, the new
    /// series staged here.
    Merging,
}

/// Creates the new series in the batch's transaction, writes their rows and commits;
/// returns the rows stored, the new series' ids and their rows.
async fn finish(
    mut batch: SampleBatch<'_>,
    collected: &Collected,
    attempt: Attempt,
) -> anyhow::Result<(u64, Resolved, Vec<SampleRow>)> {
    let merge_all = matches!(attempt, Attempt::Merging);
    if merge_all {
        batch.push(&collected.rows, false).await?;
    }
    let resolved = match (collected.new_series.is_empty(), attempt) {
        (true, _) => Resolved::default(),
        // First try: a plain insert of the series not stored yet. Another writer
        // creating one of them at the same time fails it with a unique violation, and
        // the merging retry tolerates that.
        (false, Attempt::First(Some(staged))) => {
            staged
                .create(batch.transaction().await?, Race::Fails)
                .await?
        }
        (false, Attempt::First(None)) => {
            anyhow::bail!("the body's new series were not staged")
        }
        (false, Attempt::Merging) => {
            series::create_or_find(
                batch.transaction().await?,
                &collected.new_series,
                Race::Tolerated,
            )
            .await?
        }
    };
    let new_rows = collected.new_series_rows(&resolved)?;
    // Rows of series created just now are newer than anything stored for them (the
    // common case, every series created, needs no look at each row).
    let all_created = !merge_all
        && (resolved.created.len() == resolved.ids.len() || {
            let created: HashSet<i64> = resolved.created.iter().copied().collect();
            new_rows.iter().all(|r| created.contains(&r.series_id))
        });
    batch.push(&new_rows, all_created).await?;
    Ok((batch.commit().await?, resolved, new_rows))
}
