//! README promises with no other test, each against real parts: scrape leases between
//! replicas, `ENDPOINTS_ONLY`, the database going away and coming back, a price
//! change through a scrape and a billing run, a project left out of a run and billed
//! in the next, and `os-credits migrate` with its advisory lock.

mod common;

use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use common::exporter::{Answer, FixtureExporter};
use common::{eventually, spawn_app, spawn_app_on, PgServer, TestApp, TestDb};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::str::FromStr;
use std::time::Duration;

const KEY: &str = "promises-key";

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal")
}

/// A connection to the server's `postgres` database, for what a test database
/// cannot do to itself.
async fn admin() -> tokio_postgres::Client {
    PgServer::from_env().admin().await
}

/// A second service on `app`'s database.
async fn twin(app: &TestApp, vars: &[(&str, &str)]) -> TestApp {
    let db = TestDb {
        name: app.db.name.clone(),
        server: PgServer::from_env(),
    };
    spawn_app_on(db, vars, false).await
}

async fn billing_run(app: &TestApp) -> Value {
    let response = app
        .http
        .post(format!("{}/api/billing/run", app.address))
        .header("X-API-KEY", KEY)
        .send()
        .await
        .expect("billing run");
    assert_eq!(response.status(), 200);
    response.json().await.expect("summary")
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
        .expect("project")
        .get(0)
}

#[tokio::test]
async fn a_scrape_lease_is_taken_over_when_released_and_when_it_runs_out() {
    let exporter =
        FixtureExporter::start(Answer::ok("project_vcpu_usage{project_name=\"Alpha\"} 1\n")).await;
    let targets = json!([{"name": "leased", "url": exporter.url}]).to_string();
    let vars = [("SCRAPE_TARGETS", targets.as_str())];
    let first = spawn_app(&vars).await;
    let second = twin(&first, &vars).await;
    let third = twin(&first, &vars).await;

    let by_first = first.scrape().await.len();
    let by_second_while_held = second.scrape().await.len();
    // The first stops and gives its lease up: the second takes over at once.
    let db = first.shutdown().await;
    let by_second_after_release = second.scrape().await.len();
    let by_third_while_held = third.scrape().await.len();
    // The second dies without releasing; once its lease has run out the third takes
    // over (the lease's end is moved into the past instead of waiting for it).
    db.connect()
        .await
        .execute(
            "UPDATE scrape_targets SET lease_until = now() - interval '1 second'",
            &[],
        )
        .await
        .expect("lease runs out");
    let by_third_after_expiry = third.scrape().await.len();

    assert_eq!(
        (
            by_first,
            by_second_while_held,
            by_second_after_release,
            by_third_while_held,
            by_third_after_expiry
        ),
        (1, 0, 1, 0, 1)
    );
    assert_eq!(exporter.received().len(), 3, "one request per lease holder");
    std::mem::forget(second.db);
    std::mem::forget(third.db);
    drop(db);
}

#[tokio::test]
async fn endpoints_only_serves_the_api_and_runs_no_worker() {
    let exporter =
        FixtureExporter::start(Answer::ok("project_vcpu_usage{project_name=\"Alpha\"} 1\n")).await;
    let targets = json!([{"name": "ignored", "url": exporter.url}]).to_string();
    let app = spawn_app_on(
        TestDb::create().await,
        &[
            ("ENDPOINTS_ONLY", "true"),
            ("SCRAPE_TARGETS", &targets),
            ("API_KEY", KEY),
        ],
        true,
    )
    .await;

    let health = app.health().await;
    let grant = app
        .http
        .put(format!("{}/api/projects/Alpha/grant", app.address))
        .header("X-API-KEY", KEY)
        .json(&json!({"granted_credits": 10}))
        .send()
        .await
        .expect("grant");
    let credits: Value = app
        .get("/api/current_credits/Alpha")
        .await
        .json()
        .await
        .expect("JSON");

    assert_eq!(health["endpoints_only"], true, "{health}");
    // Only the change listeners that keep answers from memory fresh run (one per
    // HTTP worker thread): no scraping, billing, sending or maintenance.
    let workers: Vec<&String> = health["workers"]
        .as_object()
        .expect("workers")
        .keys()
        .collect();
    assert!(
        !workers.is_empty() && workers.iter().all(|w| w.starts_with("change_listener/")),
        "no background worker: {health}"
    );
    assert_eq!(
        health["targets"],
        json!([]),
        "no target registered: {health}"
    );
    assert!(app.scraper.is_none());
    assert_eq!(grant.status(), 200);
    assert!(credits.to_string().contains("10"), "{credits}");
    assert!(exporter.received().is_empty(), "nothing was scraped");
}

#[tokio::test]
async fn the_database_going_away_answers_503_and_the_service_recovers_when_it_is_back() {
    let app = spawn_app(&[("API_KEY", KEY)]).await;
    let admin = admin().await;
    let name = app.db.name.clone();
    assert_eq!(app.get("/health").await.status(), 200);

    admin
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .await
        .expect("refuse connections");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&name],
        )
        .await
        .expect("cut connections");
    let down = eventually(Duration::from_secs(30), "/health to say 503", || async {
        let response = app.get("/health").await;
        (response.status() == 503).then_some(())?;
        response.json::<Value>().await.ok()
    })
    .await;
    let stats: Value = app.get("/stats").await.json().await.expect("JSON");
    let api = app.get("/api/current_credits/Alpha").await;
    let api_status = api.status();
    let api_body: Value = api.json().await.expect("a JSON error");
    admin
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .expect("accept connections");
    let back = eventually(Duration::from_secs(30), "/health to say 200", || async {
        let response = app.get("/health").await;
        (response.status() == 200).then_some(())?;
        response.json::<Value>().await.ok()
    })
    .await;

    assert_eq!(down["status"], "unavailable", "{down}");
    assert_eq!(down["database"]["reachable"], false, "{down}");
    assert!(stats["database_error"].is_string(), "{stats}");
    assert!(stats["projects"].is_null(), "{stats}");
    assert_eq!(api_status, 503, "{api_body}");
    assert!(api_body["error"].is_string(), "{api_body}");
    assert_eq!(back["status"], "ok", "{back}");
    assert_eq!(back["database"]["reachable"], true);
    let stats: Value = app.get("/stats").await.json().await.expect("JSON");
    assert!(stats["database_error"].is_null(), "{stats}");
}

#[tokio::test]
async fn a_price_change_applies_from_its_date_through_a_scrape_and_a_billing_run() {
    // Federation timestamps put the samples at known times around the change.
    let base = (Utc::now() - ChronoDuration::hours(4))
        .duration_trunc(ChronoDuration::hours(1))
        .expect("hour");
    let change = base + ChronoDuration::hours(1);
    let sample = |value: u32, at: DateTime<Utc>| {
        format!(
            "project_vcpu_usage{{project_name=\"Priced\"}} {value} {}\n",
            at.timestamp_millis()
        )
    };
    let rules = std::env::temp_dir().join(format!("osc-rules-{}.toml", std::process::id()));
    std::fs::write(
        &rules,
        format!(
            "[metrics.project_vcpu_usage]\nprice = \"1\"\n\n\
             [[metrics.project_vcpu_usage.price_changes]]\nvalid_from = \"{}\"\nprice = \"2.5\"\n",
            change.to_rfc3339()
        ),
    )
    .expect("rules file");
    let exporter = FixtureExporter::start(Answer::ok(sample(0, base))).await;
    let targets = json!([{"name": "priced", "url": exporter.url}]).to_string();
    let app = spawn_app(&[
        ("SCRAPE_TARGETS", &targets),
        ("BILLING_RULES_FILE", rules.to_str().expect("path")),
        ("API_KEY", KEY),
    ])
    .await;

    app.scrape().await;
    exporter.set(Answer::ok(sample(10, base + ChronoDuration::hours(2))));
    app.scrape().await;
    let first = billing_run(&app).await;
    exporter.set(Answer::ok(sample(16, base + ChronoDuration::hours(3))));
    app.scrape().await;
    billing_run(&app).await;

    // 0 → 10 over two hours, half before the change at 1, half after at 2.5; then
    // 10 → 16 after it at 2.5.
    assert_eq!(first["credits_billed"], "17.5", "{first}");
    assert_eq!(
        used(&app, "Priced").await,
        dec("5") + dec("12.5") + dec("15")
    );
    let rows: Vec<(Decimal, Decimal, Decimal)> = app
        .db
        .connect()
        .await
        .query(
            "SELECT quantity, price, used_delta FROM ledger
             WHERE project = 'Priced' AND kind = 'usage' ORDER BY usage_from",
            &[],
        )
        .await
        .expect("ledger")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            (dec("5"), dec("1"), dec("5")),
            (dec("5"), dec("2.5"), dec("12.5")),
            (dec("6"), dec("2.5"), dec("15")),
        ]
    );
    let _ = std::fs::remove_file(rules);
}

#[tokio::test]
async fn a_project_held_during_a_run_is_left_out_and_billed_by_the_next() {
    let exporter = FixtureExporter::start(Answer::ok(
        "project_vcpu_usage{project_name=\"Held\"} 1\nproject_vcpu_usage{project_name=\"Free\"} 1\n",
    ))
    .await;
    let targets = json!([{"name": "two", "url": exporter.url}]).to_string();
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets), ("API_KEY", KEY)]).await;
    app.scrape().await;
    exporter.set(Answer::ok(
        "project_vcpu_usage{project_name=\"Held\"} 5\nproject_vcpu_usage{project_name=\"Free\"} 3\n",
    ));
    app.scrape().await;
    // Another replica (this connection) holds the project's row during the run.
    let holder = app.db.connect().await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM projects WHERE name = 'Held' FOR UPDATE")
        .await
        .expect("hold the row");

    let first = billing_run(&app).await;
    let held_after_first = used(&app, "Held").await;
    holder.batch_execute("COMMIT").await.expect("let go");
    let second = billing_run(&app).await;
    let third = billing_run(&app).await;

    assert_eq!(
        (&first["projects_billed"], &first["projects_skipped"]),
        (&json!(1), &json!(1)),
        "{first}"
    );
    assert_eq!(held_after_first, Decimal::ZERO, "left out whole");
    assert_eq!(used(&app, "Free").await, dec("2"));
    assert_eq!(second["credits_billed"], "4", "{second}");
    assert_eq!(used(&app, "Held").await, dec("4"), "billed by the next run");
    assert_eq!(third["samples_billed"], 0, "and only once: {third}");
}

/// The advisory lock key of `src/store/migrations.rs`.
const MIGRATION_LOCK_KEY: i64 = 0x6f73_6372_6564_6974;

fn migrate(db: &TestDb) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_os-credits"))
        .arg("migrate")
        .envs(db.vars())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("os-credits migrate")
}

async fn exit_of(mut child: std::process::Child) -> std::process::ExitStatus {
    eventually(Duration::from_secs(120), "migrate to exit", || {
        let status = child.try_wait().expect("wait");
        async move { status }
    })
    .await
}

#[tokio::test]
async fn migrate_waits_for_the_advisory_lock_then_applies_every_migration_once() {
    let db = TestDb::create().await;
    let holder = db.connect().await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .expect("hold the migration lock");
    let applied = || async {
        db.connect()
            .await
            .query_one("SELECT count(*) FROM os_credits_migrations", &[])
            .await
            .map(|row| row.get::<_, i64>(0))
            .unwrap_or(0)
    };

    let waiting = migrate(&db);
    common::until_someone_waits_for_advisory_lock(&holder, MIGRATION_LOCK_KEY).await;
    let while_held = applied().await;
    let table_while_held: bool = holder
        .query_one(
            "SELECT to_regclass('os_credits_migrations') IS NOT NULL",
            &[],
        )
        .await
        .expect("lookup")
        .get(0);
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .expect("let go");
    let first = exit_of(waiting).await;
    let after_first = applied().await;
    let second = exit_of(migrate(&db)).await;

    assert_eq!(
        while_held, 0,
        "nothing applied while another migrator holds the lock"
    );
    assert!(
        !table_while_held,
        "not even the bookkeeping table is created outside the lock (replicas would race on it)"
    );
    assert!(first.success() && second.success(), "{first} {second}");
    assert!(after_first >= 5, "every migration applied: {after_first}");
    assert_eq!(
        applied().await,
        after_first,
        "a second run applies nothing again"
    );
    let tables: i64 = db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM information_schema.tables
             WHERE table_name IN ('series', 'usage_samples', 'projects', 'ledger', 'notification_deliveries')",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(tables, 5);
}
