//! The fault suite (issue 9): each fault is reproduced against a real peer on
//! loopback (PostgreSQL, an exporter, a portal socket, a second replica process), and
//! after each the invariants of `common::invariants` hold and billing has resumed.

mod common;

use common::exporter::{Answer, FixtureExporter};
use common::invariants::assert_invariants;
use common::{eventually, spawn_app_on, TestApp, TestDb};
use rust_decimal::Decimal;
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn vcpu(project: &str, value: &str) -> String {
    format!(
        "# TYPE project_vcpu_usage counter\nproject_vcpu_usage{{project_name=\"{project}\"}} {value}\n"
    )
}

/// The service with every worker running: scraping `exporter` and billing every
/// few tenths of a second.
async fn running_app(exporter: &FixtureExporter, extra: &[(&str, &str)]) -> TestApp {
    let mut vars = vec![
        ("SCRAPE_TARGETS", exporter.url.as_str()),
        ("SCRAPE_INTERVAL", "0.2"),
        ("BILLING_INTERVAL", "0.3"),
    ];
    vars.extend_from_slice(extra);
    spawn_app_on(TestDb::create().await, &vars, true).await
}

/// The project's used credits as the database holds them (zero before it exists).
async fn used(app: &TestApp, project: &str) -> Decimal {
    app.db
        .connect()
        .await
        .query_opt(
            "SELECT used_credits FROM projects WHERE name = $1",
            &[&project],
        )
        .await
        .expect("read the project")
        .map(|row| row.get(0))
        .unwrap_or_default()
}

/// Waits until `/health` satisfies `check`, returning it.
async fn health_where(app: &TestApp, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(WAIT, what, || async {
        let health = app.health().await;
        check(&health).then_some(health)
    })
    .await
}

fn billing(health: &Value) -> &Value {
    &health["workers"]["billing"]
}

#[tokio::test]
async fn a_failing_billing_run_is_retried_counted_and_shown_until_billing_recovers() {
    let exporter = FixtureExporter::start(Answer::ok(vcpu("Alpha", "1"))).await;
    let app = running_app(&exporter, &[]).await;
    let first = health_where(&app, "a billing run", |h| {
        billing(h)["last_success_at"].is_string()
    })
    .await;
    assert_eq!(first["status"], "ok", "{first}");
    let before = used(&app, "Alpha").await;

    // The billing run fails on every try while no cursor can be written.
    let db = app.db.connect().await;
    db.batch_execute(
        "ALTER TABLE billing_cursors ADD CONSTRAINT fault_no_writes CHECK (false) NOT VALID",
    )
    .await
    .expect("forbid cursor writes");
    let failing = health_where(&app, "billing failures", |h| {
        billing(h)["consecutive_failures"].as_u64() >= Some(2)
    })
    .await;
    assert_eq!(failing["status"], "degraded", "{failing}");
    let error = billing(&failing)["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("fault_no_writes"),
        "the cause is shown: {failing}"
    );
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("os_credits_worker_failures_total{")
                && l.contains("worker=\"billing\"")),
        "failures are counted:\n{metrics}"
    );

    // The loop is still alive: once the table is back, billing goes on.
    db.batch_execute("ALTER TABLE billing_cursors DROP CONSTRAINT fault_no_writes")
        .await
        .expect("allow cursor writes");
    exporter.set(Answer::ok(vcpu("Alpha", "3")));
    let recovered = health_where(&app, "billing to recover", |h| {
        billing(h)["consecutive_failures"] == 0 && h["status"] == "ok"
    })
    .await;
    assert!(
        billing(&recovered)["last_success_at"].as_str()
            > billing(&first)["last_success_at"].as_str()
    );
    let after = eventually(WAIT, "the new usage billed", || async {
        Some(used(&app, "Alpha").await).filter(|c| *c != before)
    })
    .await;
    assert_eq!(
        after - before,
        Decimal::from(2),
        "the increase 1 → 3 is billed once"
    );
    assert_invariants(&db).await;
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("os_credits_worker_last_success_timestamp_seconds{worker=\"billing\"}")),
        "last successes are exported:\n{metrics}"
    );
}

#[tokio::test]
async fn health_is_degraded_while_billing_has_not_completed_for_two_intervals() {
    let exporter = FixtureExporter::start(Answer::ok(vcpu("Alpha", "1"))).await;
    let app = running_app(&exporter, &[]).await;
    health_where(&app, "a billing run", |h| {
        billing(h)["last_success_at"].is_string() && h["status"] == "ok"
    })
    .await;

    // A run that hangs (not one that fails) must show too.
    let mut blocker = app.db.connect().await;
    let tx = blocker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE projects IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let stuck = health_where(&app, "billing to be reported stale", |h| {
        h["status"] == "degraded"
    })
    .await;
    assert_eq!(billing(&stuck)["state"], "running", "{stuck}");
    tx.rollback().await.expect("release");

    health_where(&app, "billing to complete again", |h| h["status"] == "ok").await;
    assert_invariants(&app.db.connect().await).await;
}
