//! Ingest benchmark: parse + series lookup + store of 1,000,000 samples (100,000
//! series × 10 scrapes of demo-exporter text) against raw binary `COPY` of the very
//! same rows into an identical table, in the same run; then the fetch + parse time of
//! one 200,000-series exposition and the peak memory.
//!
//! Needs a PostgreSQL server (`make bench` provides one via TEST_POSTGRES_*).
//! Sizes can be lowered for a quick look: BENCH_SERIES, BENCH_SCRAPES, BENCH_BIG_SERIES.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use os_credits::config::{ScrapeTarget, Settings, TargetAuth};
use os_credits::demo_exporter::{self, DemoConfig};
use os_credits::scrape::{self, ingest};
use os_credits::store::samples::{write_rows, SampleRow};
use os_credits::store::series::SeriesCache;
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
    drop(client);

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
    let ctx = Arc::new(ingest::IngestContext::new(&settings, BTreeMap::new()));
    let cache = SeriesCache::default();
    support::checkpoint(&pool).await?;
    let clock = Instant::now();
    let mut stored = 0;
    let mut first_scrape = Duration::ZERO;
    for (now, body) in &bodies {
        let outcome = ingest::ingest(&pool, &cache, ctx.clone(), body.clone(), *now).await?;
        stored += outcome.stored;
        if first_scrape.is_zero() {
            first_scrape = clock.elapsed();
        }
    }
    let ours = clock.elapsed();
    assert_eq!(stored as usize, series * scrapes, "every sample stored");

    // The identical rows, one COPY per scrape, into an identical table.
    let client = pool.get().await?;
    client
        .batch_execute("CREATE TABLE usage_samples_baseline (LIKE usage_samples INCLUDING ALL)")
        .await?;
    let mut batches: Vec<Vec<SampleRow>> = Vec::with_capacity(scrapes);
    for (now, _) in &bodies {
        let rows = client
            .query(
                "SELECT series_id, time, value FROM usage_samples WHERE time = $1",
                &[now],
            )
            .await?;
        batches.push(
            rows.iter()
                .map(|r| SampleRow {
                    series_id: r.get(0),
                    time: r.get(1),
                    value: r.get(2),
                })
                .collect(),
        );
    }
    drop(client);
    support::checkpoint(&pool).await?;
    let clock = Instant::now();
    for batch in &batches {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        let sink = tx
            .copy_in(
                "COPY usage_samples_baseline (series_id, time, value) FROM STDIN (FORMAT binary)",
            )
            .await?;
        write_rows(sink, batch).await?;
        tx.commit().await?;
    }
    let raw = clock.elapsed();

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
    println!(
        "ratio ingest / raw COPY:  {:.2}  (target >= 0.70)",
        ours_rate / raw_rate
    );
    let steady = (ours - first_scrape).as_secs_f64();
    let raw_steady = raw.as_secs_f64() * (scrapes - 1) as f64 / scrapes as f64;
    println!(
        "  first scrape (creates {series} series): {:.2} s; later scrapes: {:.0} samples/s, ratio {:.2} against raw COPY of the same rows",
        first_scrape.as_secs_f64(),
        (total - series as f64) / steady,
        raw_steady / steady
    );

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
    exporter_handle.stop(true).await;
    if let Some((fetched, total, bytes, kept)) = best {
        println!(
            "fetch {:.0} ms + parse {:.0} ms = {:.0} ms for {:.1} MB, {kept} samples kept (best of 3)",
            fetched.as_secs_f64() * 1e3,
            (total - fetched).as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            bytes as f64 / 1e6
        );
    }
    println!("peak memory (VmHWM):      {}", support::peak_memory());
    drop(pool);
    database.drop_database().await?;
    Ok(())
}
