//! One list of billed metrics: a metric defined only in `BILLING_RULES_FILE` is
//! scraped, stored and billed like one of `METRICS_TO_BILL`.

mod common;

use chrono::{Duration, DurationRound, Utc};
use common::exporter::{Answer, FixtureExporter};
use common::spawn_app;
use rust_decimal::Decimal;

#[tokio::test]
async fn a_metric_defined_only_in_the_rules_file_is_scraped_and_billed() {
    let rules =
        std::env::temp_dir().join(format!("osc-billed-metrics-{}.toml", std::process::id()));
    // The README's own example: a gauge that is not in METRICS_TO_BILL.
    std::fs::write(
        &rules,
        "[metrics.gpu_count]\nkind = \"gauge\"\nprice = \"5\"\nmax_gap_seconds = 900\n",
    )
    .expect("write rules file");
    let rules_path = rules.to_string_lossy().into_owned();
    let exporter = FixtureExporter::start(Answer::ok("")).await;
    let app = spawn_app(&[
        ("SCRAPE_TARGETS", &exporter.url),
        ("BILLING_RULES_FILE", &rules_path),
    ])
    .await;
    let start = (Utc::now() - Duration::hours(1))
        .duration_trunc(Duration::seconds(1))
        .expect("whole seconds");
    // Two GPUs for 15 minutes (900 s, exactly max_gap): 2 × 0.25 h × 5 = 2.5 credits.
    for seconds in [0, 900] {
        let ms = (start + Duration::seconds(seconds)).timestamp_millis();
        exporter.set(Answer::ok(format!(
            "gpu_count{{project_name=\"gpus\"}} 2 {ms}\n\
             project_vcpu_usage{{project_name=\"gpus\"}} {} {ms}\n\
             not_billed{{project_name=\"gpus\"}} 7 {ms}\n",
            seconds / 900
        )));
        let scraped = app.scrape().await;
        assert!(scraped.iter().all(|(_, a)| a.result.is_ok()), "{scraped:?}");
    }
    let metrics: Vec<String> = app.samples().await.into_iter().map(|s| s.0).collect();
    assert_eq!(
        metrics,
        [
            "gpu_count",
            "gpu_count",
            "project_vcpu_usage",
            "project_vcpu_usage"
        ],
        "rules-file and METRICS_TO_BILL metrics are stored, others are not"
    );
    let settings = os_credits::config::Settings::from_vars({
        let mut vars = app.db.vars();
        vars.push(("BILLING_RULES_FILE".into(), rules_path.clone()));
        vars
    })
    .expect("settings");
    os_credits::billing::engine::run(&app.app_pool, settings.billing(), Utc::now())
        .await
        .expect("billing run");
    let used: Decimal = app
        .db
        .connect()
        .await
        .query_one("SELECT used_credits FROM projects WHERE name = 'gpus'", &[])
        .await
        .expect("project")
        .get(0);
    assert_eq!(used, Decimal::new(35, 1), "2.5 (GPUs) + 1 vCPU-hour");
    let _ = std::fs::remove_file(rules);
}
