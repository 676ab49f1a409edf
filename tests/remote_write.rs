//! Prometheus remote write (`POST /api/v1/write`): pushes built here, and a real
//! Prometheus (Debian's `prometheus`, installed by `scripts/ensure-prometheus.sh`)
//! scraping a fixture exporter and remote-writing to the service.

mod common;

use chrono::{DateTime, Utc};
use common::exporter::{Answer, FixtureExporter};
use common::{eventually, spawn_app, PgServer, TestApp};
use os_credits::config::Settings;
use os_credits::receive::proto::{Label, Sample, TimeSeries, WriteRequest};
use prost::Message;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const TOKEN: &str = "site-a-secret";

fn senders() -> String {
    format!(
        r#"[{{"name": "site-a", "bearer_token": "{TOKEN}", "labels": {{"location": "Bielefeld"}}}},
            {{"name": "site-b", "basic_auth": {{"username": "b", "password": "pw"}}}}]"#
    )
}

async fn app() -> TestApp {
    spawn_app(&[("REMOTE_WRITE_SENDERS", &senders())]).await
}

fn series(labels: &[(&str, &str)], samples: &[(i64, f64)]) -> TimeSeries {
    TimeSeries {
        labels: labels
            .iter()
            .map(|(name, value)| Label {
                name: (*name).into(),
                value: (*value).into(),
            })
            .collect(),
        samples: samples
            .iter()
            .map(|&(timestamp, value)| Sample { value, timestamp })
            .collect(),
    }
}

/// A remote-write body as Prometheus sends it: protobuf, snappy block format.
fn body(timeseries: Vec<TimeSeries>) -> Vec<u8> {
    snappy(&WriteRequest { timeseries }.encode_to_vec())
}

/// `raw` in the snappy block format.
fn snappy(raw: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(raw)
        .expect("snappy compresses")
}

async fn push(app: &TestApp, authorization: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let mut request = app
        .http
        .post(format!("{}/api/v1/write", app.address))
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(body);
    if let Some(authorization) = authorization {
        request = request.header("Authorization", authorization);
    }
    let response = request.send().await.expect("push reaches the service");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

const T0: i64 = 1_764_000_000_000;

fn batch() -> Vec<TimeSeries> {
    vec![
        series(
            &[
                ("__name__", "project_vcpu_usage"),
                ("project_name", "Alpha"),
                ("job", "openstack"),
            ],
            &[(T0, 1.0), (T0 + 30_000, 2.5)],
        ),
        series(
            &[("__name__", "project_mb_usage"), ("project_name", "Beta")],
            &[(T0, 512.0)],
        ),
        // not billed, no project, NaN (a staleness marker): none is stored
        series(
            &[("__name__", "up"), ("project_name", "Alpha")],
            &[(T0, 1.0)],
        ),
        series(
            &[("__name__", "project_vcpu_usage"), ("job", "x")],
            &[(T0, 7.0)],
        ),
        series(
            &[
                ("__name__", "project_vcpu_usage"),
                ("project_name", "Gamma"),
            ],
            &[(T0, f64::NAN)],
        ),
    ]
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn sender_status(health: &Value, name: &str) -> Value {
    health["senders"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("sender {name} not in {health}"))
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("a time")
}

#[tokio::test]
async fn remote_write_answers_404_until_a_sender_is_configured() {
    let app = spawn_app(&[]).await;
    let (status, text) = push(&app, Some(&bearer()), body(batch())).await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("REMOTE_WRITE_SENDERS"), "{text}");
    assert_eq!(app.sample_count().await, 0);
}

#[tokio::test]
async fn a_push_is_stored_with_its_own_timestamps_filtered_and_labelled_like_a_scrape() {
    let app = app().await;
    let (status, text) = push(&app, Some(&bearer()), body(batch())).await;
    assert_eq!(status, 204, "{text}");

    let stored = app.samples().await;
    let expected_labels_alpha =
        serde_json::json!({"job": "openstack", "location": "Bielefeld", "project_name": "Alpha"});
    let expected_labels_beta = serde_json::json!({"location": "Bielefeld", "project_name": "Beta"});
    assert_eq!(
        stored,
        vec![
            (
                "project_mb_usage".into(),
                "Beta".into(),
                expected_labels_beta,
                at(T0),
                512.0
            ),
            (
                "project_vcpu_usage".into(),
                "Alpha".into(),
                expected_labels_alpha.clone(),
                at(T0),
                1.0
            ),
            (
                "project_vcpu_usage".into(),
                "Alpha".into(),
                expected_labels_alpha,
                at(T0 + 30_000),
                2.5
            ),
        ]
    );
    let status = sender_status(&app.health().await, "site-a");
    assert_eq!(status["up"], true, "{status}");
    assert_eq!(status["samples_stored_total"], 3, "{status}");
    assert_eq!(status["skipped_total"], 2, "{status}");
    // the recorder is shared by the tests of this process: at least this push's samples
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    let counted = metrics.lines().find_map(|l| {
        (l.starts_with("os_credits_remote_write_samples_total")
            && l.contains("sender=\"site-a\"")
            && l.contains("outcome=\"stored\""))
        .then(|| l.rsplit(' ').next()?.parse::<f64>().ok())?
    });
    assert!(counted >= Some(3.0), "{metrics}");
}

#[tokio::test]
async fn a_batch_sent_twice_is_stored_once() {
    let app = app().await;
    assert_eq!(push(&app, Some(&bearer()), body(batch())).await.0, 204);
    let first = app.samples().await;
    let (status, text) = push(&app, Some(&bearer()), body(batch())).await;
    assert_eq!(status, 204, "{text}");
    // and a batch overlapping the stored one: only its new sample is added
    let mut overlapping = batch();
    overlapping[0].samples.push(Sample {
        value: 4.0,
        timestamp: T0 + 60_000,
    });
    assert_eq!(push(&app, Some(&bearer()), body(overlapping)).await.0, 204);

    let stored = app.samples().await;
    assert_eq!(first.len(), 3);
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert_eq!(&stored[..3], &first[..]);
    let status = sender_status(&app.health().await, "site-a");
    assert_eq!(status["samples_stored_total"], 4, "{status}");
    assert_eq!(status["duplicates_total"], 6, "{status}");
    assert_eq!(status["pushes_total"], 3, "{status}");
}

/// Remote write carries label names as any bytes: the name `a="1",b` with the value
/// `2` is not the two labels `a="1"` and `b="2"`. Each of the two series keeps its own
/// sample; neither is stored as the other's, or dropped as its duplicate.
#[tokio::test]
async fn a_label_name_that_looks_like_two_labels_is_its_own_series() {
    let app = app().await;
    let name = ("__name__", "project_vcpu_usage");
    let two = series(
        &[name, ("a", "1"), ("b", "2"), ("project_name", "p")],
        &[(T0, 5.0)],
    );
    let posing = series(
        &[name, ("a=\"1\",b", "2"), ("project_name", "p")],
        &[(T0, 7.0)],
    );
    let (status, text) = push(&app, Some(&bearer()), body(vec![two, posing])).await;
    assert_eq!(status, 204, "{text}");
    let mut stored: Vec<(Value, f64)> = app
        .samples()
        .await
        .into_iter()
        .map(|(_, _, labels, _, value)| (labels, value))
        .collect();
    stored.sort_by(|a, b| a.1.total_cmp(&b.1));
    let labels = |extra: Value| {
        let mut all = json!({"location": "Bielefeld", "project_name": "p"});
        all.as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
        all
    };
    assert_eq!(
        stored,
        [
            (labels(json!({"a": "1", "b": "2"})), 5.0),
            (labels(json!({"a=\"1\",b": "2"})), 7.0),
        ]
    );
    let status = sender_status(&app.health().await, "site-a");
    assert_eq!(status["duplicates_total"], 0, "{status}");
}

/// A label that is not UTF-8 (remote write carries bytes; prost would refuse the
/// whole request) drops that series only: the batch is stored without it, answered
/// 204 so the sender does not retry it forever, and the drop is counted by reason.
#[tokio::test]
async fn a_series_with_a_label_that_is_not_utf8_is_dropped_and_the_rest_stored() {
    let app = app().await;
    let mut sent = batch();
    sent.push(series(
        &[
            ("__name__", "project_vcpu_usage"),
            ("project_name", "p"),
            ("site", "BAD!"),
        ],
        &[(T0, 1.0), (T0 + 30_000, 2.0)],
    ));
    let mut bytes = WriteRequest { timeseries: sent }.encode_to_vec();
    // The same length, so every length prefix still holds: "BAD!" becomes bytes
    // that are no UTF-8.
    let at = bytes
        .windows(4)
        .position(|w| w == b"BAD!")
        .expect("the marker");
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    let (status, text) = push(&app, Some(&bearer()), snappy(&bytes)).await;
    assert_eq!(status, 204, "{text}");
    let mut stored: Vec<(String, f64)> = app
        .samples()
        .await
        .into_iter()
        .map(|(_, project, _, _, value)| (project, value))
        .collect();
    stored.sort_by(|a, b| a.1.total_cmp(&b.1));
    assert_eq!(
        stored,
        [
            ("Alpha".to_owned(), 1.0),
            ("Alpha".to_owned(), 2.5),
            ("Beta".to_owned(), 512.0)
        ],
        "the batch's other series are stored"
    );
    let status = sender_status(&app.health().await, "site-a");
    // the batch's own: no project 1, NaN 1; the bad series' 2
    assert_eq!(status["skipped_total"], 4, "{status}");
    assert_eq!(status["failures_total"], 0, "{status}");
    let metrics = app
        .http
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.lines().any(|l| l
            == r#"os_credits_remote_write_samples_total{sender="site-a",outcome="not_utf8"} 2"#),
        "{metrics}"
    );
}

/// A series a sender pushes again is recognised by its label bytes and its samples
/// skip the labels' decoding; they must still land in that sender's own series (the
/// sender's added labels make it another series than the same bytes of another
/// sender), whatever order the labels come in, with NaN still dropped.
#[tokio::test]
async fn a_series_pushed_again_lands_in_the_senders_own_series() {
    let app = app().await;
    let labels = [
        ("__name__", "project_vcpu_usage"),
        ("project_name", "Alpha"),
        ("job", "openstack"),
    ];
    let basic = "Basic Yjpwdw=="; // site-b: b:pw
    for authorization in [bearer(), basic.to_owned()] {
        let first = body(vec![series(&labels, &[(T0, 1.0)])]);
        assert_eq!(push(&app, Some(&authorization), first).await.0, 204);
    }
    for (authorization, value) in [(bearer(), 2.0), (basic.to_owned(), 20.0)] {
        let again = body(vec![series(
            &labels,
            &[(T0 + 60_000, value), (T0 + 90_000, f64::NAN)],
        )]);
        assert_eq!(push(&app, Some(&authorization), again).await.0, 204);
        let mut reordered = labels;
        reordered.reverse();
        let reordered = body(vec![series(&reordered, &[(T0 + 120_000, value + 1.0)])]);
        assert_eq!(push(&app, Some(&authorization), reordered).await.0, 204);
    }

    let by_series = stored(&app, "project_vcpu_usage").await;
    let labels_of = |location: Option<&str>| {
        let mut labels: BTreeMap<String, String> =
            [("job", "openstack"), ("project_name", "Alpha")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        if let Some(location) = location {
            labels.insert("location".into(), location.into());
        }
        labels
    };
    let expected: BTreeMap<_, _> = [
        (
            labels_of(Some("Bielefeld")),
            vec![
                (at(T0), 1.0),
                (at(T0 + 60_000), 2.0),
                (at(T0 + 120_000), 3.0),
            ],
        ),
        (
            labels_of(None),
            vec![
                (at(T0), 1.0),
                (at(T0 + 60_000), 20.0),
                (at(T0 + 120_000), 21.0),
            ],
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(by_series, expected);
    let health = app.health().await;
    for name in ["site-a", "site-b"] {
        let status = sender_status(&health, name);
        assert_eq!(status["samples_stored_total"], 3, "{status}");
        assert_eq!(status["skipped_total"], 1, "the NaN: {status}");
    }
}

#[tokio::test]
async fn without_valid_credentials_nothing_is_stored() {
    let app = app().await;
    for (authorization, expected) in [
        (None, 401),
        (Some("Bearer wrong".to_owned()), 403),
        (Some(format!("Bearer {TOKEN}x")), 403),
        (Some("Basic Yjp3cm9uZw==".to_owned()), 403), // b:wrong
    ] {
        let (status, text) = push(&app, authorization.as_deref(), body(batch())).await;
        assert_eq!(status, expected, "{authorization:?}: {text}");
        let error: Value = serde_json::from_str(&text).expect("a JSON error");
        assert!(error["error"].is_string(), "{text}");
    }
    assert_eq!(app.sample_count().await, 0);
    let health = app.health().await;
    assert_eq!(
        sender_status(&health, "site-a")["pushes_total"],
        0,
        "{health}"
    );

    // site-b's basic auth (b:pw) is accepted, and site-a's label is not added to its samples
    let (status, text) = push(&app, Some("Basic Yjpwdw=="), body(batch())).await;
    assert_eq!(status, 204, "{text}");
    let stored = app.samples().await;
    assert_eq!(stored.len(), 3);
    assert!(
        stored.iter().all(|s| s.2.get("location").is_none()),
        "{stored:?}"
    );
}

#[tokio::test]
async fn a_body_that_can_never_be_read_is_refused_with_400_and_a_reason() {
    let app = app().await;
    let not_protobuf = snappy(b"\xff\xff\xff\xff not a write request");
    for (what, bad) in [
        ("snappy", b"plain text, not snappy".to_vec()),
        ("WriteRequest", not_protobuf),
    ] {
        let (status, text) = push(&app, Some(&bearer()), bad).await;
        assert_eq!(status, 400, "{what}: {text}");
        let error: Value = serde_json::from_str(&text).expect("a JSON error");
        assert!(
            error["error"].as_str().is_some_and(|e| e.contains(what)),
            "{what}: {text}"
        );
    }
    assert_eq!(app.sample_count().await, 0);
    let status = sender_status(&app.health().await, "site-a");
    assert_eq!(status["up"], false, "{status}");
    assert_eq!(status["failures_total"], 2, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("WriteRequest")),
        "{status}"
    );
    assert_eq!(app.health().await["status"], "degraded");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413() {
    let app = spawn_app(&[
        ("REMOTE_WRITE_SENDERS", &senders()),
        ("REMOTE_WRITE_MAX_BYTES", "100"),
    ])
    .await;
    let many: Vec<(i64, f64)> = (0..200).map(|i| (T0 + i * 1000, i as f64)).collect();
    let (status, text) = push(
        &app,
        Some(&bearer()),
        body(vec![series(
            &[
                ("__name__", "project_vcpu_usage"),
                ("project_name", "Alpha"),
            ],
            &many,
        )]),
    )
    .await;
    assert_eq!(status, 413, "{text}");
    assert_eq!(app.sample_count().await, 0);
}

/// A connection to the server's `postgres` database.
async fn admin() -> tokio_postgres::Client {
    PgServer::from_env().admin().await
}

async fn database_down(app: &TestApp, down: bool) {
    let admin = admin().await;
    let name = &app.db.name;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS {}",
            !down
        ))
        .await
        .expect("allow or refuse connections");
    if down {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[name],
            )
            .await
            .expect("cut connections");
    }
}

#[tokio::test]
async fn database_down_answers_5xx_so_the_sender_retries_and_the_retry_stores_it() {
    let app = app().await;
    database_down(&app, true).await;
    let (status, text) = push(&app, Some(&bearer()), body(batch())).await;
    database_down(&app, false).await;
    assert!((500..600).contains(&status), "{status}: {text}");
    let retried = eventually(
        Duration::from_secs(30),
        "the retry to be stored",
        || async {
            let (status, _) = push(&app, Some(&bearer()), body(batch())).await;
            (status == 204).then_some(status)
        },
    )
    .await;
    assert_eq!(retried, 204);
    assert_eq!(app.sample_count().await, 3);
    let status = sender_status(&app.health().await, "site-a");
    assert!(status["failures_total"].as_u64() >= Some(1), "{status}");
    assert_eq!(status["up"], true, "{status}");
}

// --- a real Prometheus --------------------------------------------------------------

/// Prometheus running from its binary with its own config and storage in a temp dir.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `exporter` every second and remote-writing to `write_url`
    /// with `authorization`; picks a free port and tries another when it was taken.
    async fn start(exporter: &str, write_url: &str, token: &str) -> Self {
        let binary = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let exporter = url::Url::parse(exporter).expect("exporter URL");
        let dir = std::env::temp_dir().join(format!(
            "os-credits-prometheus-{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        std::fs::create_dir_all(dir.join("data")).expect("temp dir");
        let dir = TempDir(dir);
        let config = format!(
            r#"global:
  scrape_interval: 1s
scrape_configs:
  - job_name: fixture
    scrape_interval: 1s
    metrics_path: {path}
    static_configs:
      - targets: ["{host}:{port}"]
remote_write:
  - url: {write_url}
    authorization:
      credentials: {token}
    queue_config:
      batch_send_deadline: 500ms
      min_backoff: 100ms
      max_backoff: 500ms
"#,
            path = exporter.path(),
            host = exporter.host_str().expect("host"),
            port = exporter.port().expect("port"),
        );
        let config_path = dir.0.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write config");
        for _attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("log file");
            let child = std::process::Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run {binary} ({e}): run scripts/ensure-prometheus.sh (make test does)")
                });
            let mut prometheus = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
                _dir: TempDir(std::path::PathBuf::new()),
            };
            let http = reqwest::Client::new();
            let started = std::time::Instant::now();
            let ready = loop {
                if let Ok(Some(_)) = prometheus.child.try_wait() {
                    break false; // exited: most likely the port was taken meanwhile
                }
                let ok = http
                    .get(format!("{}/-/ready", prometheus.url))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break true;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "prometheus did not become ready: {}",
                    std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if ready {
                prometheus._dir = dir;
                return prometheus;
            }
        }
        panic!(
            "prometheus did not start: {}",
            std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
        );
    }

    /// Every raw sample Prometheus holds of `metric`: series labels → (time, value).
    async fn raw_samples(
        &self,
        metric: &str,
    ) -> BTreeMap<BTreeMap<String, String>, Vec<(DateTime<Utc>, f64)>> {
        let mut url = url::Url::parse(&format!("{}/api/v1/query", self.url)).expect("URL");
        url.query_pairs_mut()
            .append_pair("query", &format!("{metric}[1h]"));
        let answer: Value = reqwest::Client::new()
            .get(url)
            .send()
            .await
            .expect("query Prometheus")
            .json()
            .await
            .expect("JSON");
        let mut out = BTreeMap::new();
        for series in answer["data"]["result"].as_array().expect("a result") {
            let labels: BTreeMap<String, String> = series["metric"]
                .as_object()
                .expect("labels")
                .iter()
                .filter(|(k, _)| *k != "__name__")
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let values = series["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|pair| {
                    let seconds = pair[0].as_f64().expect("time");
                    let value: f64 = pair[1].as_str().expect("value").parse().expect("a number");
                    (at((seconds * 1000.0).round() as i64), value)
                })
                .collect();
            out.insert(labels, values);
        }
        out
    }
}

const EXPOSITION: &str = r#"# TYPE project_vcpu_usage counter
project_vcpu_usage{project_name="Alpha",project_id="p1"} 10.5
project_vcpu_usage{project_name="Beta",project_id="p2"} 3
project_mb_usage{project_name="Alpha",project_id="p1"} 2048
project_vcpu_usage{project_id="p3"} 99
other_metric{project_name="Alpha"} 1
"#;

/// Stored samples of `metric`: series labels → (time, value).
async fn stored(
    app: &TestApp,
    metric: &str,
) -> BTreeMap<BTreeMap<String, String>, Vec<(DateTime<Utc>, f64)>> {
    let mut out: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for (m, _, labels, time, value) in app.samples().await {
        if m != metric {
            continue;
        }
        let labels: BTreeMap<String, String> =
            serde_json::from_value(labels).expect("labels are strings");
        out.entry(labels).or_default().push((time, value));
    }
    out
}

#[tokio::test]
async fn samples_a_real_prometheus_pushes_are_stored_exactly_as_prometheus_holds_them() {
    let exporter = FixtureExporter::start(Answer::ok(EXPOSITION)).await;
    let app = app().await;
    let prometheus = Prometheus::start(
        &exporter.url,
        &format!("{}/api/v1/write", app.address),
        TOKEN,
    )
    .await;
    // at least three pushes' worth of samples of each billed series
    eventually(
        Duration::from_secs(90),
        "samples pushed by Prometheus",
        || async {
            let vcpu = stored(&app, "project_vcpu_usage").await;
            let mb = stored(&app, "project_mb_usage").await;
            (vcpu.len() == 2
                && mb.len() == 1
                && vcpu.values().chain(mb.values()).all(|s| s.len() >= 3))
            .then_some(())
        },
    )
    .await;
    // the database being down meanwhile: Prometheus retries, and nothing is lost
    database_down(&app, true).await;
    eventually(
        Duration::from_secs(60),
        "a push refused while the database is down",
        || async {
            let status = sender_status(&app.health().await, "site-a");
            (status["failures_total"].as_u64() >= Some(1)).then_some(())
        },
    )
    .await;
    database_down(&app, false).await;
    let before_recovery = app.samples().await.len();
    eventually(Duration::from_secs(90), "pushes stored again", || async {
        (app.samples().await.len() > before_recovery + 3).then_some(())
    })
    .await;

    for metric in ["project_vcpu_usage", "project_mb_usage"] {
        let ours = stored(&app, metric).await;
        let theirs = prometheus.raw_samples(metric).await;
        assert_eq!(
            ours.len(),
            if metric == "project_mb_usage" { 1 } else { 2 },
            "{ours:?}"
        );
        for (labels, samples) in &ours {
            // what we stored carries the sender's label; Prometheus' series does not
            let mut theirs_labels = labels.clone();
            assert_eq!(
                theirs_labels.remove("location").as_deref(),
                Some("Bielefeld")
            );
            assert_eq!(
                theirs_labels.get("job").map(String::as_str),
                Some("fixture")
            );
            let theirs = theirs
                .get(&theirs_labels)
                .unwrap_or_else(|| panic!("{metric}{labels:?} is not in Prometheus: {theirs:?}"));
            // each series arrives in order: up to our newest sample, we hold all of theirs
            let newest = samples.last().expect("samples").0;
            let theirs_up_to: Vec<_> = theirs
                .iter()
                .filter(|(t, _)| *t <= newest)
                .cloned()
                .collect();
            assert_eq!(samples, &theirs_up_to, "{metric}{labels:?}");
        }
    }
    let status = sender_status(&app.health().await, "site-a");
    assert_eq!(status["up"], true, "{status}");
    assert!(status["last_error"].is_null(), "{status}");
}

/// A project's counter over time: project, metric, (ms, value) per step.
type Counter = (&'static str, &'static str, Vec<(i64, f64)>);

/// One exporter's counters over time, with a restart (a drop towards 0) and a step
/// without change, as real exporters give them.
fn history() -> Vec<Counter> {
    let steps = |values: &[f64]| -> Vec<(i64, f64)> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| (T0 + i as i64 * 30_000, v))
            .collect()
    };
    vec![
        (
            "Alpha",
            "project_vcpu_usage",
            steps(&[10.0, 10.5, 11.25, 12.0, 0.5, 1.5, 2.0]),
        ),
        (
            "Alpha",
            "project_mb_usage",
            steps(&[2048.0, 2050.0, 2100.0, 2100.0, 2300.0, 2301.5, 2400.0]),
        ),
        (
            "Beta",
            "project_vcpu_usage",
            steps(&[3.0, 3.0, 4.75, 6.0, 6.5, 9.0, 9.125]),
        ),
    ]
}

/// The used credits and the usage ledger rows of every project, comparable across
/// databases.
async fn billed(app: &TestApp) -> (Vec<(String, String)>, Vec<String>) {
    let client = app.db.connect().await;
    let used = client
        .query(
            "SELECT name, used_credits::text AS used FROM projects ORDER BY name",
            &[],
        )
        .await
        .expect("projects")
        .iter()
        .map(|r| (r.get("name"), r.get("used")))
        .collect();
    let ledger = client
        .query(
            "SELECT concat_ws(' ', project, metric, usage_from, time, quantity, price, used_delta, used_after) AS row
             FROM ledger WHERE kind = 'usage' ORDER BY project, metric, time",
            &[],
        )
        .await
        .expect("ledger")
        .iter()
        .map(|r| r.get("row"))
        .collect();
    (used, ledger)
}

#[tokio::test]
async fn billing_over_pushed_samples_equals_billing_over_the_same_samples_scraped() {
    let history = history();
    let steps = history[0].2.len();
    // Pulled: an exporter exposing each step with its timestamp, scraped once per step.
    let exporter = FixtureExporter::start(Answer::ok("")).await;
    let target = format!(r#"[{{"name": "site", "url": "{}"}}]"#, exporter.url);
    let scraped = spawn_app(&[("SCRAPE_TARGETS", &target)]).await;
    for step in 0..steps {
        let text: String = history
            .iter()
            .map(|(project, metric, samples)| {
                let (ms, value) = samples[step];
                format!("{metric}{{project_name=\"{project}\",job=\"openstack\"}} {value} {ms}\n")
            })
            .collect();
        exporter.set(Answer::ok(text));
        let attempts = scraped.scrape().await;
        assert!(
            attempts.iter().all(|(_, a)| a.result.is_ok()),
            "{attempts:?}"
        );
    }
    // Pushed: the same samples as a Prometheus shard sends them, batches cutting
    // across steps and series, one batch retried whole.
    let pushed = spawn_app(&[("REMOTE_WRITE_SENDERS", &senders())]).await;
    let mut all: Vec<TimeSeries> = Vec::new();
    for step in 0..steps {
        for (project, metric, samples) in &history {
            all.push(series(
                &[
                    ("__name__", metric),
                    ("project_name", project),
                    ("job", "openstack"),
                ],
                &[samples[step]],
            ));
        }
    }
    let batches: Vec<Vec<TimeSeries>> = all.chunks(4).map(<[TimeSeries]>::to_vec).collect();
    for (i, batch) in batches.iter().enumerate() {
        let (status, text) = push(&pushed, Some(&bearer()), body(batch.clone())).await;
        assert_eq!(status, 204, "{text}");
        if i == 2 {
            let (status, text) = push(&pushed, Some(&bearer()), body(batch.clone())).await;
            assert_eq!(status, 204, "a retried batch: {text}");
        }
    }
    let samples = (history.len() * steps) as i64;
    assert_eq!(scraped.sample_count().await, samples);
    assert_eq!(
        pushed.sample_count().await,
        samples,
        "the retry stored nothing twice"
    );

    let now = Utc::now();
    for app in [&scraped, &pushed] {
        let settings = Settings::from_vars(app.db.vars()).expect("settings");
        os_credits::billing::engine::run(&app.app_pool, settings.billing(), now)
            .await
            .expect("billing run");
    }
    let (scraped_used, scraped_ledger) = billed(&scraped).await;
    let (pushed_used, pushed_ledger) = billed(&pushed).await;
    assert_eq!(
        scraped_used.len(),
        2,
        "both projects billed: {scraped_used:?}"
    );
    assert!(
        scraped_used.iter().all(|(_, used)| used != "0"),
        "usage was billed: {scraped_used:?}"
    );
    assert_eq!(
        scraped_ledger.len(),
        history.len(),
        "one usage row per series: {scraped_ledger:#?}"
    );
    assert_eq!(pushed_used, scraped_used, "the same used credits");
    assert_eq!(pushed_ledger, scraped_ledger, "the same ledger rows");
}

#[tokio::test]
async fn a_series_a_sender_stops_pushing_is_reported_stale_until_it_comes_back() {
    let db = common::TestDb::create().await;
    let app = common::spawn_app_on(
        db,
        &[
            ("REMOTE_WRITE_SENDERS", &senders()),
            ("REMOTE_WRITE_STALE_AFTER", "1"),
        ],
        true,
    )
    .await;
    let alpha = |ms: i64| {
        series(
            &[
                ("__name__", "project_vcpu_usage"),
                ("project_name", "Alpha"),
            ],
            &[(ms, 1.0)],
        )
    };
    let beta = |ms: i64| {
        series(
            &[("__name__", "project_vcpu_usage"), ("project_name", "Beta")],
            &[(ms, 1.0)],
        )
    };
    let (status, text) = push(&app, Some(&bearer()), body(vec![alpha(T0), beta(T0)])).await;
    assert_eq!(status, 204, "{text}");
    // Alpha keeps coming, Beta does not.
    let mut ms = T0;
    let stale_beta = loop {
        ms += 1_000;
        let (status, _) = push(&app, Some(&bearer()), body(vec![alpha(ms)])).await;
        assert_eq!(status, 204);
        let detail: Value = app
            .get("/api/projects/Beta")
            .await
            .json()
            .await
            .expect("JSON");
        let stale = detail["stale_series"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !stale.is_empty() {
            break stale;
        }
        assert!(ms - T0 < 30_000, "Beta never reported stale: {detail}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stale_beta.len(), 1, "{stale_beta:?}");
    assert_eq!(stale_beta[0]["target"], "remote_write:site-a");
    let alpha_detail: Value = app
        .get("/api/projects/Alpha")
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        alpha_detail["stale_series"].as_array().map(Vec::len),
        Some(0),
        "a series still pushed is not stale: {alpha_detail}"
    );
    let status = eventually(Duration::from_secs(10), "sender status counted", || async {
        let s = sender_status(&app.health().await, "site-a");
        (s["stale_series"] == 1 && s["billed_series"] == 1).then_some(s)
    })
    .await;
    assert!(status["problem"].is_null(), "still pushing: {status}");

    // Beta comes back: no longer stale.
    ms += 1_000;
    let (status, _) = push(&app, Some(&bearer()), body(vec![alpha(ms), beta(ms)])).await;
    assert_eq!(status, 204);
    eventually(Duration::from_secs(10), "Beta no longer stale", || async {
        let detail: Value = app.get("/api/projects/Beta").await.json().await.ok()?;
        (detail["stale_series"].as_array().map(Vec::len) == Some(0)).then_some(())
    })
    .await;

    // The sender goes silent: /health says so and names it.
    let health = eventually(Duration::from_secs(15), "health degraded", || async {
        let health = app.health().await;
        (health["status"] == "degraded").then_some(health)
    })
    .await;
    let site = sender_status(&health, "site-a");
    let problem = site["problem"].as_str().unwrap_or_default();
    assert!(problem.contains("pushed no billed series"), "{site}");
    assert_eq!(site["stale_series"], 2, "{site}");
    assert!(
        sender_status(&health, "site-b")["problem"].is_null(),
        "a sender that never pushed is not reported: {health}"
    );
}
