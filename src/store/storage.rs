//! What the storage really is (hypertables or plain tables, whatever extensions
//! exist), what to do about a mixed state, the explicit conversion to TimescaleDB,
//! and the policies `os-credits migrate` owns.
//!
//! The mode comes from `timescaledb_information.hypertables`, never from whether
//! the extension exists: a database first set up on plain PostgreSQL stays plain
//! until an operator runs `os-credits migrate --to-timescaledb`.

use super::{col, StorageMode};
use anyhow::Context;
use serde::Serialize;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// The two tables that become hypertables, their chunk interval and compression.
const HYPERTABLES: &[Hypertable] = &[
    Hypertable {
        table: "usage_samples",
        chunk: "7 days",
        segment_by: "series_id",
        order_by: "time DESC",
        compress_after: "30 days",
    },
    Hypertable {
        table: "ledger",
        chunk: "30 days",
        segment_by: "project",
        order_by: "time DESC, id DESC",
        compress_after: "90 days",
    },
];

struct Hypertable {
    table: &'static str,
    chunk: &'static str,
    segment_by: &'static str,
    order_by: &'static str,
    compress_after: &'static str,
}

/// Whether TimescaleDB can be used by this database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "version")]
pub enum Extension {
    /// The server has no TimescaleDB files.
    #[default]
    NotInstalled,
    /// Installed on the server but not in `shared_preload_libraries`: cannot be created.
    NotPreloaded,
    /// Preloaded, not created in this database.
    NotCreated,
    /// Created in this database (its version).
    Created(String),
}

/// How one table is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    /// An ordinary PostgreSQL table.
    #[default]
    Plain,
    /// A TimescaleDB hypertable.
    Hypertable,
}

/// What start-up (and each maintenance round) found, for the log and `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct StorageReport {
    /// The mode the service runs in: `timescaledb` when `usage_samples` is a hypertable.
    pub mode: StorageMode,
    /// Why that mode, in words.
    pub why: String,
    /// What an operator should do, when something is left to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
    /// The TimescaleDB extension's state.
    pub extension: Extension,
    /// `usage_samples`.
    pub usage_samples: TableKind,
    /// `ledger`.
    pub ledger: TableKind,
    /// Policies differing from what `os-credits migrate` would set (empty: none).
    pub drift: Vec<String>,
}

impl Default for StorageReport {
    fn default() -> Self {
        Self {
            mode: StorageMode::Postgresql,
            why: "not inspected yet".into(),
            advice: None,
            extension: Extension::NotInstalled,
            usage_samples: TableKind::Plain,
            ledger: TableKind::Plain,
            drift: Vec::new(),
        }
    }
}

/// The report shared by the maintenance worker (which refreshes it) and `/health`.
pub type SharedReport = Arc<RwLock<StorageReport>>;

const CONVERT: &str =
    "run `os-credits migrate --to-timescaledb` (see what it would do with `--dry-run` first)";

/// Looks at the extension and the tables and says which mode this is and why.
pub async fn inspect(client: &tokio_postgres::Client) -> anyhow::Result<StorageReport> {
    let row = client
        .query_one(
            "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS version,
                    EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
                        AS available,
                    coalesce(current_setting('shared_preload_libraries', true), '') LIKE '%timescaledb%'
                        AS preloaded",
            &[],
        )
        .await
        .context("reading the TimescaleDB extension's state")?;
    let (version, available, preloaded): (Option<String>, bool, bool) = (
        col(&row, "version")?,
        col(&row, "available")?,
        col(&row, "preloaded")?,
    );
    let extension = match (version, available, preloaded) {
        (Some(version), _, _) => Extension::Created(version),
        (None, true, true) => Extension::NotCreated,
        (None, true, false) => Extension::NotPreloaded,
        (None, false, _) => Extension::NotInstalled,
    };
    let hypertables: Vec<String> = match extension {
        Extension::Created(_) => client
            .query(
                "SELECT hypertable_name::text AS hypertable_name FROM timescaledb_information.hypertables
                 WHERE hypertable_name IN ('usage_samples', 'ledger')
                   AND hypertable_schema = current_schema()",
                &[],
            )
            .await
            .context("reading timescaledb_information.hypertables")?
            .iter()
            .map(|r| col(r, "hypertable_name"))
            .collect::<anyhow::Result<_>>()?,
        _ => Vec::new(),
    };
    let kind = |table: &str| match hypertables.iter().any(|h| h == table) {
        true => TableKind::Hypertable,
        false => TableKind::Plain,
    };
    Ok(describe(extension, kind("usage_samples"), kind("ledger")))
}

/// Words for a state: the mode, why, and what to do. Pure, so every case is tested.
pub fn describe(extension: Extension, samples: TableKind, ledger: TableKind) -> StorageReport {
    use TableKind::{Hypertable as H, Plain as P};
    let mode = match samples {
        H => StorageMode::Timescaledb,
        P => StorageMode::Postgresql,
    };
    let version = match &extension {
        Extension::Created(v) => v.clone(),
        _ => String::new(),
    };
    let (why, advice): (String, Option<String>) = match (&extension, samples, ledger) {
        (_, H, H) => (
            format!("TimescaleDB {version}: usage_samples and ledger are hypertables"),
            None,
        ),
        (_, H, P) | (_, P, H) => {
            let (hyper, plain) = match samples {
                H => ("usage_samples", "ledger"),
                P => ("ledger", "usage_samples"),
            };
            (
                format!("TimescaleDB {version}: {hyper} is a hypertable but {plain} is a plain table (an interrupted conversion?)"),
                Some(format!("{CONVERT} to convert {plain} as well")),
            )
        }
        (Extension::Created(_), P, P) => (
            format!("the timescaledb extension {version} exists in this database, but usage_samples and ledger are plain tables"),
            Some(format!("to store samples in hypertables, {CONVERT}")),
        ),
        (Extension::NotCreated, P, P) => (
            "TimescaleDB is preloaded on this server, but this database was set up with plain tables".into(),
            Some(format!("to store samples in hypertables, {CONVERT}")),
        ),
        (Extension::NotPreloaded, P, P) => (
            "TimescaleDB is installed on the server but not preloaded (shared_preload_libraries), so it cannot be used".into(),
            Some(format!("to use it: add timescaledb to shared_preload_libraries, restart PostgreSQL, then {CONVERT}")),
        ),
        (Extension::NotInstalled, P, P) => (
            "TimescaleDB is not installed on the server: plain PostgreSQL tables".into(),
            None,
        ),
    };
    StorageReport {
        mode,
        why,
        advice,
        extension,
        usage_samples: samples,
        ledger,
        drift: Vec::new(),
    }
}

/// What converting would do to one table.
#[derive(Debug, Clone)]
pub struct TableEstimate {
    /// The table.
    pub table: &'static str,
    /// Rows, from the planner's statistics (`reltuples`; exact after `ANALYZE`).
    pub rows: i64,
    /// Bytes with indexes and TOAST.
    pub bytes: i64,
    /// Chunk interval it gets.
    pub chunk: &'static str,
}

/// The tables `--to-timescaledb` would convert (those not hypertables yet), with sizes.
pub async fn conversion_estimate(
    client: &tokio_postgres::Client,
    report: &StorageReport,
) -> anyhow::Result<Vec<TableEstimate>> {
    let mut estimates = Vec::new();
    for h in HYPERTABLES {
        let kind = match h.table {
            "usage_samples" => report.usage_samples,
            _ => report.ledger,
        };
        if kind == TableKind::Hypertable {
            continue;
        }
        let row = client
            .query_one(
                "SELECT greatest(c.reltuples, 0)::bigint AS rows, pg_total_relation_size(c.oid) AS bytes
                 FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&h.table],
            )
            .await
            .with_context(|| format!("sizing {}", h.table))?;
        estimates.push(TableEstimate {
            table: h.table,
            rows: col(&row, "rows")?,
            bytes: col(&row, "bytes")?,
            chunk: h.chunk,
        });
    }
    Ok(estimates)
}

/// Converts the plain tables to hypertables (`create_hypertable(..., migrate_data =>
/// true)`), with compression settings and policies; creates the extension first.
/// `progress` hears each step. Each table converts in its own transaction, holding
/// an exclusive lock on it meanwhile: writers wait, nothing is lost.
pub async fn convert_to_timescaledb(
    client: &mut tokio_postgres::Client,
    mut progress: impl FnMut(String),
) -> anyhow::Result<StorageReport> {
    let report = inspect(client).await?;
    match &report.extension {
        Extension::NotInstalled | Extension::NotPreloaded => {
            anyhow::bail!(
                "cannot convert to TimescaleDB: {}{}",
                report.why,
                match report.extension {
                    Extension::NotPreloaded => "; add timescaledb to shared_preload_libraries and restart PostgreSQL first",
                    _ => "; install it first (https://docs.timescale.com/self-hosted/latest/install/)",
                }
            )
        }
        Extension::NotCreated => {
            progress("creating the timescaledb extension".into());
            client
                .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                .await
                .context("creating the timescaledb extension")?;
        }
        Extension::Created(_) => {}
    }
    for estimate in conversion_estimate(client, &report).await? {
        let h = HYPERTABLES
            .iter()
            .find(|h| h.table == estimate.table)
            .context("unknown hypertable")?;
        progress(format!(
            "converting {} (~{} rows, {}) to a hypertable with {} chunks…",
            h.table,
            estimate.rows,
            human_bytes(estimate.bytes),
            h.chunk
        ));
        let started = Instant::now();
        let tx = client.transaction().await?;
        // Copying every row into chunks takes as long as it takes.
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        tx.execute(
            "SELECT create_hypertable($1::text::regclass, by_range('time', $2::text::interval),
                                      migrate_data => true)",
            &[&h.table, &h.chunk],
        )
        .await
        .with_context(|| format!("converting {}", h.table))?;
        let chunks: i64 = col(
            &tx.query_one(
                "SELECT count(*) AS n FROM timescaledb_information.chunks WHERE hypertable_name = $1",
                &[&h.table],
            )
            .await?,
            "n",
        )?;
        tx.commit().await?;
        progress(format!(
            "converted {} in {:.1} s ({chunks} chunks)",
            h.table,
            started.elapsed().as_secs_f64()
        ));
    }
    ensure_compression(client, &mut progress).await?;
    inspect(client).await
}

/// Compression settings and a compression policy on each hypertable that lacks them
/// (an operator's own `compress_after` is kept: only a missing policy is added).
async fn ensure_compression(
    client: &tokio_postgres::Client,
    progress: &mut impl FnMut(String),
) -> anyhow::Result<()> {
    for h in HYPERTABLES {
        let row = client
            .query_opt(
                "SELECT compression_enabled FROM timescaledb_information.hypertables
                 WHERE hypertable_name = $1 AND hypertable_schema = current_schema()",
                &[&h.table],
            )
            .await
            .context("reading compression settings")?;
        let Some(row) = row else { continue };
        if !col::<bool>(&row, "compression_enabled")? {
            progress(format!("enabling compression on {}", h.table));
            // Identifiers from the constant table above, not input.
            client
                .batch_execute(&format!(
                    "ALTER TABLE {} SET (timescaledb.compress, timescaledb.compress_segmentby = '{}',
                                         timescaledb.compress_orderby = '{}')",
                    h.table, h.segment_by, h.order_by
                ))
                .await
                .with_context(|| format!("enabling compression on {}", h.table))?;
        }
        if policy_job(client, "policy_compression", h.table)
            .await?
            .is_none()
        {
            progress(format!(
                "adding a compression policy on {} (after {})",
                h.table, h.compress_after
            ));
            client
                .execute(
                    "SELECT add_compression_policy($1::text::regclass, compress_after => $2::text::interval,
                                                   if_not_exists => true)",
                    &[&h.table, &h.compress_after],
                )
                .await
                .with_context(|| format!("adding a compression policy on {}", h.table))?;
        }
    }
    Ok(())
}

/// The id of a TimescaleDB policy job of `kind` (`policy_retention`, …) on `table`.
pub async fn policy_job(
    client: &tokio_postgres::Client,
    kind: &str,
    table: &str,
) -> anyhow::Result<Option<i32>> {
    client
        .query_opt(
            "SELECT job_id FROM timescaledb_information.jobs
             WHERE proc_name = $1 AND hypertable_name = $2 ORDER BY job_id LIMIT 1",
            &[&kind, &table],
        )
        .await
        .context("reading TimescaleDB jobs")?
        .map(|r| col(&r, "job_id"))
        .transpose()
}

/// The sample retention in force (days, 0 keeps all), as `os-credits migrate` last
/// set it; `None` before it ever did.
pub async fn applied_retention_days(
    client: &tokio_postgres::Client,
) -> anyhow::Result<Option<i64>> {
    client
        .query_opt(
            "SELECT value FROM os_credits_policies WHERE name = 'samples_retention_days'",
            &[],
        )
        .await
        .context("reading the applied retention")?
        .map(|r| col(&r, "value"))
        .transpose()
}

/// Records the retention days. `only_if_unset`: the first start of a new database
/// records its setting, like it creates the schema; later changes need `migrate`.
pub async fn record_retention_days(
    client: &tokio_postgres::Client,
    days: u32,
    only_if_unset: bool,
) -> anyhow::Result<bool> {
    let days = i64::from(days);
    let sql = match only_if_unset {
        true => {
            "INSERT INTO os_credits_policies (name, value) VALUES ('samples_retention_days', $1)
                 ON CONFLICT (name) DO NOTHING"
        }
        false => {
            "INSERT INTO os_credits_policies (name, value) VALUES ('samples_retention_days', $1)
                  ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, applied_at = now()
                  WHERE os_credits_policies.value IS DISTINCT FROM EXCLUDED.value"
        }
    };
    Ok(client
        .execute(sql, &[&days])
        .await
        .context("recording the retention")?
        > 0)
}

/// `os-credits migrate`'s part after the schema: the retention setting, TimescaleDB's
/// own retention policy removed (it drops chunks billing has not reached; the
/// maintenance worker retains instead), compression where missing.
pub async fn apply_policies(
    client: &tokio_postgres::Client,
    retention_days: u32,
    mut progress: impl FnMut(String),
) -> anyhow::Result<()> {
    if record_retention_days(client, retention_days, false).await? {
        progress(format!("SAMPLES_RETENTION_DAYS={retention_days} applied"));
    }
    let report = inspect(client).await?;
    if report.mode == StorageMode::Timescaledb {
        if let Some(job) = policy_job(client, "policy_retention", "usage_samples").await? {
            progress(format!(
                "removing TimescaleDB retention policy job {job} on usage_samples: it drops chunks whether or not billing has passed them; the maintenance worker applies SAMPLES_RETENTION_DAYS instead"
            ));
            client
                .execute(
                    "SELECT remove_retention_policy('usage_samples', if_exists => true)",
                    &[],
                )
                .await
                .context("removing the retention policy")?;
        }
    }
    if matches!(report.extension, Extension::Created(_)) {
        ensure_compression(client, &mut progress).await?;
    }
    Ok(())
}

/// What differs from what `migrate` would set; `serve` reports it, never fixes it.
pub async fn drift(
    client: &tokio_postgres::Client,
    report: &StorageReport,
    retention_days: u32,
) -> anyhow::Result<Vec<String>> {
    let mut drift = Vec::new();
    match applied_retention_days(client).await? {
        Some(applied) if applied != i64::from(retention_days) => drift.push(format!(
            "SAMPLES_RETENTION_DAYS is {retention_days} but the database applies {applied}: run `os-credits migrate` to apply it"
        )),
        None => drift.push(format!(
            "SAMPLES_RETENTION_DAYS ({retention_days}) was never applied to this database: run `os-credits migrate`"
        )),
        Some(_) => {}
    }
    if report.mode == StorageMode::Timescaledb {
        if let Some(job) = policy_job(client, "policy_retention", "usage_samples").await? {
            drift.push(format!(
                "TimescaleDB retention policy job {job} on usage_samples drops chunks whether or not billing has passed them: run `os-credits migrate` to remove it"
            ));
        }
    }
    for h in HYPERTABLES {
        let kind = match h.table {
            "usage_samples" => report.usage_samples,
            _ => report.ledger,
        };
        if kind == TableKind::Hypertable
            && policy_job(client, "policy_compression", h.table)
                .await?
                .is_none()
        {
            drift.push(format!(
                "{} has no compression policy: run `os-credits migrate` to add it",
                h.table
            ));
        }
    }
    Ok(drift)
}

/// `1.5 GB`-style sizes for progress lines.
pub fn human_bytes(bytes: i64) -> String {
    const UNITS: &[&str] = &["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use TableKind::{Hypertable as H, Plain as P};

    #[test]
    fn every_state_names_its_mode_and_what_to_do() {
        let created = || Extension::Created("2.22.1".into());
        let cases = [
            (created(), H, H, StorageMode::Timescaledb, false),
            (created(), H, P, StorageMode::Timescaledb, true),
            (created(), P, H, StorageMode::Postgresql, true),
            (created(), P, P, StorageMode::Postgresql, true),
            (Extension::NotCreated, P, P, StorageMode::Postgresql, true),
            (Extension::NotPreloaded, P, P, StorageMode::Postgresql, true),
            (
                Extension::NotInstalled,
                P,
                P,
                StorageMode::Postgresql,
                false,
            ),
        ];
        for (extension, samples, ledger, mode, advice) in cases {
            let case = format!("{extension:?} {samples:?} {ledger:?}");
            let report = describe(extension, samples, ledger);
            assert_eq!(report.mode, mode, "{case}");
            assert_eq!(report.advice.is_some(), advice, "{case}: {report:?}");
            if advice {
                assert!(
                    report
                        .advice
                        .as_deref()
                        .unwrap_or("")
                        .contains("--to-timescaledb"),
                    "{case}: {report:?}"
                );
            }
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0.0 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(45 * 1024 * 1024), "45.0 MB");
    }
}
