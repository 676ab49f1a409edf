//! Billing and API benchmarks, each against a baseline measured in the same run:
//! - billing throughput of a backlog (10,000 projects × 2 metrics × 100 samples)
//!   against PostgreSQL merely streaming the same samples in series/time order;
//! - `credits_history` latency (p50/p99) for a project with a year of 5-minute
//!   ledger rows among 1,000 projects, with `step=1d` and without;
//! - requests/s and p99 of `GET /api/current_credits/{p}` against `GET /ping`
//!   under 32 concurrent connections on loopback.
//!
//! Sizes: BENCH_PROJECTS, BENCH_SAMPLES, BENCH_HISTORY_PROJECTS, BENCH_HTTP_SECONDS.

#[path = "support/mod.rs"]
mod support;

use chrono::Utc;
use futures::StreamExt;
use os_credits::billing::engine;
use os_credits::config::Settings;
use os_credits::startup::Application;
use std::time::{Duration, Instant};
use support::{env_num, percentile, BenchDb};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let projects = env_num("BENCH_PROJECTS", 10_000);
    let samples = env_num("BENCH_SAMPLES", 100);
    let history_projects = env_num("BENCH_HISTORY_PROJECTS", 1_000);
    let http_seconds = env_num("BENCH_HTTP_SECONDS", 5);
    let database = BenchDb::create("billing").await?;
    let pool = database.pool()?;
    let mut client = pool.get().await?;
    os_credits::store::migrations::run(&mut client).await?;
    drop(client);
    let settings = Settings::from_vars(database.vars())?;

    println!("== billing: {projects} projects x 2 metrics x {samples} samples");
    pool.get()
        .await?
        .batch_execute(&format!(
            "INSERT INTO series (metric, labels, series_key, project)
             SELECT m, jsonb_build_object('project_name', 'p' || i), m || '{{project_name=\"p' || i || '\"}}', 'p' || i
             FROM generate_series(1, {projects}) i, unnest(ARRAY['project_vcpu_usage', 'project_mb_usage']) m;
             INSERT INTO projects (name) SELECT DISTINCT project FROM series ON CONFLICT DO NOTHING;
             INSERT INTO usage_samples (series_id, time, value)
             SELECT s.id, '2026-03-01'::timestamptz + k * interval '30 seconds', k * ((s.id % 7) + 1) * 0.5
             FROM series s, generate_series(0, {samples} - 1) k;
             ANALYZE;"
        ))
        .await?;
    support::checkpoint(&pool).await?;

    let clock = Instant::now();
    let client = pool.get().await?;
    let rows = client
        .query_raw(
            "SELECT series_id, time, value FROM usage_samples ORDER BY series_id, time",
            std::iter::empty::<i32>(),
        )
        .await?;
    let streamed = rows
        .fold(0u64, |n, row| async move { n + u64::from(row.is_ok()) })
        .await;
    let read = clock.elapsed();
    drop(client);

    let clock = Instant::now();
    let summary = engine::run(&pool, &settings, Utc::now()).await?;
    let billing = clock.elapsed();
    assert_eq!(
        summary.samples_billed, streamed,
        "the whole backlog was billed"
    );
    let read_rate = streamed as f64 / read.as_secs_f64();
    let bill_rate = summary.samples_billed as f64 / billing.as_secs_f64();
    println!(
        "stream samples (read):    {read_rate:>12.0} samples/s  ({:.2} s)",
        read.as_secs_f64()
    );
    println!(
        "bill backlog:             {bill_rate:>12.0} samples/s  ({:.2} s, {} projects, {} ledger rows)",
        billing.as_secs_f64(),
        summary.projects_billed,
        summary.ledger_rows
    );
    println!(
        "ratio billing / read:     {:.2}  (target >= 0.25)",
        bill_rate / read_rate
    );

    println!("== history: one project with a year of 5-minute ledger rows among {history_projects} projects");
    pool.get()
        .await?
        .batch_execute(&format!(
            "INSERT INTO projects (name, granted_credits) VALUES ('history-year', 100000);
             INSERT INTO ledger (project, time, kind, metric, usage_from, quantity, price, used_delta, used_after, granted_after)
             SELECT 'history-year', '2025-11-22'::timestamptz + k * interval '5 minutes', 'usage',
                    CASE WHEN k % 2 = 0 THEN 'project_vcpu_usage' ELSE 'project_mb_usage' END,
                    '2025-11-22'::timestamptz + (k - 1) * interval '5 minutes', 0.25, 1, 0.25, (k + 1) * 0.25, 100000
             FROM generate_series(0, 365 * 288 - 1) k;
             INSERT INTO projects (name) SELECT 'h' || i FROM generate_series(2, {history_projects}) i;
             INSERT INTO ledger (project, time, kind, metric, usage_from, quantity, price, used_delta, used_after, granted_after)
             SELECT 'h' || i, '2026-11-01'::timestamptz + k * interval '5 minutes', 'usage', 'project_vcpu_usage',
                    '2026-11-01'::timestamptz + (k - 1) * interval '5 minutes', 1, 1, 1, k + 1, 0
             FROM generate_series(2, {history_projects}) i, generate_series(0, 287) k;
             ANALYZE;"
        ))
        .await?;
    let mut vars = database.vars();
    vars.extend([
        ("CREDITS_HOST".into(), "127.0.0.1".into()),
        ("CREDITS_PORT".into(), "0".into()),
        ("ENDPOINTS_ONLY".into(), "true".into()),
    ]);
    let app = Application::build(Settings::from_vars(vars)?, None).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let stop = app.stop_handle();
    let server = tokio::spawn(app.run_without_workers());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let range = "start_date=2025-11-22%2000:00:00&end_date=2026-11-22%2000:00:00";
    for (label, query) in [
        ("step=1d", format!("{range}&step=1d")),
        ("no step", range.to_owned()),
    ] {
        let url = format!("{base}/api/credits_history/history-year?{query}");
        let mut latencies = Vec::new();
        let mut points = 0;
        for _ in 0..30 {
            let clock = Instant::now();
            let response = http.get(&url).send().await?;
            let status = response.status();
            let body: serde_json::Value = response.json().await?;
            latencies.push(clock.elapsed());
            anyhow::ensure!(
                status.is_success(),
                "credits_history answered {status}: {body}"
            );
            points = body["timestamps"].as_array().map_or(0, Vec::len);
        }
        latencies.sort();
        println!(
            "credits_history {label:8} {points:>7} points   p50 {:>8.1} ms   p99 {:>8.1} ms",
            percentile(&latencies, 50.0).as_secs_f64() * 1e3,
            percentile(&latencies, 99.0).as_secs_f64() * 1e3
        );
    }

    println!("== HTTP: 32 concurrent connections, {http_seconds} s per endpoint");
    let mut baseline = None;
    for (label, path) in [
        ("GET /ping", "/ping".to_owned()),
        (
            "GET /api/current_credits/{p}",
            "/api/current_credits/p42".to_owned(),
        ),
    ] {
        let (rps, p99) = load(
            &http,
            &format!("{base}{path}"),
            32,
            Duration::from_secs(http_seconds),
        )
        .await?;
        let ratio = baseline
            .map(|b: f64| format!("   ratio to /ping {:.2}", rps / b))
            .unwrap_or_default();
        baseline.get_or_insert(rps);
        println!(
            "{label:30} {rps:>9.0} req/s   p99 {:>6.2} ms{ratio}",
            p99.as_secs_f64() * 1e3
        );
    }
    stop.stop().await;
    server.await??;
    drop(pool);
    println!("peak memory (VmHWM):      {}", support::peak_memory());
    database.drop_database().await?;
    Ok(())
}

/// `connections` loops requesting `url` for `duration`; returns requests/s and p99.
async fn load(
    http: &reqwest::Client,
    url: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Duration)> {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (http, url) = (http.clone(), url.to_owned());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let clock = Instant::now();
                    let response = http.get(&url).send().await?;
                    anyhow::ensure!(
                        response.status().is_success(),
                        "{url} answered {}",
                        response.status()
                    );
                    response.bytes().await?;
                    latencies.push(clock.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = started.elapsed();
    all.sort();
    Ok((
        all.len() as f64 / elapsed.as_secs_f64(),
        percentile(&all, 99.0),
    ))
}
