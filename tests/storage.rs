//! Storage modes on a real server: retention never removes what billing has not
//! passed (TimescaleDB and plain), the mode comes from what the tables are, a plain
//! database converts to TimescaleDB and bills on exactly, and `serve` never touches
//! the policies `os-credits migrate` owns.

mod common;

use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use common::{needs_timescaledb, spawn_app_on, TestApp, TestDb};
use os_credits::billing::engine;
use os_credits::config::Settings;
use os_credits::store::StorageMode;
use rust_decimal::Decimal;
use std::str::FromStr;
use std::time::Duration;

const BILL: (&str, &str) = ("METRICS_TO_BILL", r#"{"project_vcpu_usage": 1.5}"#);
const RETENTION_30: (&str, &str) = ("SAMPLES_RETENTION_DAYS", "30");

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal literal")
}

/// Every 6 hours from 40 days ago until `now`, on whole hours: (time, value) of a
/// counter growing 0.25 per sample.
fn forty_days(now: DateTime<Utc>) -> Vec<(DateTime<Utc>, f64)> {
    let start = (now - ChronoDuration::days(40))
        .duration_trunc(ChronoDuration::hours(1))
        .expect("truncate");
    (0..=160)
        .map(|i| (start + ChronoDuration::hours(6 * i), 0.25 * i as f64))
        .filter(|(t, _)| *t <= now)
        .collect()
}

/// A counter series of `project` with `samples`; returns its id.
async fn seed(app: &TestApp, project: &str, samples: &[(DateTime<Utc>, f64)]) -> i64 {
    let mut client = app.db.connect().await;
    let id = common::seed_series(
        &mut client,
        "project_vcpu_usage",
        &[("project_name", project)],
        project,
    )
    .await;
    common::insert_samples(&client, id, samples).await;
    id
}

fn settings(db: &TestDb, extra: &[(&str, &str)]) -> Settings {
    let mut vars = db.vars();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Settings::from_vars(vars).expect("settings")
}

async fn bill(app: &TestApp, now: DateTime<Utc>) -> engine::BillingSummary {
    engine::run(&app.app_pool, settings(&app.db, &[BILL]).billing(), now)
        .await
        .expect("billing run")
}

async fn used(app: &TestApp, project: &str) -> Decimal {
    app.db
        .connect()
        .await
        .query_one(
            "SELECT used_credits FROM projects WHERE name = $1",
            &[&project],
        )
        .await
        .expect("used credits")
        .get(0)
}

/// Runs the `os-credits` binary against `db`; returns (exit code, stdout, stderr).
async fn os_credits(db: &TestDb, extra: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_os-credits"));
    command
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (key, value) in db.vars() {
        command.env(key, value);
    }
    for (key, value) in extra {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("os-credits runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait for os-credits").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("os-credits {args:?} did not finish within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().expect("os-credits output");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn is_hypertable(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
                AND EXISTS (SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'usage_samples')",
            &[],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

/// Runs every TimescaleDB job on our hypertables with `CALL run_job` (this build's
/// scheduler does not run them itself).
async fn run_every_job(db: &TestDb) {
    let client = db.connect().await;
    let jobs: Vec<i32> = client
        .query(
            "SELECT job_id FROM timescaledb_information.jobs
             WHERE hypertable_name IN ('usage_samples', 'ledger') ORDER BY job_id",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!jobs.is_empty(), "the hypertables have policy jobs");
    for job in jobs {
        client
            .batch_execute(&format!("CALL run_job({job})"))
            .await
            .unwrap_or_else(|e| panic!("CALL run_job({job}): {e}"));
    }
}

async fn sample_times(db: &TestDb) -> Vec<DateTime<Utc>> {
    db.connect()
        .await
        .query(
            "SELECT time FROM usage_samples ORDER BY series_id, time",
            &[],
        )
        .await
        .expect("samples")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn cursor_time(db: &TestDb) -> DateTime<Utc> {
    db.connect()
        .await
        .query_one("SELECT max(last_time) FROM billing_cursors", &[])
        .await
        .expect("cursor")
        .get(0)
}

async fn job_ids(db: &TestDb) -> Vec<(String, String, i32)> {
    db.connect()
        .await
        .query(
            "SELECT proc_name::text, hypertable_name::text, job_id FROM timescaledb_information.jobs
             WHERE hypertable_name IS NOT NULL ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The credits of a counter going 0 → 0.25 × (n − 1) at 1.5 per unit.
fn expected_credits(samples: &[(DateTime<Utc>, f64)]) -> Decimal {
    let first = Decimal::from_str(&samples[0].1.to_string()).expect("value");
    let last = Decimal::from_str(&samples[samples.len() - 1].1.to_string()).expect("value");
    (last - first) * dec("1.5")
}

#[tokio::test]
async fn retention_on_timescaledb_never_drops_a_sample_billing_has_not_passed() {
    if !needs_timescaledb("retention_on_timescaledb").await {
        return;
    }
    let app = spawn_app_on(TestDb::create().await, &[BILL, RETENTION_30], false).await;
    assert_eq!(app.mode, StorageMode::Timescaledb);
    let now = Utc::now();
    let samples = forty_days(now);
    seed(&app, "behind", &samples).await;
    let before = sample_times(&app.db).await;

    // Billing has not run: the samples older than 30 days are all unbilled.
    let (code, out, err) = os_credits(&app.db, &[BILL, RETENTION_30], &["maintain"]).await;
    assert_eq!(code, 0, "maintain: {out}\n{err}");
    run_every_job(&app.db).await;
    assert_eq!(sample_times(&app.db).await, before, "maintain: {out}");
    let round: serde_json::Value = serde_json::from_str(out.trim()).expect("round as JSON");
    assert_eq!(round["chunks_dropped"], 0, "{round}");
    assert!(round["held_by_series"].is_i64(), "{round}");

    // Billing catches up to 35 days ago: what is older may go, nothing after it.
    bill(&app, now - ChronoDuration::days(35)).await;
    let cursor = cursor_time(&app.db).await;
    let (code, out, err) = os_credits(&app.db, &[BILL, RETENTION_30], &["maintain"]).await;
    assert_eq!(code, 0, "maintain: {out}\n{err}");
    run_every_job(&app.db).await;
    let unbilled: Vec<_> = before.iter().copied().filter(|t| *t >= cursor).collect();
    let kept = sample_times(&app.db).await;
    assert!(
        unbilled.iter().all(|t| kept.contains(t)),
        "every sample billing has not passed is kept: {out}"
    );

    bill(&app, now).await;
    assert_eq!(used(&app, "behind").await, expected_credits(&samples));

    // Billed now: whole chunks older than 30 days go, the rest stays.
    let (code, out, err) = os_credits(&app.db, &[BILL, RETENTION_30], &["maintain"]).await;
    assert_eq!(code, 0, "maintain: {out}\n{err}");
    let after = sample_times(&app.db).await;
    let cutoff = now - ChronoDuration::days(30);
    assert!(
        after.len() < before.len(),
        "billed chunks past retention are dropped: {out}"
    );
    assert!(
        after
            .first()
            .is_some_and(|t| *t > now - ChronoDuration::days(38)),
        "{out}"
    );
    let kept_recent: Vec<_> = before.iter().filter(|t| **t >= cutoff).collect();
    assert!(
        kept_recent.iter().all(|t| after.contains(t)),
        "nothing newer than the cut-off goes"
    );
}

#[tokio::test]
async fn retention_on_plain_postgresql_deletes_only_billed_samples() {
    let app = spawn_app_on(TestDb::create_plain().await, &[BILL, RETENTION_30], false).await;
    assert_eq!(app.mode, StorageMode::Postgresql);
    let now = Utc::now();
    let samples = forty_days(now);
    seed(&app, "behind", &samples).await;
    let before = sample_times(&app.db).await;

    let round = os_credits::maintenance::round(&app.app_pool, 30, None, now)
        .await
        .expect("maintenance round");
    assert_eq!(round.rows_deleted, 0, "{round:?}");
    assert_eq!(sample_times(&app.db).await, before);

    // Billing catches up to 35 days ago: only what is before its cursor may go.
    bill(&app, now - ChronoDuration::days(35)).await;
    let cursor = cursor_time(&app.db).await;
    let round = os_credits::maintenance::round(&app.app_pool, 30, None, now)
        .await
        .expect("maintenance round");
    let expected: Vec<_> = before.iter().copied().filter(|t| *t >= cursor).collect();
    assert_eq!(sample_times(&app.db).await, expected, "{round:?}");

    bill(&app, now).await;
    assert_eq!(used(&app, "behind").await, expected_credits(&samples));

    let round = os_credits::maintenance::round(&app.app_pool, 30, None, now)
        .await
        .expect("maintenance round");
    let cutoff = now - ChronoDuration::days(30);
    let expected: Vec<_> = before.iter().copied().filter(|t| *t >= cutoff).collect();
    assert_eq!(sample_times(&app.db).await, expected, "{round:?}");
}

#[tokio::test]
async fn a_plain_database_converted_to_timescaledb_bills_on_exactly() {
    if !needs_timescaledb("conversion").await {
        return;
    }
    let app = spawn_app_on(TestDb::create_plain().await, &[BILL], false).await;
    assert_eq!(app.mode, StorageMode::Postgresql);
    let now = Utc::now();
    let samples = forty_days(now);
    let (old, new) = samples.split_at(100);
    let series = seed(&app, "moving", old).await;
    bill(&app, now).await;
    let db = app.shutdown().await;

    let (code, out, err) =
        os_credits(&db, &[BILL], &["migrate", "--to-timescaledb", "--dry-run"]).await;
    assert_eq!(code, 0, "dry run: {out}\n{err}");
    assert!(
        out.contains("usage_samples: ~") && out.contains("ledger: ~"),
        "{out}"
    );
    assert!(out.contains("nothing changed"), "{out}");
    let client = db.connect().await;
    assert!(!is_hypertable(&client).await, "a dry run changes nothing");

    let (code, out, err) = os_credits(&db, &[BILL], &["migrate", "--to-timescaledb"]).await;
    assert_eq!(code, 0, "conversion: {out}\n{err}");
    assert!(
        out.contains("converted usage_samples") && out.contains("converted ledger"),
        "{out}"
    );
    assert!(is_hypertable(&client).await);

    let app = spawn_app_on(db, &[BILL], false).await;
    assert_eq!(app.mode, StorageMode::Timescaledb);
    let health = app.health().await;
    assert_eq!(health["storage"]["ledger"], "hypertable", "{health}");
    assert!(health["storage"]["advice"].is_null(), "{health}");
    common::insert_samples(&app.db.connect().await, series, new).await;
    bill(&app, now).await;
    assert_eq!(used(&app, "moving").await, expected_credits(&samples));
    let ledger_total: Decimal = app
        .db
        .connect()
        .await
        .query_one(
            "SELECT sum(used_delta) FROM ledger WHERE project = 'moving'",
            &[],
        )
        .await
        .expect("ledger")
        .get(0);
    assert_eq!(
        ledger_total,
        expected_credits(&samples),
        "ledger and balance agree"
    );
}

#[tokio::test]
async fn the_extension_created_by_hand_on_a_plain_database_starts_and_says_what_to_do() {
    if !needs_timescaledb("extension_by_hand").await {
        return;
    }
    let app = spawn_app_on(TestDb::create_plain().await, &[RETENTION_30], false).await;
    let db = app.shutdown().await;
    db.connect()
        .await
        .batch_execute("CREATE EXTENSION timescaledb")
        .await
        .expect("create the extension by hand");

    let app = spawn_app_on(db, &[RETENTION_30], true).await;

    assert_eq!(app.mode, StorageMode::Postgresql);
    let health = app.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(
        health["storage"]["extension"]["state"], "created",
        "{health}"
    );
    assert_eq!(health["storage"]["usage_samples"], "plain", "{health}");
    let advice = health["storage"]["advice"].as_str().unwrap_or_default();
    assert!(
        advice.contains("os-credits migrate --to-timescaledb"),
        "{health}"
    );
}

#[tokio::test]
async fn serve_leaves_policies_alone_reports_drift_and_migrate_applies_it() {
    if !needs_timescaledb("policies").await {
        return;
    }
    let app = spawn_app_on(TestDb::create().await, &[RETENTION_30], false).await;
    let db = app.shutdown().await;
    let jobs = job_ids(&db).await;
    assert!(
        jobs.iter()
            .any(|(proc, table, _)| proc == "policy_compression" && table == "usage_samples"),
        "{jobs:?}"
    );
    // An operator tunes compression, and someone adds TimescaleDB's own retention.
    let client = db.connect().await;
    let compression_job = jobs
        .iter()
        .find(|(proc, table, _)| proc == "policy_compression" && table == "usage_samples")
        .map(|j| j.2)
        .expect("compression job");
    client
        .batch_execute(&format!(
            "SELECT alter_job({compression_job}, schedule_interval => INTERVAL '5 hours');
             SELECT add_retention_policy('usage_samples', drop_after => INTERVAL '10 days');"
        ))
        .await
        .expect("operator's changes");
    let tuned = job_ids(&db).await;

    let app = spawn_app_on(db, &[("SAMPLES_RETENTION_DAYS", "60")], false).await;
    let health = app.health().await;
    let db = app.shutdown().await;
    assert_eq!(job_ids(&db).await, tuned, "serve changes no job");
    let drift = health["storage"]["drift"].to_string();
    assert!(
        drift.contains("SAMPLES_RETENTION_DAYS is 60 but the database applies 30"),
        "{health}"
    );
    assert!(drift.contains("retention policy job"), "{health}");

    let (code, out, err) = os_credits(&db, &[("SAMPLES_RETENTION_DAYS", "60")], &["migrate"]).await;
    assert_eq!(code, 0, "migrate: {out}\n{err}");
    let after: Vec<_> = job_ids(&db).await;
    let kept: Vec<_> = tuned
        .iter()
        .filter(|j| j.0 != "policy_retention")
        .cloned()
        .collect();
    assert_eq!(after, kept, "migrate removes only the retention job: {out}");
    let schedule: String = client
        .query_one(
            "SELECT schedule_interval::text FROM timescaledb_information.jobs WHERE job_id = $1",
            &[&compression_job],
        )
        .await
        .expect("schedule")
        .get(0);
    assert_eq!(schedule, "05:00:00", "the operator's tuning stays");

    let app = spawn_app_on(db, &[("SAMPLES_RETENTION_DAYS", "60")], false).await;
    let health = app.health().await;
    assert_eq!(
        health["storage"]["drift"],
        serde_json::json!([]),
        "{health}"
    );
    let db = app.shutdown().await;
    assert_eq!(job_ids(&db).await, kept, "job ids stay across restarts");
}

#[tokio::test]
async fn a_backlog_bills_in_bounded_passes_to_the_same_exact_credits() {
    let now = Utc::now();
    let samples = forty_days(now);
    let gauge: Vec<_> = samples
        .iter()
        .map(|(t, v)| (*t, 1.0 + (v * 4.0) % 3.0))
        .collect();
    let mut results = Vec::new();
    for batch in ["7", "1000000"] {
        let vars = [
            ("METRICS_TO_BILL", r#"{"project_vcpu_usage": 1.5}"#),
            ("BILLING_BATCH_SAMPLES", batch),
        ];
        let app = spawn_app_on(TestDb::create().await, &vars, false).await;
        seed(&app, "backlog", &samples).await;
        let other = seed(&app, "backlog-2", &[]).await;
        common::insert_samples(&app.db.connect().await, other, &gauge).await;
        let summary = engine::run(&app.app_pool, settings(&app.db, &vars).billing(), now)
            .await
            .expect("billing run");
        let client = app.db.connect().await;
        let rows: i64 = client
            .query_one("SELECT count(*) FROM ledger WHERE kind = 'usage'", &[])
            .await
            .expect("ledger")
            .get(0);
        let cursors: Vec<(i64, DateTime<Utc>)> = client
            .query(
                "SELECT series_id, last_time FROM billing_cursors ORDER BY 1",
                &[],
            )
            .await
            .expect("cursors")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        results.push((
            used(&app, "backlog").await,
            used(&app, "backlog-2").await,
            summary.samples_billed,
            summary.projects_billed,
            cursors,
            rows,
        ));
    }
    let (small, whole) = (&results[0], &results[1]);
    assert_eq!(small.0, expected_credits(&samples));
    assert_eq!(small.0, whole.0, "counter: same credits in passes");
    assert_eq!(
        small.1, whole.1,
        "a counter going up and down: same credits in passes"
    );
    assert_eq!(
        (small.2, small.3),
        (whole.2, whole.3),
        "same samples and projects"
    );
    assert_eq!(small.4, whole.4, "same cursors");
    // 7 samples a pass, 3 per series: ~160 / 3 passes, each its own ledger rows.
    assert!(
        small.5 >= 2 * 160 / 3,
        "billed in passes: {} ledger rows",
        small.5
    );
    assert_eq!(whole.5, 2, "one pass: one ledger row per series");
}
