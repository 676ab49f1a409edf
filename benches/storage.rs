//! Storage at scale, TimescaleDB beside plain PostgreSQL, in one run: samples over 30
//! days (10 M by default) stored, table sizes before and after the compression policy
//! runs, then the real service (`os-credits serve`, its own process) bills the whole
//! backlog from compressed chunks: its duration and the service's peak RSS against the
//! same service idle on an empty database (billing memory must not grow with the
//! backlog), then `credits_history` p50/p99 over the compressed ledger.
//!
//! Needs a server preloading TimescaleDB for the TimescaleDB half (`make bench`
//! starts one where TimescaleDB is installed); plain mode runs on the same server
//! in a database that keeps plain tables.
//!
//! Sizes: BENCH_STORAGE_SAMPLES (10000000), BENCH_STORAGE_PROJECTS (256, two series
//! each), BENCH_STORAGE_HISTORY_REQUESTS (200), BENCH_STORAGE_MODES
//! (`timescaledb,postgresql`).

#[path = "support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{env_num, percentile, BenchDb};

/// The billing memory ceiling the README states for the default settings.
const RSS_CEILING_MIB: f64 = 150.0;

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

struct Figures {
    mode: String,
    samples: i64,
    load_secs: f64,
    bytes_before: i64,
    bytes_after: i64,
    bill_secs: f64,
    billed: i64,
    rss_idle_kb: u64,
    rss_billing_kb: u64,
    history_p50: Duration,
    history_p99: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let samples = env_num("BENCH_STORAGE_SAMPLES", 10_000_000);
    let projects = env_num("BENCH_STORAGE_PROJECTS", 256);
    let requests = env_num("BENCH_STORAGE_HISTORY_REQUESTS", 200);
    let modes =
        std::env::var("BENCH_STORAGE_MODES").unwrap_or_else(|_| "timescaledb,postgresql".into());
    let series = projects * 2;
    let per_series = (samples / series).max(2);
    // 30 days of samples, evenly spaced, ending an hour ago (all of it unbilled)
    let step_secs = (30 * 86_400 / per_series).max(1);
    println!(
        "== storage: {} samples ({projects} projects x 2 series x {per_series}, every {step_secs} s over 30 days)",
        series * per_series
    );
    let idle = idle_rss().await?;
    let mut all = Vec::new();
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        match one_mode(mode, projects, per_series, step_secs, requests, idle).await {
            Ok(f) => all.push(f),
            Err(e) => println!("  {mode}: not measured: {e:#}"),
        }
    }
    println!();
    println!(
        "  {:<12} {:>10} {:>9} {:>11} {:>11} {:>9} {:>12} {:>12} {:>9} {:>10} {:>10}",
        "mode",
        "samples",
        "load s",
        "size",
        "compressed",
        "bill s",
        "samples/s",
        "RSS idle",
        "RSS bill",
        "hist p50",
        "hist p99"
    );
    for f in &all {
        println!(
            "  {:<12} {:>10} {:>9.1} {:>11} {:>11} {:>9.1} {:>12.0} {:>9} MB {:>9} MB {:>7.1} ms {:>7.1} ms",
            f.mode,
            f.samples,
            f.load_secs,
            human(f.bytes_before),
            human(f.bytes_after),
            f.bill_secs,
            f.billed as f64 / f.bill_secs.max(1e-9),
            f.rss_idle_kb / 1024,
            f.rss_billing_kb / 1024,
            f.history_p50.as_secs_f64() * 1e3,
            f.history_p99.as_secs_f64() * 1e3,
        );
    }
    println!();
    for f in &all {
        println!(
            "  {}: compressed/plain-size ratio {:.3}; billing RSS / idle RSS {:.2} (flat: the backlog is read {} samples per transaction at most)",
            f.mode,
            f.bytes_after as f64 / f.bytes_before.max(1) as f64,
            f.rss_billing_kb as f64 / f.rss_idle_kb.max(1) as f64,
            os_credits::billing::engine::DEFAULT_BATCH_SAMPLES
        );
    }
    let mut summary = support::Summary::new("storage");
    for f in &all {
        let m = &f.mode;
        summary.info(
            &format!("usage_samples size, {m}"),
            mib(f.bytes_before),
            "MiB",
        );
        if m == "timescaledb" {
            summary.info(
                &format!("usage_samples compressed, {m}"),
                mib(f.bytes_after),
                "MiB",
            );
        }
        summary.info(
            &format!("billing {} samples, {m}", f.billed),
            f.billed as f64 / f.bill_secs.max(1e-9),
            "samples/s",
        );
        summary.at_most(
            &format!("service peak RSS billing the backlog, {m}"),
            f.rss_billing_kb as f64 / 1024.0,
            "MiB",
            RSS_CEILING_MIB,
        );
        summary.info(
            &format!("service peak RSS billing / idle, {m}"),
            f.rss_billing_kb as f64 / f.rss_idle_kb.max(1) as f64,
            "",
        );
        summary.info(
            &format!("credits_history p99 (30 days), {m}"),
            f.history_p99.as_secs_f64() * 1e3,
            "ms",
        );
    }
    summary.finish();
    if let (Some(ts), Some(pg)) = (
        all.iter().find(|f| f.mode == "timescaledb"),
        all.iter().find(|f| f.mode == "postgresql"),
    ) {
        println!(
            "  timescaledb/postgresql: size after compression {:.3}, billing time {:.2}, history p99 {:.2}",
            ts.bytes_after as f64 / pg.bytes_after.max(1) as f64,
            ts.bill_secs / pg.bill_secs.max(1e-9),
            ts.history_p99.as_secs_f64() / pg.history_p99.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

/// Peak RSS of the service on an empty database, after its first billing run.
async fn idle_rss() -> anyhow::Result<u64> {
    let db = BenchDb::create("storage_idle").await?;
    let mut service = Service::start(&db)?;
    service.wait_healthy().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = service.peak_rss_kb();
    drop(service);
    db.drop_database().await?;
    Ok(rss)
}

async fn one_mode(
    mode: &str,
    projects: u64,
    per_series: u64,
    step_secs: u64,
    requests: u64,
    rss_idle_kb: u64,
) -> anyhow::Result<Figures> {
    let db = BenchDb::create(&format!("storage_{mode}")).await?;
    let result = measure(
        &db,
        mode,
        projects,
        per_series,
        step_secs,
        requests,
        rss_idle_kb,
    )
    .await;
    db.drop_database().await?;
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    db: &BenchDb,
    mode: &str,
    projects: u64,
    per_series: u64,
    step_secs: u64,
    requests: u64,
    rss_idle_kb: u64,
) -> anyhow::Result<Figures> {
    let pool = db.pool()?;
    {
        let client = pool.get().await?;
        if mode == "postgresql" {
            client
                .batch_execute(&format!(
                    "ALTER DATABASE {} SET os_credits.timescaledb = off",
                    db.settings.database
                ))
                .await?;
        }
    }
    // a fresh connection sees the database setting
    let pool = db.pool()?;
    let mut client = pool.get().await?;
    os_credits::store::migrations::run(&mut client).await?;
    let found = os_credits::store::storage::inspect(&client).await?;
    anyhow::ensure!(
        format!("{:?}", found.mode).to_lowercase() == mode,
        "this server gives {:?} ({})",
        found.mode,
        found.why
    );
    println!("-- {mode}: {}", found.why);
    let clock = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO series (metric, series_key, project)
             SELECT m, m || '{{project_name=\"p' || i || '\"}}', 'p' || i
             FROM generate_series(1, {projects}) i, unnest(ARRAY['project_vcpu_usage', 'project_mb_usage']) m;
             INSERT INTO projects (name) SELECT DISTINCT project FROM series ON CONFLICT DO NOTHING;
             INSERT INTO usage_samples (series_id, time, value)
             SELECT s.id, date_trunc('hour', now()) - interval '1 hour' - k * interval '{step_secs} seconds',
                    ({per_series} - k) * ((s.id % 7) + 1) * 0.25
             FROM series s, generate_series(0, {per_series} - 1) k;
             ANALYZE;"
        ))
        .await?;
    let load_secs = clock.elapsed().as_secs_f64();
    let stored: i64 = client
        .query_one("SELECT count(*) FROM usage_samples", &[])
        .await?
        .get(0);
    let bytes_before = samples_bytes(&client, mode).await?;
    println!(
        "   stored {stored} samples in {load_secs:.1} s: {}",
        human(bytes_before)
    );
    let bytes_after = if mode == "timescaledb" {
        // The compression policy, brought forward so the 30 days of samples qualify.
        let clock = Instant::now();
        compress_now(&client, "usage_samples").await?;
        let after = samples_bytes(&client, mode).await?;
        println!(
            "   compression policy run in {:.1} s: {}",
            clock.elapsed().as_secs_f64(),
            human(after)
        );
        after
    } else {
        bytes_before
    };
    drop(client);
    support::checkpoint(&pool).await?;

    // The service bills the backlog at start-up; done when every cursor is at its
    // series' newest sample.
    let mut service = Service::start(db)?;
    let clock = Instant::now();
    service.wait_healthy().await?;
    let client = pool.get().await?;
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM billing_cursors
                 WHERE last_time >= date_trunc('hour', now()) - interval '1 hour'",
                &[],
            )
            .await?;
        if row.get::<_, i64>(0) >= (projects * 2) as i64 {
            break;
        }
        service.alive()?;
        anyhow::ensure!(
            clock.elapsed() < Duration::from_secs(3600),
            "billing took over an hour"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bill_secs = clock.elapsed().as_secs_f64();
    let rss_billing_kb = service.peak_rss_kb();
    let ledger: i64 = client
        .query_one("SELECT count(*) FROM ledger", &[])
        .await?
        .get(0);
    println!(
        "   billed in {bill_secs:.1} s ({ledger} ledger rows), service peak RSS {} MB (idle {} MB)",
        rss_billing_kb / 1024,
        rss_idle_kb / 1024
    );
    if mode == "timescaledb" {
        compress_now(&client, "ledger").await?;
    }

    let http = reqwest::Client::new();
    let url = format!(
        "http://127.0.0.1:{}/api/credits_history/p1?start_date=2000-01-01%2000:00:00",
        service.port
    );
    let mut latencies = Vec::new();
    for _ in 0..requests {
        let clock = Instant::now();
        let response = http.get(&url).send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "history: {}",
            response.status()
        );
        response.bytes().await?;
        latencies.push(clock.elapsed());
    }
    latencies.sort();
    drop(service);
    Ok(Figures {
        mode: mode.into(),
        samples: stored,
        load_secs,
        bytes_before,
        bytes_after,
        bill_secs,
        billed: stored,
        rss_idle_kb,
        rss_billing_kb,
        history_p50: percentile(&latencies, 50.0),
        history_p99: percentile(&latencies, 99.0),
    })
}

/// Runs the compression policy of `table` now: `compress_after` brought to one hour,
/// then `CALL run_job` (this build's scheduler does not run jobs itself).
async fn compress_now(client: &tokio_postgres::Client, table: &str) -> anyhow::Result<()> {
    let job: i32 = client
        .query_one(
            "SELECT job_id FROM timescaledb_information.jobs
             WHERE proc_name = 'policy_compression' AND hypertable_name = $1",
            &[&table],
        )
        .await?
        .get(0);
    client
        .batch_execute(&format!(
            "SELECT alter_job({job}, config => (SELECT config FROM timescaledb_information.jobs WHERE job_id = {job})
                                              || '{{\"compress_after\": \"1 hour\"}}')"
        ))
        .await?;
    // on its own: a procedure that commits cannot run inside a multi-statement batch
    client
        .batch_execute(&format!("CALL run_job({job})"))
        .await?;
    Ok(())
}

async fn samples_bytes(client: &tokio_postgres::Client, mode: &str) -> anyhow::Result<i64> {
    let sql = match mode {
        "timescaledb" => "SELECT hypertable_size('usage_samples')",
        _ => "SELECT pg_total_relation_size('usage_samples')",
    };
    Ok(client.query_one(sql, &[]).await?.get(0))
}

fn human(bytes: i64) -> String {
    os_credits::store::storage::human_bytes(bytes)
}

/// `os-credits serve` in its own process against a bench database.
struct Service {
    child: Child,
    port: u16,
}

impl Service {
    fn start(db: &BenchDb) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_os-credits"));
        command
            .arg("serve")
            .envs(db.vars())
            .env("CREDITS_HOST", "127.0.0.1")
            .env("CREDITS_PORT", port.to_string())
            .env("BILLING_INTERVAL", "86400")
            .env("MAINTENANCE_INTERVAL", "86400")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(Self {
            child: command.spawn()?,
            port,
        })
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/ping", self.port);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            self.alive()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "the service did not answer within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => anyhow::bail!("the service exited: {status}"),
            None => Ok(()),
        }
    }

    /// VmHWM of the service process, in kB.
    fn peak_rss_kb(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
