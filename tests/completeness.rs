//! Completeness: a federation-shaped target that goes empty while its exporter is
//! down, and single series that stop appearing, are reported.

mod common;

use chrono::{Duration, DurationRound, Utc};
use common::exporter::{Answer, FixtureExporter};
use common::spawn_app;
use serde_json::Value;

/// What `/federate` answers: the site exporter's series with Prometheus' timestamps.
fn federate(series: &[&str], minute: i64) -> String {
    let start = (Utc::now() - Duration::hours(1))
        .duration_trunc(Duration::seconds(1))
        .expect("whole seconds");
    let ms = (start + Duration::minutes(minute)).timestamp_millis();
    let mut body = String::from("# TYPE project_vcpu_usage untyped\n");
    for labels in series {
        body.push_str(&format!(
            "project_vcpu_usage{{{labels},instance=\"exporter:8080\",job=\"usage\"}} {minute} {ms}\n"
        ));
    }
    body
}

const ALPHA_1: &str = "project_id=\"p1\",project_name=\"alpha\"";
const ALPHA_2: &str = "project_id=\"p1\",project_name=\"alpha-pool\"";
const BETA: &str = "project_id=\"p2\",project_name=\"beta\"";

#[tokio::test]
async fn a_federated_target_going_empty_is_degraded_and_its_missing_series_are_listed() {
    let exporter = FixtureExporter::start(Answer::ok(federate(&[ALPHA_1, ALPHA_2, BETA], 0))).await;
    let targets = format!(r#"[{{"name": "federate", "url": "{}"}}]"#, exporter.url);
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;
    let scrape = |body: String| {
        exporter.set(Answer::ok(body));
        async {
            let attempts = app.scrape().await;
            assert!(
                attempts.iter().all(|(_, a)| a.result.is_ok()),
                "{attempts:?}"
            );
        }
    };
    let stale = |project: &'static str| {
        let app = &app;
        async move {
            let detail: Value = app
                .get(&format!("/api/projects/{project}"))
                .await
                .json()
                .await
                .expect("detail");
            detail["stale_series"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }
    };

    app.scrape().await;
    scrape(federate(&[ALPHA_1, ALPHA_2, BETA], 1)).await;
    let health = app.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    let target = app.target_status("federate").await;
    assert_eq!(target["billed_series"], 3, "{target}");

    // One series stops appearing: listed for its project, the target still answers.
    scrape(federate(&[ALPHA_1, ALPHA_2], 2)).await;
    let beta = stale("beta").await;
    assert_eq!(beta.len(), 1, "{beta:?}");
    assert_eq!(beta[0]["labels"]["project_name"], "beta");
    assert_eq!(beta[0]["target"], "federate");
    assert!(stale("alpha").await.is_empty());
    let target = app.target_status("federate").await;
    assert_eq!(
        (
            target["billed_series"].clone(),
            target["billed_series_before"].clone()
        ),
        (2.into(), 3.into())
    );
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics.contains("os_credits_stale_series{target=\"federate\"} 1"),
        "{metrics}"
    );

    // The site exporter is down: Prometheus answers 200 without its series.
    scrape("# no project_* series while the exporter is down\n".into()).await;
    let health = app.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    let target = app.target_status("federate").await;
    assert_eq!(target["up"], true, "the scrape itself worked");
    assert_eq!(target["billed_series"], 0);
    assert_eq!(target["billed_series_before"], 2);
    assert!(
        target["problem"]
            .as_str()
            .is_some_and(|p| p.contains("returns no billed series, 2 until")),
        "{target}"
    );
    // SimpleVM pools: one project_id, each project_name its own project.
    assert_eq!(stale("alpha").await.len(), 1, "listed per project");
    assert_eq!(stale("alpha-pool").await.len(), 1, "listed per project");
    // Still empty on the next scrape: still degraded.
    scrape("\n".into()).await;
    assert_eq!(app.health().await["status"], "degraded");

    // The exporter is back: nothing missing any more (beta came back too).
    scrape(federate(&[ALPHA_1, ALPHA_2, BETA], 5)).await;
    let health = app.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    for project in ["alpha", "alpha-pool", "beta"] {
        assert!(stale(project).await.is_empty(), "{project}");
    }
}
