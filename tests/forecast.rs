//! Forecasts of young projects: the burn rate divides by the time actually billed,
//! not by the whole window.

mod common;

use chrono::{DateTime, Duration, DurationRound, Utc};
use common::exporter::{Answer, FixtureExporter};
use common::spawn_app;
use rust_decimal::Decimal;
use std::str::FromStr;

const KEY: &str = "forecast-key";

/// Project "young" with `granted` credits, billed 1.36 vCPU-hours over its first 6
/// minutes (13.6 credits an hour) through a real scrape and billing run; returns the
/// app (its exporter kept alive with it) and the whole second the usage ended.
async fn young_project(granted: &str) -> (common::TestApp, FixtureExporter, DateTime<Utc>) {
    let exporter = FixtureExporter::start(Answer::ok("")).await;
    let app = spawn_app(&[("SCRAPE_TARGETS", &exporter.url), ("API_KEY", KEY)]).await;
    let now = Utc::now()
        .duration_trunc(Duration::seconds(1))
        .expect("whole seconds");
    for (ago, value) in [(360, "100"), (180, "100.68"), (0, "101.36")] {
        let ms = (now - Duration::seconds(ago)).timestamp_millis();
        exporter.set(Answer::ok(format!(
            "project_vcpu_usage{{project_name=\"young\"}} {value} {ms}\n"
        )));
        let scraped = app.scrape().await;
        assert!(scraped.iter().all(|(_, a)| a.result.is_ok()), "{scraped:?}");
    }
    let grant = app
        .http
        .put(format!("{}/api/projects/young/grant", app.address))
        .header("X-API-KEY", KEY)
        .json(&serde_json::json!({
            "granted_credits": serde_json::Number::from_str(granted).expect("a number")
        }))
        .send()
        .await
        .expect("grant");
    assert_eq!(grant.status(), 200);
    let run = app
        .http
        .post(format!("{}/api/billing/run", app.address))
        .header("X-API-KEY", KEY)
        .send()
        .await
        .expect("billing run");
    assert_eq!(run.status(), 200);
    (app, exporter, now)
}

/// `GET /api/projects/young` as JSON.
async fn young_detail(app: &common::TestApp) -> serde_json::Value {
    app.get("/api/projects/young")
        .await
        .json()
        .await
        .expect("detail")
}

#[tokio::test]
async fn a_project_billed_for_6_minutes_forecasts_from_those_6_minutes() {
    let (app, _exporter, now) = young_project("100").await;
    let detail = young_detail(&app).await;
    let asked = Utc::now();
    assert_eq!(detail["used_credits"], "1.36", "{detail}");
    let rate = Decimal::from_str(detail["burn_rate_per_hour"].as_str().unwrap_or("x"))
        .unwrap_or_else(|e| panic!("{detail}: {e}"));
    // Exactly 13.6 when asked at once; the request itself takes a moment (< 60 s).
    assert!(
        rate <= Decimal::from_str("13.6").expect("13.6")
            && rate >= Decimal::from_str("11.65").expect("13.6 × 6/7"),
        "13.6 credits an hour, not 1.36 / 24 h = 0.0567: {detail}"
    );
    let since: DateTime<Utc> = serde_json::from_value(detail["burn_rate_since"].clone())
        .unwrap_or_else(|e| panic!("{detail}: {e}"));
    assert_eq!(
        since,
        now - Duration::seconds(360),
        "from the first billed usage"
    );
    let run_out: DateTime<Utc> = serde_json::from_value(detail["forecast_run_out_at"].clone())
        .unwrap_or_else(|e| panic!("{detail}: {e}"));
    // 98.64 remaining at 13.6 an hour: about 7 h 15 min.
    let hours = (run_out - asked).num_minutes() as f64 / 60.0;
    assert!(
        (7.0..=8.5).contains(&hours),
        "run-out in {hours} h: {detail}"
    );

    // The history page says the same before its script runs.
    let page = app
        .get("/credits_history/young")
        .await
        .text()
        .await
        .expect("page");
    let summary = page
        .split("<div id=\"summary\">")
        .nth(1)
        .and_then(|rest| rest.split("</div>\n").next())
        .unwrap_or_default();
    let run_out_item = format!(
        "<span>forecast run-out</span><b>{}",
        run_out.format("%Y-%m-%d")
    );
    for item in [
        "<span>granted</span><b>100.00</b>",
        "<span>used</span><b>1.36</b>",
        "<span>remaining</span><b>98.64</b>",
        run_out_item.as_str(),
    ] {
        assert!(
            summary.contains(item),
            "{item} not in the served summary: {summary}"
        );
    }
}

/// The API fuzzer's case: 3,080,176,590.68 credits at 13.6 an hour last some 25,800
/// years, which RFC 3339 (four-digit years) cannot write. The detail answers `null`,
/// a `date-time` or nothing as its OpenAPI description says, never "+27826-…".
#[tokio::test]
async fn a_run_out_after_the_year_9999_is_null() {
    let (app, _exporter, _) = young_project("3080176590.68").await;
    let detail = young_detail(&app).await;
    assert_eq!(detail["used_credits"], "1.36", "{detail}");
    assert!(
        detail["forecast_run_out_at"].is_null(),
        "no run-out a date-time can hold: {detail}"
    );
}
