//! Scraping into PostgreSQL with real exporters on loopback.

mod common;

use common::exporter::{refused_url, Answer, FixtureExporter};
use common::{eventually, spawn_app, spawn_app_on, TestDb};
use std::time::Duration;

const BODY: &str = r#"# HELP project_vcpu_usage Total vCPU hours
# TYPE project_vcpu_usage counter
project_vcpu_usage{domain_id="default",project_id="p1",project_name="Alpha"} 10.5
project_vcpu_usage{domain_id="default",project_id="p2",project_name="Beta, \"the second\""} 3
project_mb_usage{domain_id="default",project_id="p1",project_name="Alpha"} 2048
project_mb_usage{domain_id="default",project_id="p2",project_name="Beta, \"the second\""} 1e3
project_vcpu_usage{domain_id="default",project_id="p3"} 99
project_other_metric{project_name="Alpha"} 1
# TYPE request_seconds histogram
request_seconds_bucket{le="0.5"} 3
request_seconds_sum 1.5
request_seconds_count 3
"#;

fn targets_json(targets: &[(&str, &str)]) -> String {
    let items: Vec<String> = targets
        .iter()
        .map(|(name, url)| format!(r#"{{"name": "{name}", "url": "{url}"}}"#))
        .collect();
    format!("[{}]", items.join(","))
}

#[tokio::test]
async fn one_scrape_cycle_stores_exactly_the_billed_samples_with_their_projects() {
    let exporter = FixtureExporter::start(Answer::ok(BODY)).await;
    let targets = format!(
        r#"[{{"name": "site-a", "url": "{}", "labels": {{"location": "Bielefeld"}}}}]"#,
        exporter.url
    );
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;

    let attempts = app.scrape().await;

    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].1.result,
        Ok(4),
        "four billed samples name a project"
    );
    let samples = app.samples().await;
    let summary: Vec<(String, String, f64)> = samples
        .iter()
        .map(|(m, p, _, _, v)| (m.clone(), p.clone(), *v))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("project_mb_usage".into(), "Alpha".into(), 2048.0),
            (
                "project_mb_usage".into(),
                "Beta, \"the second\"".into(),
                1000.0
            ),
            ("project_vcpu_usage".into(), "Alpha".into(), 10.5),
            (
                "project_vcpu_usage".into(),
                "Beta, \"the second\"".into(),
                3.0
            ),
        ]
    );
    let labels = &samples[0].2;
    assert_eq!(
        labels["location"], "Bielefeld",
        "target labels are added: {labels}"
    );
    assert_eq!(labels["project_id"], "p1");
    let status = app.target_status("site-a").await;
    assert_eq!(status["up"], true, "{status}");
    assert_eq!(status["last_samples"], 4, "{status}");
    assert!(exporter.requests.lock().expect("lock")[0]
        .to_ascii_lowercase()
        .contains("accept: text/plain"));
}

#[tokio::test]
async fn failing_targets_are_recorded_with_their_reason_and_the_others_still_store() {
    let good = FixtureExporter::start(Answer::ok(BODY)).await;
    let slow = FixtureExporter::start(Answer {
        delay: Duration::from_secs(5),
        ..Answer::ok(BODY)
    })
    .await;
    let oversized =
        FixtureExporter::start(Answer::ok(format!("{BODY}{}", "# padding\n".repeat(500)))).await;
    let garbage = FixtureExporter::start(Answer::ok(format!(
        "{BODY}project_vcpu_usage{{project_name=\"x\"}} twelve\n"
    )))
    .await;
    let broken = FixtureExporter::start(Answer {
        status: 500,
        ..Answer::ok("oops")
    })
    .await;
    let refused = refused_url();
    let targets = targets_json(&[
        ("good", &good.url),
        ("slow", &slow.url),
        ("oversized", &oversized.url),
        ("garbage", &garbage.url),
        ("broken", &broken.url),
        ("refused", &refused),
    ]);
    let app = spawn_app(&[
        ("SCRAPE_TARGETS", &targets),
        ("SCRAPE_TIMEOUT", "0.5"),
        ("SCRAPE_MAX_BYTES", "2000"),
    ])
    .await;

    let attempts = app.scrape().await;

    assert_eq!(attempts.len(), 6, "every target was attempted");
    assert_eq!(
        app.sample_count().await,
        4,
        "only the good target stored, and nothing of the garbage body"
    );
    let expectations = [
        ("good", None),
        ("slow", Some("timed out")),
        ("oversized", Some("SCRAPE_MAX_BYTES")),
        ("garbage", Some("line 13: invalid value")),
        ("broken", Some("500")),
        ("refused", Some("fetch failed")),
    ];
    let health = app.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    for (name, expected_error) in expectations {
        let status = app.target_status(name).await;
        match expected_error {
            None => assert_eq!(status["up"], true, "{name}: {status}"),
            Some(reason) => {
                assert_eq!(status["up"], false, "{name}: {status}");
                assert_eq!(status["failures_total"], 1, "{name}: {status}");
                let error = status["last_error"].as_str().unwrap_or_default();
                assert!(
                    error.contains(reason),
                    "{name}: error {error:?} should mention {reason:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn federation_timestamps_are_kept_and_a_rescrape_stores_no_duplicates() {
    let body = "\
project_vcpu_usage{project_name=\"Alpha\",site=\"a\"} 1 1767225600000
project_vcpu_usage{project_name=\"Alpha\",site=\"a\"} 2 1767225660000
project_vcpu_usage{project_name=\"Alpha\",site=\"b\"} 5 1767225600000
";
    let exporter = FixtureExporter::start(Answer::ok(body)).await;
    let app = spawn_app(&[("SCRAPE_TARGETS", &exporter.url)]).await;

    app.scrape().await;
    let first = app.samples().await;
    let attempts = app.scrape().await;

    assert_eq!(
        attempts[0].1.result,
        Ok(0),
        "the re-scrape stores nothing new"
    );
    assert_eq!(app.samples().await, first, "no duplicates, nothing changed");
    let times: Vec<i64> = first.iter().map(|s| s.3.timestamp_millis()).collect();
    assert_eq!(
        times,
        vec![1_767_225_600_000, 1_767_225_660_000, 1_767_225_600_000]
    );

    let grown =
        format!("{body}project_vcpu_usage{{project_name=\"Alpha\",site=\"a\"}} 3 1767225720000\n");
    exporter.set(Answer::ok(grown));
    let attempts = app.scrape().await;
    assert_eq!(attempts[0].1.result, Ok(1), "only the new sample is stored");
    assert_eq!(app.sample_count().await, 4);
}

#[tokio::test]
async fn scrapes_without_timestamps_store_one_sample_per_series_per_scrape() {
    let exporter = FixtureExporter::start(Answer::ok(BODY)).await;
    let app = spawn_app(&[("SCRAPE_TARGETS", &exporter.url)]).await;

    for _ in 0..3 {
        app.scrape().await;
    }

    assert_eq!(app.sample_count().await, 12);
}

#[tokio::test]
async fn the_whitelist_keeps_only_listed_projects() {
    let exporter = FixtureExporter::start(Answer::ok(BODY)).await;
    let app = spawn_app(&[
        ("SCRAPE_TARGETS", &exporter.url),
        ("OS_CREDITS_PROJECT_WHITELIST", "Alpha;Gamma"),
    ])
    .await;

    app.scrape().await;

    let projects: Vec<String> = app.samples().await.into_iter().map(|s| s.1).collect();
    assert_eq!(projects, vec!["Alpha", "Alpha"]);
}

#[tokio::test]
async fn a_custom_project_label_names_the_project() {
    let body = "project_vcpu_usage{tenant=\"t-1\",project_name=\"ignored\"} 1\nproject_vcpu_usage{project_name=\"no tenant\"} 1\n";
    let exporter = FixtureExporter::start(Answer::ok(body)).await;
    let app = spawn_app(&[
        ("SCRAPE_TARGETS", &exporter.url),
        ("PROJECT_LABEL", "tenant"),
    ])
    .await;

    app.scrape().await;

    let projects: Vec<String> = app.samples().await.into_iter().map(|s| s.1).collect();
    assert_eq!(projects, vec!["t-1"]);
}

#[tokio::test]
async fn start_up_says_which_storage_mode_it_runs_in_and_why() {
    let app = spawn_app(&[]).await;

    let health = app.health().await;

    // What the server can create, not what files it has: TimescaleDB installed but
    // not preloaded means plain tables.
    let expected = match common::expected_storage().await {
        os_credits::store::StorageMode::Timescaledb => "timescaledb",
        os_credits::store::StorageMode::Postgresql => "postgresql",
    };
    assert_eq!(health["storage_mode"], expected, "{health}");
    assert_eq!(health["storage"]["mode"], expected, "{health}");
    assert!(
        health["storage"]["why"]
            .as_str()
            .is_some_and(|w| !w.is_empty()),
        "{health}"
    );
    assert_eq!(health["database"]["reachable"], true);
    assert_eq!(health["status"], "ok");
    let ping = app.get("/ping").await;
    assert_eq!(ping.status(), 200);
    assert_eq!(ping.text().await.expect("body"), "Pong");
}

#[tokio::test]
async fn migrations_apply_once_and_a_restart_reuses_the_schema() {
    let exporter = FixtureExporter::start(Answer::ok(BODY)).await;
    let first = spawn_app(&[("SCRAPE_TARGETS", &exporter.url)]).await;
    first.scrape().await;
    let db = first.shutdown().await;

    let second = spawn_app_on(db, &[("SCRAPE_TARGETS", &exporter.url)], false).await;
    second.scrape().await;

    let client = second.db.connect().await;
    let migrations: i64 = client
        .query_one("SELECT count(*) FROM os_credits_migrations", &[])
        .await
        .expect("q")
        .get(0);
    let series: i64 = client
        .query_one("SELECT count(*) FROM series", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(
        migrations,
        os_credits::store::migrations::MIGRATIONS.len() as i64
    );
    assert_eq!(series, 4, "the restarted service found the existing series");
    assert_eq!(second.sample_count().await, 8);
}

#[tokio::test]
async fn two_replicas_never_scrape_the_same_target_in_one_lease() {
    let exporter = FixtureExporter::start(Answer::ok(BODY)).await;
    let vars = [
        ("SCRAPE_TARGETS", exporter.url.as_str()),
        ("SCRAPE_INTERVAL", "60"),
    ];
    let first = spawn_app(&vars).await;
    let db_twin = TestDb {
        name: first.db.name.clone(),
        server: common::PgServer::from_env(),
    };
    let second = spawn_app_on(db_twin, &vars, false).await;

    let (a, b) = tokio::join!(first.scrape(), second.scrape());

    assert_eq!(a.len() + b.len(), 1, "exactly one replica holds the lease");
    assert_eq!(first.sample_count().await, 4);
    std::mem::forget(second.db); // the first app's TestDb drops the shared database
}

#[tokio::test]
async fn the_background_loop_scrapes_the_demo_exporter_end_to_end() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/metrics", listener.local_addr().expect("address"));
    let config = os_credits::demo_exporter::DemoConfig {
        projects: 25,
        ..Default::default()
    };
    let server = os_credits::demo_exporter::server(config, listener).expect("demo exporter");
    tokio::spawn(server);

    let app = spawn_app_on(
        TestDb::create().await,
        &[("SCRAPE_TARGETS", &url), ("SCRAPE_INTERVAL", "3600")],
        true,
    )
    .await;

    let status = eventually(Duration::from_secs(20), "the first scrape", || async {
        let status = app.target_status(&url).await;
        (status["last_success_at"].is_string()).then_some(status)
    })
    .await;
    assert_eq!(
        status["last_samples"], 50,
        "25 projects × 2 metrics: {status}"
    );
    assert_eq!(app.sample_count().await, 50);
}

#[tokio::test]
async fn a_sample_repeated_in_one_body_is_stored_once() {
    let body = "project_vcpu_usage{project_name=\"Alpha\"} 1\nproject_vcpu_usage{project_name=\"Beta\"} 2\nproject_vcpu_usage{project_name=\"Alpha\"} 1\n";
    let exporter = FixtureExporter::start(Answer::ok(body)).await;
    let app = spawn_app(&[("SCRAPE_TARGETS", &exporter.url)]).await;

    let first = app.scrape().await;
    let second = app.scrape().await;

    assert_eq!(
        first[0].1.result,
        Ok(2),
        "the repeated line is a duplicate, not a second sample"
    );
    assert_eq!(second[0].1.result, Ok(2));
    assert_eq!(app.sample_count().await, 4);
}

#[tokio::test]
async fn a_malformed_line_after_the_first_megabyte_stores_nothing_not_even_series() {
    let mut body = String::new();
    let lines = 20_000;
    for i in 0..lines {
        body.push_str(&format!("project_vcpu_usage{{project_name=\"project-{i:05}\",domain_name=\"a fairly long domain name to fill the chunk\"}} {i}\n"));
    }
    assert!(body.len() > 2 << 20, "the body spans several parse chunks");
    body.push_str("project_vcpu_usage{project_name=\"late\"} 1 2 3\n");
    let exporter = FixtureExporter::start(Answer::ok(body)).await;
    let app = spawn_app(&[
        ("SCRAPE_TARGETS", &exporter.url),
        ("SCRAPE_MAX_BYTES", "10000000"),
    ])
    .await;

    let attempts = app.scrape().await;

    let error = attempts[0]
        .1
        .result
        .clone()
        .expect_err("the body is rejected");
    assert!(
        error.contains(&format!("line {}", lines + 1)),
        "the error names the bad line: {error}"
    );
    assert_eq!(app.sample_count().await, 0, "nothing of the body is stored");
    let row = app
        .db
        .connect()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM series) AS series,
                    (SELECT count(*) FROM projects) AS projects",
            &[],
        )
        .await
        .expect("q");
    let (series, projects): (i64, i64) = (row.get("series"), row.get("projects"));
    assert_eq!(
        (series, projects),
        (0, 0),
        "series created for the body, and their projects, were rolled back too"
    );
}

#[tokio::test]
async fn a_restarted_service_merges_its_first_scrape_of_known_series() {
    let body = "project_vcpu_usage{project_name=\"Alpha\"} 1 1767225600000\n";
    let exporter = FixtureExporter::start(Answer::ok(body)).await;
    let first = spawn_app(&[("SCRAPE_TARGETS", &exporter.url)]).await;
    first.scrape().await;
    let db = first.shutdown().await;

    let second = spawn_app_on(db, &[("SCRAPE_TARGETS", &exporter.url)], false).await;
    let attempts = second.scrape().await;

    assert_eq!(
        attempts[0].1.result,
        Ok(0),
        "the already stored sample is recognised after a restart"
    );
    assert_eq!(second.sample_count().await, 1);
}
