//! Remote-write benchmark: samples pushed to the real service's `POST /api/v1/write`
//! as Prometheus sends them (snappy protobuf, at most `BENCH_RW_BATCH` = 2,000 samples
//! a request, several senders at once, each series once per batch) against raw binary
//! `COPY` of the very same rows into an identical table, in the same batches and with
//! the same concurrency, in the same run.
//!
//! Needs a PostgreSQL server (`make bench` provides one via TEST_POSTGRES_*). Sizes:
//! BENCH_RW_SAMPLES (1,000,000), BENCH_RW_SENDERS (4), BENCH_RW_SERIES per sender
//! (10,000), BENCH_RW_BATCH (2,000).

use os_credits::receive::proto::{Label, Sample, TimeSeries, WriteRequest};
use os_credits::store::samples::{write_rows, SampleRow};
use prost::Message;
use std::time::Instant;

#[path = "support/mod.rs"]
mod support;
use support::{env_num, BenchDb};

const T0: i64 = 1_780_000_000_000;

/// One sender's bodies: series × steps samples, batches of `batch` (a batch holds
/// consecutive series of one step, as a Prometheus shard sends them).
fn bodies(sender: usize, series: usize, samples: usize, batch: usize) -> Vec<Vec<u8>> {
    let steps = samples.div_ceil(series);
    let mut out = Vec::new();
    let mut pending: Vec<TimeSeries> = Vec::with_capacity(batch);
    let mut left = samples;
    let mut encoder = snap::raw::Encoder::new();
    let mut flush = |pending: &mut Vec<TimeSeries>, out: &mut Vec<Vec<u8>>| {
        if pending.is_empty() {
            return;
        }
        let raw = WriteRequest {
            timeseries: std::mem::take(pending),
        }
        .encode_to_vec();
        out.push(encoder.compress_vec(&raw).expect("snappy compresses"));
    };
    'steps: for step in 0..steps {
        for s in 0..series {
            if left == 0 {
                break 'steps;
            }
            left -= 1;
            let label = |name: &str, value: String| Label {
                name: name.into(),
                value,
            };
            pending.push(TimeSeries {
                labels: vec![
                    label("__name__", "project_vcpu_usage".into()),
                    label("instance", format!("hypervisor-{}:9100", s % 50)),
                    label("job", "openstack".into()),
                    label("project_id", format!("id-{sender}-{s}")),
                    label("project_name", format!("project-{sender}-{}", s / 2)),
                ],
                samples: vec![Sample {
                    value: (step * 4 + s % 7) as f64,
                    timestamp: T0 + step as i64 * 30_000,
                }],
            });
            if pending.len() == batch {
                flush(&mut pending, &mut out);
            }
        }
    }
    flush(&mut pending, &mut out);
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = env_num("BENCH_RW_SAMPLES", 1_000_000) as usize;
    let senders = env_num("BENCH_RW_SENDERS", 4).max(1) as usize;
    let series = env_num("BENCH_RW_SERIES", 10_000).max(1) as usize;
    let batch = env_num("BENCH_RW_BATCH", 2_000).clamp(1, 2_000) as usize;
    let per_sender = total / senders;
    let database = BenchDb::create("remote_write").await?;
    let pool = database.pool()?;
    let mode = {
        let mut client = pool.get().await?;
        os_credits::store::migrations::run(&mut client).await?;
        format!("{:?}", os_credits::store::storage_mode(&client).await?).to_lowercase()
    };
    let mut summary = support::Summary::new(&format!("remote write ({mode})"));
    println!(
        "== remote write: {senders} senders x {per_sender} samples ({series} series each), batches of {batch}"
    );

    let sender_list: Vec<String> = (0..senders)
        .map(|i| format!(r#"{{"name": "site-{i}", "bearer_token": "token-{i}", "labels": {{"location": "site-{i}"}}}}"#))
        .collect();
    let mut vars = database.vars();
    vars.extend([
        ("CREDITS_HOST".to_owned(), "127.0.0.1".to_owned()),
        ("CREDITS_PORT".to_owned(), "0".to_owned()),
        (
            "REMOTE_WRITE_SENDERS".to_owned(),
            format!("[{}]", sender_list.join(",")),
        ),
    ]);
    let settings = os_credits::config::Settings::from_vars(vars)?;
    let app = os_credits::startup::Application::build(settings, None).await?;
    let url = format!("http://127.0.0.1:{}/api/v1/write", app.port());
    let stop = app.stop_handle();
    let service = tokio::spawn(app.run_without_workers());

    let all: Vec<Vec<Vec<u8>>> = (0..senders)
        .map(|i| bodies(i, series, per_sender, batch))
        .collect();
    let requests: usize = all.iter().map(Vec::len).sum();
    support::checkpoint(&pool).await?;
    let http = reqwest::Client::new();
    // Phase 0: the first step of each sender (every series new); phase 1: the rest.
    let first_bodies = series.min(per_sender).div_ceil(batch);
    let mut phases = [std::time::Duration::ZERO; 2];
    for (phase, elapsed) in phases.iter_mut().enumerate() {
        let clock = Instant::now();
        let pushes = all.iter().enumerate().map(|(i, bodies)| {
            let http = http.clone();
            let url = url.clone();
            let bodies = match phase {
                0 => &bodies[..first_bodies.min(bodies.len())],
                _ => &bodies[first_bodies.min(bodies.len())..],
            };
            async move {
                for body in bodies {
                    let response = http
                        .post(&url)
                        .bearer_auth(format!("token-{i}"))
                        .header("Content-Encoding", "snappy")
                        .header("Content-Type", "application/x-protobuf")
                        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
                        .body(body.clone())
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status() == 204,
                        "push answered {}: {}",
                        response.status(),
                        response.text().await.unwrap_or_default()
                    );
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        for result in futures::future::join_all(pushes).await {
            result?;
        }
        *elapsed = clock.elapsed();
    }
    let ours = phases[0] + phases[1];
    let stored: i64 = pool
        .get()
        .await?
        .query_one("SELECT count(*) FROM usage_samples", &[])
        .await?
        .get(0);
    let pushed = per_sender * senders;
    anyhow::ensure!(
        stored as usize == pushed,
        "stored {stored} of {pushed} samples"
    );
    stop.stop().await;
    service.await??;

    // The identical rows, in the same batches, with the same concurrency.
    let client = pool.get().await?;
    client
        .batch_execute("CREATE TABLE usage_samples_baseline (LIKE usage_samples INCLUDING ALL)")
        .await?;
    let rows = support::sample_rows(
        &client,
        // (each series' labels read once, not once per sample)
        "WITH s AS MATERIALIZED (
             SELECT id, series_labels(series_key)->>'location' AS location FROM series
         )
         SELECT u.series_id, u.time, u.value FROM usage_samples u JOIN s ON s.id = u.series_id
         ORDER BY s.location, u.time, u.series_id",
        &[],
    )
    .await?;
    drop(client);
    let per: Vec<&[SampleRow]> = rows.chunks(per_sender.max(1)).collect();
    support::checkpoint(&pool).await?;
    let first_rows = series.min(per_sender);
    let mut raw_phases = [std::time::Duration::ZERO; 2];
    for (phase, elapsed) in raw_phases.iter_mut().enumerate() {
        let clock = Instant::now();
        let copies = per.iter().map(|rows| {
            let pool = pool.clone();
            let rows = match phase {
                0 => &rows[..first_rows.min(rows.len())],
                _ => &rows[first_rows.min(rows.len())..],
            };
            async move {
                for chunk in rows.chunks(batch) {
                    let mut client = pool.get().await?;
                    let tx = client.transaction().await?;
                    let sink = tx
                        .copy_in("COPY usage_samples_baseline (series_id, time, value) FROM STDIN (FORMAT binary)")
                        .await?;
                    write_rows(sink, chunk).await?;
                    tx.commit().await?;
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        for result in futures::future::join_all(copies).await {
            result?;
        }
        *elapsed = clock.elapsed();
    }
    let raw = raw_phases[0] + raw_phases[1];

    let ours_rate = pushed as f64 / ours.as_secs_f64();
    let raw_rate = pushed as f64 / raw.as_secs_f64().max(f64::EPSILON);
    println!("requests:                       {requests}");
    println!(
        "raw binary COPY (same batches): {raw_rate:>12.0} samples/s  ({:.2} s)",
        raw.as_secs_f64()
    );
    println!(
        "remote write over HTTP:         {ours_rate:>12.0} samples/s  ({:.2} s)",
        ours.as_secs_f64()
    );
    println!(
        "ratio remote write / raw COPY:  {:.2}",
        ours_rate / raw_rate
    );
    let later = pushed.saturating_sub(first_rows * senders) as f64;
    let steady = later / phases[1].as_secs_f64().max(f64::EPSILON);
    let raw_steady = later / raw_phases[1].as_secs_f64().max(f64::EPSILON);
    println!(
        "  first step (creates {} series): {:.2} s (raw COPY of its rows {:.2} s); later steps: {steady:.0} samples/s, raw COPY {raw_steady:.0} samples/s, ratio {:.2}",
        first_rows * senders,
        phases[0].as_secs_f64(),
        raw_phases[0].as_secs_f64(),
        steady / raw_steady
    );
    summary.at_least(
        "remote write / raw COPY, same batches (samples/s ratio)",
        ours_rate / raw_rate,
        "",
        0.70,
    );
    if later > 0.0 {
        summary.at_least(
            "remote write / raw COPY, steps 2.. (series known)",
            steady / raw_steady,
            "",
            0.70,
        );
    }
    summary.info("remote write", ours_rate / 1e3, "k samples/s");
    summary.finish();
    drop(pool);
    database.drop_database().await?;
    Ok(())
}
