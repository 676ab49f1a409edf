//! The Grafana dashboards against a real database with billed data: every panel's
//! SQL, with macros and variables expanded as Grafana's PostgreSQL data source does,
//! runs and returns the columns the panel shows, and rows.

mod common;

use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, Timelike, Utc};
use common::exporter::{Answer, FixtureExporter};
use common::{spawn_app, TestApp};
use os_credits::billing::engine;
use os_credits::config::Settings;
use os_credits::store::StorageMode;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

const API_KEY: &str = "grafana-test-key";
const DATASOURCE_UID: &str = "os-credits-postgres";

/// (dashboard uid, panel title) → the columns the panel reads, in order.
const EXPECTED_COLUMNS: &[(&str, &str, &[&str])] = &[
    (
        "os-credits-credits",
        "Used and granted credits",
        &["time", "metric", "used", "granted"],
    ),
    (
        "os-credits-credits",
        "Remaining credits",
        &["time", "metric", "remaining"],
    ),
    (
        "os-credits-balances",
        "Projects: remaining credits and forecast run-out",
        &[
            "project",
            "granted",
            "used",
            "remaining",
            "percent_used",
            "burn_per_hour",
            "forecast_run_out",
            "last_billed_at",
        ],
    ),
    (
        "os-credits-balances",
        "Share of the grant used",
        &["project", "percent_used"],
    ),
    (
        "os-credits-usage",
        "Credits charged per metric and project",
        &["time", "metric", "credits"],
    ),
    (
        "os-credits-usage",
        "Units used per metric and project",
        &["time", "metric", "quantity"],
    ),
    (
        "os-credits-usage",
        "Totals in the time range",
        &[
            "project",
            "metric",
            "quantity",
            "credits",
            "usage_from",
            "usage_to",
        ],
    ),
    (
        "os-credits-operations",
        "Billing lag per metric",
        &["metric", "lag_seconds", "unbilled_samples"],
    ),
    (
        "os-credits-operations",
        "Scrape targets",
        &[
            "target",
            "url",
            "up",
            "last_attempt_at",
            "last_success_at",
            "seconds_since_success",
            "last_duration_ms",
            "last_samples",
            "scrapes_total",
            "failures_total",
            "last_error",
        ],
    ),
    (
        "os-credits-operations",
        "Samples stored per metric",
        &["time", "metric", "samples"],
    ),
    (
        "os-credits-operations",
        "Billing cursor per series",
        &[
            "metric",
            "project",
            "series",
            "newest_sample",
            "billed_until",
            "unbilled_samples",
            "lag_seconds",
            "cursor_updated_at",
        ],
    ),
    (
        "os-credits-notifications",
        "Deliveries by channel and status",
        &["channel", "status", "deliveries"],
    ),
    (
        "os-credits-notifications",
        "Threshold crossings",
        &["time", "metric", "crossings"],
    ),
    (
        "os-credits-notifications",
        "Notification log",
        &[
            "time",
            "id",
            "project",
            "threshold_percent",
            "granted",
            "used",
            "cause",
            "channel",
            "status",
            "attempts",
            "next_attempt_at",
            "sent_at",
            "recipients",
            "last_error",
        ],
    ),
];

/// Functions only TimescaleDB has: the dashboards must run on plain PostgreSQL too.
const TIMESCALEDB_ONLY: &[&str] = &[
    "time_bucket",
    "locf(",
    "interpolate(",
    "first(",
    "last(",
    "histogram(",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Dashboard {
    file: String,
    json: Value,
}

fn dashboards() -> Vec<Dashboard> {
    let dir = repo().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read dashboard");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            Dashboard {
                file: file_name(&path),
                json,
            }
        })
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Panels, including those inside collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                walk(&panel["panels"], out);
            } else {
                out.push(panel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn variables(dashboard: &Value) -> &Vec<Value> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list is an array")
}

/// Which way Grafana expands `$__timeGroup`: its `timescaledb` data source option.
#[derive(Debug, Clone, Copy)]
enum Flavor {
    Postgres,
    Timescaledb,
}

/// What a dashboard is looked at with.
struct View {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    interval: &'static str,
    projects: Vec<String>,
    flavor: Flavor,
}

impl View {
    /// Multi-value variables in SQL: each value single-quoted (quotes doubled), joined
    /// by commas — Grafana's SQL formatting, also what `:sqlstring` gives.
    fn project_list(&self) -> String {
        self.projects
            .iter()
            .map(|p| format!("'{}'", p.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Template variables first (as Grafana's frontend does), then the data source's
    /// macros (as `pkg/tsdb/grafana-postgresql-datasource/macros.go`).
    fn expand(&self, sql: &str) -> String {
        let sql = sql
            .replace("${project:sqlstring}", &self.project_list())
            .replace("${project}", &self.project_list())
            .replace("$project", &self.project_list())
            .replace(
                "$__interval_ms",
                &(interval_seconds(self.interval) * 1000).to_string(),
            )
            .replace("$__interval", self.interval);
        let mut out = String::new();
        let mut rest = sql.as_str();
        while let Some(start) = rest.find("$__") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            let name_len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..name_len];
            let call = &after[name_len..];
            assert!(
                call.starts_with('('),
                "${name} is not a macro call in {sql}"
            );
            // Grafana's pattern: arguments up to the first `)`, split at commas.
            let close = call.find(')').expect("macro call is closed");
            let args: Vec<&str> = call[1..close].split(',').map(str::trim).collect();
            out.push_str(&self.macro_text(name, &args));
            rest = &call[close + 1..];
        }
        out.push_str(rest);
        assert!(
            !out.contains('$'),
            "a variable or macro was left unexpanded: {out}"
        );
        out
    }

    fn macro_text(&self, name: &str, args: &[&str]) -> String {
        let from = quoted_time(self.from);
        let to = quoted_time(self.to);
        match name {
            "__timeFilter" => format!("{} BETWEEN {from} AND {to}", args[0]),
            "__timeFrom" => from,
            "__timeTo" => to,
            "__timeGroup" | "__timeGroupAlias" => {
                assert!(args.len() >= 2, "{name} needs a column and an interval");
                let secs = interval_seconds(args[1].trim_matches('\''));
                let group = match self.flavor {
                    Flavor::Postgres => {
                        format!("floor(extract(epoch from {})/{secs})*{secs}", args[0])
                    }
                    Flavor::Timescaledb => format!("time_bucket('{secs}.000s',{})", args[0]),
                };
                if name == "__timeGroupAlias" {
                    format!("{group} AS \"time\"")
                } else {
                    group
                }
            }
            other => panic!("macro {other} is not one the dashboards may use"),
        }
    }
}

/// Go's RFC 3339 in UTC (the test uses whole seconds, so no fraction).
fn quoted_time(t: DateTime<Utc>) -> String {
    format!("'{}'", t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

fn interval_seconds(text: &str) -> u64 {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let count: u64 = digits.parse().unwrap_or_else(|_| panic!("interval {text}"));
    count
        * match &text[digits.len()..] {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => panic!("interval unit {other:?}"),
        }
}

#[test]
fn every_dashboard_has_a_unique_uid_the_project_variable_and_the_provisioned_data_source() {
    let mut uids = BTreeSet::new();
    for Dashboard { file, json } in dashboards() {
        let uid = json["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{file} has no uid"));
        assert!(
            uids.insert(uid.to_owned()),
            "{file}: uid {uid} is used twice"
        );
        assert!(json["title"].as_str().is_some(), "{file} has no title");
        let schema = json["schemaVersion"].as_u64().unwrap_or_default();
        assert!(
            (36..=41).contains(&schema),
            "{file}: schemaVersion {schema}"
        );
        let project = variables(&json)
            .iter()
            .find(|v| v["name"] == "project")
            .unwrap_or_else(|| panic!("{file} has no project variable"));
        assert_eq!(project["type"], "query", "{file}");
        assert_eq!(project["multi"], true, "{file}: project is multi-value");
        assert_eq!(project["includeAll"], true, "{file}: project includes All");
        assert_eq!(
            project["query"], "SELECT name FROM projects ORDER BY name",
            "{file}"
        );
        for panel in panels(&json) {
            let title = panel["title"].as_str().unwrap_or_default();
            assert_eq!(
                panel["datasource"]["uid"], DATASOURCE_UID,
                "{file}: panel {title}"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{file}: panel {title} has no query");
            for target in targets {
                let sql = target["rawSql"].as_str().expect("rawSql").to_lowercase();
                for function in TIMESCALEDB_ONLY {
                    assert!(
                        !sql.contains(function),
                        "{file}: panel {title} uses {function}, which plain PostgreSQL lacks"
                    );
                }
            }
        }
    }
    let provisioning =
        std::fs::read_to_string(repo().join("grafana/provisioning/datasources/postgres.yaml"))
            .expect("data source provisioning");
    assert!(
        provisioning
            .lines()
            .any(|line| line.trim() == format!("uid: {DATASOURCE_UID}")),
        "the provisioned data source has the uid the dashboards use"
    );
}

#[test]
fn every_panel_is_listed_with_its_columns() {
    let mut listed: BTreeSet<(String, String)> = EXPECTED_COLUMNS
        .iter()
        .map(|(uid, title, _)| (uid.to_string(), title.to_string()))
        .collect();
    for Dashboard { file, json } in dashboards() {
        let uid = json["uid"].as_str().unwrap_or_default().to_owned();
        for panel in panels(&json) {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            assert!(
                listed.remove(&(uid.clone(), title.clone())),
                "{file}: panel {title:?} is missing from EXPECTED_COLUMNS"
            );
        }
    }
    assert!(
        listed.is_empty(),
        "EXPECTED_COLUMNS names panels that do not exist: {listed:?}"
    );
}

/// Stores a counter series with samples at the given times before now.
async fn seed(app: &TestApp, metric: &str, project: &str, samples: &[(i64, f64)]) {
    let mut client = app.db.connect().await;
    let id = common::seed_series(&mut client, metric, &[("project_name", project)], project).await;
    let now = Utc::now();
    for (minutes_ago, value) in samples {
        let time = now - ChronoDuration::minutes(*minutes_ago);
        client
            .execute(
                "INSERT INTO usage_samples (series_id, time, value) VALUES ($1, $2, $3)",
                &[&id, &time, value],
            )
            .await
            .expect("insert sample");
    }
}

async fn grant(app: &TestApp, project: &str, credits: u32) {
    let response = app
        .http
        .put(format!("{}/api/projects/{project}/grant", app.address))
        .header("X-API-KEY", API_KEY)
        .json(&serde_json::json!({ "granted_credits": credits }))
        .send()
        .await
        .expect("grant request");
    assert_eq!(response.status(), 200, "grant {project}");
}

/// Three projects (one with a quote in its name) with six hours of counter samples,
/// grants that cross thresholds, one billing run, and a scraped target.
async fn billed_app() -> (TestApp, FixtureExporter) {
    let exporter = FixtureExporter::start(Answer::ok("node_load1 0.5\n")).await;
    let app = spawn_app(&[("API_KEY", API_KEY), ("SCRAPE_TARGETS", &exporter.url)]).await;
    let minutes: Vec<i64> = (0..36).map(|i| 370 - i * 10).collect();
    for (project, rate) in [("alpha", 1.0), ("beta", 0.5), ("o'hara", 2.0)] {
        let vcpu: Vec<(i64, f64)> = minutes
            .iter()
            .enumerate()
            .map(|(i, m)| (*m, i as f64 * rate))
            .collect();
        let mb: Vec<(i64, f64)> = minutes
            .iter()
            .enumerate()
            .map(|(i, m)| (*m, 100.0 + i as f64 * 4.0))
            .collect();
        seed(&app, "project_vcpu_usage", project, &vcpu).await;
        seed(&app, "project_mb_usage", project, &mb).await;
    }
    grant(&app, "alpha", 60).await;
    grant(&app, "o'hara", 50).await;
    let mut vars = app.db.vars();
    vars.push(("API_KEY".into(), API_KEY.into()));
    let settings = Settings::from_vars(vars).expect("settings");
    let summary = engine::run(&app.app_pool, settings.billing(), Utc::now())
        .await
        .expect("billing run");
    assert!(summary.ledger_rows > 0, "billing wrote ledger rows");
    let attempts = app.scrape().await;
    assert_eq!(attempts.len(), 1, "one target scraped");
    // Samples after the cursor, so the lag panels have something waiting.
    seed(&app, "project_vcpu_usage", "late", &[(5, 1.0), (2, 2.0)]).await;
    (app, exporter)
}

fn is_number(ty: &Type) -> bool {
    [
        Type::FLOAT8,
        Type::FLOAT4,
        Type::INT8,
        Type::INT4,
        Type::INT2,
        Type::NUMERIC,
    ]
    .contains(ty)
}

/// Runs one panel query; returns its columns and the number of rows.
async fn run(client: &tokio_postgres::Client, sql: &str) -> (Vec<(String, Type)>, usize) {
    let statement = client
        .prepare(sql)
        .await
        .unwrap_or_else(|e| panic!("query does not prepare: {e:?}\n{sql}"));
    let columns = statement
        .columns()
        .iter()
        .map(|c| (c.name().to_owned(), c.type_().clone()))
        .collect();
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("query fails: {e:?}\n{sql}"))
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count();
    (columns, rows)
}

#[tokio::test]
async fn every_panel_query_returns_its_columns_and_rows_from_billed_data() {
    let (app, _exporter) = billed_app().await;
    let client = app.db.connect().await;
    let expected: BTreeMap<(&str, &str), &[&str]> = EXPECTED_COLUMNS
        .iter()
        .map(|(uid, title, columns)| ((*uid, *title), *columns))
        .collect();
    // Whole seconds: Go's RFC3339Nano and chrono agree on how to write them.
    let now = Utc::now()
        .with_nanosecond(0)
        .expect("zero nanoseconds is valid");
    let mut flavors = vec![Flavor::Postgres];
    if app.mode == StorageMode::Timescaledb {
        flavors.push(Flavor::Timescaledb);
    }
    for flavor in flavors {
        for Dashboard { file, json } in dashboards() {
            let uid = json["uid"].as_str().unwrap_or_default();
            // What the variable query offers is what "All" selects.
            let variable = variables(&json)
                .iter()
                .find(|v| v["name"] == "project")
                .expect("project variable");
            let variable_sql = variable["query"].as_str().expect("variable query");
            let projects: Vec<String> = client
                .query(variable_sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{file}: variable query fails: {e:?}"))
                .iter()
                .map(|row| row.get(0))
                .collect();
            assert!(projects.contains(&"o'hara".to_owned()), "{projects:?}");
            let view = View {
                from: now - ChronoDuration::days(2),
                to: now + ChronoDuration::minutes(1),
                interval: "1h",
                projects,
                flavor,
            };
            for panel in panels(&json) {
                let title = panel["title"].as_str().unwrap_or_default();
                let want = expected
                    .get(&(uid, title))
                    .unwrap_or_else(|| panic!("{file}: panel {title:?} not in EXPECTED_COLUMNS"));
                for target in panel["targets"].as_array().expect("targets") {
                    let sql = view.expand(target["rawSql"].as_str().expect("rawSql"));
                    let (columns, rows) = run(&client, &sql).await;
                    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
                    assert_eq!(
                        &names, want,
                        "{file} ({flavor:?}): columns of panel {title:?}"
                    );
                    assert!(
                        rows > 0,
                        "{file} ({flavor:?}): panel {title:?} returned no rows\n{sql}"
                    );
                    if target["format"] == "time_series" {
                        for (name, ty) in &columns[1..] {
                            assert!(
                                name == "metric" || is_number(ty),
                                "{file}: panel {title:?}: value column {name} is {ty}, not a number"
                            );
                        }
                    }
                }
            }
        }
    }
    // A single project narrows the panels to it; the quote in its name is escaped.
    let credits = dashboards()
        .into_iter()
        .find(|d| d.json["uid"] == "os-credits-usage")
        .expect("usage dashboard");
    let view = View {
        from: now - ChronoDuration::days(2),
        to: now,
        interval: "30m",
        projects: vec!["o'hara".into()],
        flavor: Flavor::Postgres,
    };
    let totals = panels(&credits.json)
        .into_iter()
        .find(|p| p["title"] == "Totals in the time range")
        .expect("totals panel");
    let sql = view.expand(totals["targets"][0]["rawSql"].as_str().expect("rawSql"));
    let rows = client.query(&sql, &[]).await.expect("totals query");
    assert_eq!(rows.len(), 2, "o'hara's two metrics");
    for row in rows {
        assert_eq!(row.get::<_, String>("project"), "o'hara");
        assert!(row.get::<_, f64>("credits") > 0.0, "charged");
    }
}
