//! Scraping over the wire as exporters serve it: gzip and chunked bodies, bearer and
//! basic auth actually sent, federation `match[]` in the URL, the size limit while a
//! body streams, values that are not usage and bodies that are not text. The
//! exporters are real HTTP servers (actix-web) on loopback.

mod common;

use common::exporter::{Answer, FixtureExporter, Wire};
use common::spawn_app;
use serde_json::json;
use std::time::Duration;

/// Two billed samples of `project`.
fn body(project: &str) -> String {
    format!(
        "# TYPE project_vcpu_usage counter\n\
         project_vcpu_usage{{project_name=\"{project}\"}} 10\n\
         project_mb_usage{{project_name=\"{project}\"}} 2048\n"
    )
}

/// One scrape cycle, bounded: a scraper that never gives up fails the test.
async fn scrape(app: &common::TestApp) {
    tokio::time::timeout(Duration::from_secs(60), app.scrape())
        .await
        .expect("a scrape cycle ends");
}

async fn projects(app: &common::TestApp) -> Vec<String> {
    let mut projects: Vec<String> = app.samples().await.into_iter().map(|s| s.1).collect();
    projects.sort();
    projects.dedup();
    projects
}

#[tokio::test]
async fn gzip_and_chunked_bodies_are_stored_like_plain_ones() {
    let gzip = FixtureExporter::start_with(
        Answer::ok(body("Gzip")),
        Wire {
            gzip: true,
            ..Wire::default()
        },
    )
    .await;
    let chunked = FixtureExporter::start_with(
        Answer::ok(body("Chunked")),
        Wire {
            chunk_size: Some(7),
            ..Wire::default()
        },
    )
    .await;
    let both = FixtureExporter::start_with(
        Answer::ok(body("Both")),
        Wire {
            gzip: true,
            chunk_size: Some(5),
            ..Wire::default()
        },
    )
    .await;
    let targets = json!([
        {"name": "gzip", "url": gzip.url},
        {"name": "chunked", "url": chunked.url},
        {"name": "both", "url": both.url},
    ])
    .to_string();
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;

    scrape(&app).await;

    assert_eq!(projects(&app).await, ["Both", "Chunked", "Gzip"]);
    assert_eq!(app.sample_count().await, 6);
    for exporter in [&gzip, &both] {
        let asked = exporter.received()[0]
            .header("accept-encoding")
            .unwrap_or_default()
            .to_owned();
        assert!(asked.contains("gzip"), "the scraper asks for gzip: {asked}");
    }
    // What went over the wire, seen by a client that does not decompress.
    let raw = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("client");
    let zipped = raw
        .get(&both.url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("GET");
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    assert_eq!(zipped.headers()["transfer-encoding"], "chunked");
    let bytes = zipped.bytes().await.expect("body");
    assert_eq!(&bytes[..2], [0x1f, 0x8b], "a gzip stream");
    let pieces = raw.get(&chunked.url).send().await.expect("GET");
    assert_eq!(pieces.headers()["transfer-encoding"], "chunked");
    assert!(pieces.headers().get("content-length").is_none());
}

#[tokio::test]
async fn bearer_and_basic_credentials_are_sent_and_a_wrong_one_fails_the_target() {
    let bearer = FixtureExporter::start_with(
        Answer::ok(body("Bearer")),
        Wire {
            authorization: Some("Bearer t0k3n".into()),
            ..Wire::default()
        },
    )
    .await;
    // "scraper:s3cret" in base64
    let basic = FixtureExporter::start_with(
        Answer::ok(body("Basic")),
        Wire {
            authorization: Some("Basic c2NyYXBlcjpzM2NyZXQ=".into()),
            ..Wire::default()
        },
    )
    .await;
    let in_url = basic.url.replace("http://", "http://scraper:s3cret@");
    let targets = json!([
        {"name": "bearer", "url": bearer.url, "bearer_token": "t0k3n"},
        {"name": "basic", "url": basic.url,
         "basic_auth": {"username": "scraper", "password": "s3cret"}},
        {"name": "in-url", "url": in_url},
        {"name": "wrong", "url": bearer.url, "bearer_token": "guess"},
    ])
    .to_string();
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;

    scrape(&app).await;

    assert_eq!(app.target_status("bearer").await["up"], true);
    assert_eq!(app.target_status("basic").await["up"], true);
    assert_eq!(app.target_status("in-url").await["up"], true);
    let wrong = app.target_status("wrong").await;
    assert_eq!(wrong["up"], false, "{wrong}");
    assert!(
        wrong["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("401"),
        "{wrong}"
    );
    assert!(
        !wrong.to_string().contains("guess") && !app.health().await.to_string().contains("s3cret"),
        "credentials never show in /health"
    );
    assert_eq!(projects(&app).await, ["Basic", "Bearer"]);
    let sent: Vec<String> = bearer
        .received()
        .iter()
        .filter_map(|r| r.header("authorization").map(str::to_owned))
        .collect();
    assert_eq!(sent.len(), 2, "every request carried credentials: {sent:?}");
}

#[tokio::test]
async fn federation_match_selectors_go_into_the_url_in_order() {
    let federate = FixtureExporter::start(Answer::ok(body("Federated"))).await;
    let url = federate.url.replace("/metrics", "/federate");
    let targets = json!([{
        "name": "federate", "url": url,
        "match": ["{__name__=~\"project_.*\"}", "up{job=\"openstack\"}"],
    }])
    .to_string();
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;

    scrape(&app).await;

    let request = &federate.received()[0];
    assert_eq!(request.path, "/federate");
    assert_eq!(
        request.query_values("match[]"),
        ["{__name__=~\"project_.*\"}", "up{job=\"openstack\"}"]
    );
    assert_eq!(app.sample_count().await, 2);
}

#[tokio::test]
async fn the_size_limit_stops_a_body_while_it_streams_plain_or_gzip() {
    // Bodies without end and without Content-Length: only counting the bytes as
    // they arrive (after decompression) stops them; SCRAPE_TIMEOUT is far away.
    let padding = format!("{}# padding\n", body("Endless"));
    let endless = FixtureExporter::start_with(
        Answer::ok(padding.clone()),
        Wire {
            chunk_size: Some(4096),
            endless: true,
            ..Wire::default()
        },
    )
    .await;
    let endless_gzip = FixtureExporter::start_with(
        Answer::ok(padding),
        Wire {
            chunk_size: Some(4096),
            endless: true,
            gzip: true,
            ..Wire::default()
        },
    )
    .await;
    let targets = json!([
        {"name": "endless", "url": endless.url},
        {"name": "endless-gzip", "url": endless_gzip.url},
    ])
    .to_string();
    let app = spawn_app(&[
        ("SCRAPE_TARGETS", &targets),
        ("SCRAPE_MAX_BYTES", "200000"),
        ("SCRAPE_TIMEOUT", "120"),
    ])
    .await;

    scrape(&app).await;

    for name in ["endless", "endless-gzip"] {
        let status = app.target_status(name).await;
        assert_eq!(status["up"], false, "{status}");
        assert!(
            status["last_error"]
                .as_str()
                .unwrap_or_default()
                .contains("SCRAPE_MAX_BYTES"),
            "{name}: {status}"
        );
    }
    assert_eq!(app.sample_count().await, 0);
}

#[tokio::test]
async fn nan_and_infinite_values_are_dropped_and_the_rest_is_stored() {
    let exporter = FixtureExporter::start(Answer::ok(
        "project_vcpu_usage{project_name=\"Finite\"} 3.5\n\
         project_vcpu_usage{project_name=\"NotANumber\"} NaN\n\
         project_vcpu_usage{project_name=\"Up\"} +Inf\n\
         project_mb_usage{project_name=\"Down\"} -Inf\n\
         project_mb_usage{project_name=\"Finite\"} 12\n",
    ))
    .await;
    let targets = json!([{"name": "odd", "url": exporter.url}]).to_string();
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;

    scrape(&app).await;

    let stored: Vec<(String, String, f64)> = app
        .samples()
        .await
        .into_iter()
        .map(|(metric, project, _, _, value)| (metric, project, value))
        .collect();
    assert_eq!(
        stored,
        [
            ("project_mb_usage".to_owned(), "Finite".to_owned(), 12.0),
            ("project_vcpu_usage".to_owned(), "Finite".to_owned(), 3.5),
        ]
    );
    assert_eq!(app.target_status("odd").await["up"], true);
}

#[tokio::test]
async fn a_body_that_is_not_utf8_fails_the_target_as_not_utf8() {
    let mut bytes = body("Latin").into_bytes();
    bytes.extend_from_slice(b"project_vcpu_usage{project_name=\"M\xfcller\"} 1\n");
    let exporter = FixtureExporter::start_with(
        Answer::ok(""),
        Wire {
            raw_body: Some(bytes),
            ..Wire::default()
        },
    )
    .await;
    let targets = json!([{"name": "latin1", "url": exporter.url}]).to_string();
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;

    scrape(&app).await;

    let status = app.target_status("latin1").await;
    assert_eq!(status["up"], false, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("not UTF-8"),
        "{status}"
    );
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "os_credits_scrapes_total{target=\"latin1\",outcome=\"not_utf8\"} 1"),
        "counted by its outcome:\n{metrics}"
    );
    assert_eq!(app.sample_count().await, 0, "nothing of the body stored");
}
