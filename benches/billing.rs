//! Billing and API benchmarks, each against a baseline measured in the same run:
//! - billing throughput of a backlog (10,000 projects × 2 metrics × 100 samples)
//!   against PostgreSQL merely streaming the same samples in series/time order;
//! - `credits_history` latency (p50/p99 of BENCH_LATENCY_REQUESTS, default 1,000) for a project with a year of 5-minute
//!   ledger rows among 1,000 projects, with `step=1d` and without;
//! - requests/s and p99 of `GET /api/current_credits/{p}` and of
//!   `GET /api/credits_history/{p}` (a project with 238 ledger rows) against
//!   `GET /ping` under 32 concurrent connections on loopback, among the 10,000 billed
//!   projects; then the same two while a billing run writes all 10,000 projects' rows
//!   (its backlog sized from the billing rate measured first, so that it outlasts the
//!   loads; the summary shows the billing run's duration over the loads'). The three
//!   loads take 1 s turns (BENCH_HTTP_SECONDS turns each), so a ratio compares loads
//!   measured over the same stretch of time.
//!
//! Every latency percentile comes from at least 1,000 requests after a warm-up.
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
    // latency percentiles come from this many requests, after `warm_up` not counted
    let requests = env_num("BENCH_LATENCY_REQUESTS", 1_000);
    let warm_up = 20;
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
            "INSERT INTO series (metric, series_key, project)
             SELECT m, m || '{{project_name=\"p' || i || '\"}}', 'p' || i
             FROM generate_series(1, {projects}) i, unnest(ARRAY['project_vcpu_usage', 'project_mb_usage']) m;
             INSERT INTO projects (name) SELECT DISTINCT project FROM series ON CONFLICT DO NOTHING;
             INSERT INTO usage_samples (series_id, time, value)
             SELECT s.id, '2026-03-01'::timestamptz + k * interval '30 seconds', k * ((s.id % 7) + 1) * 0.5
             FROM series s, generate_series(0, {samples} - 1) k;
             ANALYZE;"
        ))
        .await?;
    support::checkpoint(&pool).await?;

    // The baseline reads the same samples with the parallelism billing uses
    // (`OS_CREDITS_WORKERS` connections at once, each its share of the series in
    // series/time order), so the ratio compares like with like.
    let parallel = settings.workers.max(1);
    let clock = Instant::now();
    let streams = (0..parallel).map(|part| {
        let pool = pool.clone();
        async move {
            let client = pool.get().await?;
            let rows = client
                .query_raw(
                    "SELECT series_id, time, value FROM usage_samples
                     WHERE series_id % $1 = $2 ORDER BY series_id, time",
                    [parallel as i64, part as i64],
                )
                .await?;
            Ok::<u64, anyhow::Error>(
                rows.fold(0u64, |n, row| async move { n + u64::from(row.is_ok()) })
                    .await,
            )
        }
    });
    let streamed: u64 = futures::future::try_join_all(streams).await?.iter().sum();
    let read = clock.elapsed();
    let expected = projects * 2 * samples;
    anyhow::ensure!(
        streamed == expected,
        "the baseline read {streamed} samples, not {expected}"
    );

    let clock = Instant::now();
    let summary = engine::run(&pool, settings.billing(), Utc::now()).await?;
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
    println!("ratio billing / read:     {:.2}", bill_rate / read_rate);
    let mut report = support::Summary::new("billing");
    report.at_least(
        &format!("billing / parallel read ({parallel} connections), samples/s"),
        bill_rate / read_rate,
        "",
        0.25,
    );
    report.info("billing a backlog", bill_rate / 1e3, "k samples/s");

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
             INSERT INTO projects (name, granted_credits) VALUES ('rows238', 1000);
             INSERT INTO ledger (project, time, kind, metric, usage_from, quantity, price, used_delta, used_after, granted_after)
             SELECT 'rows238', '2026-11-21'::timestamptz + k * interval '5 minutes', 'usage',
                    CASE WHEN k % 2 = 0 THEN 'project_vcpu_usage' ELSE 'project_mb_usage' END,
                    '2026-11-21'::timestamptz + (k - 1) * interval '5 minutes', 0.5, 1, 0.5, (k + 1) * 0.5, 1000
             FROM generate_series(0, 237) k;
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
    for (label, step) in [("step=1d", "&step=1d"), ("no step", "")] {
        let mut latencies = Vec::new();
        let mut points = 0;
        for round in 0..warm_up + requests {
            // A different end second each time (after the last row, so the same
            // answer): every request reads the database, none is answered from memory.
            let url = format!(
                "{base}/api/credits_history/history-year?start_date=2025-11-22%2000:00:00&end_date=2026-11-22%20{:02}:{:02}:{:02}{step}",
                round / 3600,
                round / 60 % 60,
                round % 60
            );
            let clock = Instant::now();
            let response = http.get(&url).send().await?;
            let status = response.status();
            let body: serde_json::Value = response.json().await?;
            if round >= warm_up {
                latencies.push(clock.elapsed());
            }
            anyhow::ensure!(
                status.is_success(),
                "credits_history answered {status}: {body}"
            );
            points = body["timestamps"].as_array().map_or(0, Vec::len);
        }
        latencies.sort();
        let (p50, p99) = (
            percentile(&latencies, 50.0).as_secs_f64() * 1e3,
            percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        );
        println!(
            "credits_history {label:8} {points:>7} points   p50 {p50:>8.1} ms   p99 {p99:>8.1} ms   ({} requests after {warm_up} not counted)",
            latencies.len()
        );
        report.info(&format!("credits_history a year {label}, p50"), p50, "ms");
        if label == "step=1d" {
            report.at_most(
                &format!("credits_history a year {label}, p99"),
                p99,
                "ms",
                20.0,
            );
        } else {
            report.info(&format!("credits_history a year {label}, p99"), p99, "ms");
        }
    }

    println!("== HTTP: 32 concurrent connections, {http_seconds} s per endpoint in 1 s turns");
    let endpoints = [
        ("GET /ping", "/ping"),
        ("GET /api/current_credits/{p}", "/api/current_credits/p42"),
        (
            "GET /api/credits_history/{p} (238 rows)",
            "/api/credits_history/rows238",
        ),
    ];
    // The three loads take turns, one second each, until each has had
    // `http_seconds`: a ratio then compares loads measured over the same stretch of
    // time, not one phase with another a few seconds later.
    let measure = |phase: &'static str| {
        let (http, base) = (&http, &base);
        async move {
            let mut latencies = vec![Vec::new(); endpoints.len()];
            let turns = http_seconds.max(1);
            for slice in 0..turns {
                for (i, (_, path)) in endpoints.iter().enumerate() {
                    // one second of the first turn warms connections and caches up
                    let warm_up = match slice {
                        0 => Duration::from_secs(1),
                        _ => Duration::from_millis(100),
                    };
                    let times = load(
                        http,
                        &format!("{base}{path}"),
                        32,
                        warm_up,
                        Duration::from_secs(1),
                    )
                    .await?;
                    latencies[i].extend(times);
                }
            }
            let mut figures = Vec::new();
            let took = Duration::from_secs(turns);
            for ((label, path), mut all) in endpoints.iter().zip(latencies) {
                all.sort();
                anyhow::ensure!(
                    all.len() >= 1_000,
                    "only {} requests to {path} in {took:?}: a p99 needs at least 1,000 (raise BENCH_HTTP_SECONDS)",
                    all.len()
                );
                let rps = all.len() as f64 / took.as_secs_f64();
                let p99 = percentile(&all, 99.0);
                println!(
                    "{phase}{label:42} {rps:>9.0} req/s   p99 {:>6.2} ms",
                    p99.as_secs_f64() * 1e3
                );
                figures.push((rps, p99.as_secs_f64() * 1e3));
            }
            Ok::<_, anyhow::Error>(figures)
        }
    };
    let clock = Instant::now();
    let quiet = measure("").await?;
    let loads_took = clock.elapsed();
    report_http(&mut report, &quiet, "");
    // A second backlog, billed while the same loads run. It is sized from the billing
    // rate measured above so that the run would last twice as long as the quiet
    // loads took: whole hours of 30-second samples for every series, at least one.
    // The margin is for a small first backlog (a quick run's), which understates the
    // rate: with 1.5 times, quick runs' billing ended at 0.94-1.11 of the loads (at
    // default sizes, 1.6). A fixed hour ended half-way through the loads on a faster
    // machine, and the rest measured a quiet service.
    let series = 2 * projects;
    let hours = (2.0 * bill_rate * loads_took.as_secs_f64() / (series * 120) as f64)
        .ceil()
        .max(1.0) as u64;
    let busy_samples = hours * 120;
    pool.get()
        .await?
        .batch_execute(&format!(
            "INSERT INTO usage_samples (series_id, time, value)
             SELECT s.id, '2026-03-01'::timestamptz + k * interval '30 seconds', k * ((s.id % 7) + 1) * 0.5
             FROM series s, generate_series({samples}, {samples} + {busy_samples} - 1) k;
             ANALYZE usage_samples;"
        ))
        .await?;
    let billing_run = {
        let (pool, settings) = (pool.clone(), settings.clone());
        tokio::spawn(async move {
            let clock = Instant::now();
            let summary = engine::run(&pool, settings.billing(), Utc::now()).await?;
            Ok::<_, anyhow::Error>((summary, clock.elapsed(), Instant::now()))
        })
    };
    let clock = Instant::now();
    let busy = measure("during billing: ").await?;
    let busy_took = clock.elapsed();
    let (summary, took, billing_ended) = billing_run.await??;
    anyhow::ensure!(
        summary.samples_billed == series * busy_samples,
        "the billing run during the loads billed {} samples, not {}",
        summary.samples_billed,
        series * busy_samples
    );
    println!(
        "the billing run during the loads: {} projects, {} samples ({hours} h per series), {} ledger rows in {:.1} s; the loads took {:.1} s",
        summary.projects_billed,
        summary.samples_billed,
        summary.ledger_rows,
        took.as_secs_f64(),
        busy_took.as_secs_f64(),
    );
    // Below 1 the last loads ran after billing had ended: their figures are not
    // "during billing".
    report.at_least(
        "billing run / loads beside it, duration",
        billing_ended.saturating_duration_since(clock).as_secs_f64() / busy_took.as_secs_f64(),
        "",
        1.0,
    );
    report_http(&mut report, &busy, ", during billing");
    stop.stop().await;
    server.await??;
    drop(pool);
    database.drop_database().await?;
    report.finish();
    Ok(())
}

/// Rows of the summary from (req/s, p99 ms) of /ping, current_credits, history.
fn report_http(report: &mut support::Summary, figures: &[(f64, f64)], phase: &str) {
    let [(ping_rps, ping_p99), (credits_rps, credits_p99), (history_rps, history_p99)] = figures
    else {
        return;
    };
    report.info(
        &format!("GET /ping, 32 connections{phase}"),
        *ping_rps,
        "req/s",
    );
    report.at_least(
        &format!("current_credits / ping, req/s{phase}"),
        credits_rps / ping_rps,
        "",
        0.8,
    );
    report.at_most(
        &format!("current_credits / ping, p99{phase}"),
        credits_p99 / ping_p99,
        "",
        2.0,
    );
    report.at_least(
        &format!("credits_history 238 rows / ping, req/s{phase}"),
        history_rps / ping_rps,
        "",
        0.3,
    );
    report.info(
        &format!("credits_history 238 rows, p99{phase}"),
        *history_p99,
        "ms",
    );
}

/// `connections` loops requesting `url` for `warm_up` (not counted), then for
/// `duration`; returns the latencies counted.
async fn load(
    http: &reqwest::Client,
    url: &str,
    connections: usize,
    warm_up: Duration,
    duration: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let warm_up = Instant::now() + warm_up;
    let deadline = warm_up + duration;
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
                    if clock > warm_up {
                        latencies.push(clock.elapsed());
                    }
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}
