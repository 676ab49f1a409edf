//! Writing samples with binary `COPY`, atomically and never storing one twice.
//!
//! Rows known to be newer than everything stored for their series stream straight
//! into `usage_samples`; from the first row that is not (a federation re-scrape, a
//! series not seen since start-up) the rest goes through a staging table merged with
//! `ON CONFLICT DO NOTHING`. Both happen in one transaction.

use super::copy::CopyWriter;
use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;

/// One sample ready to store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRow {
    /// The series it belongs to.
    pub series_id: i64,
    /// Sample time (scrape time, or the exposed timestamp).
    pub time: DateTime<Utc>,
    /// Sample value.
    pub value: f64,
}

/// What a store did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Rows written.
    pub stored: u64,
    /// Rows skipped because the same series and time was already stored or given twice.
    pub duplicates: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    Direct,
    Staging,
}

/// An open transaction that samples are streamed into.
pub struct SampleBatch<'a> {
    tx: Transaction<'a>,
    copy: Option<CopyWriter>,
    destination: Destination,
    stored_direct: u64,
}

impl<'a> SampleBatch<'a> {
    /// Opens the transaction.
    pub async fn begin(client: &'a mut tokio_postgres::Client) -> anyhow::Result<Self> {
        Ok(Self {
            tx: client
                .transaction()
                .await
                .context("starting the sample transaction")?,
            copy: None,
            destination: Destination::Direct,
            stored_direct: 0,
        })
    }

    /// Writes rows; `all_newer` says whether each is newer than all stored for its
    /// series (see `SeriesCache::all_newer`). Once false, later rows are merged.
    pub async fn push(&mut self, rows: &[SampleRow], all_newer: bool) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        if !all_newer && self.destination == Destination::Direct {
            self.close_copy().await?;
            self.tx
                .batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS usage_samples_staging (
                        series_id bigint NOT NULL, time timestamptz NOT NULL, value double precision NOT NULL
                     ) ON COMMIT DELETE ROWS",
                )
                .await
                .context("creating the staging table")?;
            self.destination = Destination::Staging;
        }
        if self.copy.is_none() {
            let table = match self.destination {
                Destination::Direct => "usage_samples",
                Destination::Staging => "usage_samples_staging",
            };
            let sink = self
                .tx
                .copy_in(&format!(
                    "COPY {table} (series_id, time, value) FROM STDIN (FORMAT binary)"
                ))
                .await?;
            self.copy = Some(CopyWriter::new(sink));
        }
        if let Some(writer) = self.copy.as_mut() {
            write_all(writer, rows).await?;
        }
        Ok(())
    }

    /// Ends a running `COPY` so other statements can run in the transaction.
    pub async fn transaction(&mut self) -> anyhow::Result<&Transaction<'a>> {
        self.close_copy().await?;
        Ok(&self.tx)
    }

    async fn close_copy(&mut self) -> anyhow::Result<()> {
        if let Some(writer) = self.copy.take() {
            let written = writer.finish().await?;
            if self.destination == Destination::Direct {
                self.stored_direct += written;
            }
        }
        Ok(())
    }

    /// Merges staged rows and commits; returns the rows stored.
    pub async fn commit(mut self) -> anyhow::Result<u64> {
        self.close_copy().await?;
        let merged = match self.destination {
            Destination::Direct => 0,
            Destination::Staging => self
                .tx
                .execute(
                    "INSERT INTO usage_samples (series_id, time, value)
                     SELECT series_id, time, value FROM usage_samples_staging
                     ON CONFLICT (series_id, time) DO NOTHING",
                    &[],
                )
                .await
                .context("merging staged samples")?,
        };
        self.tx.commit().await.context("committing samples")?;
        Ok(self.stored_direct + merged)
    }
}

/// Whether `error` is PostgreSQL refusing a duplicate key.
pub fn is_unique_violation(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<tokio_postgres::Error>())
        .any(|e| e.code() == Some(&SqlState::UNIQUE_VIOLATION))
}

/// Streams rows into a `COPY … FROM STDIN (FORMAT binary)` sink (benchmarks use it
/// as the raw baseline).
pub async fn write_rows(
    sink: tokio_postgres::CopyInSink<bytes::Bytes>,
    rows: &[SampleRow],
) -> anyhow::Result<u64> {
    let mut writer = CopyWriter::new(sink);
    write_all(&mut writer, rows).await?;
    writer.finish().await
}

/// Writes sample rows as `(series_id, time, value)`.
async fn write_all(writer: &mut CopyWriter, rows: &[SampleRow]) -> anyhow::Result<()> {
    for row in rows {
        writer
            .row(3)
            .int8(row.series_id)
            .timestamptz(row.time)?
            .float8(row.value);
        writer.end_row().await?;
    }
    Ok(())
}
