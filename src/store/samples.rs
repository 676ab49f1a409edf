//! Writing samples with binary `COPY`, never storing one twice.

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::series::SeriesCache;

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

const COLUMN_TYPES: &[Type] = &[Type::INT8, Type::TIMESTAMPTZ, Type::FLOAT8];

/// Stores `rows` atomically: all of them or none. Rows newer than everything stored
/// for their series go straight in with binary `COPY`; otherwise (or when another
/// writer got there first) they are copied to a staging table and merged with
/// `ON CONFLICT DO NOTHING`, so a re-scrape never duplicates a sample.
#[tracing::instrument(skip_all, fields(rows = rows.len()), err)]
pub async fn store(
    client: &mut tokio_postgres::Client,
    cache: &SeriesCache,
    mut rows: Vec<SampleRow>,
) -> anyhow::Result<StoreOutcome> {
    let given = rows.len() as u64;
    rows.sort_unstable_by_key(|r| (r.series_id, r.time));
    rows.dedup_by_key(|r| (r.series_id, r.time));
    if rows.is_empty() {
        return Ok(StoreOutcome {
            stored: 0,
            duplicates: given,
        });
    }
    let all_new = cache.read(|state| {
        rows.iter()
            .all(|r| state.is_newer(r.series_id, r.time.timestamp_micros()))
    });
    let stored = match all_new {
        true => match copy_direct(client, &rows).await {
            Err(e) if is_unique_violation(&e) => merge(client, &rows).await?,
            other => other?,
        },
        false => merge(client, &rows).await?,
    };
    cache.write(|state| {
        for row in &rows {
            state.stored(row.series_id, row.time.timestamp_micros());
        }
    });
    Ok(StoreOutcome {
        stored,
        duplicates: given - stored,
    })
}

fn is_unique_violation(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|code| *code == SqlState::UNIQUE_VIOLATION)
}

async fn copy_direct(
    client: &mut tokio_postgres::Client,
    rows: &[SampleRow],
) -> anyhow::Result<u64> {
    let tx = client.transaction().await?;
    let sink = tx
        .copy_in("COPY usage_samples (series_id, time, value) FROM STDIN (FORMAT binary)")
        .await?;
    let written = write_rows(sink, rows).await?;
    tx.commit().await?;
    Ok(written)
}

async fn merge(client: &mut tokio_postgres::Client, rows: &[SampleRow]) -> anyhow::Result<u64> {
    let tx = client.transaction().await?;
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS usage_samples_staging (
            series_id bigint NOT NULL, time timestamptz NOT NULL, value double precision NOT NULL
         ) ON COMMIT DELETE ROWS",
    )
    .await
    .context("creating the staging table")?;
    let sink = tx
        .copy_in("COPY usage_samples_staging (series_id, time, value) FROM STDIN (FORMAT binary)")
        .await?;
    write_rows(sink, rows).await?;
    let stored = tx
        .execute(
            "INSERT INTO usage_samples (series_id, time, value)
             SELECT series_id, time, value FROM usage_samples_staging
             ON CONFLICT (series_id, time) DO NOTHING",
            &[],
        )
        .await
        .context("merging staged samples")?;
    tx.commit().await?;
    Ok(stored)
}

/// Streams rows into a `COPY … FROM STDIN (FORMAT binary)` sink.
pub async fn write_rows(
    sink: tokio_postgres::CopyInSink<bytes::Bytes>,
    rows: &[SampleRow],
) -> anyhow::Result<u64> {
    let writer = BinaryCopyInWriter::new(sink, COLUMN_TYPES);
    pin_mut!(writer);
    for row in rows {
        writer
            .as_mut()
            .write(&[&row.series_id, &row.time, &row.value])
            .await?;
    }
    Ok(writer.finish().await?)
}
