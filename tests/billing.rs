//! Billing scenarios on a real PostgreSQL: exact totals, decreases, gaps, several
//! sites, replicas and a crash in the middle of a run.

mod common;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use common::{spawn_app, TestApp};
use os_credits::billing::engine;
use os_credits::config::Settings;
use os_credits::money::decimal_from_f64;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal literal")
}

fn t0() -> DateTime<Utc> {
    "2026-03-01T00:00:00Z".parse().expect("time")
}

/// Samples given as (seconds after t0, value), as stored times.
fn at_offsets(samples: &[(i64, f64)]) -> Vec<(DateTime<Utc>, f64)> {
    samples
        .iter()
        .map(|(seconds, value)| (t0() + ChronoDuration::seconds(*seconds), *value))
        .collect()
}

/// Stores a series with samples at t0 + seconds; returns its id.
async fn seed(app: &TestApp, metric: &str, labels: &[(&str, &str)], samples: &[(i64, f64)]) -> i64 {
    let mut client = app.db.connect().await;
    let project = labels
        .iter()
        .find(|(name, _)| *name == "project_name")
        .map(|(_, value)| *value)
        .unwrap_or_default();
    let id = common::seed_series(&mut client, metric, labels, project).await;
    common::insert_samples(&client, id, &at_offsets(samples)).await;
    id
}

fn settings_for(app: &TestApp, extra: &[(&str, &str)]) -> Settings {
    let mut vars = app.db.vars();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Settings::from_vars(vars).expect("settings")
}

async fn bill(app: &TestApp, extra: &[(&str, &str)]) -> engine::BillingSummary {
    let settings = settings_for(app, extra);
    engine::run(&app.app_pool, settings.billing(), Utc::now())
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
        .expect("project exists")
        .get(0)
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.db
        .connect()
        .await
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}

fn rules_file(name: &str, toml: &str) -> String {
    let path = std::env::temp_dir().join(format!("os-credits-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, toml).expect("write rules file");
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn counter_increases_are_billed_exactly_once() {
    let app = spawn_app(&[]).await;
    seed(
        &app,
        "project_vcpu_usage",
        &[("project_name", "alpha")],
        &[(0, 10.0), (3600, 12.0), (7200, 15.5)],
    )
    .await;
    seed(
        &app,
        "project_mb_usage",
        &[("project_name", "alpha")],
        &[(0, 100.0), (3600, 100.1), (7200, 100.3)],
    )
    .await;

    let first = bill(&app, &[]).await;
    let second = bill(&app, &[]).await;

    // vCPU: 5.5 × 1.0; MB: 0.3 × 0.3 = 0.09 (the first sample only sets the cursor)
    assert_eq!(used(&app, "alpha").await, dec("5.59"));
    assert_eq!(first.credits_billed, dec("5.59"));
    assert_eq!(first.samples_billed, 6);
    assert_eq!(
        second.credits_billed,
        Decimal::ZERO,
        "nothing is billed twice"
    );
    assert_eq!(second.samples_billed, 0);
    let ledger_sum: Decimal = app
        .db
        .connect()
        .await
        .query_one(
            "SELECT sum(used_delta) FROM ledger WHERE project = 'alpha'",
            &[],
        )
        .await
        .expect("sum")
        .get(0);
    assert_eq!(ledger_sum, dec("5.59"), "the ledger adds up to the balance");
}

#[tokio::test]
async fn new_samples_after_a_run_are_billed_from_the_cursor() {
    let app = spawn_app(&[]).await;
    let id = seed(
        &app,
        "project_vcpu_usage",
        &[("project_name", "alpha")],
        &[(0, 1.0), (60, 2.0)],
    )
    .await;
    bill(&app, &[]).await;

    let client = app.db.connect().await;
    common::insert_samples(&client, id, &at_offsets(&[(120, 2.5), (180, 4.0)])).await;
    bill(&app, &[]).await;

    assert_eq!(used(&app, "alpha").await, dec("3"));
}

#[tokio::test]
async fn two_sites_of_one_project_are_billed_each_and_summed() {
    let app = spawn_app(&[]).await;
    for (site, growth) in [("Bielefeld", 2.0), ("Giessen", 3.25)] {
        seed(
            &app,
            "project_vcpu_usage",
            &[("project_name", "shared"), ("location", site)],
            &[(0, 50.0), (600, 50.0 + growth)],
        )
        .await;
    }

    bill(&app, &[]).await;

    assert_eq!(used(&app, "shared").await, dec("5.25"));
}

#[tokio::test]
async fn counter_decreases_follow_the_metric_policy_and_are_recorded() {
    let rules = rules_file(
        "decrease",
        r#"
[metrics.project_vcpu_usage]
decrease_policy = "rebase"
[metrics.project_mb_usage]
decrease_policy = "restart"
"#,
    );
    let app = spawn_app(&[]).await;
    let samples = [(0, 10.0), (60, 12.0), (120, 5.0), (180, 8.0)];
    seed(
        &app,
        "project_vcpu_usage",
        &[("project_name", "rebased")],
        &samples,
    )
    .await;
    seed(
        &app,
        "project_mb_usage",
        &[("project_name", "restarted")],
        &samples,
    )
    .await;

    bill(&app, &[("BILLING_RULES_FILE", &rules)]).await;

    assert_eq!(used(&app, "rebased").await, dec("5"), "rebase: 2 + 0 + 3");
    assert_eq!(
        used(&app, "restarted").await,
        dec("3.0"),
        "restart: (2 + 5 + 3) × 0.3"
    );
    let decreases = app
        .db
        .connect()
        .await
        .query("SELECT policy, from_value::text, to_value::text FROM counter_decreases ORDER BY policy", &[])
        .await
        .expect("decreases");
    let decreases: Vec<(String, String, String)> = decreases
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        decreases,
        vec![
            ("rebase".into(), "12".into(), "5".into()),
            ("restart".into(), "12".into(), "5".into())
        ]
    );
}

#[tokio::test]
async fn gauges_bill_value_times_hours_and_record_gaps_they_do_not_bill() {
    let rules = rules_file(
        "gauge",
        r#"
[metrics.gpu_count]
kind = "gauge"
price = "2"
max_gap_seconds = 900
"#,
    );
    let app = spawn_app(&[]).await;
    seed(
        &app,
        "gpu_count",
        &[("project_name", "gpu")],
        &[(0, 3.0), (900, 3.0), (1800, 1.0), (5400, 1.0), (6300, 0.0)],
    )
    .await;

    bill(&app, &[("BILLING_RULES_FILE", &rules)]).await;

    // 3 GPUs × 0.25 h × 2 twice = 3; 1800→5400 is a 1 h gap (> 15 min): unbilled;
    // 1 GPU × 0.25 h × 2 = 0.5
    assert_eq!(used(&app, "gpu").await, dec("3.5"));
    assert_eq!(count(&app, "SELECT count(*) FROM unbilled_gaps").await, 1);
}

#[tokio::test]
async fn label_prices_apply_per_site() {
    let rules = rules_file(
        "labels",
        r#"
[metrics.project_vcpu_usage]
price = "1"
label = "location"
by_label = { Bielefeld = "0.5" }
"#,
    );
    let app = spawn_app(&[]).await;
    seed(
        &app,
        "project_vcpu_usage",
        &[("project_name", "p"), ("location", "Bielefeld")],
        &[(0, 0.0), (60, 10.0)],
    )
    .await;
    seed(
        &app,
        "project_vcpu_usage",
        &[("project_name", "p"), ("location", "Elsewhere")],
        &[(0, 0.0), (60, 10.0)],
    )
    .await;

    bill(&app, &[("BILLING_RULES_FILE", &rules)]).await;

    assert_eq!(used(&app, "p").await, dec("15"));
}

#[tokio::test]
async fn the_whitelist_leaves_other_projects_unbilled() {
    let app = spawn_app(&[]).await;
    seed(
        &app,
        "project_vcpu_usage",
        &[("project_name", "in")],
        &[(0, 0.0), (60, 1.0)],
    )
    .await;
    seed(
        &app,
        "project_vcpu_usage",
        &[("project_name", "out")],
        &[(0, 0.0), (60, 1.0)],
    )
    .await;

    bill(&app, &[("OS_CREDITS_PROJECT_WHITELIST", "in")]).await;

    assert_eq!(used(&app, "in").await, dec("1"));
    assert_eq!(used(&app, "out").await, Decimal::ZERO);
}

#[tokio::test]
async fn billing_in_many_small_runs_equals_one_big_run() {
    let values: Vec<(i64, f64)> = (0..200)
        .map(|i| (i * 30, i as f64 * 0.1 + (i % 3) as f64 * 1e-7))
        .collect();
    let once = spawn_app(&[]).await;
    seed(&once, "project_mb_usage", &[("project_name", "p")], &values).await;
    bill(&once, &[]).await;

    let stepwise = spawn_app(&[]).await;
    let id = seed(
        &stepwise,
        "project_mb_usage",
        &[("project_name", "p")],
        &values[..1],
    )
    .await;
    let client = stepwise.db.connect().await;
    for sample in at_offsets(&values[1..]) {
        common::insert_samples(&client, id, &[sample]).await;
        bill(&stepwise, &[]).await;
    }

    let expected = (decimal_from_f64(values[199].1).expect("exact")
        - decimal_from_f64(values[0].1).expect("exact"))
        * dec("0.3");
    assert_eq!(used(&once, "p").await, expected);
    assert_eq!(
        used(&stepwise, "p").await,
        expected,
        "199 runs of one step each give the same exact total"
    );
}

/// A backlog of `projects` × 2 metrics × `samples`, deterministic; returns the
/// expected exact used credits per project.
async fn seed_backlog(app: &TestApp, projects: i32, samples: i32) -> BTreeMap<String, Decimal> {
    let mut client = app.db.connect().await;
    // Seeding the series registers their projects too.
    common::seed_series_batch(
        &mut client,
        (1..=projects).flat_map(|i| {
            ["project_vcpu_usage", "project_mb_usage"].map(|metric| {
                let project = format!("p{i}");
                (metric, [("project_name", project.clone())], project)
            })
        }),
    )
    .await;
    client
        .batch_execute(&format!(
            "INSERT INTO usage_samples (series_id, time, value)
             SELECT s.id, '2026-03-01'::timestamptz + k * interval '5 minutes', k * ((s.id % 7) + 1) * 0.1
             FROM series s, generate_series(0, {samples} - 1) k;"
        ))
        .await
        .expect("seed backlog");
    let rows = client
        .query(
            "SELECT s.project, s.metric, min(u.value) FILTER (WHERE u.time = '2026-03-01'), max(u.value)
             FROM series s JOIN usage_samples u ON u.series_id = s.id GROUP BY s.project, s.metric",
            &[],
        )
        .await
        .expect("expected");
    let mut expected = BTreeMap::new();
    for row in rows {
        let price = if row.get::<_, String>(1) == "project_vcpu_usage" {
            dec("1")
        } else {
            dec("0.3")
        };
        let first = decimal_from_f64(row.get(2)).expect("exact");
        let last = decimal_from_f64(row.get(3)).expect("exact");
        *expected
            .entry(row.get::<_, String>(0))
            .or_insert(Decimal::ZERO) += (last - first) * price;
    }
    expected
}

/// The text a one-row, one-column query answers.
async fn count_text(app: &TestApp, sql: &str) -> String {
    app.db
        .connect()
        .await
        .query_one(sql, &[])
        .await
        .expect("query")
        .get(0)
}

async fn balances(app: &TestApp) -> BTreeMap<String, Decimal> {
    app.db
        .connect()
        .await
        .query("SELECT name, used_credits FROM projects", &[])
        .await
        .expect("balances")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn two_replicas_billing_one_backlog_bill_exactly_what_one_would() {
    let app = spawn_app(&[]).await;
    let expected = seed_backlog(&app, 60, 20).await;
    let twin = common::spawn_app_on(
        common::TestDb {
            name: app.db.name.clone(),
            server: common::PgServer::from_env(),
        },
        &[],
        false,
    )
    .await;
    let (a_settings, b_settings) = (
        settings_for(&app, &[("OS_CREDITS_WORKERS", "4")]),
        settings_for(&twin, &[("OS_CREDITS_WORKERS", "4")]),
    );

    // Replica a takes every project (one batch) and is held at the gate before it
    // commits; replica b runs meanwhile: the two runs overlap for certain.
    let last = count_text(&app, "SELECT max(name) FROM projects").await;
    let gate = common::ProjectGate::close(&app.db, &last).await;
    let a = tokio::spawn({
        let pool = app.app_pool.clone();
        async move { engine::run(&pool, a_settings.billing(), Utc::now()).await }
    });
    gate.until_someone_waits().await;
    let b = tokio::time::timeout(
        Duration::from_secs(30),
        engine::run(&twin.app_pool, b_settings.billing(), Utc::now()),
    )
    .await
    .expect("replica b does not wait for the projects replica a holds")
    .expect("replica b");
    gate.open().await;
    let a = a.await.expect("task").expect("replica a");

    assert_eq!(
        (b.projects_skipped, b.samples_billed),
        (60, 0),
        "replica b skipped every project replica a held"
    );
    assert_eq!((a.projects_billed, a.projects_skipped), (60, 0));
    let again = bill(&app, &[]).await;
    assert_eq!(
        again.samples_billed, 0,
        "nothing was left over or billed twice"
    );

    assert_eq!(balances(&app).await, expected);
    let samples = count(&app, "SELECT count(*) FROM usage_samples").await as u64;
    assert_eq!(
        a.samples_billed + b.samples_billed,
        samples,
        "each sample consumed by exactly one replica"
    );
    std::mem::forget(twin.db);
}

#[tokio::test]
async fn a_service_killed_while_billing_loses_nothing_and_bills_nothing_twice() {
    let app = spawn_app(&[]).await;
    let expected = seed_backlog(&app, 1500, 40).await;
    let total_projects = expected.len() as i64;

    // The batch holding the last project (in billing's order) cannot commit until
    // the gate opens: the kill lands while earlier batches are committed and it is not.
    let last = count_text(&app, "SELECT max(name) FROM projects").await;
    let gate = common::ProjectGate::close(&app.db, &last).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_os-credits"))
        .arg("serve")
        .envs(app.db.vars())
        .env("BILLING_INTERVAL", "3600")
        .env("OS_CREDITS_WORKERS", "2")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the service");
    gate.until_someone_waits().await;
    common::eventually(
        Duration::from_secs(60),
        "the service to commit some projects",
        || async {
            let billed = count(
                &app,
                "SELECT count(*) FROM projects WHERE last_billed_at IS NOT NULL",
            )
            .await;
            (billed > 0).then_some(())
        },
    )
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    gate.open().await;
    let billed_at_kill = count(
        &app,
        "SELECT count(*) FROM projects WHERE last_billed_at IS NOT NULL",
    )
    .await;
    assert!(
        0 < billed_at_kill && billed_at_kill < total_projects,
        "the kill landed mid-run ({billed_at_kill} of {total_projects} billed)"
    );

    bill(&app, &[]).await;
    bill(&app, &[]).await;

    assert_eq!(
        balances(&app).await,
        expected,
        "the restarted billing equals an uninterrupted run"
    );
    let ledger_total: Decimal = app
        .db
        .connect()
        .await
        .query_one("SELECT sum(used_delta) FROM ledger", &[])
        .await
        .expect("sum")
        .get(0);
    assert_eq!(
        ledger_total,
        expected.values().copied().sum::<Decimal>(),
        "no ledger row twice"
    );
}

#[tokio::test]
async fn grants_are_fetched_from_the_portal_with_its_key_and_written_to_the_ledger() {
    let portal =
        common::exporter::FixtureExporter::start(common::exporter::Answer::ok("1500.50\n")).await;
    let base = portal.url.trim_end_matches("/metrics").to_owned();
    let app = spawn_app(&[]).await;
    seed(
        &app,
        "project_vcpu_usage",
        &[("project_name", "Portal Project")],
        &[(0, 0.0)],
    )
    .await;
    let settings = settings_for(
        &app,
        &[
            ("API_CONTACT_BASE_URL", &base),
            ("API_CONTACT_KEY", "portal-key"),
        ],
    );
    let http = reqwest::Client::new();

    let first = os_credits::billing::portal::sync_grants(&app.app_pool, settings.portal(), &http)
        .await
        .expect("sync");
    let second = os_credits::billing::portal::sync_grants(&app.app_pool, settings.portal(), &http)
        .await
        .expect("sync");

    assert_eq!((first.changed, first.failed), (1, 0));
    assert_eq!(
        (second.changed, second.unchanged),
        (0, 1),
        "an unchanged grant writes nothing"
    );
    let granted: Decimal = app
        .db
        .connect()
        .await
        .query_one(
            "SELECT granted_credits FROM projects WHERE name = 'Portal Project'",
            &[],
        )
        .await
        .expect("project")
        .get(0);
    assert_eq!(granted, dec("1500.50"));
    assert_eq!(
        count(&app, "SELECT count(*) FROM ledger WHERE kind = 'grant'").await,
        1
    );
    let request = portal.requests.lock().expect("lock")[0].clone();
    assert!(
        request.starts_with("GET /secure/granted-credits/?project_name=Portal+Project "),
        "old service's path and query: {request}"
    );
    assert!(
        request
            .to_ascii_lowercase()
            .contains("x-api-key: portal-key"),
        "{request}"
    );

    portal.set(common::exporter::Answer {
        status: 500,
        ..common::exporter::Answer::ok("oops")
    });
    let failing = os_credits::billing::portal::sync_grants(&app.app_pool, settings.portal(), &http)
        .await
        .expect("sync");
    assert_eq!(
        failing.failed, 1,
        "a failing portal is counted and retried next run, the grant stays"
    );
}

/// The day rollup against the ledger it sums: (project, day, metric) → (used, granted, rows).
async fn rollup_and_ledger_sums(app: &TestApp) -> (Vec<String>, Vec<String>) {
    let client = app.db.connect().await;
    let read = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|r| {
                    format!(
                        "{} {} {:?} used {} granted {} rows {}",
                        r.get::<_, String>(0),
                        r.get::<_, DateTime<Utc>>(1),
                        r.get::<_, String>(2),
                        r.get::<_, Decimal>(3).normalize(),
                        r.get::<_, Decimal>(4).normalize(),
                        r.get::<_, i64>(5)
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let rollup = read(
        "SELECT project, day, metric, used_delta, granted_delta, rows FROM ledger_daily ORDER BY 1, 2, 3",
    )
    .await;
    let ledger = read(
        "SELECT project, date_bin('1 day', time, TIMESTAMPTZ '2001-01-01 00:00:00+00'),
                coalesce(metric, ''), sum(used_delta), sum(granted_delta), count(*)
         FROM ledger GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .await;
    (rollup, ledger)
}

#[tokio::test]
async fn the_day_rollup_sums_exactly_what_billing_grants_and_adjustments_wrote() {
    let app = spawn_app(&[]).await;
    // Two days of half-hourly samples, two metrics, two projects.
    let samples: Vec<(i64, f64)> = (0..96).map(|i| (i * 1800, i as f64 * 0.37)).collect();
    let client = app.db.connect().await;
    let mut ids = Vec::new();
    for project in ["p1", "p2"] {
        for metric in ["project_vcpu_usage", "project_mb_usage"] {
            ids.push(seed(&app, metric, &[("project_name", project)], &samples[..30]).await);
        }
    }
    bill(&app, &[]).await;
    // The second run adds to the day rows the first one started, the third starts
    // the next day.
    for range in [30..40, 40..96] {
        for id in &ids {
            common::insert_samples(&client, *id, &at_offsets(&samples[range.clone()])).await;
        }
        bill(&app, &[]).await;
    }
    // A grant and an adjustment, written row by row as the API writes them.
    client
        .batch_execute(
            "INSERT INTO ledger (project, time, kind, granted_delta, used_after, granted_after, actor)
             VALUES ('p1', '2026-03-01T12:00:00Z', 'grant', 50, 0, 50, 'api');
             INSERT INTO ledger (project, time, kind, used_delta, used_after, granted_after, reason, actor)
             VALUES ('p1', '2026-03-02T12:00:00Z', 'adjustment', -2.5, 0, 50, 'refund', 'api')",
        )
        .await
        .expect("grant and adjustment");

    let (rollup, ledger) = rollup_and_ledger_sums(&app).await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM ledger_daily WHERE rows > 1").await,
        4,
        "the second run added to each series' first day"
    );
    assert_eq!(
        rollup, ledger,
        "the rollup holds exactly the ledger's sums per project, day and metric"
    );
}
