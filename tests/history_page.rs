//! The history page (`GET /credits_history/{project}`) in a real headless Chromium
//! (Debian's `chromium`, installed by `scripts/ensure-chromium.sh`): the DOM after the
//! page's script ran, its console, and a screenshot under `target/test-artifacts/`.

mod common;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use common::{spawn_app, TestApp};
use os_credits::billing::engine;
use os_credits::config::Settings;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const KEY: &str = "history-page-key";
const PROJECT: &str = "Alpha";
/// Days ago (at noon UTC) of the seeded samples; the oldest only sets the cursor, so
/// each later day is one billed bucket.
const SAMPLE_DAYS: [i64; 9] = [400, 300, 100, 20, 10, 5, 3, 2, 1];

/// The Chromium binary, or a failure that says how to get it: the test never passes
/// without a browser.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromium is not installed: run `bash scripts/ensure-chromium.sh` \
                 (installs Debian's chromium and chromium-driver; `make test` runs it)"
            )
        })
}

/// What Chromium made of a page: its DOM after the scripts ran and its console lines.
struct Rendered {
    dom: String,
    console: Vec<String>,
}

/// Loads `url` in a fresh headless Chromium profile; with `screenshot`, saves one there.
fn render(url: &str, screenshot: Option<&Path>) -> Rendered {
    static RUN: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "os-credits-chromium-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create chromium profile dir");
    let stdout = dir.join("stdout");
    let stderr = dir.join("stderr");
    let mut command = Command::new(chromium());
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--window-size=1200,800",
    ]);
    command.arg(format!("--user-data-dir={}", dir.join("profile").display()));
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    command
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    let mut child = command.spawn().unwrap_or_else(|e| {
        panic!("cannot start chromium ({e}): run `bash scripts/ensure-chromium.sh`")
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish {url} within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dom = std::fs::read_to_string(&stdout).unwrap_or_default();
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        status.success(),
        "chromium failed on {url} ({status}):\n{log}"
    );
    let console = log
        .lines()
        .filter(|line| line.contains("CONSOLE") || line.contains("Uncaught"))
        .map(str::to_owned)
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    Rendered { dom, console }
}

/// `render` off the runtime's thread, so the service keeps answering meanwhile.
async fn render_page(app: &TestApp, path: &str, screenshot: Option<PathBuf>) -> Rendered {
    let url = format!("{}{}", app.address, path);
    tokio::task::spawn_blocking(move || render(&url, screenshot.as_deref()))
        .await
        .expect("chromium thread")
}

fn noon_days_ago(days: i64) -> DateTime<Utc> {
    let midnight = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    midnight - ChronoDuration::days(days) + ChronoDuration::hours(12)
}

/// A counter series of `project` with one sample per entry of `SAMPLE_DAYS`, growing
/// by `per_day`.
async fn seed_counter(app: &TestApp, project: &str, metric: &str, per_day: f64) {
    let mut client = app.db.connect().await;
    let id = common::seed_series(&mut client, metric, &[("project_name", project)], project).await;
    for (n, days) in SAMPLE_DAYS.iter().enumerate() {
        let value = n as f64 * per_day;
        client
            .execute(
                "INSERT INTO usage_samples (series_id, time, value) VALUES ($1, $2, $3)",
                &[&id, &noon_days_ago(*days), &value],
            )
            .await
            .expect("insert sample");
    }
}

/// `Alpha` with a grant of 100, two metrics billed by the real engine once a day on
/// eight days (8 credits a day, so it crossed 50 %).
async fn seeded_app() -> TestApp {
    let vars = [("API_KEY", KEY), ("FORECAST_WINDOW_HOURS", "72")];
    let app = spawn_app(&vars).await;
    let grant = app
        .http
        .put(format!("{}/api/projects/{PROJECT}/grant", app.address))
        .header("X-API-KEY", KEY)
        .json(&serde_json::json!({"granted_credits": 100}))
        .send()
        .await
        .expect("grant request");
    assert_eq!(
        grant.status(),
        200,
        "{}",
        grant.text().await.unwrap_or_default()
    );
    seed_counter(&app, PROJECT, "project_vcpu_usage", 5.0).await;
    seed_counter(&app, PROJECT, "project_mb_usage", 10.0).await;
    let mut all = app.db.vars();
    all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = Settings::from_vars(all).expect("settings");
    // A run bills a metric's new samples as one ledger row at the newest sample, so
    // one run per sample day gives one row (one chart point) per day.
    for days in SAMPLE_DAYS {
        let until = noon_days_ago(days) + ChronoDuration::minutes(1);
        engine::run(&app.app_pool, settings.billing(), until)
            .await
            .expect("billing run");
    }
    app
}

fn state(dom: &str) -> &str {
    let start = dom.find("data-state=\"").map(|i| i + 12).unwrap_or(0);
    dom[start..].split('"').next().unwrap_or_default()
}

fn points(dom: &str) -> usize {
    dom.matches("class=\"point\"").count()
}

#[tokio::test]
async fn the_history_page_charts_a_seeded_project_and_its_range_selector_changes_the_points() {
    let app = seeded_app().await;

    let year = render_page(&app, "/credits_history/Alpha?range=1y", None).await;
    let week = render_page(&app, "/credits_history/Alpha?range=7d", None).await;
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifact dir");
    let shot = artifacts.join("history_page.png");
    let _ = std::fs::remove_file(&shot);
    let shown = render_page(&app, "/credits_history/Alpha?range=1y", Some(shot.clone())).await;

    for (name, page) in [("1y", &year), ("7d", &week), ("screenshot", &shown)] {
        assert!(
            page.console.is_empty(),
            "console output on the {name} page:\n{}",
            page.console.join("\n")
        );
    }
    assert_eq!(state(&year.dom), "ready", "{}", year.dom);
    assert_eq!(
        points(&year.dom),
        8,
        "one point per billed day in a year:\n{}",
        year.dom
    );
    assert!(year.dom.contains("data-points=\"8\""), "{}", year.dom);
    assert_eq!(
        points(&week.dom),
        4,
        "the last 7 days hold 4 billed days:\n{}",
        week.dom
    );
    assert!(
        week.dom.contains("aria-pressed=\"true\">7 days"),
        "{}",
        week.dom
    );
    assert!(
        year.dom.contains("Credits history of Alpha"),
        "{}",
        year.dom
    );
    for part in [
        "project_vcpu_usage",
        "project_mb_usage",
        "class=\"grant\"",
        "class=\"used\"",
    ] {
        assert!(
            year.dom.contains(part),
            "the page lacks {part}:\n{}",
            year.dom
        );
    }
    assert!(
        year.dom.contains("class=\"notification\""),
        "the 50 % crossing is listed:\n{}",
        year.dom
    );
    assert!(
        !year.dom.contains("forecast run-out</span><b>none"),
        "a burning project has a run-out forecast:\n{}",
        year.dom
    );
    assert!(
        year.dom
            .contains("/api/credits_history/Alpha?format=csv&amp;step=1d&amp;start_date="),
        "a CSV link for the range:\n{}",
        year.dom
    );
    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
}

#[tokio::test]
async fn an_unknown_project_gets_a_clear_message_with_its_name_escaped() {
    let app = spawn_app(&[("API_KEY", KEY)]).await;

    let page = render_page(
        &app,
        "/credits_history/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        None,
    )
    .await;

    assert_eq!(state(&page.dom), "unknown", "{}", page.dom);
    assert!(page.dom.contains("Unknown project"), "{}", page.dom);
    assert!(
        page.dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "the name is shown as text:\n{}",
        page.dom
    );
    assert!(!page.dom.contains("<script>alert(1)"), "{}", page.dom);
    assert!(
        page.console.is_empty(),
        "console output:\n{}",
        page.console.join("\n")
    );
}
