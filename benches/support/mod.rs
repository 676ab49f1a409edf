//! Shared by the benchmarks: a fresh database on the test PostgreSQL, memory and
//! latency figures.
#![allow(dead_code)]

use os_credits::config::{DatabaseSettings, Secret};
use std::time::Duration;

/// The samples a query returns as `(series_id, time, value)`, the baseline's rows.
pub async fn sample_rows(
    client: &tokio_postgres::Client,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> anyhow::Result<Vec<os_credits::store::samples::SampleRow>> {
    client
        .query(query, params)
        .await?
        .iter()
        .map(|r| {
            Ok(os_credits::store::samples::SampleRow {
                series_id: r.try_get("series_id")?,
                time: r.try_get("time")?,
                value: r.try_get("value")?,
            })
        })
        .collect()
}

/// A size from the environment (to shrink a bench), or its default.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory (VmHWM, KiB) of process `pid`.
pub fn peak_memory_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))
}

/// A child process stopped (SIGTERM, then SIGKILL after 30 s) when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Flushes dirty buffers so one phase's writes do not slow the next (best effort:
/// it needs rights the bench user may lack).
pub async fn checkpoint(pool: &deadpool_postgres::Pool) -> anyhow::Result<()> {
    let _ = pool.get().await?.batch_execute("CHECKPOINT").await;
    Ok(())
}

/// The p-th percentile (0..=100) of sorted latencies.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A database created for one bench run and dropped after it.
pub struct BenchDb {
    pub settings: DatabaseSettings,
}

impl BenchDb {
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        let settings = DatabaseSettings {
            host: var("TEST_POSTGRES_HOST", "127.0.0.1"),
            port: var("TEST_POSTGRES_PORT", "5432").parse()?,
            user: var("TEST_POSTGRES_USER", "postgres"),
            password: Secret::new(var("TEST_POSTGRES_PASSWORD", "")),
            database: format!("osc_bench_{name}_{}", std::process::id()),
            pool_size: 16,
            pool_timeout: std::time::Duration::from_secs(10),
            lock_timeout: std::time::Duration::from_secs(2),
            statement_timeout: std::time::Duration::from_secs(300),
            idle_in_transaction_timeout: std::time::Duration::from_secs(60),
        };
        let admin = Self::admin(&settings).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", settings.database))
            .await?;
        Ok(Self { settings })
    }

    /// A pool on the bench database, migrated.
    pub fn pool(&self) -> anyhow::Result<deadpool_postgres::Pool> {
        os_credits::store::pool(&self.settings)
    }

    /// Environment variables that point the service at this database.
    pub fn vars(&self) -> Vec<(String, String)> {
        vec![
            ("POSTGRES_HOST".into(), self.settings.host.clone()),
            ("POSTGRES_PORT".into(), self.settings.port.to_string()),
            ("POSTGRES_USER".into(), self.settings.user.clone()),
            (
                "POSTGRES_PASSWORD".into(),
                self.settings.password.expose().to_owned(),
            ),
            ("POSTGRES_DB".into(), self.settings.database.clone()),
        ]
    }

    async fn admin(settings: &DatabaseSettings) -> anyhow::Result<tokio_postgres::Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&settings.host)
            .port(settings.port)
            .user(&settings.user)
            .dbname("postgres");
        if !settings.password.is_empty() {
            config.password(settings.password.expose());
        }
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
            anyhow::anyhow!(
                "no PostgreSQL at {}:{} ({e}); run `make bench`, which starts one",
                settings.host,
                settings.port
            )
        })?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn drop_database(self) -> anyhow::Result<()> {
        Self::admin(&self.settings)
            .await?
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.settings.database
            ))
            .await?;
        Ok(())
    }
}

/// What a figure is judged against (the README's targets, in `## Benchmarks`).
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// Met when measured >= this.
    AtLeast(f64),
    /// Met when measured <= this.
    AtMost(f64),
    /// Shown for information; no target.
    None,
}

struct Row {
    figure: String,
    measured: String,
    target: String,
    verdict: &'static str,
}

/// The table every bench ends with: figure, measured, target, met/missed.
///
/// ```ignore
/// let mut summary = support::Summary::new("ingest");
/// summary.at_least("ingest / raw COPY", ratio, "", 0.70);
/// summary.at_most("p99 GET /x", p99_ms, "ms", 50.0);
/// summary.info("peak memory of the service", mib, "MiB");
/// summary.finish();
/// ```
///
/// `finish` prints the bench's table and, when `BENCH_SUMMARY` names a file (as
/// `make bench` does), appends the rows there so `make bench` ends with one table of
/// all benches.
pub struct Summary {
    bench: String,
    rows: Vec<Row>,
}

impl Summary {
    pub fn new(bench: &str) -> Self {
        Self {
            bench: bench.to_owned(),
            rows: Vec::new(),
        }
    }

    /// A figure that meets its target when it is at least `target`.
    pub fn at_least(&mut self, figure: &str, measured: f64, unit: &str, target: f64) {
        self.add(figure, measured, unit, Target::AtLeast(target));
    }

    /// A figure that meets its target when it is at most `target`.
    pub fn at_most(&mut self, figure: &str, measured: f64, unit: &str, target: f64) {
        self.add(figure, measured, unit, Target::AtMost(target));
    }

    /// A figure shown without a target.
    pub fn info(&mut self, figure: &str, measured: f64, unit: &str) {
        self.add(figure, measured, unit, Target::None);
    }

    pub fn add(&mut self, figure: &str, measured: f64, unit: &str, target: Target) {
        let show = |value: f64| {
            let digits = if value.abs() >= 100.0 {
                0
            } else if value.abs() >= 10.0 {
                1
            } else {
                2
            };
            format!(
                "{value:.digits$}{}{unit}",
                if unit.is_empty() { "" } else { " " }
            )
        };
        let (target, verdict) = match target {
            Target::AtLeast(t) => (
                format!(">= {}", show(t)),
                if measured >= t { "met" } else { "MISSED" },
            ),
            Target::AtMost(t) => (
                format!("<= {}", show(t)),
                if measured <= t { "met" } else { "MISSED" },
            ),
            Target::None => ("-".to_owned(), "-"),
        };
        self.rows.push(Row {
            figure: figure.to_owned(),
            measured: show(measured),
            target,
            verdict,
        });
    }

    /// Prints the table (and appends it to `$BENCH_SUMMARY`).
    pub fn finish(self) {
        let lines: Vec<[String; 5]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    self.bench.clone(),
                    r.figure.clone(),
                    r.measured.clone(),
                    r.target.clone(),
                    r.verdict.to_owned(),
                ]
            })
            .collect();
        println!("== summary: {}", self.bench);
        print!("{}", table(&lines));
        if let Ok(path) = std::env::var("BENCH_SUMMARY") {
            use std::io::Write;
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| {
                    lines
                        .iter()
                        .try_for_each(|line| writeln!(file, "{}", line.join("\t")))
                });
            if let Err(e) = written {
                eprintln!("cannot append the summary to {path}: {e}");
            }
        }
    }
}

/// Rows of (bench, figure, measured, target, verdict) as an aligned text table.
pub fn table(lines: &[[String; 5]]) -> String {
    let header = ["bench", "figure", "measured", "target", "met?"].map(String::from);
    let mut widths = [0usize; 5];
    for line in std::iter::once(&header).chain(lines) {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(&header).chain(lines) {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
