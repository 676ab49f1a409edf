//! Ingest benchmark: parse + series lookup + store of 1,000,000 samples (100,000
//! series × 10 scrapes of demo-exporter text) against raw binary `COPY` of the very
//! same rows into an identical table, in the same run, the two taking turns scrape by
//! scrape; then the fetch + parse time of
//! one 200,000-series exposition; then the real service binary scraping that
//! exposition into an empty database: its own peak memory and the time of its
//! `GET /metrics`, which reads gauges per series from the database.
//!
//! Needs a PostgreSQL server (`make bench` provides one via TEST_POSTGRES_*).
//! Sizes can be lowered for a quick look: BENCH_SERIES, BENCH_SCRAPES, BENCH_BIG_SERIES.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use os_credits::config::{ScrapeTarget, Settings, TargetAuth};
use os_credits::demo_exporter::{self, DemoConfig};
use os_credits::store::samples::write_rows;
use os_credits::store::series::SeriesCache;
use os_credits::{ingest, scrape};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;
use support::{env_num, BenchDb};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let series = env_num("BENCH_SERIES", 100_000) as usize;
    let scrapes = env_num("BENCH_SCRAPES", 10) as usize;
    let big_series = env_num("BENCH_BIG_SERIES", 200_000) as usize;
    let database = BenchDb::create("ingest").await?;
    let pool = database.pool()?;
    let mut client = pool.get().await?;
    os_credits::store::migrations::run(&mut client).await?;
    // Both storage modes are benched (TEST_POSTGRES_PORT picks the cluster): say which.
    let mode = format!("{:?}", os_credits::store::storage_mode(&client).await?).to_lowercase();
    drop(client);
    let mut summary = support::Summary::new(&format!("ingest ({mode})"));

    println!(
        "== ingest: {series} series x {scrapes} scrapes = {} samples",
        series * scrapes
    );
    let demo = DemoConfig {
        projects: series / 2,
        ..DemoConfig::default()
    };
    let start: DateTime<Utc> = "2026-06-01T00:00:00Z".parse()?;
    let bodies: Vec<(DateTime<Utc>, String)> = (0..scrapes)
        .map(|i| {
            let now = start + ChronoDuration::seconds(30 * i as i64);
            let mut body = String::new();
            demo_exporter::render(&demo, now, &mut body);
            (now, body)
        })
        .collect();
    let megabytes: f64 = bodies.iter().map(|(_, b)| b.len() as f64).sum::<f64>() / 1e6;

    let settings = Settings::from_vars(Vec::<(String, String)>::new())?;
    let ctx = Arc::new(ingest::IngestContext::new(
        &settings.ingest,
        &settings.rules,
        BTreeMap::new(),
    ));
    let cache = SeriesCache::default();
    // Ours and the baseline take turns, scrape by scrape, so both meet the same
    // machine: a busy neighbour or a checkpoint slows one scrape of each, not all of
    // one side. The baseline copies exactly the rows os-credits stored for that
    // scrape, one COPY per scrape, into an identical table.
    pool.get()
        .await?
        .batch_execute("CREATE TABLE usage_samples_baseline (LIKE usage_samples INCLUDING ALL)")
        .await?;
    support::checkpoint(&pool).await?;
    let mut ours = Duration::ZERO;
    let mut raw = Duration::ZERO;
    let mut stored = 0;
    let mut first_scrape = Duration::ZERO;
    let mut raw_first = Duration::ZERO;
    for (now, body) in &bodies {
        let clock = Instant::now();
        let outcome = ingest::ingest_text(&pool, &cache, ctx.clone(), body.clone(), *now).await?;
        ours += clock.elapsed();
        stored += outcome.stored;
        if first_scrape.is_zero() {
            first_scrape = ours;
        }
        let batch = support::sample_rows(
            &*pool.get().await?,
            "SELECT series_id, time, value FROM usage_samples WHERE time = $1",
            &[now],
        )
        .await?;
        let clock = Instant::now();
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        let sink = tx
            .copy_in(
                "COPY usage_samples_baseline (series_id, time, value) FROM STDIN (FORMAT binary)",
            )
            .await?;
        write_rows(sink, &batch).await?;
        tx.commit().await?;
        raw += clock.elapsed();
        if raw_first.is_zero() {
            raw_first = raw;
        }
    }
    assert_eq!(stored as usize, series * scrapes, "every sample stored");

    let copied: i64 = pool
        .get()
        .await?
        .query_one("SELECT count(*) FROM usage_samples_baseline", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        copied as usize == series * scrapes,
        "the baseline copied {copied} rows, not the {} os-credits stored",
        series * scrapes
    );

    let total = (series * scrapes) as f64;
    let ours_rate = total / ours.as_secs_f64();
    let raw_rate = total / raw.as_secs_f64();
    println!("text parsed:              {megabytes:.1} MB");
    println!(
        "raw binary COPY:          {raw_rate:>12.0} samples/s  ({:.2} s)",
        raw.as_secs_f64()
    );
    println!(
        "os-credits ingest:        {ours_rate:>12.0} samples/s  ({:.2} s)",
        ours.as_secs_f64()
    );
    println!("ratio ingest / raw COPY:  {:.2}", ours_rate / raw_rate);
    // Steady state: scrapes 2.. (series known) against the COPY of exactly those rows,
    // both measured.
    let steady = (ours - first_scrape).as_secs_f64();
    let raw_steady = (raw - raw_first).as_secs_f64();
    let steady_samples = total - series as f64;
    println!(
        "  first scrape (creates {series} series): {:.2} s (raw COPY of its rows {:.2} s); later scrapes: {:.0} samples/s, raw COPY {:.0} samples/s, ratio {:.2}",
        first_scrape.as_secs_f64(),
        raw_first.as_secs_f64(),
        steady_samples / steady,
        steady_samples / raw_steady,
        raw_steady / steady
    );
    // Issue #12 asks 0.6 with the first scrape (which creates every series) counted;
    // issue #2's earlier 0.70 for the same figure is printed beside it.
    summary.at_least(
        "ingest / raw COPY, all scrapes (#12)",
        ours_rate / raw_rate,
        "",
        0.60,
    );
    summary.at_least(
        "ingest / raw COPY, all scrapes (#2)",
        ours_rate / raw_rate,
        "",
        0.70,
    );
    summary.at_least(
        "ingest / raw COPY, scrapes 2.. (series known)",
        raw_steady / steady,
        "",
        0.70,
    );
    summary.info("ingest, all scrapes", ours_rate / 1e3, "k samples/s");

    println!("== one {big_series}-series exposition: fetch + parse");
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/metrics", listener.local_addr()?);
    let exporter = demo_exporter::server(
        DemoConfig {
            projects: big_series / 2,
            ..DemoConfig::default()
        },
        listener,
    )?;
    let exporter_handle = exporter.handle();
    tokio::spawn(exporter);
    let target = ScrapeTarget {
        name: "bench".into(),
        url: url.parse()?,
        labels: BTreeMap::new(),
        auth: TargetAuth::None,
    };
    let http = reqwest::Client::new();
    let mut best: Option<(Duration, Duration, usize, usize)> = None;
    for _ in 0..3 {
        let clock = Instant::now();
        let body = scrape::fetch(&http, &target, Duration::from_secs(60), 512 << 20).await?;
        let fetched = clock.elapsed();
        let prepared =
            SeriesCache::default().read(|state| ingest::prepare(&body, &ctx, state, Utc::now()))?;
        let total = clock.elapsed();
        let kept = prepared.new_rows.len();
        if best.is_none_or(|b| total < b.1) {
            best = Some((fetched, total, body.len(), kept));
        }
    }
    if let Some((fetched, total, bytes, kept)) = best {
        println!(
            "fetch {:.0} ms + parse {:.0} ms = {:.0} ms for {:.1} MB, {kept} samples kept (best of 3)",
            fetched.as_secs_f64() * 1e3,
            (total - fetched).as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            bytes as f64 / 1e6
        );
        summary.info(
            &format!("fetch + parse of one {big_series}-series exposition"),
            total.as_secs_f64() * 1e3,
            "ms",
        );
    }
    drop(pool);
    database.drop_database().await?;

    println!("== the service (real binary) scraping that exposition into an empty database");
    let service_db = BenchDb::create("service").await?;
    let figures = service_scrape(&service_db, &url).await;
    exporter_handle.stop(true).await;
    service_db.drop_database().await?;
    let (peak_mib, gauges_ms, series_stored) = figures?;
    println!(
        "service peak memory (VmHWM) after its first scrape: {peak_mib:.0} MiB; GET /metrics with {series_stored} series: {gauges_ms:.0} ms"
    );
    summary.info(
        &format!("service peak memory, first scrape of {big_series} series"),
        peak_mib,
        "MiB",
    );
    summary.at_most(
        "GET /metrics database gauges, per 1,000 series",
        gauges_ms / (series_stored as f64 / 1000.0),
        "ms",
        5.0,
    );
    summary.finish();
    Ok(())
}

/// Runs `os-credits serve` against `database` with `url` as its only target, waits
/// for the first scrape to succeed, and returns the process's peak resident memory
/// (MiB), the median time of `GET /metrics` (ms, after a warm-up) and the series
/// count it reads its gauges over.
async fn service_scrape(database: &BenchDb, url: &str) -> anyhow::Result<(f64, f64, i64)> {
    let port_file = std::env::temp_dir().join(format!("osc-bench-{}.port", std::process::id()));
    let _ = std::fs::remove_file(&port_file);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_os-credits"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--port-file"])
        .arg(&port_file)
        .envs(database.vars())
        .env("SCRAPE_TARGETS", url)
        .env("SCRAPE_INTERVAL", "3600")
        .env("SCRAPE_TIMEOUT", "300")
        .env("BILLING_INTERVAL", "3600")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let service = support::Child(child);
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(600);
        let http = reqwest::Client::new();
        let base = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
            {
                break format!("http://127.0.0.1:{port}");
            }
            anyhow::ensure!(Instant::now() < deadline, "the service did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        loop {
            let health: serde_json::Value = http
                .get(format!("{base}/health"))
                .send()
                .await?
                .json()
                .await?;
            let target = &health["targets"][0];
            if target["last_success_at"].is_string() {
                break;
            }
            anyhow::ensure!(
                target["last_error"].is_null(),
                "the scrape failed: {target}"
            );
            anyhow::ensure!(Instant::now() < deadline, "no scrape within 600 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let peak_mib = support::peak_memory_kib(service.0.id())? as f64 / 1024.0;
        let mut times = Vec::new();
        for _ in 0..6 {
            let clock = Instant::now();
            let response = http.get(format!("{base}/metrics")).send().await?;
            anyhow::ensure!(
                response.status().is_success(),
                "GET /metrics: {}",
                response.status()
            );
            response.bytes().await?;
            times.push(clock.elapsed());
        }
        times.remove(0); // warm-up
        times.sort();
        let series: i64 = database
            .pool()?
            .get()
            .await?
            .query_one("SELECT count(*) FROM series", &[])
            .await?
            .get(0);
        Ok((peak_mib, times[times.len() / 2].as_secs_f64() * 1e3, series))
    }
    .await;
    drop(service);
    let _ = std::fs::remove_file(&port_file);
    result
}
