//! Faults from peers, each against a real peer on loopback: redirecting HTTP servers
//! (two listeners are two origins), an SMTP server whose final reply comes late or
//! never, slow targets beside healthy ones, exporters serving labels PostgreSQL
//! cannot store, and log lines a project name tries to forge.

mod common;

use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use common::{spawn_app, TestApp};
use os_credits::billing::{engine, portal};
use os_credits::config::Settings;
use os_credits::notify::Notifier;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "admin-key-4711";
const PORTAL_KEY: &str = "portal-secret-0815";
const TOKEN: &str = "target-token-1234";

// ---------------------------------------------------------------------------
// A real HTTP server on loopback that answers each path as told.

#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    location: Option<String>,
    body: String,
}

impl Reply {
    fn ok(body: &str) -> Self {
        Self {
            status: 200,
            location: None,
            body: body.to_owned(),
        }
    }

    fn redirect(status: u16, location: &str) -> Self {
        Self {
            status,
            location: Some(location.to_owned()),
            body: String::new(),
        }
    }
}

/// Records every request head; unknown paths get 404.
struct Peer {
    base: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    async fn start(routes: &[(&str, Reply)]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind peer");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let routes: Arc<BTreeMap<String, Reply>> = Arc::new(
            routes
                .iter()
                .map(|(path, reply)| (path.to_string(), reply.clone()))
                .collect(),
        );
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (routes, seen) = (routes.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut buf = [0u8; 4096];
                    let end = loop {
                        if let Some(i) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&read[..end]).into_owned();
                    let length: usize = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(str::trim))
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(0);
                    while read.len() < end + length {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => read.extend_from_slice(&buf[..n]),
                        }
                    }
                    let path = head
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("/")
                        .split('?')
                        .next()
                        .unwrap_or("/")
                        .to_owned();
                    seen.lock().expect("lock").push(head);
                    let reply = routes.get(&path).cloned().unwrap_or(Reply {
                        status: 404,
                        location: None,
                        body: "not here".into(),
                    });
                    let location = reply
                        .location
                        .map(|l| format!("Location: {l}\r\n"))
                        .unwrap_or_default();
                    let response = format!(
                        "HTTP/1.1 {} X\r\n{location}Content-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        reply.status,
                        reply.body.len(),
                        reply.body
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { base, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("lock").clone()
    }
}

fn has_header(head: &str, name: &str) -> bool {
    head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with(&format!("{}:", name.to_ascii_lowercase()))
    })
}

// ---------------------------------------------------------------------------
// A hand-written SMTP server on loopback whose reply to the end of DATA is late or
// never comes (the connection closes instead).

#[derive(Clone, Copy)]
enum FinalReply {
    After(Duration),
    /// The connection closes instead.
    Never,
    /// The connection stays open, silent.
    Hang,
}

struct Smtp {
    port: u16,
    /// Every message body received (up to the end-of-data line).
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Smtp {
    fn start(final_reply: FinalReply) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind SMTP");
        let port = listener.local_addr().expect("address").port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let received = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let received = received.clone();
                std::thread::spawn(move || {
                    let _ = converse(stream, final_reply, &received);
                });
            }
        });
        Self { port, bodies }
    }

    fn received(&self) -> usize {
        self.bodies.lock().expect("lock").len()
    }
}

fn converse(
    stream: std::net::TcpStream,
    final_reply: FinalReply,
    received: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(b"220 smtp.test ESMTP\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let command = line.to_ascii_uppercase();
        if command.starts_with("EHLO") || command.starts_with("HELO") {
            writer.write_all(b"250-smtp.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")?;
        } else if command.starts_with("DATA") {
            writer.write_all(b"354 go ahead\r\n")?;
            let mut body = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" {
                    break;
                }
                body.push_str(&line);
            }
            received.lock().expect("lock").push(body);
            match final_reply {
                FinalReply::After(delay) => {
                    std::thread::sleep(delay);
                    writer.write_all(b"250 queued\r\n")?;
                }
                FinalReply::Never => return Ok(()),
                FinalReply::Hang => {
                    std::thread::sleep(Duration::from_secs(3600));
                    return Ok(());
                }
            }
        } else if command.starts_with("QUIT") {
            writer.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            writer.write_all(b"250 OK\r\n")?;
        }
    }
}

// ---------------------------------------------------------------------------
// The service with a project about to cross its thresholds.

struct World {
    app: TestApp,
    vars: Vec<(String, String)>,
}

impl World {
    async fn start(extra: &[(&str, &str)]) -> Self {
        Self::start_workers(extra, false).await
    }

    async fn start_workers(extra: &[(&str, &str)], with_workers: bool) -> Self {
        let mut vars: Vec<(String, String)> = vec![
            ("API_KEY".into(), KEY.into()),
            ("MAIL_FROM".into(), "credits@example.org".into()),
        ];
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let borrowed: Vec<(&str, &str)> =
            vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let app =
            common::spawn_app_on(common::TestDb::create().await, &borrowed, with_workers).await;
        Self { app, vars }
    }

    fn settings(&self) -> Settings {
        let mut all = self.app.db.vars();
        all.extend(self.vars.iter().cloned());
        Settings::from_vars(all).expect("settings")
    }

    fn notifier(&self) -> Notifier {
        Notifier::new(self.app.app_pool.clone(), self.settings().notify()).expect("notifier")
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .app
            .http
            .request(method, format!("{}{}", self.app.address, path))
            .header("X-API-KEY", KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request reaches the service");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `project` granted 100 credits, with a contact, that used 60 by `at` (half the
    /// grant crossed once billed).
    async fn project_over_half(&self, project: &str, at: DateTime<Utc>) {
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &format!("/api/projects/{project}/grant"),
                Some(json!({ "granted_credits": 100 })),
            )
            .await;
        assert_eq!(status, 200, "grant: {body}");
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &format!("/api/projects/{project}/contacts"),
                Some(json!({ "emails": ["owner@example.org"] })),
            )
            .await;
        assert_eq!(status, 200, "contacts: {body}");
        let mut client = self.app.db.connect().await;
        let id = common::seed_series(
            &mut client,
            "project_vcpu_usage",
            &[("project_name", project)],
            project,
        )
        .await;
        common::insert_samples(
            &client,
            id,
            &[
                (at - ChronoDuration::hours(2), 0.0),
                (at - ChronoDuration::hours(1), 60.0),
            ],
        )
        .await;
        engine::run(&self.app.app_pool, self.settings().billing(), at)
            .await
            .expect("billing run");
    }

    /// `(channel, status, last_error)` of the project's deliveries, as the API shows them.
    async fn deliveries(&self, project: &str) -> Vec<(String, String, String)> {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/api/projects/{project}/notifications"),
                None,
            )
            .await;
        assert_eq!(status, 200, "notifications: {body}");
        body.as_array()
            .expect("a list")
            .iter()
            .flat_map(|n| n["deliveries"].as_array().cloned().unwrap_or_default())
            .map(|d| {
                (
                    d["channel"].as_str().unwrap_or_default().to_owned(),
                    d["status"].as_str().unwrap_or_default().to_owned(),
                    d["last_error"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(ChronoDuration::seconds(1))
        .expect("truncate")
}

fn mail_dir() -> String {
    std::env::temp_dir()
        .join(format!("os-credits-faults-peers-{}", std::process::id()))
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------
// 4. Redirects carry no secrets to strangers.

#[tokio::test]
async fn a_webhook_answered_with_a_redirect_is_not_sent_and_the_key_stays_home() {
    let stranger = Peer::start(&[("/portal/credits-limit/", Reply::ok("thanks"))]).await;
    let target = format!("{}/portal/credits-limit/", stranger.base);
    let portal = Peer::start(&[("/portal/credits-limit/", Reply::redirect(302, &target))]).await;
    let base = format!("{}/portal", portal.base);
    let dir = mail_dir();
    let world = World::start(&[
        ("MAIL_CONTACT_URL", &base),
        ("API_CONTACT_KEY", PORTAL_KEY),
        ("MAIL_FILE_DIR", &dir),
    ])
    .await;
    let t = now();
    world.project_over_half("Alpha", t).await;

    world.notifier().send_due(t).await.expect("send");

    let asked = portal.heads();
    assert_eq!(
        asked.len(),
        1,
        "one post to the configured portal: {asked:?}"
    );
    assert!(asked[0].contains(PORTAL_KEY), "{}", asked[0]);
    assert!(
        stranger.heads().is_empty(),
        "the redirect was followed: {:?}",
        stranger.heads()
    );
    let webhook: Vec<_> = world
        .deliveries("Alpha")
        .await
        .into_iter()
        .filter(|d| d.0 == "webhook")
        .collect();
    assert_eq!(webhook.len(), 1, "{webhook:?}");
    let (_, status, error) = &webhook[0];
    assert_eq!(status, "pending", "a redirect is not a delivery: {error}");
    assert!(
        error.contains("302") && error.contains(&target),
        "names the Location: {error}"
    );
    common::invariants::assert_invariants(&world.app.db.connect().await).await;
}

#[tokio::test]
async fn grants_are_not_fetched_through_a_redirect_and_the_key_stays_home() {
    let stranger = Peer::start(&[("/secure/granted-credits/", Reply::ok("5000"))]).await;
    let target = format!("{}/secure/granted-credits/", stranger.base);
    let portal = Peer::start(&[("/secure/granted-credits/", Reply::redirect(307, &target))]).await;
    let client = os_credits::outbound::portal_client().expect("portal client");
    let base = url::Url::parse(&portal.base).expect("url");

    let result = portal::fetch_granted(&client, &base, PORTAL_KEY, "Alpha").await;

    let error = format!("{:#}", result.expect_err("a redirect is no grant"));
    assert!(
        error.contains("307") && error.contains(&target),
        "names the Location: {error}"
    );
    assert_eq!(portal.heads().len(), 1);
    assert!(
        stranger.heads().is_empty(),
        "the redirect was followed: {:?}",
        stranger.heads()
    );

    // An empty key sends no header at all (not an empty one).
    let _ = portal::fetch_granted(&client, &base, "", "Alpha").await;
    let heads = portal.heads();
    assert!(!has_header(&heads[1], "x-api-key"), "{}", heads[1]);
}

#[tokio::test]
async fn a_scrape_follows_redirects_but_carries_credentials_only_within_the_origin() {
    let body = "project_vcpu_usage{project_name=\"Alpha\"} 5\n";
    let other = Peer::start(&[("/metrics", Reply::ok(body))]).await;
    let to_other = format!("{}/metrics", other.base);
    let exporter = Peer::start(&[
        ("/away", Reply::redirect(302, &to_other)),
        ("/moved", Reply::redirect(301, "/final")),
        ("/final", Reply::ok(body)),
    ])
    .await;
    let targets = json!([
        {"url": format!("{}/away", exporter.base), "name": "away", "bearer_token": TOKEN},
        {"url": format!("{}/moved", exporter.base), "name": "moved", "bearer_token": TOKEN,
         "labels": {"site": "b"}},
    ])
    .to_string();
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets)]).await;

    let attempts = app.scrape().await;

    assert!(
        attempts.iter().all(|(_, a)| a.result == Ok(1)),
        "both targets stored their sample through the redirect: {attempts:?}"
    );
    let authorized = |head: &String| head.contains(&format!("Bearer {TOKEN}"));
    let heads = exporter.heads();
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(
        heads.iter().all(authorized),
        "same origin keeps the token: {heads:?}"
    );
    let stranger = other.heads();
    assert_eq!(stranger.len(), 1, "{stranger:?}");
    assert!(
        !has_header(&stranger[0], "authorization") && !stranger[0].contains(TOKEN),
        "the token went to another origin: {}",
        stranger[0]
    );
    common::invariants::assert_invariants(&app.db.connect().await).await;
}

// ---------------------------------------------------------------------------
// 5. A slow or missing final SMTP reply never sends the mail twice.

async fn smtp_world(smtp: &Smtp) -> World {
    let port = smtp.port.to_string();
    World::start(&[
        ("MAIL_SMTP_SERVER", "127.0.0.1"),
        ("MAIL_SMTP_PORT", &port),
        ("MAIL_NOT_STARTTLS", "true"),
        ("MAIL_SMTP_TIMEOUT", "3"),
    ])
    .await
}

#[tokio::test]
async fn a_final_smtp_reply_after_the_timeout_is_awaited_and_the_mail_sent_once() {
    // Later than every per-step bound of MAIL_SMTP_TIMEOUT=3 (and their sum).
    let smtp = Smtp::start(FinalReply::After(Duration::from_secs(10)));
    let world = smtp_world(&smtp).await;
    let t = now();
    world.project_over_half("Alpha", t).await;
    let notifier = world.notifier();

    let first = notifier.send_due(t).await.expect("send");
    let later = notifier
        .send_due(t + ChronoDuration::hours(2))
        .await
        .expect("send again");

    assert_eq!((first.sent, later.claimed()), (1, 0), "{first:?} {later:?}");
    assert_eq!(
        smtp.received(),
        1,
        "the server received the mail more than once"
    );
    let email: Vec<_> = world
        .deliveries("Alpha")
        .await
        .into_iter()
        .filter(|d| d.0 == "email")
        .collect();
    assert_eq!(email[0].1, "sent", "{email:?}");
    common::invariants::assert_invariants(&world.app.db.connect().await).await;
}

#[tokio::test]
async fn a_missing_final_smtp_reply_makes_the_mail_unknown_and_it_is_never_resent() {
    let smtp = Smtp::start(FinalReply::Never);
    let world = smtp_world(&smtp).await;
    let t = now();
    world.project_over_half("Alpha", t).await;
    let notifier = world.notifier();

    let first = notifier.send_due(t).await.expect("send");
    let later = notifier
        .send_due(t + ChronoDuration::hours(2))
        .await
        .expect("send again");

    assert_eq!(
        (first.unknown, later.claimed()),
        (1, 0),
        "{first:?} {later:?}"
    );
    assert_eq!(smtp.received(), 1, "the mail was sent again automatically");
    let email: Vec<_> = world
        .deliveries("Alpha")
        .await
        .into_iter()
        .filter(|d| d.0 == "email")
        .collect();
    assert_eq!(email[0].1, "unknown", "{email:?}");
    assert!(email[0].2.contains("resend it by hand"), "{email:?}");
    common::invariants::assert_invariants(&world.app.db.connect().await).await;
}

#[tokio::test]
async fn shutdown_cuts_the_wait_for_a_final_smtp_reply_short_and_leaves_the_mail_unknown() {
    let smtp = Smtp::start(FinalReply::Hang);
    let port = smtp.port.to_string();
    let world = World::start_workers(
        &[
            ("MAIL_SMTP_SERVER", "127.0.0.1"),
            ("MAIL_SMTP_PORT", &port),
            ("MAIL_NOT_STARTTLS", "true"),
            ("MAIL_SMTP_TIMEOUT", "3"),
        ],
        true,
    )
    .await;
    world.project_over_half("Alpha", now()).await;
    common::eventually(
        Duration::from_secs(60),
        "the mail at the server",
        || async { (smtp.received() == 1).then_some(()) },
    )
    .await;

    // The sender now waits for the final reply (up to 10 minutes); stopping the
    // service ends the wait within the workers' grace period.
    let db = world.app.shutdown().await;

    let status: String = db
        .connect()
        .await
        .query_one(
            "SELECT status FROM notification_deliveries WHERE channel = 'email'",
            &[],
        )
        .await
        .expect("the email delivery")
        .get(0);
    assert_eq!(status, "unknown");
    assert_eq!(smtp.received(), 1);
    common::invariants::assert_invariants(&db.connect().await).await;
}

// ---------------------------------------------------------------------------
// 10. Strings from users are logged escaped: no forged log lines.

/// The real binary, its log lines collected as they come.
struct Binary {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    address: String,
}

impl Binary {
    async fn start(db: &common::TestDb, vars: &[(&str, &str)]) -> Self {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_os-credits"));
        command
            .envs(db.vars())
            .envs(vars.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("start the binary");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                collected.lock().expect("lock").push(line);
            }
        });
        let port = common::eventually(Duration::from_secs(60), "the listening line", || {
            let lines = lines.clone();
            async move {
                let lines = lines.lock().expect("lock");
                lines
                    .iter()
                    .filter(|l| l.contains("listening"))
                    .find_map(|l| {
                        let at = l
                            .find("port=")
                            .map(|i| i + 5)
                            .or_else(|| l.find("\"port\":").map(|i| i + 7))?;
                        let digits: String =
                            l[at..].chars().take_while(char::is_ascii_digit).collect();
                        digits.parse::<u16>().ok()
                    })
            }
        })
        .await;
        Self {
            child,
            lines,
            address: format!("http://127.0.0.1:{port}"),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const FORGED_TEXT: &str = "1999-01-01T00:00:00.000000Z ERROR os_credits::forged: FORGED LINE";
const FORGED_JSON: &str = r#"{"timestamp":"1999-01-01T00:00:00.000000Z","level":"ERROR","fields":{"message":"FORGED LINE"},"target":"os_credits::forged"}"#;

/// Grants and charges a project whose name carries forged log lines; waits until the
/// notification sender has logged it.
async fn log_an_evil_project(binary: &Binary) -> String {
    let evil = format!("Evil\n{FORGED_TEXT}\r\n{FORGED_JSON}\u{1b}[2J");
    let path: String = url::form_urlencoded::byte_serialize(evil.as_bytes())
        .collect::<String>()
        .replace('+', "%20");
    let http = reqwest::Client::new();
    let grant = http
        .put(format!("{}/api/projects/{path}/grant", binary.address))
        .header("X-API-KEY", KEY)
        .json(&json!({ "granted_credits": 100 }))
        .send()
        .await
        .expect("grant");
    assert_eq!(grant.status(), 200);
    let adjusted = http
        .post(format!(
            "{}/api/projects/{path}/adjustments",
            binary.address
        ))
        .header("X-API-KEY", KEY)
        .json(&json!({ "credits": 60, "reason": format!("usage\n{FORGED_TEXT}") }))
        .send()
        .await
        .expect("adjust");
    assert_eq!(adjusted.status(), 201);
    common::eventually(Duration::from_secs(60), "the sender's log line", || async {
        binary
            .lines()
            .iter()
            .any(|l| l.contains("notification skipped") || l.contains("notification sent"))
            .then_some(())
    })
    .await;
    evil
}

#[tokio::test]
async fn a_project_name_with_line_breaks_cannot_forge_text_log_lines() {
    let db = common::TestDb::create().await;
    let dir = mail_dir();
    let binary = Binary::start(
        &db,
        &[
            ("API_KEY", KEY),
            ("LOG_FORMAT", "text"),
            ("MAIL_FILE_DIR", &dir),
        ],
    )
    .await;

    log_an_evil_project(&binary).await;

    let lines = binary.lines();
    let logged: Vec<&String> = lines.iter().filter(|l| l.contains("Evil")).collect();
    assert!(!logged.is_empty(), "the project was logged: {lines:#?}");
    for line in &lines {
        assert!(
            !line.starts_with("1999-01-01") && !line.starts_with('{') && !line.contains('\u{1b}'),
            "a forged or raw line: {line:?}\n{lines:#?}"
        );
    }
    assert!(
        logged.iter().any(|l| l.contains("Evil\\n1999-01-01")),
        "escaped, still readable: {logged:#?}"
    );
    common::invariants::assert_invariants(&db.connect().await).await;
}

#[tokio::test]
async fn a_project_name_with_line_breaks_cannot_forge_json_log_lines() {
    let db = common::TestDb::create().await;
    let dir = mail_dir();
    let binary = Binary::start(
        &db,
        &[
            ("API_KEY", KEY),
            ("LOG_FORMAT", "json"),
            ("MAIL_FILE_DIR", &dir),
        ],
    )
    .await;

    let evil = log_an_evil_project(&binary).await;

    let lines = binary.lines();
    let entries: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON entry ({e}): {l:?}"))
        })
        .collect();
    assert!(
        entries.iter().all(|e| e["target"] != "os_credits::forged"),
        "{lines:#?}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["fields"]["project"] == evil.as_str()),
        "the project is logged, whole: {lines:#?}"
    );
    common::invariants::assert_invariants(&db.connect().await).await;
}

// ---------------------------------------------------------------------------
// 8. One bad label drops only its sample.

#[tokio::test]
async fn samples_that_cannot_be_stored_or_served_are_dropped_counted_and_the_rest_stores() {
    let long = "x".repeat(256);
    let body = format!(
        "project_vcpu_usage{{project_name=\"Good\"}} 1\n\
         project_vcpu_usage{{project_name=\"Good\",flavor=\"a\0b\"}} 2\n\
         project_vcpu_usage{{project_name=\"   \"}} 3\n\
         project_vcpu_usage{{project_name=\"{long}\"}} 4\n\
         project_vcpu_usage{{project_name=\"Nul\0name\"}} 5\n\
         project_mb_usage{{project_name=\"Good\"}} 6\n"
    );
    let exporter = Peer::start(&[("/metrics", Reply::ok(&body))]).await;
    let targets = json!([{"url": format!("{}/metrics", exporter.base), "name": "nul-labels"}]);
    let app = spawn_app(&[("SCRAPE_TARGETS", &targets.to_string())]).await;

    let first = app.scrape().await;
    let second = app.scrape().await;

    assert_eq!(
        first[0].1.result,
        Ok(2),
        "the good samples store: {first:?}"
    );
    assert!(second[0].1.result.is_ok(), "and keep storing: {second:?}");
    let stored: Vec<(String, String)> = app
        .samples()
        .await
        .into_iter()
        .map(|(metric, project, ..)| (metric, project))
        .collect();
    let good = |metric: &str| (metric.to_owned(), "Good".to_owned());
    assert_eq!(
        stored,
        [
            good("project_mb_usage"),
            good("project_mb_usage"),
            good("project_vcpu_usage"),
            good("project_vcpu_usage")
        ],
        "both scrapes stored the good samples, and only those"
    );
    assert_eq!(app.target_status("nul-labels").await["up"], true);
    let metrics = app.get("/metrics").await.text().await.expect("metrics");
    let dropped = |reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("os_credits_samples_dropped_total")
                    && l.contains("target=\"nul-labels\"")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(dropped("nul_label").as_deref(), Some("2"), "{metrics}");
    assert_eq!(dropped("bad_project").as_deref(), Some("6"), "{metrics}");
    common::invariants::assert_invariants(&app.db.connect().await).await;
}

// ---------------------------------------------------------------------------
// 7. A slow target delays only itself.

/// A slow-loris exporter: answers every request with a head promising a body, then
/// one byte a second.
async fn slow_loris() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/metrics", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    .await;
                while stream.write_all(b"#").await.is_ok() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn a_slow_target_delays_only_itself() {
    let healthy = Peer::start(&[(
        "/metrics",
        Reply::ok("project_vcpu_usage{project_name=\"Alpha\"} 1\n"),
    )])
    .await;
    let targets = json!([
        {"url": slow_loris().await, "name": "slow"},
        {"url": format!("{}/metrics", healthy.base), "name": "healthy"},
    ])
    .to_string();
    let app = common::spawn_app_on(
        common::TestDb::create().await,
        &[
            ("SCRAPE_TARGETS", &targets),
            ("SCRAPE_INTERVAL", "0.5"),
            ("SCRAPE_TIMEOUT", "3"),
            ("OS_CREDITS_WORKERS", "1"),
        ],
        true,
    )
    .await;

    // Two slow attempts take at least two timeouts: 12 intervals of the healthy one.
    common::eventually(Duration::from_secs(60), "two slow scrapes", || async {
        let slow = app.target_status("slow").await;
        (slow["scrapes_total"].as_i64() >= Some(2)).then_some(())
    })
    .await;
    let healthy_samples = app.sample_count().await;

    assert!(
        healthy_samples >= 6,
        "the healthy target kept its own schedule: {healthy_samples} samples while the slow one timed out twice (one per slow scrape would mean it waited)"
    );
    assert_eq!(app.target_status("slow").await["up"], false);
    let db = app.shutdown().await;
    common::invariants::assert_invariants(&db.connect().await).await;
}

// ---------------------------------------------------------------------------
// 11. Small input and conformance gaps.

/// A case: what it is, method, path, JSON body, the statuses that are right.
type BadInput<'a> = (
    &'a str,
    reqwest::Method,
    &'a str,
    Option<&'a str>,
    &'a [u16],
);

#[tokio::test]
async fn bad_input_is_a_json_400_and_every_405_says_what_is_allowed() {
    let world = World::start(&[]).await;
    let (status, body) = world
        .call(
            reqwest::Method::PUT,
            "/api/projects/Alpha/grant",
            Some(json!({ "granted_credits": 100 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let cases: Vec<BadInput> = vec![
        (
            "NUL in a project name",
            reqwest::Method::GET,
            "/api/current_credits/a%00b",
            None,
            &[400],
        ),
        (
            "NUL in a grant reason",
            reqwest::Method::PUT,
            "/api/projects/Alpha/grant",
            Some(r#"{"granted_credits": 1, "reason": "a\u0000b"}"#),
            &[400],
        ),
        (
            "NUL in an adjustment reason",
            reqwest::Method::POST,
            "/api/projects/Alpha/adjustments",
            Some(r#"{"credits": 1, "reason": "a\u0000b"}"#),
            &[400],
        ),
        (
            "a date before PostgreSQL's range",
            reqwest::Method::GET,
            "/api/credits_history/Alpha?start_date=-4713-01-01%2000:00:00",
            None,
            &[400],
        ),
        (
            "a year past 9999",
            reqwest::Method::GET,
            "/api/credits_history/Alpha?end_date=+10000-01-01%2000:00:00",
            None,
            &[400],
        ),
        (
            "invalid UTF-8 in a path",
            reqwest::Method::GET,
            "/api/current_credits/%FF",
            None,
            &[400],
        ),
        (
            "invalid UTF-8 in a query",
            reqwest::Method::GET,
            "/api/credits_history/Alpha?step=%FF",
            None,
            &[400],
        ),
        (
            "more precision than a float holds",
            reqwest::Method::PUT,
            "/api/projects/Alpha/grant",
            Some(r#"{"granted_credits": 1.00000000000000000000001}"#),
            &[400],
        ),
        (
            "underscores in a number",
            reqwest::Method::PUT,
            "/api/projects/Alpha/grant",
            Some(r#"{"granted_credits": "1_000"}"#),
            &[400],
        ),
        (
            "a number with too many digits",
            reqwest::Method::POST,
            "/api/costs_per_hour",
            Some(r#"{"project_vcpu_usage": 1.00000000000000000000000000001}"#),
            &[400],
        ),
    ];
    for (case, method, path, body, expected) in cases {
        let mut request = world
            .app
            .http
            .request(method, format!("{}{path}", world.app.address))
            .header("X-API-KEY", KEY);
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        assert!(expected.contains(&status), "{case}: {status} {text}");
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{case}: not a JSON error ({e}): {text}"));
        assert!(json["error"].is_string(), "{case}: {json}");
    }
    let (status, body) = world
        .call(reqwest::Method::GET, "/api/current_credits/Alpha", None)
        .await;
    assert_eq!(
        (status, &body["granted_credits"]),
        (200, &json!(100.0)),
        "nothing changed: {body}"
    );

    let not_allowed = [
        (reqwest::Method::DELETE, "/api/projects/Alpha/grant", "PUT"),
        (reqwest::Method::POST, "/ping", "GET"),
        (reqwest::Method::GET, "/api/costs_per_hour", "POST"),
        (
            reqwest::Method::DELETE,
            "/api/projects/Alpha/contacts",
            "GET, PUT",
        ),
        (reqwest::Method::PUT, "/health", "GET"),
    ];
    for (method, path, allow) in not_allowed {
        let response = world
            .app
            .http
            .request(method.clone(), format!("{}{path}", world.app.address))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 405, "{method} {path}");
        let header = response
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        assert_eq!(header.as_deref(), Some(allow), "{method} {path}");
    }
    common::invariants::assert_invariants(&world.app.db.connect().await).await;
}

#[tokio::test]
async fn health_forgets_a_target_removed_from_scrape_targets() {
    let exporter = Peer::start(&[("/metrics", Reply::ok("# nothing\n"))]).await;
    let url = format!("{}/metrics", exporter.base);
    let both = json!([{"url": url, "name": "kept"}, {"url": common::exporter::refused_url(), "name": "removed"}]);
    let app = spawn_app(&[("SCRAPE_TARGETS", &both.to_string())]).await;
    app.scrape().await;
    assert_eq!(
        app.health().await["status"],
        "degraded",
        "the refused target is down"
    );
    let db = app.shutdown().await;

    let one = json!([{"url": url, "name": "kept"}]);
    let app = common::spawn_app_on(db, &[("SCRAPE_TARGETS", &one.to_string())], false).await;
    app.scrape().await;

    let health = app.health().await;
    let names: Vec<&str> = health["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["kept"], "{health}");
    assert_eq!(health["status"], "ok", "{health}");
}
