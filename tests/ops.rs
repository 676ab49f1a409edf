//! Operators' endpoints on a real PostgreSQL: the service's own metrics, `/stats`,
//! the run-time log filter, and a graceful stop of the real binary on SIGTERM.

mod common;

use common::exporter::{Answer, FixtureExporter};
use common::{spawn_app, TestApp, TestDb};
use os_credits::config::Settings;
use os_credits::telemetry::LogHandle;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "ops-key-0815";

/// Starts the service like `spawn_app`, with a log filter `/logconfig` can change
/// (not installed as the process's subscriber, which belongs to the test harness).
async fn spawn_app_with_logs(vars: &[(&str, &str)]) -> TestApp {
    let logs = LogHandle::detached("info").expect("a valid filter");
    common::spawn_app_with(TestDb::create().await, vars, false, Some(logs)).await
}

/// One scrape target named `name` serving two projects' vCPU counters.
async fn exporter_and_target(name: &str) -> (FixtureExporter, String) {
    let exporter = FixtureExporter::start(Answer::ok(
        "# TYPE project_vcpu_usage counter\n\
         project_vcpu_usage{project_name=\"Alpha\"} 10\n\
         project_vcpu_usage{project_name=\"Beta\"} 4\n",
    ))
    .await;
    let targets = serde_json::json!([{"name": name, "url": exporter.url}]).to_string();
    (exporter, targets)
}

/// A sample line of the text format: name, labels, value.
#[derive(Debug)]
struct Line {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The families' types and the sample lines of a `/metrics` answer. Label values
/// here have no escaped quotes or commas.
fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Line>) {
    let mut types = BTreeMap::new();
    let mut lines = Vec::new();
    for line in text.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declaration.split_once(' ').expect("TYPE name kind");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{name} declared twice"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label=value");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        lines.push(Line {
            name: name.to_owned(),
            labels,
            value: value.parse().unwrap_or_else(|_| panic!("value of {line}")),
        });
    }
    (types, lines)
}

struct Metrics {
    text: String,
    types: BTreeMap<String, String>,
    lines: Vec<Line>,
}

impl Metrics {
    async fn of(app: &TestApp) -> Self {
        let response = app.get("/metrics").await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        let text = response.text().await.expect("body");
        let (types, lines) = parse(&text);
        Self { text, types, lines }
    }

    /// The value of the sample of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.lines
            .iter()
            .find(|l| {
                l.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|l| l.value)
    }

    fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
    }

    fn kind(&self, family: &str) -> &str {
        self.types
            .get(family)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no family {family} in\n{}", self.text))
    }
}

async fn bill(app: &TestApp) -> Value {
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

#[tokio::test]
async fn metrics_show_scrapes_billing_backlog_and_the_pool_after_a_scrape_and_a_billing_run() {
    let (_exporter, targets) = exporter_and_target("ops-metrics-site").await;
    // Read the database at every scrape, to see the run's effect at once.
    let app = spawn_app(&[
        ("SCRAPE_TARGETS", &targets),
        ("API_KEY", KEY),
        ("METRICS_REFRESH_INTERVAL", "0"),
    ])
    .await;
    app.scrape().await;
    app.scrape().await;
    // One more vCPU sample, an hour older than the scraped ones: the oldest unbilled.
    let client = app.db.connect().await;
    let oldest: chrono::DateTime<chrono::Utc> = client
        .query_one(
            "INSERT INTO usage_samples (series_id, time, value)
             SELECT id, now() - interval '1 hour', 1 FROM series
             WHERE metric = 'project_vcpu_usage' ORDER BY id LIMIT 1
             RETURNING time",
            &[],
        )
        .await
        .expect("an older sample")
        .get(0);
    let age = |at: chrono::DateTime<chrono::Utc>| (at - oldest).num_milliseconds() as f64 / 1e3;

    let oldest_age_before = age(chrono::Utc::now());
    let before = Metrics::of(&app).await;
    let oldest_age_after = age(chrono::Utc::now());
    bill(&app).await;
    let after = Metrics::of(&app).await;

    let site = [("target", "ops-metrics-site")];
    let vcpu = [("metric", "project_vcpu_usage")];
    assert_eq!(
        before.expect(
            "os_credits_scrapes_total",
            &[("target", "ops-metrics-site"), ("outcome", "success")]
        ),
        2.0
    );
    assert_eq!(before.expect("os_credits_samples_stored_total", &site), 4.0);
    assert_eq!(
        before.kind("os_credits_scrape_duration_seconds"),
        "histogram"
    );
    assert_eq!(
        before.expect("os_credits_scrape_duration_seconds_count", &site),
        2.0
    );
    assert!(
        before
            .value(
                "os_credits_scrape_duration_seconds_bucket",
                &[("target", "ops-metrics-site"), ("le", "0.5")]
            )
            .is_some(),
        "real histogram buckets"
    );
    assert_eq!(before.expect("os_credits_scrape_target_up", &site), 1.0);
    assert_eq!(before.expect("os_credits_series", &vcpu), 2.0);
    assert_eq!(before.expect("os_credits_projects", &[]), 2.0);
    assert_eq!(
        before.expect("os_credits_unbilled_samples", &vcpu),
        5.0,
        "everything stored waits for billing"
    );
    let lag = before.expect("os_credits_billing_lag_seconds", &vcpu);
    assert!(
        (oldest_age_before - 1.0..=oldest_age_after + 1.0).contains(&lag),
        "the lag is the age of the oldest unbilled sample, {oldest_age_before} to {oldest_age_after} s: {lag}"
    );
    assert_eq!(
        before.expect(
            "os_credits_unbilled_samples",
            &[("metric", "project_mb_usage")]
        ),
        0.0,
        "a billed metric without series shows as zero"
    );

    assert_eq!(after.expect("os_credits_unbilled_samples", &vcpu), 0.0);
    assert_eq!(after.expect("os_credits_billing_lag_seconds", &vcpu), 0.0);
    assert!(
        after.expect("os_credits_billing_runs_total", &[("outcome", "success")]) >= 1.0,
        "billing runs of this process are counted"
    );
    assert_eq!(
        after.kind("os_credits_billing_run_duration_seconds"),
        "histogram"
    );
    assert_eq!(after.kind("os_credits_credits_billed_total"), "counter");
    assert!(after.expect("os_credits_samples_billed_total", &[]) >= 4.0);
    assert!(after
        .value("os_credits_last_billed_timestamp_seconds", &[])
        .is_some());
    assert_eq!(after.expect("os_credits_db_pool_max_connections", &[]), 4.0);
    assert!(after.expect("os_credits_db_pool_connections", &[]) >= 1.0);
    assert!(after
        .value("os_credits_db_pool_idle_connections", &[])
        .is_some());
    assert_eq!(after.expect("os_credits_db_pool_waiting", &[]), 0.0);
    assert_eq!(after.expect("os_credits_database_up", &[]), 1.0);
    // The migrations create the outbox, so its family is always there.
    assert_eq!(after.kind("os_credits_notification_deliveries"), "gauge");
}

#[tokio::test]
async fn a_failing_target_is_counted_by_its_outcome_not_its_message() {
    let broken = FixtureExporter::start(Answer {
        status: 503,
        ..Answer::ok("down for maintenance")
    })
    .await;
    let targets = serde_json::json!([{"name": "ops-broken-site", "url": broken.url}]).to_string();
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;
    app.scrape().await;

    let metrics = Metrics::of(&app).await;

    let labels = [("target", "ops-broken-site"), ("outcome", "bad_status")];
    assert_eq!(metrics.expect("os_credits_scrapes_total", &labels), 1.0);
    assert_eq!(
        metrics.expect(
            "os_credits_scrape_target_up",
            &[("target", "ops-broken-site")]
        ),
        0.0
    );
    assert!(!metrics.text.contains("maintenance"));
}

#[tokio::test]
async fn http_requests_are_labelled_by_route_template_never_by_raw_path() {
    let app = spawn_app(&[]).await;
    let project = app.get("/api/current_credits/ops-raw-project-name").await;
    app.get("/ops/no/such/path").await;

    let metrics = Metrics::of(&app).await;

    assert_eq!(project.status(), 404);
    let request_id = project.headers()["x-request-id"].to_str().expect("ascii");
    assert_eq!(request_id.len(), 36, "a UUID: {request_id}");
    let template = [
        ("method", "GET"),
        ("route", "/api/current_credits/{project_name}"),
        ("status", "404"),
    ];
    assert!(metrics.expect("os_credits_http_requests_total", &template) >= 1.0);
    assert!(
        metrics.expect(
            "os_credits_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ) >= 1.0
    );
    assert_eq!(
        metrics.kind("os_credits_http_request_duration_seconds"),
        "histogram"
    );
    assert!(metrics
        .value(
            "os_credits_http_request_duration_seconds_bucket",
            &[
                ("route", "/api/current_credits/{project_name}"),
                ("le", "+Inf")
            ]
        )
        .is_some());
    for raw in ["ops-raw-project-name", "/ops/no/such/path"] {
        assert!(!metrics.text.contains(raw), "{raw} became a label");
    }
}

#[tokio::test]
async fn stats_keep_the_old_services_keys_and_verbose_adds_targets_backlog_and_pool() {
    let (_exporter, targets) = exporter_and_target("ops-stats-site").await;
    let app = spawn_app_with_logs(&[
        ("SCRAPE_TARGETS", &targets),
        ("API_KEY", KEY),
        ("OS_CREDITS_WORKERS", "3"),
    ])
    .await;
    app.scrape().await;

    let waiting: Value = app.get("/stats").await.json().await.expect("JSON");
    bill(&app).await;
    let billed: Value = app.get("/stats").await.json().await.expect("JSON");
    let verbose: Value = app
        .get("/stats?verbose=true")
        .await
        .json()
        .await
        .expect("JSON");

    assert_eq!(waiting["number_of_workers"], 3, "{waiting}");
    assert_eq!(waiting["queue_size"], 2, "two samples wait: {waiting}");
    assert_eq!(billed["queue_size"], 0, "{billed}");
    let uptime = waiting["uptime"].as_str().expect("uptime is text");
    let seconds = waiting["uptime_seconds"].as_f64().expect("uptime_seconds");
    let parts: Vec<f64> = uptime
        .split(':')
        .map(|part| part.parse().expect("a number"))
        .collect();
    assert!(
        parts.len() == 3
            && uptime
                .split(':')
                .skip(1)
                .all(|p| p.find('.').unwrap_or(p.len()) == 2),
        "Python timedelta format H:MM:SS[.ffffff]: {uptime}"
    );
    assert!(
        (parts[0] * 3600.0 + parts[1] * 60.0 + parts[2] - seconds).abs() < 1e-3,
        "uptime {uptime} says uptime_seconds {seconds}"
    );
    assert_eq!(waiting["scrape_targets"], 1);
    assert!(waiting.get("targets").is_none(), "not verbose: {waiting}");
    assert_eq!(billed["last_billing_run"]["outcome"], "success", "{billed}");
    assert!(billed["last_billed_at"].is_string(), "{billed}");
    assert_eq!(verbose["targets"][0]["name"], "ops-stats-site", "{verbose}");
    assert_eq!(verbose["targets"][0]["up"], true);
    assert_eq!(verbose["database_pool"]["max_size"], 4, "{verbose}");
    assert_eq!(
        verbose["backlog"]["project_vcpu_usage"]["series"], 2,
        "{verbose}"
    );
    assert_eq!(verbose["log_filter"], "info");
}

async fn post_logconfig(
    app: &TestApp,
    key: Option<&str>,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let mut request = app
        .http
        .post(format!("{}/logconfig", app.address))
        .header("Content-Type", content_type)
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("X-API-KEY", key);
    }
    let response = request.send().await.expect("POST /logconfig");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON answer"))
}

async fn current_filter(app: &TestApp) -> String {
    let answer: Value = app.get("/logconfig").await.json().await.expect("JSON");
    answer["filter"].as_str().expect("filter").to_owned()
}

#[tokio::test]
async fn changing_the_log_filter_needs_the_api_key() {
    let app = spawn_app_with_logs(&[("API_KEY", KEY)]).await;

    let missing = post_logconfig(&app, None, "text/plain", "debug").await;
    let wrong = post_logconfig(&app, Some("nope"), "text/plain", "debug").await;

    assert_eq!(missing.0, 401, "{}", missing.1);
    assert_eq!(wrong.0, 403, "{}", wrong.1);
    assert!(missing.1["error"].is_string());
    assert_eq!(current_filter(&app).await, "info", "nothing changed");
}

#[tokio::test]
async fn a_bad_log_filter_is_refused_with_its_reason_and_changes_nothing() {
    let app = spawn_app_with_logs(&[("API_KEY", KEY)]).await;
    let cases = [
        (
            "a level that does not exist",
            "text/plain",
            "os_credits=loud",
        ),
        ("blank", "text/plain", "  "),
        (
            "JSON without filter",
            "application/json",
            r#"{"level": "debug"}"#,
        ),
        ("broken JSON", "application/json", r#"{"filter": "#),
    ];

    for (case, content_type, body) in cases {
        let (status, answer) = post_logconfig(&app, Some(KEY), content_type, body).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert!(answer["error"].is_string(), "{case}: {answer}");
    }

    assert_eq!(current_filter(&app).await, "info", "nothing changed");
}

#[tokio::test]
async fn a_good_log_filter_applies_at_once_as_text_or_json() {
    let app = spawn_app_with_logs(&[("API_KEY", KEY)]).await;

    let text = post_logconfig(
        &app,
        Some(KEY),
        "text/plain",
        "os_credits::billing=debug,info",
    )
    .await;
    let after_text = current_filter(&app).await;
    let json = post_logconfig(&app, Some(KEY), "application/json", r#"{"filter": "warn"}"#).await;
    let after_json = current_filter(&app).await;

    assert_eq!(text.0, 200, "{}", text.1);
    assert!(
        after_text.contains("os_credits::billing=debug") && after_text.contains("info"),
        "{after_text}"
    );
    assert_eq!(text.1["filter"], after_text.as_str());
    assert_eq!(json.0, 200, "{}", json.1);
    assert_eq!(after_json, "warn");
}

#[tokio::test]
async fn without_run_time_log_control_logconfig_answers_503() {
    let app = spawn_app(&[("API_KEY", KEY)]).await;

    let get = app.get("/logconfig").await;
    let (status, answer) = post_logconfig(&app, Some(KEY), "text/plain", "debug").await;

    assert_eq!(get.status(), 503);
    assert_eq!(status, 503, "{answer}");
    assert!(answer["error"].is_string());
}

/// The real binary, its stderr collected line by line.
struct Service {
    child: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Where the service writes the port it bound (`--port-file`; it binds port 0).
    port_file: std::path::PathBuf,
}

impl Service {
    fn start(db: &TestDb, vars: &[(&str, &str)]) -> Self {
        let port_file = std::env::temp_dir().join(format!("{}.port", db.name));
        let _ = std::fs::remove_file(&port_file);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_os-credits"))
            .arg("serve")
            .arg("--port-file")
            .arg(&port_file)
            .envs(db.vars())
            .envs(vars.iter().copied())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the service");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("lock").push(line);
            }
        });
        Self {
            child,
            log,
            port_file,
        }
    }

    /// The JSON log lines whose message is `message`.
    fn logged(&self, message: &str) -> Vec<Value> {
        self.log
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|entry| entry["fields"]["message"] == message)
            .collect()
    }

    /// The port the service bound, as it reports it in `--port-file`.
    async fn port(&self) -> u16 {
        common::eventually(Duration::from_secs(60), "the service to listen", || async {
            std::fs::read_to_string(&self.port_file)
                .ok()
                .and_then(|text| text.trim_end().parse().ok())
        })
        .await
    }

    fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "SIGTERM sent");
    }

    /// Waits for the exit, failing after `deadline`.
    async fn exit_within(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > deadline {
                let _ = self.child.kill();
                panic!(
                    "still running {deadline:?} after SIGTERM; log:\n{}",
                    self.log.lock().expect("lock").join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.port_file);
    }
}

/// Requests may take 10 s to finish and workers 15 s more; anything beyond is a hang.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn sigterm_stops_accepting_finishes_the_request_in_flight_and_exits_0() {
    let db = TestDb::create().await;
    let settings = Settings::from_vars(db.vars()).expect("settings");
    os_credits::startup::migrate(&settings)
        .await
        .expect("migrate");
    let client = db.connect().await;
    client
        .batch_execute("INSERT INTO projects (name) VALUES ('Held')")
        .await
        .expect("project");
    let mut service = Service::start(&db, &[("API_KEY", KEY), ("BILLING_INTERVAL", "3600")]);
    let address = format!("127.0.0.1:{}", service.port().await);
    let http = reqwest::Client::new();
    let logconfig = http
        .post(format!("http://{address}/logconfig"))
        .header("X-API-KEY", KEY)
        .body("info")
        .send()
        .await
        .expect("POST /logconfig");
    let request_id = logconfig.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();

    // Hold the project's row so that a grant waits for it: a request in flight.
    client
        .batch_execute("BEGIN; SELECT 1 FROM projects WHERE name = 'Held' FOR UPDATE")
        .await
        .expect("lock");
    let in_flight = tokio::spawn({
        let (http, address) = (http.clone(), address.clone());
        async move {
            http.put(format!("http://{address}/api/projects/Held/grant"))
                .header("X-API-KEY", KEY)
                .body(r#"{"granted_credits": 100}"#)
                .send()
                .await
        }
    });
    common::a_service_session_waits_for_a_lock(
        &db,
        Duration::from_secs(10),
        "the grant to wait for the row",
    )
    .await;
    service.terminate();
    common::eventually(
        Duration::from_secs(10),
        "new connections to be refused",
        || async {
            tokio::net::TcpStream::connect(&address)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    assert!(
        service.child.try_wait().expect("wait").is_none(),
        "still running while a request is in flight"
    );
    client
        .batch_execute("COMMIT")
        .await
        .expect("release the row");
    let answer = in_flight
        .await
        .expect("task")
        .expect("the request in flight is answered");
    let status = service.exit_within(STOP_DEADLINE).await;

    assert_eq!(answer.status(), 200, "the request in flight finished");
    let granted: rust_decimal::Decimal = client
        .query_one(
            "SELECT granted_credits FROM projects WHERE name = 'Held'",
            &[],
        )
        .await
        .expect("grant")
        .get(0);
    assert_eq!(granted, rust_decimal::Decimal::from(100));
    assert_eq!(status.code(), Some(0), "exit code");
    assert_eq!(service.logged("shutdown requested").len(), 1);
    assert_eq!(
        service.logged("stopped").len(),
        1,
        "the log says it stopped"
    );
    let changed = service.logged("log filter changed");
    assert_eq!(
        changed[0]["span"]["request_id"],
        request_id.as_str(),
        "JSON log lines carry the request id: {changed:?}"
    );
}

#[tokio::test]
async fn sigterm_during_a_billing_run_lets_it_finish_and_exits_0() {
    const PROJECTS: i64 = 900;
    const SAMPLES: i64 = 40;
    let db = TestDb::create().await;
    let settings = Settings::from_vars(db.vars()).expect("settings");
    os_credits::startup::migrate(&settings)
        .await
        .expect("migrate");
    let mut client = db.connect().await;
    // A counter rising by 1 per sample: each project uses SAMPLES - 1 credits. Seeding
    // the series registers their projects too.
    common::seed_series_batch(
        &mut client,
        (1..=PROJECTS).map(|i| {
            let project = format!("p{i}");
            let labels = [("project_name", project.clone())];
            ("project_vcpu_usage", labels, project)
        }),
    )
    .await;
    client
        .batch_execute(&format!(
            "INSERT INTO usage_samples (series_id, time, value)
             SELECT s.id, '2026-03-01'::timestamptz + k * interval '5 minutes', k
             FROM series s, generate_series(0, {SAMPLES} - 1) k;"
        ))
        .await
        .expect("seed a backlog");
    let billed = || async {
        client
            .query_one(
                "SELECT count(*) FROM projects WHERE last_billed_at IS NOT NULL",
                &[],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
    };

    // The batch holding the last project waits at the gate, so the run is certainly
    // in its middle when SIGTERM arrives.
    let last: String = client
        .query_one("SELECT max(name) FROM projects", &[])
        .await
        .expect("last project")
        .get(0);
    let gate = common::ProjectGate::close(&db, &last).await;
    let mut service = Service::start(
        &db,
        &[("OS_CREDITS_WORKERS", "1"), ("BILLING_INTERVAL", "3600")],
    );
    gate.until_someone_waits().await;
    service.terminate();
    common::eventually(Duration::from_secs(30), "SIGTERM to be seen", || async {
        (!service.logged("shutdown requested").is_empty()).then_some(())
    })
    .await;
    let at_sigterm = billed().await;
    gate.open().await;
    let status = service.exit_within(STOP_DEADLINE).await;

    assert_eq!(status.code(), Some(0), "exit code");
    assert!(
        0 < at_sigterm && at_sigterm < PROJECTS,
        "SIGTERM landed mid-run ({at_sigterm} of {PROJECTS} billed)"
    );
    assert_eq!(billed().await, PROJECTS, "the run in progress finished");
    let wrong: i64 = client
        .query_one(
            "SELECT count(*) FROM projects WHERE used_credits <> $1",
            &[&rust_decimal::Decimal::from(SAMPLES - 1)],
        )
        .await
        .expect("balances")
        .get(0);
    assert_eq!(wrong, 0, "every project billed exactly once");
    let billing_stopped = service
        .logged("worker stopped")
        .into_iter()
        .filter(|entry| entry["fields"]["worker"] == "billing")
        .count();
    assert_eq!(billing_stopped, 1, "the billing worker stopped once");
    assert_eq!(service.logged("stopped").len(), 1);
}

/// The service with its billing worker stuck talking to a portal that answers each
/// grant request after 9 s (its timeout is 10 s): syncing ten projects one at a time
/// would keep it busy for 90 s. Returns once the worker is stuck.
async fn service_with_a_hanging_worker() -> (Service, FixtureExporter, TestDb) {
    let portal = FixtureExporter::start(Answer {
        delay: Duration::from_secs(9),
        ..Answer::ok("100\n")
    })
    .await;
    let base = portal.url.trim_end_matches("/metrics").to_owned();
    let db = TestDb::create().await;
    let settings = Settings::from_vars(db.vars()).expect("settings");
    os_credits::startup::migrate(&settings)
        .await
        .expect("migrate");
    db.connect()
        .await
        .batch_execute("INSERT INTO projects (name) SELECT 'p' || i FROM generate_series(1, 10) i")
        .await
        .expect("projects");
    let service = Service::start(
        &db,
        &[
            ("API_CONTACT_BASE_URL", &base),
            ("OS_CREDITS_WORKERS", "1"),
            ("BILLING_INTERVAL", "3600"),
        ],
    );
    common::eventually(
        Duration::from_secs(60),
        "the billing worker to ask the portal",
        || async { (!portal.requests.lock().expect("lock").is_empty()).then_some(()) },
    )
    .await;
    (service, portal, db)
}

#[tokio::test]
async fn sigterm_while_a_worker_hangs_still_exits_0_within_the_grace_period() {
    let (mut service, portal, _db) = service_with_a_hanging_worker().await;

    service.terminate();
    let status = service.exit_within(STOP_DEADLINE).await;

    assert_eq!(status.code(), Some(0), "exit code");
    assert!(
        portal.requests.lock().expect("lock").len() < 10,
        "the hanging grant sync was dropped, not waited out"
    );
    let log = service.log.lock().expect("lock").join("\n");
    assert!(
        log.contains("workers did not finish within"),
        "the abandoned step is logged:\n{log}"
    );
    assert_eq!(service.logged("stopped").len(), 1);
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_with_status_1() {
    let (mut service, _portal, _db) = service_with_a_hanging_worker().await;
    service.terminate();
    common::eventually(
        Duration::from_secs(10),
        "the first signal to be seen",
        || async { (!service.logged("shutdown requested").is_empty()).then_some(()) },
    )
    .await;

    service.terminate();
    let status = service.exit_within(Duration::from_secs(5)).await;

    assert_eq!(status.code(), Some(1), "exit code");
    assert_eq!(service.logged("second signal: exiting at once").len(), 1);
}
