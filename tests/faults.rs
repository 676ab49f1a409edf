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

fn usage(lines: &[(&str, &str, &str)]) -> String {
    let mut body =
        String::from("# TYPE project_vcpu_usage counter\n# TYPE project_mb_usage counter\n");
    for (metric, project, value) in lines {
        body.push_str(&format!("{metric}{{project_name=\"{project}\"}} {value}\n"));
    }
    body
}

/// Waits until every series has been scraped after now (so the exporter's current
/// answer is stored) and billing has consumed those samples.
async fn billed_up_to_now(app: &TestApp) {
    let db = app.db.connect().await;
    let now = chrono::Utc::now();
    let newest = eventually(WAIT, "a scrape of every series", || async {
        let row = db
            .query_one(
                "SELECT min(newest), max(newest) FROM (
                     SELECT (SELECT max(time) FROM usage_samples u WHERE u.series_id = s.id) AS newest
                     FROM series s) n",
                &[],
            )
            .await
            .expect("newest samples");
        let (oldest, newest): (Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>) = (row.get(0), row.get(1));
        oldest.filter(|t| *t > now).and(newest)
    })
    .await;
    eventually(WAIT, "billing to pass the newest sample", || async {
        let behind: i64 = db
            .query_one(
                "SELECT count(*) FROM series s LEFT JOIN billing_cursors c ON c.series_id = s.id
                 WHERE c.last_time IS NULL OR c.last_time < $1",
                &[&newest],
            )
            .await
            .expect("cursors")
            .get(0);
        (behind == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_value_no_decimal_holds_is_quarantined_and_the_series_goes_on_billing() {
    let exporter = FixtureExporter::start(Answer::ok(usage(&[
        ("project_vcpu_usage", "Alpha", "1"),
        ("project_mb_usage", "Alpha", "10"),
    ])))
    .await;
    let app = running_app(&exporter, &[]).await;
    billed_up_to_now(&app).await;
    let before = used(&app, "Alpha").await;

    exporter.set(Answer::ok(usage(&[
        ("project_vcpu_usage", "Alpha", "1e30"),
        ("project_mb_usage", "Alpha", "20"),
    ])));
    let detail = eventually(WAIT, "the sample quarantined", || async {
        let detail: Value = app.get("/api/projects/Alpha").await.json().await.ok()?;
        (!detail["quarantined_samples"].as_array()?.is_empty()).then_some(detail)
    })
    .await;
    let quarantined = &detail["quarantined_samples"][0];
    assert_eq!(quarantined["metric"], "project_vcpu_usage", "{detail}");
    assert_eq!(quarantined["value"], "1e30", "{detail}");
    assert!(
        quarantined["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("decimal range"),
        "{detail}"
    );

    // Across the quarantined value nothing is billed: 3 is the new baseline, 3 → 5
    // bills 2; the project's other series bills all along (10 → 20 at 0.3).
    exporter.set(Answer::ok(usage(&[
        ("project_vcpu_usage", "Alpha", "3"),
        ("project_mb_usage", "Alpha", "20"),
    ])));
    billed_up_to_now(&app).await;
    exporter.set(Answer::ok(usage(&[
        ("project_vcpu_usage", "Alpha", "5"),
        ("project_mb_usage", "Alpha", "20"),
    ])));
    billed_up_to_now(&app).await;
    assert_eq!(used(&app, "Alpha").await - before, Decimal::new(50, 1));

    let health = app.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("os_credits_quarantined_samples{metric=\"project_vcpu_usage\"}")),
        "{metrics}"
    );
    assert_invariants(&app.db.connect().await).await;
}

#[tokio::test]
async fn huge_but_exact_increases_of_two_projects_do_not_stop_billing() {
    // 0 → 5e28 in two projects: each charge fits a decimal, their sum does not
    // (this panicked the billing loop for good).
    let exporter = FixtureExporter::start(Answer::ok(usage(&[
        ("project_vcpu_usage", "Alpha", "0"),
        ("project_vcpu_usage", "Beta", "0"),
    ])))
    .await;
    let app = running_app(&exporter, &[]).await;
    billed_up_to_now(&app).await;
    exporter.set(Answer::ok(usage(&[
        ("project_vcpu_usage", "Alpha", "5e28"),
        ("project_vcpu_usage", "Beta", "5e28"),
    ])));
    billed_up_to_now(&app).await;
    let huge: Decimal = "50000000000000000000000000000".parse().expect("decimal");
    assert_eq!(used(&app, "Alpha").await, huge);
    assert_eq!(used(&app, "Beta").await, huge);

    // Billing goes on: a further 4e28 would take Alpha beyond the decimal range and
    // is quarantined; Beta's small increase bills.
    exporter.set(Answer::ok(usage(&[
        ("project_vcpu_usage", "Alpha", "9e28"),
        (
            "project_vcpu_usage",
            "Beta",
            "50000000000000010000000000000",
        ),
    ])));
    billed_up_to_now(&app).await;
    let health = app.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    assert!(used(&app, "Beta").await > huge);
    assert_eq!(used(&app, "Alpha").await, huge);
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("os_credits_worker_failures_total{")
                && l.contains("kind=\"panic\"")),
        "no worker panicked:\n{metrics}"
    );
    assert_invariants(&app.db.connect().await).await;
}

/// A server on loopback that hands each accepted connection to `serve` in its own
/// task; answers its URL.
async fn loopback_server<F, Fut>(serve: F) -> (String, tokio::task::JoinHandle<()>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    (url, task)
}

/// A portal on loopback that accepts connections and never answers.
async fn silent_portal() -> (String, tokio::task::JoinHandle<()>) {
    loopback_server(|stream| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(stream);
    })
    .await
}

/// A portal on loopback that answers 200 with an endless body of digits.
async fn endless_portal() -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loopback_server(|mut stream| async move {
        let mut head = [0u8; 4096];
        let _ = stream.read(&mut head).await;
        let chunk = vec![b'1'; 64 * 1024];
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            .await;
        // Until the client hangs up (1 GiB at most).
        for _ in 0..16 * 1024 {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Billing goes on with the last known grants while grant sync fails with `cause`.
/// `idle` more projects make a round long (each one asks the portal).
async fn billing_goes_on_while_the_portal_fails(portal: &str, cause: &str, idle: i32) {
    let exporter = FixtureExporter::start(Answer::ok(vcpu("Alpha", "1"))).await;
    let app = running_app(
        &exporter,
        &[
            ("API_CONTACT_BASE_URL", portal),
            ("API_CONTACT_SYNC_INTERVAL", "0.5"),
            ("API_CONTACT_SYNC_DEADLINE", "2"),
        ],
    )
    .await;
    // Projects to ask the portal about: synced before each billing run (as it was),
    // a hung portal held billing for 10 s per OS_CREDITS_WORKERS of them.
    app.db
        .connect()
        .await
        .execute(
            "INSERT INTO projects (name) SELECT 'idle' || i FROM generate_series(1, $1) i",
            &[&idle],
        )
        .await
        .expect("projects");
    let failing = health_where(&app, "grant sync to fail", |h| {
        h["workers"]["grant_sync"]["consecutive_failures"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(failing["status"], "degraded", "{failing}");
    let error = failing["workers"]["grant_sync"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains(cause), "{cause} expected in {failing}");

    // Billing is its own worker: it keeps completing runs and billing usage.
    billed_up_to_now(&app).await;
    let before = used(&app, "Alpha").await;
    exporter.set(Answer::ok(vcpu("Alpha", "4")));
    billed_up_to_now(&app).await;
    assert_eq!(used(&app, "Alpha").await - before, Decimal::from(3));
    let health = app.health().await;
    assert_eq!(billing(&health)["consecutive_failures"], 0, "{health}");
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("os_credits_worker_failures_total{")
                && l.contains("worker=\"grant_sync\"")),
        "{metrics}"
    );
    assert_invariants(&app.db.connect().await).await;
}

#[tokio::test]
async fn a_portal_that_never_answers_fails_grant_sync_rounds_not_billing() {
    let (portal, _task) = silent_portal().await;
    billing_goes_on_while_the_portal_fails(&portal, "API_CONTACT_SYNC_DEADLINE", 100).await;
}

#[tokio::test]
async fn an_endless_portal_answer_is_cut_off_at_the_size_limit() {
    let (portal, _task) = endless_portal().await;
    billing_goes_on_while_the_portal_fails(&portal, "larger than 65536 bytes", 0).await;
}

/// A portal on loopback that never answers for projects named `hang…` and grants 42
/// to every other.
async fn partly_hanging_portal() -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loopback_server(|mut stream| async move {
        let mut head = vec![0u8; 4096];
        let n = stream.read(&mut head).await.unwrap_or(0);
        if String::from_utf8_lossy(&head[..n]).contains("project_name=hang") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n42")
            .await;
    })
    .await
}

#[tokio::test]
async fn portal_answers_that_hang_cannot_starve_the_projects_behind_them() {
    let (portal, _task) = partly_hanging_portal().await;
    let db = TestDb::create().await;
    let app = spawn_app_on(db, &[], false).await;
    // Four hanging projects sort before the healthy one; two fetches at a time, so
    // a round that always started at the first project would never reach "zeta".
    app.db
        .connect()
        .await
        .batch_execute(
            "INSERT INTO projects (name) VALUES ('hang1'), ('hang2'), ('hang3'), ('hang4'), ('zeta')",
        )
        .await
        .expect("projects");
    let mut vars = app.db.vars();
    vars.extend(
        [
            ("API_CONTACT_BASE_URL", portal.as_str()),
            ("API_CONTACT_SYNC_DEADLINE", "1"),
            ("OS_CREDITS_WORKERS", "2"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let settings =
        std::sync::Arc::new(os_credits::config::Settings::from_vars(vars).expect("settings"));
    let http = os_credits::outbound::portal_client().expect("client");
    let rotation = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let granted = || async {
        app.db
            .connect()
            .await
            .query_one(
                "SELECT granted_credits FROM projects WHERE name = 'zeta'",
                &[],
            )
            .await
            .expect("zeta")
            .get::<_, Decimal>(0)
    };
    let mut rounds = 0;
    while granted().await != Decimal::from(42) {
        rounds += 1;
        assert!(rounds <= 4, "zeta never synced in {rounds} rounds");
        let round = os_credits::billing::worker::sync_grants(
            app.app_pool.clone(),
            settings.clone(),
            http.clone(),
            rotation.clone(),
        )
        .await;
        let error = format!(
            "{:#}",
            round.expect_err("hanging answers cut the round off")
        );
        assert!(error.contains("API_CONTACT_SYNC_DEADLINE"), "{error}");
    }
    assert!(rounds >= 2, "the first round only reaches hanging projects");
}

/// A real replica process (the binary), continued and killed when dropped.
struct Replica {
    child: std::process::Child,
}

impl Replica {
    fn start(db: &TestDb, vars: &[(&str, &str)]) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_os-credits"))
            .arg("serve")
            .envs(db.vars())
            .envs(vars.iter().copied())
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the replica");
        Self { child }
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "{signal} sent");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Projects another session holds locked (tried without waiting).
async fn locked_projects(db: &mut tokio_postgres::Client) -> Vec<String> {
    let tx = db.transaction().await.expect("begin");
    let rows = tx
        .query(
            "SELECT name FROM projects WHERE name NOT IN (
                 SELECT name FROM projects FOR UPDATE SKIP LOCKED) ORDER BY name",
            &[],
        )
        .await
        .expect("probe the locks");
    tx.rollback().await.expect("rollback");
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn a_replica_frozen_inside_a_billing_transaction_does_not_freeze_the_other() {
    const KEY: &str = "fault-key";
    let app = spawn_app_on(
        TestDb::create().await,
        &[
            ("API_KEY", KEY),
            ("POSTGRES_LOCK_TIMEOUT", "0.5"),
            ("ENDPOINTS_ONLY", "true"),
        ],
        false,
    )
    .await;
    let mut db = app.db.connect().await;
    // A backlog that keeps the other replica inside billing transactions for a while:
    // 3,000 projects, each a counter 1 → 40 (39 credits).
    // Seeding the series registers their projects too.
    common::seed_series_batch(
        &mut db,
        (1..=3000).map(|i| {
            let project = format!("p{i}");
            let labels = [("project_name", project.clone())];
            ("project_vcpu_usage", labels, project)
        }),
    )
    .await;
    db.batch_execute(
        "INSERT INTO usage_samples (series_id, time, value)
           SELECT s.id, now() - interval '2 hours' + j * interval '1 minute', j
           FROM series s, generate_series(1, 40) j;",
    )
    .await
    .expect("seed the backlog");

    let replica = Replica::start(
        &app.db,
        &[
            ("BILLING_INTERVAL", "0.2"),
            ("OS_CREDITS_WORKERS", "1"),
            ("POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT", "6"),
        ],
    );
    // Freeze it inside a billing transaction: stopped while its session holds
    // project locks and waits for it (`idle in transaction`).
    let mut locked = Vec::new();
    for _ in 0..200 {
        let billing = eventually(Duration::from_secs(60), "the replica to bill", || async {
            let frozen: i64 = db
                .query_one(
                    "SELECT count(*) FROM projects WHERE last_billed_at IS NOT NULL",
                    &[],
                )
                .await
                .expect("progress")
                .get(0);
            (frozen > 0).then_some(())
        });
        billing.await;
        replica.signal("-STOP");
        let idle = eventually(Duration::from_secs(2), "its session to settle", || async {
            let row = db
                .query_one(
                    "SELECT count(*) FILTER (WHERE state = 'idle in transaction'),
                            count(*) FILTER (WHERE state = 'active')
                     FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND application_name = 'os-credits'",
                    &[],
                )
                .await
                .expect("activity");
            let (idle, active): (i64, i64) = (row.get(0), row.get(1));
            (active == 0).then_some(idle)
        })
        .await;
        if idle > 0 {
            locked = locked_projects(&mut db).await;
            if !locked.is_empty() {
                break;
            }
        }
        replica.signal("-CONT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !locked.is_empty(),
        "the replica was never stopped inside a billing transaction"
    );
    let frozen_project = locked[0].clone();

    // The other replica answers at once: a write waiting for the frozen lock gives
    // up with 503 and Retry-After, concurrent writes do not exhaust its pool, reads
    // never wait.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let grant = http
        .put(format!(
            "{}/api/projects/{frozen_project}/grant",
            app.address
        ))
        .header("X-API-KEY", KEY)
        .json(&serde_json::json!({"granted_credits": "100"}))
        .send()
        .await
        .expect("the grant PUT answers without waiting for the frozen replica");
    assert_eq!(grant.status(), 503);
    assert!(grant.headers().contains_key("retry-after"));
    let reason: Value = grant.json().await.expect("JSON reason");
    assert!(
        reason["error"]
            .as_str()
            .unwrap_or_default()
            .contains("locked"),
        "{reason}"
    );
    let adjustments = futures::future::join_all((0..20).map(|_| {
        http.post(format!(
            "{}/api/projects/{frozen_project}/adjustments",
            app.address
        ))
        .header("X-API-KEY", KEY)
        .json(&serde_json::json!({"credits": "1", "reason": "fault test"}))
        .send()
    }))
    .await;
    for answer in adjustments {
        let answer = answer.expect("an adjustment answers");
        assert_eq!(answer.status(), 503);
    }
    for project in [frozen_project.as_str(), "p1", "p3000"] {
        let answer = http
            .get(format!("{}/api/current_credits/{project}", app.address))
            .send()
            .await
            .expect("current_credits answers");
        assert_eq!(answer.status(), 200, "{project}");
    }
    let health = http
        .get(format!("{}/health", app.address))
        .send()
        .await
        .expect("/health answers");
    assert_eq!(health.status(), 200);

    // PostgreSQL ends the frozen session after POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT,
    // freeing its locks; then the write goes through.
    eventually(WAIT, "the frozen session's locks to be freed", || async {
        locked_projects(&mut app.db.connect().await)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let grant = http
        .put(format!(
            "{}/api/projects/{frozen_project}/grant",
            app.address
        ))
        .header("X-API-KEY", KEY)
        .json(&serde_json::json!({"granted_credits": "100"}))
        .send()
        .await
        .expect("grant");
    assert_eq!(grant.status(), 200);

    // Woken up, the replica finds its session gone, and its billing goes on.
    replica.signal("-CONT");
    eventually(Duration::from_secs(120), "every project billed", || async {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE used_credits <> 39), count(*) FROM projects",
                &[],
            )
            .await
            .expect("balances");
        let (unbilled, all): (i64, i64) = (row.get(0), row.get(1));
        (unbilled == 0 && all == 3000).then_some(())
    })
    .await;
    assert_invariants(&db).await;
    drop(replica);
}

#[tokio::test]
async fn concurrent_metrics_scrapes_share_one_database_read_per_interval() {
    let app = spawn_app_on(
        TestDb::create().await,
        &[("METRICS_REFRESH_INTERVAL", "3600")],
        false,
    )
    .await;
    let db = app.db.connect().await;
    db.batch_execute("INSERT INTO projects (name) SELECT 'p' || i FROM generate_series(1, 5) i")
        .await
        .expect("projects");
    let projects = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("os_credits_projects "))
            .map(str::to_owned)
    };
    let scrapes = futures::future::join_all(
        (0..64).map(|_| async { app.get("/metrics").await.text().await.expect("metrics") }),
    )
    .await;
    // More projects now: the scrapes within the interval still show the shared read.
    db.batch_execute("INSERT INTO projects (name) VALUES ('late')")
        .await
        .expect("one more");
    let later = app.get("/metrics").await.text().await.expect("metrics");
    for text in scrapes.iter().chain([&later]) {
        assert_eq!(projects(text).as_deref(), Some("5"), "{text}");
    }
    // The process's own counters are not held back.
    assert!(later.contains("os_credits_http_requests_total{"));
    assert_invariants(&db).await;
}

/// Every wait on the pool is bounded: with the only connection held by a write that
/// waits for a lock, another request gives up after `POSTGRES_POOL_TIMEOUT` with 503,
/// `Retry-After` and a JSON reason instead of queueing behind it; once the lock is
/// freed, both go through.
#[tokio::test]
async fn a_request_that_finds_no_free_connection_answers_503_within_the_pool_timeout() {
    const KEY: &str = "pool-key";
    let app = spawn_app_on(
        TestDb::create().await,
        &[
            ("API_KEY", KEY),
            ("ENDPOINTS_ONLY", "true"),
            ("POSTGRES_POOL_SIZE", "1"),
            ("POSTGRES_POOL_TIMEOUT", "0.5"),
            ("POSTGRES_LOCK_TIMEOUT", "60"),
        ],
        false,
    )
    .await;
    let mut db = app.db.connect().await;
    db.batch_execute("INSERT INTO projects (name) VALUES ('Alpha'), ('Beta')")
        .await
        .expect("projects");
    // Another session holds Alpha's row: a grant for Alpha waits for it, holding the
    // service's only pooled connection meanwhile.
    let holder = db.transaction().await.expect("begin");
    holder
        .execute(
            "SELECT 1 FROM projects WHERE name = 'Alpha' FOR UPDATE",
            &[],
        )
        .await
        .expect("lock Alpha");
    let http = reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("client");
    let grant = tokio::spawn(
        http.put(format!("{}/api/projects/Alpha/grant", app.address))
            .header("X-API-KEY", KEY)
            .json(&serde_json::json!({"granted_credits": "100"}))
            .send(),
    );
    common::a_service_session_waits_for_a_lock(&app.db, WAIT, "the grant to wait for the lock")
        .await;

    let starved = http
        .get(format!("{}/api/projects/Beta/notifications", app.address))
        .header("X-API-KEY", KEY)
        .send()
        .await
        .expect("the read answers instead of queueing");
    assert_eq!(starved.status(), 503);
    assert!(starved.headers().contains_key("retry-after"));
    let reason: Value = starved.json().await.expect("JSON reason");
    assert_eq!(reason["error"], "database unavailable", "{reason}");
    assert!(!grant.is_finished(), "the grant still waits for the lock");

    holder.rollback().await.expect("free Alpha");
    let grant = grant.await.expect("task").expect("the grant answers");
    assert_eq!(grant.status(), 200);
    let read = http
        .get(format!("{}/api/projects/Beta/notifications", app.address))
        .header("X-API-KEY", KEY)
        .send()
        .await
        .expect("the read answers");
    assert_eq!(read.status(), 200);
}
