//! The HTTP API on a real PostgreSQL: the old service's endpoints (shapes, status
//! codes, error cases), the API key, grants, adjustments, history and the forecast.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{spawn_app, TestApp};
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::str::FromStr;

const KEY: &str = "test-key-4711";

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

async fn app() -> TestApp {
    spawn_app(&[("API_KEY", KEY)]).await
}

/// A response: status and body text.
struct Answer {
    status: u16,
    body: String,
    content_type: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// The `error` reason of a JSON error body.
    fn reason(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error reason in {}", self.body))
            .to_owned()
    }
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut request = app.http.request(method, format!("{}{}", app.address, path));
    if let Some(key) = key {
        request = request.header("X-API-KEY", key);
    }
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.expect("request reaches the service");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.text().await.expect("body");
    Answer {
        status,
        body,
        content_type,
    }
}

async fn get(app: &TestApp, path: &str) -> Answer {
    call(app, Method::GET, path, None, None).await
}

async fn put_grant(app: &TestApp, project: &str, body: &str) -> Answer {
    let path = format!("/api/projects/{project}/grant");
    call(app, Method::PUT, &path, Some(KEY), Some(body)).await
}

async fn post_adjustment(app: &TestApp, project: &str, body: &str) -> Answer {
    let path = format!("/api/projects/{project}/adjustments");
    call(app, Method::POST, &path, Some(KEY), Some(body)).await
}

async fn sql(app: &TestApp, statements: &str) {
    app.db
        .connect()
        .await
        .batch_execute(statements)
        .await
        .unwrap_or_else(|e| panic!("{statements}: {e}"));
}

async fn count(app: &TestApp, query: &str) -> i64 {
    app.db
        .connect()
        .await
        .query_one(query, &[])
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .get(0)
}

/// (granted, used) of a project.
async fn totals(app: &TestApp, project: &str) -> Option<(Decimal, Decimal)> {
    app.db
        .connect()
        .await
        .query_opt(
            "SELECT granted_credits, used_credits FROM projects WHERE name = $1",
            &[&project],
        )
        .await
        .expect("read project")
        .map(|row| (row.get(0), row.get(1)))
}

// ---------------------------------------------------------------- old endpoints

#[tokio::test]
async fn metrics_lists_each_billed_metric_with_its_price_as_a_number() {
    let app = app().await;

    let answer = get(&app, "/api/metrics").await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"project_vcpu_usage": 1.0, "project_mb_usage": 0.3})
    );
}

#[tokio::test]
async fn costs_per_hour_is_the_sum_of_units_times_price_rounded_to_the_precision() {
    let app = app().await;
    let cases = [
        (
            "the old service's example",
            r#"{"project_vcpu_usage": 16, "project_mb_usage": 32}"#,
            json!(25.6),
        ),
        (
            "half a cent rounds to even (0.015 → 0.02)",
            r#"{"project_mb_usage": 0.05}"#,
            json!(0.02),
        ),
        (
            "half a cent rounds to even (0.045 → 0.04)",
            r#"{"project_mb_usage": 0.15}"#,
            json!(0.04),
        ),
        (
            "numeric strings count",
            r#"{"project_vcpu_usage": "2.5"}"#,
            json!(2.5),
        ),
        ("nothing costs nothing", "{}", json!(0.0)),
        (
            "each metric's cost is rounded before the sum (0.015 + 0.015 → 0.02 + 0.02)",
            r#"{"project_mb_usage": 0.05, "project_vcpu_usage": 0.015}"#,
            json!(0.04),
        ),
    ];
    for (case, body, expected) in cases {
        let answer = call(&app, Method::POST, "/api/costs_per_hour", None, Some(body)).await;
        assert_eq!(answer.status, 200, "{case}: {}", answer.body);
        assert_eq!(answer.json(), expected, "{case}");
    }
}

#[tokio::test]
async fn costs_per_hour_refuses_bad_input_with_a_json_reason() {
    let app = app().await;
    let oversized = format!(
        r#"{{"project_vcpu_usage": 1, "pad": "{}"}}"#,
        "x".repeat(70_000)
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "an unknown metric",
            r#"{"project_gpu_usage": 1}"#.into(),
            404,
            "Unknown measurement `project_gpu_usage`",
        ),
        (
            "text instead of a number",
            r#"{"project_vcpu_usage": "sixteen"}"#.into(),
            400,
            "project_vcpu_usage",
        ),
        (
            "a boolean",
            r#"{"project_vcpu_usage": true}"#.into(),
            400,
            "wrong type",
        ),
        (
            "null",
            r#"{"project_vcpu_usage": null}"#.into(),
            400,
            "wrong type",
        ),
        (
            "a negative amount",
            r#"{"project_vcpu_usage": -1}"#.into(),
            400,
            "negative",
        ),
        (
            "NaN text",
            r#"{"project_vcpu_usage": "NaN"}"#.into(),
            400,
            "not a decimal",
        ),
        (
            "invalid JSON",
            r#"{"project_vcpu_usage": "#.into(),
            400,
            "Invalid JSON",
        ),
        ("an array", "[1, 2]".into(), 400, "Invalid JSON"),
        ("an empty body", String::new(), 400, "Invalid JSON"),
        ("a body over 64 KiB", oversized, 413, "larger than"),
    ];
    for (case, body, status, reason) in cases {
        let answer = call(&app, Method::POST, "/api/costs_per_hour", None, Some(&body)).await;
        assert_eq!(answer.status, status, "{case}: {}", answer.body);
        assert!(
            answer.content_type.starts_with("application/json"),
            "{case}: content type {}",
            answer.content_type
        );
        assert!(
            answer.reason().contains(reason),
            "{case}: reason {:?} should contain {reason:?}",
            answer.reason()
        );
    }
}

#[tokio::test]
async fn current_credits_shows_used_and_granted_rounded_half_to_even() {
    let app = app().await;
    sql(
        &app,
        "INSERT INTO projects (name, granted_credits, used_credits)
         VALUES ('Alpha', 100.005, 12.345), ('Beta', 0, 0), ('Gamma', 7.5, 0.015)",
    )
    .await;
    let cases = [
        (
            "Alpha",
            json!({"current_credits": 12.34, "granted_credits": 100.0}),
        ),
        (
            "Beta",
            json!({"current_credits": 0.0, "granted_credits": 0.0}),
        ),
        (
            "Gamma",
            json!({"current_credits": 0.02, "granted_credits": 7.5}),
        ),
    ];
    for (project, expected) in cases {
        let answer = get(&app, &format!("/api/current_credits/{project}")).await;
        assert_eq!(answer.status, 200, "{project}: {}", answer.body);
        assert_eq!(answer.json(), expected, "{project}");
    }
}

#[tokio::test]
async fn current_credits_refuses_unknown_and_malformed_project_names() {
    let app = app().await;
    let long = "x".repeat(256);
    let cases = [
        // The old service's reasons, word for word.
        (
            "an unknown project",
            "Nobody".to_owned(),
            404,
            "No credits found for Nobody.",
        ),
        (
            "a blank name",
            "%20%20".to_owned(),
            400,
            "No non-empty ``project_name`` provided",
        ),
        (
            "what Swagger UI sends without a name",
            "%7Bproject_name%7D".to_owned(),
            400,
            "No non-empty ``project_name`` provided",
        ),
        (
            "a name over 255 bytes",
            long,
            400,
            "project_name is longer than 255 bytes",
        ),
    ];
    for (case, name, status, reason) in cases {
        let answer = get(&app, &format!("/api/current_credits/{name}")).await;
        assert_eq!(answer.status, status, "{case}: {}", answer.body);
        assert_eq!(answer.json(), json!({ "error": reason }), "{case}");
    }
}

#[tokio::test]
async fn project_names_with_spaces_and_unicode_are_found() {
    let app = app().await;
    sql(
        &app,
        "INSERT INTO projects (name, granted_credits) VALUES ('Bio Lab ä/ß', 3)",
    )
    .await;

    let answer = get(&app, "/api/current_credits/Bio%20Lab%20%C3%A4%2F%C3%9F").await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["granted_credits"], json!(3.0));
}

// ---------------------------------------------------------------- history

/// Usage ledger rows of `project`: (time, metric, used_delta, used_after).
async fn seed_usage(app: &TestApp, project: &str, rows: &[(&str, &str, &str, &str)]) {
    let client = app.db.connect().await;
    for (time, metric, delta, after) in rows {
        let time: DateTime<Utc> = time.parse().expect("time");
        client
            .execute(
                "INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price)
                 VALUES ($1, $2, 'usage', $3, $4, $5, 100, $2, $4, 1)",
                &[&project, &time, metric, &dec(delta), &dec(after)],
            )
            .await
            .expect("insert usage row");
    }
}

/// The golden ledger: rows with hand-computed running totals of used credits.
///
/// | time (UTC)            | kind       | metric | delta | used after | granted after |
/// |-----------------------|------------|--------|-------|------------|---------------|
/// | 11-20 09:00:00        | usage      | vcpu   | 0.125 | 0.125      | 0             |
/// | 11-20 10:00:00        | usage      | vcpu   | 0.135 | 0.26       | 0             |
/// | 11-20 10:00:00        | usage      | mb     | 1.5   | 1.76       | 0             |
/// | 11-20 10:30:00        | grant      |        | +100  | 1.76       | 100           |
/// | 11-20 10:31:00        | adjustment |        | -1    | 0.76       | 100           |
/// | 11-20 11:00:00.250    | usage      | mb     | 2     | 2.76       | 100           |
/// | 11-21 00:00:00        | usage      | vcpu   | 0.005 | 2.765      | 100           |
///
/// Rows are inserted as single statements (as a portal sync or an operator would),
/// so the day rollup is kept by the ledger trigger; `used_after` is deliberately
/// wrong in the stored rows, since the history counts in time order itself.
async fn seed_golden_ledger(app: &TestApp) {
    sql(
        app,
        "INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price) VALUES
           ('Alpha', '2026-11-20T09:00:00Z', 'usage', 'project_vcpu_usage', 0.125, 0, 0, '2026-11-20T09:00:00Z', 0.125, 1),
           ('Alpha', '2026-11-20T10:00:00Z', 'usage', 'project_vcpu_usage', 0.135, 0, 0, '2026-11-20T10:00:00Z', 0.135, 1),
           ('Alpha', '2026-11-20T10:00:00Z', 'usage', 'project_mb_usage', 1.5, 0, 0, '2026-11-20T10:00:00Z', 1.5, 1);
         INSERT INTO ledger (project, time, kind, granted_delta, used_after, granted_after, actor)
         VALUES ('Alpha', '2026-11-20T10:30:00Z', 'grant', 100, 0, 100, 'api');
         INSERT INTO ledger (project, time, kind, used_delta, used_after, granted_after, reason, actor)
         VALUES ('Alpha', '2026-11-20T10:31:00Z', 'adjustment', -1, 0, 100, 'refund', 'api');
         INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price) VALUES
           ('Alpha', '2026-11-20T11:00:00.250Z', 'usage', 'project_mb_usage', 2, 0, 100, '2026-11-20T11:00:00.250Z', 2, 1),
           ('Alpha', '2026-11-21T00:00:00Z', 'usage', 'project_vcpu_usage', 0.005, 0, 100, '2026-11-21T00:00:00Z', 0.005, 1);
         -- another project's rows never count
         INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price)
         VALUES ('Beta', '2026-11-20T08:00:00Z', 'usage', 'project_vcpu_usage', 7, 7, 0, '2026-11-20T08:00:00Z', 7, 1)",
    )
    .await;
}

#[tokio::test]
async fn credits_history_answers_what_the_old_service_answered_for_the_golden_ledger() {
    // A friendly name in the rules: the old service listed metric names all the same.
    let rules = std::env::temp_dir().join(format!("osc-api-rules-{}.toml", std::process::id()));
    std::fs::write(
        &rules,
        "[metrics.project_vcpu_usage]\nfriendly_name = \"vCPU hours\"\n",
    )
    .expect("write rules file");
    let rules_path = rules.to_string_lossy().into_owned();
    let app = spawn_app(&[("API_KEY", KEY), ("BILLING_RULES_FILE", &rules_path)]).await;
    seed_golden_ledger(&app).await;
    let vcpu = "project_vcpu_usage";
    let mb = "project_mb_usage";

    // (case, query, exact JSON the old code gives for these rows)
    let cases = [
        (
            "everything: oldest first, used total after each row, rounded half to even",
            "",
            json!({
                "timestamps": ["2026-11-20 09:00:00", "2026-11-20 10:00:00", "2026-11-20 10:00:00",
                               "2026-11-20 11:00:00", "2026-11-21 00:00:00"],
                "credits": [0.12, 0.26, 1.76, 2.76, 2.76],
                "metrics": [vcpu, vcpu, mb, mb, vcpu],
            }),
        ),
        (
            "a range starting mid-history counts the rows before it; both ends inclusive",
            "?start_date=2026-11-20+10:00:00&end_date=2026-11-20%2011:00:00",
            json!({
                "timestamps": ["2026-11-20 10:00:00", "2026-11-20 10:00:00"],
                "credits": [0.26, 1.76],
                "metrics": [vcpu, mb],
            }),
        ),
        (
            "a range after the adjustment starts from the adjusted total",
            "?start_date=2026-11-20%2010:45:00",
            json!({
                "timestamps": ["2026-11-20 11:00:00", "2026-11-21 00:00:00"],
                "credits": [2.76, 2.76],
                "metrics": [mb, vcpu],
            }),
        ),
        (
            "the end instant itself is in the range",
            "?start_date=2026-11-20%2012:00:00&end_date=2026-11-21%2000:00:00",
            json!({
                "timestamps": ["2026-11-21 00:00:00"],
                "credits": [2.76],
                "metrics": [vcpu],
            }),
        ),
        (
            "values=charges: each row's own charge",
            "?values=charges",
            json!({
                "timestamps": ["2026-11-20 09:00:00", "2026-11-20 10:00:00", "2026-11-20 10:00:00",
                               "2026-11-20 11:00:00", "2026-11-21 00:00:00"],
                "credits": [0.12, 0.14, 1.5, 2.0, 0.0],
                "metrics": [vcpu, vcpu, mb, mb, vcpu],
            }),
        ),
        (
            "step=1d: the used total at each bucket's end, per metric",
            "?step=1d",
            json!({
                "timestamps": ["2026-11-20 00:00:00", "2026-11-20 00:00:00", "2026-11-21 00:00:00"],
                "credits": [2.76, 2.76, 2.76],
                "metrics": [mb, vcpu, vcpu],
            }),
        ),
        (
            "step=1d&values=charges: each metric's sum per bucket",
            "?step=1d&values=charges",
            json!({
                "timestamps": ["2026-11-20 00:00:00", "2026-11-20 00:00:00", "2026-11-21 00:00:00"],
                "credits": [3.5, 0.26, 0.0],
                "metrics": [mb, vcpu, vcpu],
            }),
        ),
        (
            "step=1d from mid-day: the partial day from the ledger, whole days from the rollup",
            "?step=1d&values=charges&start_date=2026-11-20%2010:45:00",
            json!({
                "timestamps": ["2026-11-20 00:00:00", "2026-11-21 00:00:00"],
                "credits": [2.0, 0.0],
                "metrics": [mb, vcpu],
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (case, query, expected) in cases {
        let answer = get(&app, &format!("/api/credits_history/Alpha{query}")).await;
        if answer.status != 200 || answer.json() != expected {
            failures.push(format!(
                "{case}: {} {}\n  expected {expected}",
                answer.status, answer.body
            ));
        }
    }
    let csv = get(
        &app,
        "/api/credits_history/Alpha?format=csv&start_date=2026-11-20%2010:45:00",
    )
    .await;
    let _ = std::fs::remove_file(&rules);

    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        normalize_csv(&csv.body),
        "timestamp,metric,credits,used_after,granted_after\n\
         2026-11-20 11:00:00,project_mb_usage,2,2.76,100\n\
         2026-11-21 00:00:00,project_vcpu_usage,0.005,2.765,100\n",
        "CSV: exact charges and totals"
    );
}

#[tokio::test]
async fn credits_history_refuses_bad_parameters_and_says_when_there_is_nothing() {
    let app = app().await;
    seed_usage(
        &app,
        "Alpha",
        &[("2026-11-20T09:00:00Z", "project_vcpu_usage", "1", "1")],
    )
    .await;
    let cases = [
        ("an unknown project", "/api/credits_history/Nobody", 404, "No data"),
        (
            "nothing in the range",
            "/api/credits_history/Alpha?start_date=2026-11-21%2000:00:00",
            404,
            "No data",
        ),
        (
            "a bad start date",
            "/api/credits_history/Alpha?start_date=yesterday",
            400,
            "start_date",
        ),
        (
            "an ISO date instead of the old format",
            "/api/credits_history/Alpha?end_date=2026-11-20T10:00:00Z",
            400,
            "end_date",
        ),
        (
            "start after end",
            "/api/credits_history/Alpha?start_date=2026-11-21%2000:00:00&end_date=2026-11-20%2000:00:00",
            400,
            "older than",
        ),
        (
            "start equal to end",
            "/api/credits_history/Alpha?start_date=2026-11-20%2000:00:00&end_date=2026-11-20%2000:00:00",
            400,
            "older than",
        ),
        (
            "a bad step",
            "/api/credits_history/Alpha?step=1y",
            400,
            "step",
        ),
        ("a zero step", "/api/credits_history/Alpha?step=0", 400, "step"),
        (
            "unknown values",
            "/api/credits_history/Alpha?values=total",
            400,
            "values",
        ),
        (
            "what Swagger UI sends without a name",
            "/api/credits_history/%7Bproject_name%7D",
            400,
            "No non-empty ``project_name``",
        ),
        (
            "an unknown format",
            "/api/credits_history/Alpha?format=xml",
            400,
            "format",
        ),
    ];
    for (case, path, status, reason) in cases {
        let answer = get(&app, path).await;
        assert_eq!(answer.status, status, "{case}: {}", answer.body);
        assert!(
            answer.reason().contains(reason),
            "{case}: reason {:?} should contain {reason:?}",
            answer.reason()
        );
    }
}

/// 2,000 usage rows five minutes apart from 2026-01-01, alternating vCPU (even) and
/// MB (odd), row i charging (i mod 13) × 0.017 credits; `used_after` is the running sum.
async fn seed_two_thousand_rows(app: &TestApp) {
    sql(
        app,
        "INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price)
         SELECT 'Alpha', TIMESTAMPTZ '2026-01-01 00:00:00+00' + i * INTERVAL '5 minutes', 'usage',
                CASE WHEN i % 2 = 0 THEN 'project_vcpu_usage' ELSE 'project_mb_usage' END,
                (i % 13) * 0.017,
                sum((i % 13) * 0.017) OVER (ORDER BY i),
                1000, TIMESTAMPTZ '2026-01-01 00:00:00+00' + i * INTERVAL '5 minutes', (i % 13) * 0.017, 1
         FROM generate_series(0, 1999) AS i",
    )
    .await;
}

fn row_metric(i: i64) -> &'static str {
    if i % 2 == 0 {
        "project_vcpu_usage"
    } else {
        "project_mb_usage"
    }
}

fn row_delta(i: i64) -> Decimal {
    Decimal::from(i % 13) * dec("0.017")
}

/// Expected buckets of `seconds` from the seeded rows: (bucket index, metric, exact
/// sum, used total at the bucket's end), oldest bucket first, metric names ascending.
fn expected_buckets(seconds: i64) -> Vec<(i64, &'static str, Decimal, Decimal)> {
    let mut sums: std::collections::BTreeMap<(i64, &'static str), Decimal> = Default::default();
    let mut ends: std::collections::BTreeMap<i64, Decimal> = Default::default();
    let mut running = Decimal::ZERO;
    for i in 0..2000 {
        running += row_delta(i);
        *sums.entry((i * 300 / seconds, row_metric(i))).or_default() += row_delta(i);
        ends.insert(i * 300 / seconds, running);
    }
    sums.into_iter()
        .map(|((bucket, metric), sum)| (bucket, metric, sum, ends[&bucket]))
        .collect()
}

fn start_of_2026() -> DateTime<Utc> {
    "2026-01-01T00:00:00Z".parse().expect("time")
}

#[tokio::test]
async fn credits_history_with_a_step_gives_each_buckets_end_total_or_sum_exactly() {
    let app = app().await;
    seed_two_thousand_rows(&app).await;

    for (step, seconds, buckets) in [("1d", 86_400, 14), ("1h", 3600, 334), ("900", 900, 1334)] {
        let answer = get(&app, &format!("/api/credits_history/Alpha?step={step}")).await;
        let charges = get(
            &app,
            &format!("/api/credits_history/Alpha?step={step}&values=charges"),
        )
        .await;
        assert_eq!(answer.status, 200, "step {step}: {}", answer.body);
        let body = answer.json();
        let expected = expected_buckets(seconds);
        assert_eq!(
            expected.len(),
            buckets,
            "step {step}: the fixture's bucket count"
        );
        let timestamps: Vec<String> = expected
            .iter()
            .map(|(bucket, ..)| {
                (start_of_2026() + Duration::seconds(bucket * seconds))
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .collect();
        let rounded = |value: &Decimal| {
            let rounded = value
                .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven);
            json!(rounded.to_string().parse::<f64>().expect("float"))
        };
        let credits: Vec<Value> = expected.iter().map(|(_, _, sum, _)| rounded(sum)).collect();
        let totals: Vec<Value> = expected.iter().map(|(.., end)| rounded(end)).collect();
        let metrics: Vec<&str> = expected.iter().map(|(_, metric, ..)| *metric).collect();
        assert_eq!(
            body["timestamps"],
            json!(timestamps),
            "step {step}: bucket starts"
        );
        assert_eq!(
            body["credits"],
            json!(totals),
            "step {step}: rounded used totals at each bucket's end"
        );
        assert_eq!(charges.status, 200, "step {step}: {}", charges.body);
        assert_eq!(
            charges.json()["credits"],
            json!(credits),
            "step {step}: rounded sums"
        );
        assert_eq!(body["metrics"], json!(metrics), "step {step}: metrics");
    }

    let days = get(&app, "/api/credits_history/Alpha?step=1d&format=csv").await;
    assert_eq!(days.status, 200, "{}", days.body);
    assert!(
        days.content_type.starts_with("text/csv"),
        "{}",
        days.content_type
    );
    let mut expected_csv = String::from("timestamp,metric,credits,used_after,granted_after\n");
    for (bucket, metric, sum, after) in expected_buckets(86_400) {
        let day = start_of_2026() + Duration::days(bucket);
        expected_csv.push_str(&format!(
            "{},{metric},{},{},0\n",
            day.format("%Y-%m-%d %H:%M:%S"),
            sum.normalize(),
            after.normalize()
        ));
    }
    assert_eq!(
        normalize_csv(&days.body),
        expected_csv,
        "exact sums and the last totals of each bucket"
    );
}

/// Strips trailing zeros of the decimal columns, so `1.700` and `1.7` compare equal.
fn normalize_csv(csv: &str) -> String {
    let mut out = String::new();
    for (n, line) in csv.lines().enumerate() {
        if n == 0 {
            out.push_str(line);
        } else {
            let fields: Vec<String> = line
                .split(',')
                .enumerate()
                .map(|(i, f)| {
                    if i >= 2 {
                        dec(f).normalize().to_string()
                    } else {
                        f.to_owned()
                    }
                })
                .collect();
            out.push_str(&fields.join(","));
        }
        out.push('\n');
    }
    out
}

#[tokio::test]
async fn a_stepped_range_includes_its_end_and_buckets_start_at_midnight_utc() {
    let app = app().await;
    seed_two_thousand_rows(&app).await;

    let answer = get(
        &app,
        "/api/credits_history/Alpha?step=1d&values=charges&start_date=2026-01-02%2000:00:00&end_date=2026-01-03%2000:00:00",
    )
    .await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(
        body["timestamps"],
        json!([
            "2026-01-02 00:00:00",
            "2026-01-02 00:00:00",
            "2026-01-03 00:00:00"
        ]),
        "the row at the end instant (i = 576, vCPU) is its own bucket"
    );
    assert_eq!(
        body["metrics"],
        json!([
            "project_mb_usage",
            "project_vcpu_usage",
            "project_vcpu_usage"
        ])
    );
    assert_eq!(row_delta(576), dec("0.068"));
    assert_eq!(
        body["credits"][2],
        json!(0.07),
        "the end row alone, rounded to the precision"
    );
}

#[tokio::test]
async fn credits_history_as_csv_has_exact_decimals_by_parameter_or_accept_header() {
    let app = app().await;
    seed_usage(
        &app,
        "Alpha",
        &[
            (
                "2026-11-20T09:00:00Z",
                "project_vcpu_usage",
                "0.125",
                "0.125",
            ),
            (
                "2026-11-20T10:00:00Z",
                "project_mb_usage",
                "1.0000001",
                "1.1250001",
            ),
        ],
    )
    .await;
    let expected = "timestamp,metric,credits,used_after,granted_after\n\
                    2026-11-20 09:00:00,project_vcpu_usage,0.125,0.125,0\n\
                    2026-11-20 10:00:00,project_mb_usage,1.0000001,1.1250001,0\n";

    let by_parameter = get(&app, "/api/credits_history/Alpha?format=csv").await;
    let by_header = app
        .http
        .get(format!("{}/api/credits_history/Alpha", app.address))
        .header("Accept", "text/csv")
        .send()
        .await
        .expect("request");
    let header_type = by_header
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let header_body = by_header.text().await.expect("body");
    let json_wins = app
        .http
        .get(format!(
            "{}/api/credits_history/Alpha?format=json",
            app.address
        ))
        .header("Accept", "text/csv")
        .send()
        .await
        .expect("request");

    assert_eq!(by_parameter.status, 200, "{}", by_parameter.body);
    assert!(by_parameter.content_type.starts_with("text/csv"));
    assert_eq!(by_parameter.body, expected);
    assert!(header_type.starts_with("text/csv"), "{header_type}");
    assert_eq!(header_body, expected);
    assert!(
        json_wins
            .json::<Value>()
            .await
            .expect("format=json answers JSON")
            .get("timestamps")
            .is_some(),
        "format=json wins over Accept"
    );
}

// ---------------------------------------------------------------- API key

#[tokio::test]
async fn protected_endpoints_need_the_right_api_key() {
    let app = app().await;
    let endpoints = [
        (
            Method::PUT,
            "/api/projects/Alpha/grant",
            r#"{"granted_credits": 10}"#,
        ),
        (
            Method::POST,
            "/api/projects/Alpha/adjustments",
            r#"{"credits": 1, "reason": "test"}"#,
        ),
        (Method::POST, "/api/billing/run", ""),
    ];
    for (method, path, body) in endpoints {
        let cases = [
            ("no key", None, Some(body), 401, "No API key"),
            (
                "a wrong key",
                Some("wrong"),
                Some(body),
                403,
                "Wrong API key",
            ),
            (
                "a prefix of the key",
                Some(&KEY[..KEY.len() - 1]),
                Some(body),
                403,
                "Wrong API key",
            ),
            (
                "a wrong key with a broken body is refused before the body is read",
                Some("wrong"),
                Some("{"),
                403,
                "Wrong API key",
            ),
        ];
        for (case, key, body, status, reason) in cases {
            let answer = call(&app, method.clone(), path, key, body).await;
            assert_eq!(
                answer.status, status,
                "{method} {path}, {case}: {}",
                answer.body
            );
            assert!(
                answer.reason().contains(reason),
                "{method} {path}, {case}: {}",
                answer.body
            );
        }
    }
    assert_eq!(
        count(&app, "SELECT count(*) FROM ledger").await,
        0,
        "nothing was written"
    );
    assert_eq!(totals(&app, "Alpha").await, None, "no project was created");

    let right = put_grant(&app, "Alpha", r#"{"granted_credits": 10}"#).await;
    assert_eq!(right.status, 200, "the right key: {}", right.body);
}

#[tokio::test]
async fn an_empty_api_key_refuses_every_protected_endpoint() {
    let app = spawn_app(&[("API_KEY", "")]).await;
    for (method, path, key) in [
        (Method::PUT, "/api/projects/Alpha/grant", None),
        (Method::PUT, "/api/projects/Alpha/grant", Some("")),
        (
            Method::POST,
            "/api/projects/Alpha/adjustments",
            Some("anything"),
        ),
        (Method::POST, "/api/billing/run", Some("")),
    ] {
        let answer = call(
            &app,
            method.clone(),
            path,
            key,
            Some(r#"{"granted_credits": 1}"#),
        )
        .await;
        assert_eq!(
            answer.status, 403,
            "{method} {path} with {key:?}: {}",
            answer.body
        );
        assert!(
            answer.reason().contains("API_KEY is not configured"),
            "{method} {path}: {}",
            answer.body
        );
    }
    assert_eq!(count(&app, "SELECT count(*) FROM projects").await, 0);
}

// ---------------------------------------------------------------- grants

#[tokio::test]
async fn a_grant_creates_the_project_and_writes_a_ledger_row() {
    let app = app().await;

    let answer = put_grant(
        &app,
        "Alpha",
        r#"{"granted_credits": 1000, "reason": "first call"}"#,
    )
    .await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({
            "name": "Alpha",
            "granted_credits": "1000.00",
            "used_credits": "0.00",
            "remaining_credits": "1000.00",
            "last_billed_at": null,
        })
    );
    assert_eq!(totals(&app, "Alpha").await, Some((dec("1000"), dec("0"))));
    let row = app
        .db
        .connect()
        .await
        .query_one(
            "SELECT kind, granted_delta, used_delta, granted_after, used_after, reason, actor, metric
             FROM ledger WHERE project = 'Alpha'",
            &[],
        )
        .await
        .expect("one ledger row");
    assert_eq!(row.get::<_, String>(0), "grant");
    assert_eq!(row.get::<_, Decimal>(1), dec("1000"));
    assert_eq!(row.get::<_, Decimal>(2), dec("0"));
    assert_eq!(row.get::<_, Decimal>(3), dec("1000"));
    assert_eq!(row.get::<_, Decimal>(4), dec("0"));
    assert_eq!(
        row.get::<_, Option<String>>(5).as_deref(),
        Some("first call")
    );
    assert_eq!(row.get::<_, Option<String>>(6).as_deref(), Some("api"));
    assert_eq!(row.get::<_, Option<String>>(7), None);
    let current = get(&app, "/api/current_credits/Alpha").await;
    assert_eq!(
        current.json(),
        json!({"current_credits": 0.0, "granted_credits": 1000.0})
    );
}

#[tokio::test]
async fn raising_and_lowering_a_grant_books_the_differences() {
    let app = app().await;
    sql(
        &app,
        "INSERT INTO projects (name, granted_credits, used_credits) VALUES ('Alpha', 100, 40.5)",
    )
    .await;

    let steps = [
        (r#"{"granted_credits": 250}"#, "250.00", "209.50"),
        (r#"{"granted_credits": "80.25"}"#, "80.25", "39.75"),
        (r#"{"granted_credits": 80.25}"#, "80.25", "39.75"),
        (r#"{"granted_credits": 0}"#, "0.00", "-40.50"),
    ];
    for (body, granted, remaining) in steps {
        let answer = put_grant(&app, "Alpha", body).await;
        assert_eq!(answer.status, 200, "{body}: {}", answer.body);
        assert_eq!(answer.json()["granted_credits"], granted, "{body}");
        assert_eq!(answer.json()["remaining_credits"], remaining, "{body}");
        assert_eq!(answer.json()["used_credits"], "40.50", "{body}");
    }

    let rows: Vec<(Decimal, Decimal, Decimal)> = app
        .db
        .connect()
        .await
        .query(
            "SELECT granted_delta, granted_after, used_after FROM ledger WHERE kind = 'grant' ORDER BY id",
            &[],
        )
        .await
        .expect("grant rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (dec("150"), dec("250"), dec("40.5")),
            (dec("-169.75"), dec("80.25"), dec("40.5")),
            (dec("-80.25"), dec("0"), dec("40.5")),
        ],
        "one row per change; setting the same grant again writes none"
    );
    let sum: Decimal = app
        .db
        .connect()
        .await
        .query_one("SELECT 100 + sum(granted_delta) FROM ledger", &[])
        .await
        .expect("sum")
        .get(0);
    assert_eq!(sum, dec("0"), "the ledger adds up to the stored grant");
}

#[tokio::test]
async fn bad_grants_and_adjustments_are_refused_and_write_nothing() {
    let app = app().await;
    sql(
        &app,
        "INSERT INTO projects (name, granted_credits, used_credits) VALUES ('Alpha', 100, 10)",
    )
    .await;
    let long = "x".repeat(256);
    let grant = |p: &str| format!("/api/projects/{p}/grant");
    let adjust = |p: &str| format!("/api/projects/{p}/adjustments");
    let cases: Vec<(&str, Method, String, String, u16, &str)> = vec![
        (
            "a negative grant",
            Method::PUT,
            grant("Alpha"),
            r#"{"granted_credits": -1}"#.into(),
            400,
            "negative",
        ),
        (
            "a grant as text",
            Method::PUT,
            grant("Alpha"),
            r#"{"granted_credits": "lots"}"#.into(),
            400,
            "not a decimal",
        ),
        (
            "a NaN grant",
            Method::PUT,
            grant("Alpha"),
            r#"{"granted_credits": "NaN"}"#.into(),
            400,
            "not a decimal",
        ),
        (
            "a grant without the field",
            Method::PUT,
            grant("Alpha"),
            r#"{"credits": 5}"#.into(),
            400,
            "Invalid JSON",
        ),
        (
            "a grant with a typo",
            Method::PUT,
            grant("Alpha"),
            r#"{"granted_credits": 5, "reson": "x"}"#.into(),
            400,
            "unknown field",
        ),
        (
            "a grant finer than the precision",
            Method::PUT,
            grant("Alpha"),
            r#"{"granted_credits": "1.005"}"#.into(),
            400,
            "decimal places",
        ),
        (
            "a grant that is not JSON",
            Method::PUT,
            grant("Alpha"),
            "granted=5".into(),
            400,
            "Invalid JSON",
        ),
        (
            "a grant for a name over 255 bytes",
            Method::PUT,
            grant(&long),
            r#"{"granted_credits": 5}"#.into(),
            400,
            "255 bytes",
        ),
        (
            "a grant for a blank name",
            Method::PUT,
            grant("%20"),
            r#"{"granted_credits": 5}"#.into(),
            400,
            "non-empty",
        ),
        (
            "an adjustment without a reason",
            Method::POST,
            adjust("Alpha"),
            r#"{"credits": 5}"#.into(),
            400,
            "reason",
        ),
        (
            "an adjustment with a blank reason",
            Method::POST,
            adjust("Alpha"),
            r#"{"credits": 5, "reason": "  "}"#.into(),
            400,
            "reason",
        ),
        (
            "a zero adjustment",
            Method::POST,
            adjust("Alpha"),
            r#"{"credits": "0.00", "reason": "x"}"#.into(),
            400,
            "zero",
        ),
        (
            "a NaN adjustment",
            Method::POST,
            adjust("Alpha"),
            r#"{"credits": "NaN", "reason": "x"}"#.into(),
            400,
            "not a decimal",
        ),
        (
            "an adjustment as a bool",
            Method::POST,
            adjust("Alpha"),
            r#"{"credits": false, "reason": "x"}"#.into(),
            400,
            "wrong type",
        ),
        (
            "an adjustment that is not JSON",
            Method::POST,
            adjust("Alpha"),
            "credits=5".into(),
            400,
            "Invalid JSON",
        ),
        (
            "an adjustment out of range",
            Method::POST,
            adjust("Alpha"),
            r#"{"credits": 1e300, "reason": "x"}"#.into(),
            400,
            "not a decimal",
        ),
        (
            "an adjustment of an unknown project",
            Method::POST,
            adjust("Nobody"),
            r#"{"credits": 5, "reason": "x"}"#.into(),
            404,
            "Unknown project",
        ),
        (
            "an oversized adjustment",
            Method::POST,
            adjust("Alpha"),
            format!(r#"{{"credits": 5, "reason": "{}"}}"#, "x".repeat(70_000)),
            413,
            "larger than",
        ),
    ];
    for (case, method, path, body, status, reason) in cases {
        let answer = call(&app, method, &path, Some(KEY), Some(&body)).await;
        assert_eq!(answer.status, status, "{case}: {}", answer.body);
        assert!(
            answer.reason().contains(reason),
            "{case}: reason {:?} should contain {reason:?}",
            answer.reason()
        );
    }
    assert_eq!(
        count(&app, "SELECT count(*) FROM ledger").await,
        0,
        "no ledger rows"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM projects").await,
        1,
        "no new projects"
    );
    assert_eq!(totals(&app, "Alpha").await, Some((dec("100"), dec("10"))));
}

// ---------------------------------------------------------------- adjustments

#[tokio::test]
async fn adjustments_charge_or_give_back_credits_with_a_ledger_row_each() {
    let app = app().await;
    put_grant(&app, "Alpha", r#"{"granted_credits": 100}"#).await;

    let charge = post_adjustment(
        &app,
        "Alpha",
        r#"{"credits": 12.5, "reason": "manual charge"}"#,
    )
    .await;
    let refund = post_adjustment(
        &app,
        "Alpha",
        r#"{"credits": "-5.00", "reason": "outage refund"}"#,
    )
    .await;

    assert_eq!(charge.status, 201, "{}", charge.body);
    assert_eq!(charge.json()["credits"], "12.50");
    assert_eq!(charge.json()["project"]["used_credits"], "12.50");
    assert_eq!(refund.status, 201, "{}", refund.body);
    let body = refund.json();
    assert_eq!(body["credits"], "-5.00");
    assert_eq!(body["reason"], "outage refund");
    assert_eq!(body["actor"], "api");
    assert_eq!(
        body["project"],
        json!({
            "name": "Alpha",
            "granted_credits": "100.00",
            "used_credits": "7.50",
            "remaining_credits": "92.50",
            "last_billed_at": null,
        })
    );
    assert_eq!(totals(&app, "Alpha").await, Some((dec("100"), dec("7.5"))));
    let rows: Vec<(i64, Decimal, Decimal, Decimal, String)> = app
        .db
        .connect()
        .await
        .query(
            "SELECT id, used_delta, used_after, granted_after, reason FROM ledger
             WHERE kind = 'adjustment' ORDER BY id",
            &[],
        )
        .await
        .expect("adjustment rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[1].0,
        body["id"].as_i64().expect("id"),
        "the answer names its row"
    );
    let stored_time: DateTime<Utc> = app
        .db
        .connect()
        .await
        .query_one("SELECT time FROM ledger WHERE id = $1", &[&rows[1].0])
        .await
        .expect("row time")
        .get(0);
    assert_eq!(
        body["time"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok()),
        Some(stored_time),
        "the answer shows the stored time"
    );
    assert_eq!(
        rows.iter()
            .map(|r| (r.1, r.2, r.3, r.4.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (dec("12.5"), dec("12.5"), dec("100"), "manual charge"),
            (dec("-5"), dec("7.5"), dec("100"), "outage refund"),
        ]
    );
    let current = get(&app, "/api/current_credits/Alpha").await;
    assert_eq!(
        current.json(),
        json!({"current_credits": 7.5, "granted_credits": 100.0})
    );
}

// ---------------------------------------------------------------- projects

#[tokio::test]
async fn the_project_list_shows_every_balance_as_exact_strings() {
    let app = app().await;
    sql(
        &app,
        "INSERT INTO projects (name, granted_credits, used_credits, last_billed_at) VALUES
         ('Beta', 10, 12.345, '2026-11-20T10:00:00Z'), ('Alpha', 12.3, 0, NULL)",
    )
    .await;

    let answer = get(&app, "/api/projects").await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!([
            {"name": "Alpha", "granted_credits": "12.30", "used_credits": "0.00",
             "remaining_credits": "12.30", "last_billed_at": null},
            {"name": "Beta", "granted_credits": "10.00", "used_credits": "12.34",
             "remaining_credits": "-2.34", "last_billed_at": "2026-11-20T10:00:00Z"},
        ])
    );
}

#[tokio::test]
async fn the_project_detail_forecasts_the_run_out_from_the_recent_burn_rate() {
    let app = app().await;
    sql(
        &app,
        "INSERT INTO projects (name, granted_credits, used_credits) VALUES ('Alpha', 1000, 100);
         INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price) VALUES
           ('Alpha', now() - INTERVAL '30 hours', 'usage', 'project_vcpu_usage', 52, 52, 1000, now() - INTERVAL '30 hours', 52, 1),
           ('Alpha', now() - INTERVAL '2 hours', 'usage', 'project_vcpu_usage', 24, 76, 1000, now() - INTERVAL '2 hours', 24, 1),
           ('Alpha', now() - INTERVAL '1 hour', 'usage', 'project_mb_usage', 24, 100, 1000, now() - INTERVAL '1 hour', 24, 1);
         INSERT INTO ledger (project, time, kind, used_delta, used_after, granted_after, reason, actor) VALUES
           ('Alpha', now() - INTERVAL '1 hour', 'adjustment', 0, 100, 1000, 'not usage', 'api');",
    )
    .await;
    // After Alpha's row: seeding registers the projects of the series ("Other" too).
    let ids = common::seed_series_batch(
        &mut app.db.connect().await,
        [
            (
                "project_vcpu_usage",
                vec![("project_name", "Alpha"), ("location", "A")],
                "Alpha",
            ),
            (
                "project_vcpu_usage",
                vec![("project_name", "Alpha"), ("location", "B")],
                "Alpha",
            ),
            ("project_mb_usage", vec![("project_name", "Alpha")], "Alpha"),
            ("project_mb_usage", vec![("project_name", "Other")], "Other"),
        ],
    )
    .await;
    let [vcpu_a, vcpu_b, mb, _mb_other] = ids[..] else {
        panic!("four series: {ids:?}")
    };
    sql(
        &app,
        &format!(
            "INSERT INTO billing_cursors (series_id, last_time, last_value)
               SELECT id, CASE id WHEN {vcpu_a} THEN TIMESTAMPTZ '2026-11-20T10:00:00Z'
                                  WHEN {vcpu_b} THEN TIMESTAMPTZ '2026-11-20T10:05:00Z'
                                  ELSE TIMESTAMPTZ '2026-11-20T09:00:00Z' END, 1
               FROM series;
             INSERT INTO counter_decreases (series_id, time, from_value, to_value, policy)
               SELECT {vcpu_a}, TIMESTAMPTZ '2026-11-21T00:00:00Z' + g * INTERVAL '1 minute', 10.5, 2, 'rebase'
               FROM generate_series(1, 120) AS g;
             INSERT INTO unbilled_gaps (series_id, from_time, to_time)
               VALUES ({mb}, '2026-11-20T00:00:00Z', '2026-11-20T01:00:00Z');"
        ),
    )
    .await;
    let asked_at = Utc::now();

    let answer = get(&app, "/api/projects/Alpha").await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["name"], "Alpha");
    assert_eq!(body["granted_credits"], "1000.00");
    assert_eq!(body["used_credits"], "100.00");
    assert_eq!(body["remaining_credits"], "900.00");
    assert_eq!(body["burn_rate_window_hours"], 24);
    assert_eq!(
        body["burn_rate_per_hour"], "2.000000",
        "48 credits of usage in the last 24 hours"
    );
    let forecast: DateTime<Utc> = body["forecast_run_out_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("a forecast in {body}"));
    let expected = asked_at + Duration::hours(450);
    assert!(
        (forecast - expected).num_seconds().abs() < 60,
        "900 credits at 2 per hour run out in 450 hours: {forecast} vs {expected}"
    );
    assert_eq!(
        body["metrics"],
        json!([
            {"metric": "project_mb_usage", "friendly_name": null, "last_billed_sample_at": "2026-11-20T09:00:00Z"},
            {"metric": "project_vcpu_usage", "friendly_name": null, "last_billed_sample_at": "2026-11-20T10:05:00Z"},
        ]),
        "the newest cursor per metric, other projects' series left out"
    );
    let decreases = body["counter_decreases"].as_array().expect("decreases");
    assert_eq!(decreases.len(), 100, "the latest 100 of 120");
    assert_eq!(decreases[0]["time"], "2026-11-21T02:00:00Z", "newest first");
    assert_eq!(decreases[0]["from_value"], "10.5");
    assert_eq!(decreases[0]["to_value"], "2");
    assert_eq!(decreases[0]["policy"], "rebase");
    assert_eq!(decreases[0]["labels"]["location"], "A");
    assert_eq!(
        body["unbilled_gaps"],
        json!([{"metric": "project_mb_usage", "labels": {"project_name": "Alpha"},
                "from_time": "2026-11-20T00:00:00Z", "to_time": "2026-11-20T01:00:00Z"}])
    );
}

#[tokio::test]
async fn the_project_detail_has_no_forecast_without_usage_or_grant_and_404s_unknown() {
    let app = app().await;
    sql(
        &app,
        "INSERT INTO projects (name, granted_credits) VALUES ('Idle', 50), ('Ungranted', 0);
         INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price)
         VALUES ('Ungranted', now() - INTERVAL '1 hour', 'usage', 'project_vcpu_usage', 5, 5, 0, now() - INTERVAL '1 hour', 5, 1)",
    )
    .await;

    let idle = get(&app, "/api/projects/Idle").await;
    let ungranted = get(&app, "/api/projects/Ungranted").await;
    let unknown = get(&app, "/api/projects/Nobody").await;

    assert_eq!(idle.status, 200, "{}", idle.body);
    assert_eq!(idle.json()["burn_rate_per_hour"], "0.000000");
    assert_eq!(
        idle.json()["forecast_run_out_at"],
        Value::Null,
        "nothing burns"
    );
    assert_eq!(idle.json()["metrics"], json!([]));
    assert_eq!(
        ungranted.json()["forecast_run_out_at"],
        Value::Null,
        "no grant"
    );
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert!(unknown.reason().contains("Unknown project"));
}

#[tokio::test]
async fn rules_lists_every_metric_with_its_prices() {
    let app = app().await;

    let answer = get(&app, "/api/rules").await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    let rules = answer.json();
    let metrics: Vec<&str> = rules
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|r| r["metric"].as_str())
        .collect();
    assert_eq!(metrics, ["project_mb_usage", "project_vcpu_usage"]);
    let rule = |metric: &str, price: &str| {
        json!({
            "metric": metric, "kind": "counter", "decrease_policy": "rebase",
            "max_gap_seconds": 900, "friendly_name": null, "description": null, "unit": null,
            "prices": [{"default": price, "by_label": {}, "label": null, "valid_from": null}],
            "jump_guard": {"max_rate_per_hour": null, "jump_factor": "100", "jump_floor_per_hour": "10"},
        })
    };
    assert_eq!(
        rules,
        json!([
            rule("project_mb_usage", "0.3"),
            rule("project_vcpu_usage", "1")
        ]),
        "every rule in full, not only the first"
    );
}

// ---------------------------------------------------------------- billing run

#[tokio::test]
async fn billing_run_bills_stored_usage_and_answers_a_summary() {
    let app = app().await;
    let start = Utc::now() - Duration::hours(2);
    let mut client = app.db.connect().await;
    let series_id = common::seed_series(
        &mut client,
        "project_vcpu_usage",
        &[("project_name", "Alpha")],
        "Alpha",
    )
    .await;
    for (minutes, value) in [(0, 100.0_f64), (30, 104.5), (60, 110.25)] {
        client
            .execute(
                "INSERT INTO usage_samples (series_id, time, value) VALUES ($1, $2, $3)",
                &[&series_id, &(start + Duration::minutes(minutes)), &value],
            )
            .await
            .expect("sample");
    }
    put_grant(&app, "Alpha", r#"{"granted_credits": 50}"#).await;

    let answer = call(&app, Method::POST, "/api/billing/run", Some(KEY), None).await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    let summary = answer.json();
    assert_eq!(summary["projects_billed"], 1, "{summary}");
    assert_eq!(summary["samples_billed"], 3, "{summary}");
    assert_eq!(
        dec(summary["credits_billed"].as_str().expect("a string")),
        dec("10.25")
    );
    assert_eq!(
        get(&app, "/api/current_credits/Alpha").await.json(),
        json!({"current_credits": 10.25, "granted_credits": 50.0})
    );
    let again = call(&app, Method::POST, "/api/billing/run", Some(KEY), None).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["ledger_rows"], 0, "nothing is billed twice");
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_answer_json_errors() {
    let app = app().await;
    for path in [
        "/api/nothing",
        "/api/current_credits/",
        "/api/projects/Alpha/other",
    ] {
        let answer = get(&app, path).await;
        assert_eq!(answer.status, 404, "{path}: {}", answer.body);
        assert!(!answer.reason().is_empty(), "{path}");
    }
    for (method, path) in [
        (Method::GET, "/api/costs_per_hour"),
        (Method::POST, "/api/metrics"),
        (Method::DELETE, "/api/projects/Alpha"),
        (Method::GET, "/api/projects/Alpha/grant"),
    ] {
        let answer = call(&app, method.clone(), path, Some(KEY), None).await;
        assert_eq!(answer.status, 405, "{method} {path}: {}", answer.body);
        assert!(answer.reason().contains("not allowed"), "{method} {path}");
    }
}

#[tokio::test]
async fn the_openapi_description_lists_every_endpoint_and_the_doc_page_serves() {
    let app = app().await;

    let spec = get(&app, "/api/openapi.json").await;
    let page = get(&app, "/api/doc").await;

    assert_eq!(spec.status, 200, "{}", spec.body);
    let spec = spec.json();
    let mut paths: Vec<String> = spec["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/api/billing/run",
            "/api/costs_per_hour",
            "/api/credits_history/{project_name}",
            "/api/current_credits/{project_name}",
            "/api/held/{id}/approve",
            "/api/held/{id}/reject",
            "/api/metrics",
            "/api/notifications/{id}/resend",
            "/api/projects",
            "/api/projects/{project_name}",
            "/api/projects/{project_name}/adjustments",
            "/api/projects/{project_name}/contacts",
            "/api/projects/{project_name}/grant",
            "/api/projects/{project_name}/held",
            "/api/projects/{project_name}/notifications",
            "/api/rules",
            "/api/v1/write",
            "/health",
            "/logconfig",
            "/metrics",
            "/ping",
            "/stats",
        ]
    );
    assert_eq!(
        spec["components"]["securitySchemes"]["api_key"],
        json!({"type": "apiKey", "in": "header", "name": "X-API-KEY"})
    );
    assert_eq!(
        spec["paths"]["/api/projects/{project_name}/grant"]["put"]["security"],
        json!([{"api_key": []}])
    );
    assert_eq!(page.status, 200, "/api/doc redirects to the page");
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    assert!(page.body.contains("swagger"), "the Swagger UI page");
}
