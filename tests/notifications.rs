//! Low-credit notifications end to end: billing crosses a threshold, the sender
//! delivers to a real SMTP server on loopback (mailin-embedded) and to a recording
//! portal. The sender is driven with `send_due(now)`, so retries run on the test's
//! clock.

mod common;

use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use common::exporter::{Answer, FixtureExporter};
use common::{eventually, spawn_app, spawn_app_on, TestApp};
use mailin_embedded::response::{NO_MAILBOX, OK};
use mailin_embedded::{Handler, Response, Server};
use os_credits::billing::engine;
use os_credits::config::Settings;
use os_credits::notify::{Notifier, SendSummary};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "test-key-4711";
const FROM: &str = "\"Cloud Credits\" <credits@example.org>";
const GOVERNANCE: &str = "governance@example.org";
const OWNER: &str = "owner@example.org";

// ---------------------------------------------------------------------------
// A real SMTP server on loopback.

/// One message the SMTP server accepted.
#[derive(Debug, Clone)]
struct Mail {
    envelope_to: Vec<String>,
    headers: BTreeMap<String, String>,
    /// The text/plain part, decoded.
    text: String,
    /// The text/html part, decoded.
    html: String,
    raw: String,
}

impl Mail {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {name} header in {}", self.raw))
    }
}

#[derive(Clone, Default)]
struct Sink {
    mails: Arc<Mutex<Vec<Mail>>>,
    envelope: Vec<String>,
    data: Vec<u8>,
    hold: Arc<Hold>,
}

/// Holds the next message at the end of DATA (before the server answers) until
/// released: a sender is certainly in the middle of a delivery.
#[derive(Default)]
struct Hold {
    /// (hold the next message, a message is held)
    state: Mutex<(bool, bool)>,
    released: std::sync::Condvar,
}

impl Handler for Sink {
    fn rcpt(&mut self, to: &str) -> Response {
        if to.starts_with("reject") {
            NO_MAILBOX
        } else if to.starts_with("busy") {
            Response::custom(450, "Mailbox busy, try later".into())
        } else {
            OK
        }
    }

    fn data_start(&mut self, _domain: &str, _from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.envelope = to.to_vec();
        self.data.clear();
        OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let mut state = self.hold.state.lock().expect("lock");
        if state.0 {
            *state = (false, true);
            while state.1 {
                state = self.hold.released.wait(state).expect("lock");
            }
        }
        drop(state);
        let raw = String::from_utf8_lossy(&self.data).into_owned();
        let mail = parse_mail(&raw, std::mem::take(&mut self.envelope));
        self.mails.lock().expect("lock").push(mail);
        OK
    }
}

struct SmtpServer {
    port: u16,
    mails: Arc<Mutex<Vec<Mail>>>,
    hold: Arc<Hold>,
}

impl SmtpServer {
    fn start() -> Self {
        Self::serve(std::net::TcpListener::bind("127.0.0.1:0").expect("bind SMTP"))
    }

    /// Starts listening on a port held by `common::reserved_port` (the server coming
    /// up where connections were refused until now).
    fn start_on(socket: tokio::net::TcpSocket) -> Self {
        let listener = socket
            .listen(64)
            .and_then(|listener| listener.into_std())
            .expect("listen SMTP");
        listener.set_nonblocking(false).expect("blocking listener");
        Self::serve(listener)
    }

    /// Serves `listener` from a thread for the rest of the test run.
    fn serve(listener: std::net::TcpListener) -> Self {
        let port = listener.local_addr().expect("address").port();
        let sink = Sink::default();
        let (mails, hold) = (sink.mails.clone(), sink.hold.clone());
        let mut server = Server::new(sink);
        server
            .with_name("smtp.test")
            .with_num_threads(16)
            .with_tcp_listener(listener);
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        Self { port, mails, hold }
    }

    fn mails(&self) -> Vec<Mail> {
        self.mails.lock().expect("lock").clone()
    }

    /// The next message is held at the end of DATA until `release`.
    fn hold_next(&self) {
        self.hold.state.lock().expect("lock").0 = true;
    }

    fn holds_one(&self) -> bool {
        self.hold.state.lock().expect("lock").1
    }

    fn release(&self) {
        self.hold.state.lock().expect("lock").1 = false;
        self.hold.released.notify_all();
    }
}

fn parse_mail(raw: &str, envelope_to: Vec<String>) -> Mail {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let headers = parse_headers(head);
    let boundary = headers
        .get("content-type")
        .and_then(|ct| ct.split("boundary=").nth(1))
        .map(|b| b.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("not multipart: {raw}"));
    let (mut text, mut html) = (String::new(), String::new());
    for part in body.split(&format!("--{boundary}")) {
        let Some((part_head, part_body)) = part.split_once("\r\n\r\n") else {
            continue;
        };
        let part_headers = parse_headers(part_head.trim_start());
        let decoded = match part_headers
            .get("content-transfer-encoding")
            .map(String::as_str)
        {
            Some("quoted-printable") => quoted_printable(part_body),
            Some("7bit") | Some("8bit") | None => part_body.to_owned(),
            Some(other) => panic!("unexpected encoding {other}"),
        };
        match part_headers.get("content-type") {
            Some(ct) if ct.starts_with("text/plain") => text = decoded,
            Some(ct) if ct.starts_with("text/html") => html = decoded,
            _ => {}
        }
    }
    Mail {
        envelope_to,
        headers,
        text,
        html,
        raw: raw.to_owned(),
    }
}

/// Header name (lower case) → unfolded value.
fn parse_headers(head: &str) -> BTreeMap<String, String> {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    let mut last = String::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(value) = headers.get_mut(&last) {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            last = name.to_ascii_lowercase();
            headers.insert(last.clone(), value.trim().to_owned());
        }
    }
    headers
}

/// What a browser reads from escaped HTML text.
fn unescape(html: &str) -> String {
    html.replace("&#x2f;", "/")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&amp;", "&")
}

fn quoted_printable(encoded: &str) -> String {
    let bytes = encoded.replace("=\r\n", "").into_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// The service, usage and the sender.

/// The test's clock: whole seconds, so stored times compare equal.
fn now() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(ChronoDuration::seconds(1))
        .expect("truncate")
}

fn smtp_vars(port: u16) -> Vec<(String, String)> {
    [
        ("API_KEY", KEY.to_owned()),
        ("MAIL_SMTP_SERVER", "127.0.0.1".to_owned()),
        ("MAIL_SMTP_PORT", port.to_string()),
        ("MAIL_NOT_STARTTLS", "true".to_owned()),
        ("MAIL_SMTP_TIMEOUT", "5".to_owned()),
        ("MAIL_FROM", FROM.to_owned()),
        ("CLOUD_GOVERNANCE_MAIL", GOVERNANCE.to_owned()),
        ("PUBLIC_BASE_URL", "https://credits.example.org".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The service plus the settings its sender and billing use.
struct World {
    app: TestApp,
    vars: Vec<(String, String)>,
}

impl World {
    async fn start(port: u16, extra: &[(&str, &str)]) -> Self {
        let mut vars = smtp_vars(port);
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let borrowed: Vec<(&str, &str)> =
            vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let app = spawn_app(&borrowed).await;
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

    async fn bill(&self, at: DateTime<Utc>) -> engine::BillingSummary {
        engine::run(&self.app.app_pool, self.settings().billing(), at)
            .await
            .expect("billing run")
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

    async fn grant(&self, project: &str, credits: u32) {
        let path = format!("/api/projects/{}/grant", encode(project));
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &path,
                Some(json!({ "granted_credits": credits })),
            )
            .await;
        assert_eq!(status, 200, "grant: {body}");
    }

    async fn contacts(&self, project: &str, emails: &[&str]) {
        let path = format!("/api/projects/{}/contacts", encode(project));
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &path,
                Some(json!({ "emails": emails })),
            )
            .await;
        assert_eq!(status, 200, "contacts: {body}");
    }

    async fn notifications(&self, project: &str) -> Vec<Value> {
        let path = format!("/api/projects/{}/notifications", encode(project));
        let (status, body) = self.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "notifications: {body}");
        body.as_array().expect("a list").clone()
    }

    /// A vCPU counter series of `project` (price 1 per unit) with `values` at the
    /// given times: the first value only sets the cursor, each increase is charged.
    async fn usage(&self, project: &str, samples: &[(DateTime<Utc>, f64)]) {
        let mut client = self.app.db.connect().await;
        let id = common::seed_series(
            &mut client,
            "project_vcpu_usage",
            &[("project_name", project)],
            project,
        )
        .await;
        for (time, value) in samples {
            client
                .execute(
                    "INSERT INTO usage_samples (series_id, time, value) VALUES ($1, $2, $3)",
                    &[&id, time, value],
                )
                .await
                .expect("sample");
        }
    }

    async fn deliveries(&self) -> Vec<(String, String, i32, Option<String>)> {
        self.app
            .db
            .connect()
            .await
            .query(
                "SELECT n.threshold::text, d.channel || ':' || d.status, d.attempts, d.last_error
                 FROM notification_deliveries d JOIN notifications n ON n.id = d.notification_id
                 ORDER BY n.id, d.channel",
                &[],
            )
            .await
            .expect("deliveries")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }

    async fn email_delivery(&self) -> (String, i32, Option<String>, Option<DateTime<Utc>>) {
        let row = self
            .app
            .db
            .connect()
            .await
            .query_one(
                "SELECT status, attempts, last_error, next_attempt_at FROM notification_deliveries
                 WHERE channel = 'email'",
                &[],
            )
            .await
            .expect("one email delivery");
        (row.get(0), row.get(1), row.get(2), row.get(3))
    }
}

fn encode(project: &str) -> String {
    url::form_urlencoded::byte_serialize(project.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn hours(h: i64) -> ChronoDuration {
    ChronoDuration::hours(h)
}

async fn send(notifier: &Notifier, at: DateTime<Utc>) -> SendSummary {
    notifier.send_due(at).await.expect("send_due")
}

/// A project granted 100 credits with its owner as contact, that used `used` credits
/// by `now` (starting two hours before).
async fn project_at(world: &World, project: &str, used: f64, at: DateTime<Utc>) {
    world.grant(project, 100).await;
    world.contacts(project, &[OWNER]).await;
    world
        .usage(project, &[(at - hours(2), 0.0), (at - hours(1), used)])
        .await;
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn crossing_half_the_grant_sends_one_mail_with_the_right_headers_and_values() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    let notifier = world.notifier();

    world.bill(t).await;
    let sent = send(&notifier, t).await;

    assert_eq!(
        (sent.sent, sent.skipped),
        (1, 1),
        "the mail; the webhook is not configured"
    );
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "exactly one mail");
    let mail = &mails[0];
    assert_eq!(mail.header("From"), FROM);
    assert_eq!(mail.header("To"), OWNER);
    assert_eq!(mail.header("Cc"), GOVERNANCE);
    assert_eq!(
        mail.header("Subject"),
        "Alpha: 50% of the granted credits used"
    );
    assert_eq!(mail.envelope_to, [OWNER, GOVERNANCE]);
    for part in [&mail.text, &unescape(&mail.html)] {
        for value in [
            "Alpha",
            "60.00",
            "100.00",
            "40.00",
            "60%",
            "half limit reached",
        ] {
            assert!(part.contains(value), "{value} missing from {part}");
        }
        assert!(
            part.contains("https://credits.example.org/credits_history/Alpha"),
            "{part}"
        );
    }
    // 60 credits in the 2 hours since the project's first usage (not over the whole
    // 24 h window) burn 30 per hour: 40 left last 1 h 20 min.
    let run_out = (t + ChronoDuration::minutes(80))
        .format("%Y-%m-%d %H:%M UTC")
        .to_string();
    assert!(mail.text.contains("the last 2 hours"), "{}", mail.text);
    assert!(
        mail.text.contains(&run_out),
        "forecast {run_out} in {}",
        mail.text
    );
    assert_eq!(
        world.deliveries().await,
        [
            ("0.5".into(), "email:sent".into(), 1, None),
            (
                "0.5".into(),
                "webhook:skipped".into(),
                1,
                Some("MAIL_CONTACT_URL is not set".into())
            ),
        ]
    );

    world.bill(t).await;
    assert_eq!(
        send(&notifier, t + hours(1)).await,
        SendSummary::default(),
        "re-billing sends nothing"
    );

    world.usage("Alpha", &[(t + hours(1), 100.0)]).await;
    world.bill(t + hours(1)).await;
    let sent = send(&notifier, t + hours(1)).await;

    assert_eq!(sent.sent, 1);
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2, "one more mail at 100 %");
    assert_eq!(
        mails[1].header("Subject"),
        "Alpha: 100% of the granted credits used"
    );
    assert!(
        mails[1].text.contains("full limit reached"),
        "{}",
        mails[1].text
    );
    let listed = world.notifications("Alpha").await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["threshold"], "1");
    assert_eq!(listed[0]["used_credits"], "100.00");
    assert_eq!(listed[0]["cause"], "usage");
    assert_eq!(listed[1]["limit_type"], "half limit reached");
    assert_eq!(listed[1]["deliveries"][0]["channel"], "email");
    assert_eq!(listed[1]["deliveries"][0]["status"], "sent");
}

#[tokio::test]
async fn crossing_several_thresholds_at_once_writes_one_notification_each() {
    let smtp = SmtpServer::start();
    let world = World::start(
        smtp.port,
        &[("NOTIFICATION_THRESHOLDS", "0.5,0.75,0.9,1.0")],
    )
    .await;
    let t = now();
    project_at(&world, "Alpha", 95.0, t).await;
    world.grant("Idle", 0).await;
    world
        .usage("Idle", &[(t - hours(2), 0.0), (t - hours(1), 50.0)])
        .await;

    world.bill(t).await;
    let sent = send(&world.notifier(), t).await;

    assert_eq!(
        sent.sent, 3,
        "0.5, 0.75 and 0.9; a project without grant never"
    );
    let mut subjects: Vec<String> = smtp
        .mails()
        .iter()
        .map(|m| m.header("Subject").to_owned())
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "Alpha: 50% of the granted credits used",
            "Alpha: 75% of the granted credits used",
            "Alpha: 90% of the granted credits used",
        ]
    );
}

#[tokio::test]
async fn the_sender_runs_inside_serve_and_stops_with_it() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    world.bill(t).await;
    let vars = world.vars.clone();
    let db = world.app.shutdown().await;

    let borrowed: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let app = spawn_app_on(db, &borrowed, true).await;
    let mails = eventually(Duration::from_secs(20), "the mail", || async {
        Some(smtp.mails()).filter(|m| !m.is_empty())
    })
    .await;
    tokio::time::timeout(Duration::from_secs(20), app.shutdown())
        .await
        .expect("the service and its workers stop");

    assert_eq!(mails.len(), 1);
    assert_eq!(
        mails[0].header("Subject"),
        "Alpha: 50% of the granted credits used"
    );
}

#[tokio::test]
async fn a_restarted_service_or_a_second_replica_sends_nothing_again() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    for i in 0..5 {
        world.grant(&format!("p{i}"), 100).await;
        world.contacts(&format!("p{i}"), &[OWNER]).await;
        world
            .usage(
                &format!("p{i}"),
                &[(t - hours(2), 0.0), (t - hours(1), 70.0)],
            )
            .await;
    }
    // Two replicas bill and send at the same time.
    let twin = World {
        app: spawn_app_on(
            common::TestDb {
                name: world.app.db.name.clone(),
                server: common::PgServer::from_env(),
            },
            &[],
            false,
        )
        .await,
        vars: world.vars.clone(),
    };
    let (a, b) = tokio::join!(world.bill(t), twin.bill(t));
    // The second either skips the projects the first holds or, when the first has
    // committed already, finds nothing new in them: each usage is billed once.
    assert_eq!(
        (
            a.samples_billed + b.samples_billed,
            a.ledger_rows + b.ledger_rows,
            a.credits_billed + b.credits_billed
        ),
        (12, 6, rust_decimal::Decimal::from(410))
    );
    // Replica one is held in the middle of its first delivery; the other sends
    // meanwhile: the two senders overlap for certain.
    let (one, other) = (world.notifier(), twin.notifier());
    smtp.hold_next();
    let a = tokio::spawn(async move { send(&one, t).await });
    eventually(
        Duration::from_secs(30),
        "a delivery held by the server",
        || async { smtp.holds_one().then_some(()) },
    )
    .await;
    let b = send(&other, t).await;
    smtp.release();
    let a = a.await.expect("task");
    assert_eq!(
        (a.sent, b.sent),
        (1, 5),
        "each crossing sent by one replica; the one in flight is not sent twice"
    );
    std::mem::forget(twin.app.db);

    // A restart: a new service on the same database bills and sends again.
    let vars = world.vars.clone();
    let db = world.app.shutdown().await;
    let borrowed: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let world = World {
        app: spawn_app_on(db, &borrowed, false).await,
        vars,
    };
    world.bill(t).await;
    world.bill(t + hours(1)).await;
    let again = send(&world.notifier(), t + hours(2)).await;

    assert_eq!(again, SendSummary::default());
    assert_eq!(smtp.mails().len(), 6, "every crossing mailed exactly once");
}

#[tokio::test]
async fn raising_the_grant_re_arms_and_crossing_again_notifies_again() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    let notifier = world.notifier();
    world.bill(t).await;
    send(&notifier, t).await;

    // 60 of 110: still above half, nothing is re-armed or sent.
    world.grant("Alpha", 110).await;
    world.usage("Alpha", &[(t + hours(1), 61.0)]).await;
    world.bill(t + hours(1)).await;
    assert_eq!(send(&notifier, t + hours(1)).await.sent, 0);
    // 61 of 200: below half again (re-armed); 101 crosses half of 200.
    world.grant("Alpha", 200).await;
    world.usage("Alpha", &[(t + hours(2), 101.0)]).await;
    world.bill(t + hours(2)).await;
    let sent = send(&notifier, t + hours(2)).await;

    assert_eq!(sent.sent, 1);
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2);
    assert!(mails[1].text.contains("200.00"), "{}", mails[1].text);
    assert!(mails[1].text.contains("101.00"), "{}", mails[1].text);
}

#[tokio::test]
async fn lowering_the_grant_below_the_usage_notifies() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 30.0, t).await;
    world.bill(t).await;

    world.grant("Alpha", 50).await;
    let sent = send(&world.notifier(), Utc::now()).await;

    assert_eq!(sent.sent, 1, "30 of 50 crosses half");
    let listed = world.notifications("Alpha").await;
    assert_eq!(listed[0]["cause"], "grant");
    assert_eq!(listed[0]["granted_credits"], "50.00");
    assert_eq!(
        smtp.mails()[0].header("Subject"),
        "Alpha: 50% of the granted credits used"
    );
}

#[tokio::test]
async fn a_positive_adjustment_that_crosses_a_threshold_notifies() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 30.0, t).await;
    world.bill(t).await;
    let path = format!("/api/projects/{}/adjustments", encode("Alpha"));

    let (status, body) = world
        .call(
            reqwest::Method::POST,
            &path,
            Some(json!({"credits": "25", "reason": "manual charge"})),
        )
        .await;
    let sent = send(&world.notifier(), Utc::now()).await;

    assert_eq!(status, 201, "{body}");
    assert_eq!(sent.sent, 1, "30 + 25 of 100 crosses half");
    let listed = world.notifications("Alpha").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["cause"], "adjustment");
    assert_eq!(listed[0]["used_credits"], "55.00", "{listed:?}");
    assert_eq!(
        smtp.mails()[0].header("Subject"),
        "Alpha: 50% of the granted credits used"
    );
}

#[tokio::test]
async fn a_grant_lowered_by_the_portal_sync_notifies() {
    let smtp = SmtpServer::start();
    let portal = FixtureExporter::start(Answer::ok("50\n")).await;
    let base = portal.url.trim_end_matches("/metrics").to_owned();
    let world = World::start(smtp.port, &[("API_CONTACT_BASE_URL", &base)]).await;
    let t = now();
    project_at(&world, "Alpha", 30.0, t).await;
    world.bill(t).await;

    let settings = world.settings();
    let synced = os_credits::billing::portal::sync_grants(
        &world.app.app_pool,
        settings.portal(),
        &reqwest::Client::new(),
    )
    .await
    .expect("sync");
    let sent = send(&world.notifier(), Utc::now()).await;

    assert_eq!(synced.failed, 0, "{synced:?}");
    assert_eq!(sent.sent, 1, "30 of the portal's 50 crosses half");
    let listed = world.notifications("Alpha").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["cause"], "grant");
    assert_eq!(listed[0]["granted_credits"], "50.00");
}

#[tokio::test]
async fn resending_while_the_mail_is_being_sent_is_refused_and_a_resent_mail_keeps_its_message_id()
{
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    world.bill(t).await;
    let id = world.notifications("Alpha").await[0]["id"]
        .as_i64()
        .expect("notification id");
    let resend = format!("/api/notifications/{id}/resend?channel=email");

    smtp.hold_next();
    let notifier = world.notifier();
    let sending = tokio::spawn(async move { send(&notifier, t).await });
    eventually(
        Duration::from_secs(30),
        "the mail held mid-DATA",
        || async { smtp.holds_one().then_some(()) },
    )
    .await;
    let (while_sending, refusal) = world.call(reqwest::Method::POST, &resend, None).await;
    smtp.release();
    let first = sending.await.expect("task");
    let (after, _) = world.call(reqwest::Method::POST, &resend, None).await;
    let again = send(&world.notifier(), Utc::now()).await;

    assert_eq!(while_sending, 409, "{refusal}");
    assert!(refusal["error"].is_string(), "{refusal}");
    assert_eq!((first.sent, after, again.sent), (1, 200, 1));
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2, "sent, then resent by hand");
    let expected = format!("<os-credits-notification-{id}@example.org>");
    assert_eq!(mails[0].header("Message-ID"), expected);
    assert_eq!(
        mails[1].header("Message-ID"),
        expected,
        "a copy is recognisable as the same mail"
    );
}

#[tokio::test]
async fn notification_to_overwrite_redirects_every_recipient() {
    let smtp = SmtpServer::start();
    let world = World::start(
        smtp.port,
        &[("NOTIFICATION_TO_OVERWRITE", "test@example.org")],
    )
    .await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    world
        .contacts("Alpha", &[OWNER, "second@example.org"])
        .await;

    world.bill(t).await;
    send(&world.notifier(), t).await;

    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].header("To"), "test@example.org");
    assert!(
        !mails[0].headers.contains_key("cc"),
        "no Cc: {}",
        mails[0].raw
    );
    assert_eq!(mails[0].envelope_to, ["test@example.org"]);
}

#[tokio::test]
async fn mail_waits_while_the_smtp_server_is_down_and_is_delivered_once_when_it_is_back() {
    let (socket, port) = common::reserved_port();
    let world = World::start(port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    let notifier = world.notifier();
    world.bill(t).await;

    let down = send(&notifier, t).await;
    let (status, attempts, error, next) = world.email_delivery().await;

    assert_eq!(down.retried, 1);
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert!(
        error.unwrap_or_default().to_lowercase().contains("connect"),
        "the reason is kept"
    );
    assert_eq!(
        next,
        Some(t + ChronoDuration::minutes(1)),
        "retried after a minute"
    );
    assert_eq!(
        send(&notifier, t + ChronoDuration::seconds(30)).await,
        SendSummary::default(),
        "not before"
    );

    let smtp = SmtpServer::start_on(socket);
    let back = send(&notifier, t + ChronoDuration::minutes(1)).await;

    assert_eq!(back.sent, 1);
    assert_eq!(smtp.mails().len(), 1);
    assert_eq!(send(&notifier, t + hours(5)).await, SendSummary::default());
    assert_eq!(smtp.mails().len(), 1, "delivered once");
    assert_eq!(world.email_delivery().await.0, "sent");
}

#[tokio::test]
async fn a_rejected_recipient_fails_with_the_reason_and_a_busy_one_is_retried_until_given_up() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    world.contacts("Alpha", &["rejected@example.org"]).await;
    let notifier = world.notifier();
    world.bill(t).await;

    let rejected = send(&notifier, t).await;
    let (status, attempts, error, _) = world.email_delivery().await;

    assert_eq!(rejected.failed, 1, "a permanent refusal is not retried");
    assert_eq!((status.as_str(), attempts), ("failed", 1));
    let error = error.unwrap_or_default();
    assert!(
        error.contains("550") && error.contains("Mailbox unavailable"),
        "{error}"
    );
    assert!(smtp.mails().is_empty());

    // Resent by hand to a mailbox that is busy (450): retried with backoff, then given up.
    world.contacts("Alpha", &["busy@example.org"]).await;
    let id = world.notifications("Alpha").await[0]["id"]
        .as_i64()
        .expect("id");
    let (status, body) = world
        .call(
            reqwest::Method::POST,
            &format!("/api/notifications/{id}/resend?channel=email"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut clock = now() + ChronoDuration::seconds(1);
    let mut waits = Vec::new();
    loop {
        let summary = send(&notifier, clock).await;
        let (status, attempts, error, next) = world.email_delivery().await;
        assert!(
            error.unwrap_or_default().contains("450"),
            "the reason is kept"
        );
        match next {
            Some(next) => {
                assert_eq!(
                    (status.as_str(), summary.retried),
                    ("pending", 1),
                    "attempt {attempts}"
                );
                waits.push((next - clock).num_minutes());
                clock = next;
            }
            None => {
                assert_eq!(
                    (status.as_str(), attempts, summary.failed),
                    ("failed", 8, 1)
                );
                break;
            }
        }
    }
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60]);
    assert!(smtp.mails().is_empty());
}

#[tokio::test]
async fn the_portal_webhook_gets_the_old_form_fields_and_header_and_non_200_is_retried() {
    let smtp = SmtpServer::start();
    let portal = FixtureExporter::start(Answer {
        status: 500,
        body: "down".into(),
        delay: Duration::ZERO,
    })
    .await;
    let base = portal.url.replace("/metrics", "/portal");
    let world = World::start(
        smtp.port,
        &[
            ("MAIL_CONTACT_URL", &base),
            ("API_CONTACT_KEY", "portal-key"),
        ],
    )
    .await;
    let t = now();
    project_at(&world, "Alpha Beta", 100.5, t).await;
    let notifier = world.notifier();
    world.bill(t).await;

    let failing = send(&notifier, t).await;

    assert_eq!(
        (failing.sent, failing.retried),
        (2, 2),
        "both mails; both posts retried"
    );
    portal.set(Answer::ok("ok"));
    let retried = send(&notifier, t + ChronoDuration::minutes(1)).await;
    assert_eq!(retried.sent, 2);
    assert_eq!(send(&notifier, t + hours(3)).await, SendSummary::default());

    let heads = portal.requests.lock().expect("lock").clone();
    let bodies = portal.bodies.lock().expect("lock").clone();
    assert_eq!(heads.len(), 4, "two failed posts, two delivered");
    for head in &heads {
        let lower = head.to_ascii_lowercase();
        assert!(
            head.starts_with("POST /portal/credits-limit/ HTTP/1.1"),
            "{head}"
        );
        assert!(lower.contains("x-api-key: portal-key"), "{head}");
        assert!(
            lower.contains("content-type: application/x-www-form-urlencoded"),
            "{head}"
        );
    }
    let mut forms: Vec<BTreeMap<String, String>> = bodies[2..]
        .iter()
        .map(|b| {
            url::form_urlencoded::parse(b.as_bytes())
                .into_owned()
                .collect()
        })
        .collect();
    forms.sort_by(|a, b| a["limit_type"].cmp(&b["limit_type"]));
    let timestamp = t.timestamp().to_string();
    let expected = |limit: &str| -> BTreeMap<String, String> {
        [
            ("project_name", "Alpha Beta"),
            ("granted_credits", "100.00"),
            ("used_credits", "100.50"),
            ("timestamp", timestamp.as_str()),
            ("limit_type", limit),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    assert_eq!(
        forms,
        [
            expected("full limit reached"),
            expected("half limit reached")
        ]
    );
    assert_eq!(smtp.mails().len(), 2, "email is an independent channel");
}

#[tokio::test]
async fn markup_and_line_breaks_in_project_names_break_neither_the_html_nor_the_headers() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    let evil = "<script>alert(1)</script>\r\nBcc: evil@example.org";
    project_at(&world, evil, 60.0, t).await;

    world.bill(t).await;
    send(&world.notifier(), t).await;

    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert!(
        !mail.headers.contains_key("bcc"),
        "no injected header: {}",
        mail.raw
    );
    assert_eq!(
        mail.envelope_to,
        [OWNER, GOVERNANCE],
        "nobody else received it"
    );
    assert_eq!(
        mail.header("Subject"),
        "<script>alert(1)</script> Bcc: evil@example.org: 50% of the granted credits used"
    );
    assert!(!mail.html.contains("<script>"), "{}", mail.html);
    assert!(
        mail.html
            .contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;\r\nBcc: evil@example.org"),
        "{}",
        mail.html
    );
    assert!(
        unescape(&mail.html)
            .contains("credits_history/%3Cscript%3Ealert%281%29%3C%2Fscript%3E%0D%0ABcc"),
        "the link encodes the name: {}",
        mail.html
    );
}

#[tokio::test]
async fn a_sender_that_died_while_sending_leaves_the_mail_unknown_until_resent_by_hand() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;
    world.bill(t).await;
    // A sender claims the mail and dies before recording what the server said.
    let client = world.app.db.connect().await;
    let claimed =
        os_credits::notify::outbox::claim(&client, t, t + ChronoDuration::minutes(5), hours(24))
            .await
            .expect("claim")
            .expect("a due delivery");
    assert_eq!(claimed.channel, os_credits::notify::outbox::Channel::Email);
    let notifier = world.notifier();

    let during = send(&notifier, t + ChronoDuration::minutes(1)).await;
    let after = send(&notifier, t + ChronoDuration::minutes(6)).await;

    assert_eq!(
        during.sent, 0,
        "the claim is respected while its lease runs"
    );
    assert_eq!(after.unknown, 1);
    assert_eq!(after.sent, 0, "never resent automatically");
    let (status, _, error, _) = world.email_delivery().await;
    assert_eq!(status, "unknown");
    assert!(
        error.unwrap_or_default().contains("resend"),
        "says what to do"
    );
    assert!(smtp.mails().is_empty());

    let (missing, _) = world
        .call(
            reqwest::Method::POST,
            "/api/notifications/999999/resend",
            None,
        )
        .await;
    let (bad, _) = world
        .call(
            reqwest::Method::POST,
            &format!("/api/notifications/{}/resend?channel=sms", claimed.id),
            None,
        )
        .await;
    let (ok, body) = world
        .call(
            reqwest::Method::POST,
            &format!("/api/notifications/{}/resend?channel=email", claimed.id),
            None,
        )
        .await;
    assert_eq!((missing, bad, ok), (404, 400, 200), "{body}");
    assert_eq!(body["deliveries"][0]["status"], "pending");
    assert_eq!(send(&notifier, Utc::now()).await.sent, 1);
    assert_eq!(smtp.mails().len(), 1);
}

#[tokio::test]
async fn contacts_are_checked_addresses_and_need_the_api_key() {
    let smtp = SmtpServer::start();
    let world = World::start(smtp.port, &[]).await;
    world.grant("Alpha", 100).await;
    let put = |key: Option<&'static str>, body: Value| {
        let mut request = world
            .app
            .http
            .put(format!("{}/api/projects/Alpha/contacts", world.app.address))
            .json(&body);
        if let Some(key) = key {
            request = request.header("X-API-KEY", key);
        }
        async move { request.send().await.expect("request").status().as_u16() }
    };

    let cases = [
        ("no key", None, json!({"emails": [OWNER]}), 401),
        ("wrong key", Some("nope"), json!({"emails": [OWNER]}), 403),
        (
            "not an address",
            Some(KEY),
            json!({"emails": ["owner"]}),
            400,
        ),
        (
            "header injection",
            Some(KEY),
            json!({"emails": ["a@example.org\r\nBcc: x@example.org"]}),
            400,
        ),
        ("not a list", Some(KEY), json!({"emails": OWNER}), 400),
        (
            "unknown field",
            Some(KEY),
            json!({"emails": [], "cc": []}),
            400,
        ),
        (
            "valid",
            Some(KEY),
            json!({"emails": [OWNER, "Owner@example.org", "b@example.org"]}),
            200,
        ),
    ];
    for (case, key, body, expected) in cases {
        assert_eq!(put(key, body).await, expected, "{case}");
    }

    let (status, stored) = world
        .call(reqwest::Method::GET, "/api/projects/Alpha/contacts", None)
        .await;
    assert_eq!(
        (status, stored),
        (200, json!({"emails": [OWNER, "b@example.org"]}))
    );
    let (unknown, _) = world
        .call(
            reqwest::Method::PUT,
            "/api/projects/Nobody/contacts",
            Some(json!({"emails": []})),
        )
        .await;
    assert_eq!(unknown, 404);
    let listed = world
        .app
        .http
        .get(format!(
            "{}/api/projects/Nobody/notifications",
            world.app.address
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(listed.status().as_u16(), 404);
    assert!(world.notifications("Alpha").await.is_empty());
}

#[tokio::test]
async fn without_an_smtp_server_mail_is_written_as_eml_files() {
    let dir = std::env::temp_dir().join(format!(
        "os-credits-mail-{}-{}",
        std::process::id(),
        now().timestamp()
    ));
    let dir_text = dir.to_string_lossy().into_owned();
    let app = spawn_app(&[("API_KEY", KEY), ("MAIL_FILE_DIR", dir_text.as_str())]).await;
    let world = World {
        app,
        vars: vec![
            ("API_KEY".into(), KEY.into()),
            ("MAIL_FILE_DIR".into(), dir_text.clone()),
        ],
    };
    let t = now();
    project_at(&world, "Alpha", 60.0, t).await;

    world.bill(t).await;
    let sent = send(&world.notifier(), t).await;

    assert_eq!(sent.sent, 1);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the folder exists")
        .flatten()
        .collect();
    assert_eq!(files.len(), 1);
    let content = std::fs::read_to_string(files[0].path()).expect("read .eml");
    assert!(
        content.contains("Subject: Alpha: 50% of the granted credits used"),
        "{content}"
    );
    assert!(
        content.contains("From: cloud@denbi.de"),
        "the old service's sender"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_broken_template_stops_the_start_naming_the_file() {
    let dir = std::env::temp_dir().join(format!(
        "os-credits-tpl-{}-{}",
        std::process::id(),
        now().timestamp()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("body.html"), "<p>{{ project </p>").expect("write");
    let db = common::TestDb::create().await;
    let mut vars = db.vars();
    vars.push((
        "MAIL_TEMPLATE_DIR".into(),
        dir.to_string_lossy().into_owned(),
    ));

    let built =
        os_credits::startup::Application::build(Settings::from_vars(vars).expect("settings"), None)
            .await;

    let Err(error) = built else {
        panic!("the start was not refused");
    };

    let message = format!("{error:#}");
    assert!(
        message.contains(&dir.join("body.html").display().to_string()),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn send_test_email_delivers_or_says_what_to_fix() {
    let smtp = SmtpServer::start();
    let mail = |port: u16| {
        let mut vars = smtp_vars(port);
        vars.push(("POSTGRES_DB".into(), "unused".into()));
        Settings::from_vars(vars).expect("settings").mail
    };

    let sent = os_credits::notify::email::send_test(&mail(smtp.port), "admin@example.org")
        .await
        .expect("sent");
    let (_held, refused_port) = common::reserved_port();
    let refused = os_credits::notify::email::send_test(&mail(refused_port), "admin@example.org")
        .await
        .expect_err("nothing listens");
    let bad = os_credits::notify::email::send_test(&mail(smtp.port), "not an address").await;
    let mut no_starttls = mail(smtp.port);
    no_starttls.tls = os_credits::config::SmtpTls::Starttls;
    let plain_server = os_credits::notify::email::send_test(&no_starttls, "admin@example.org")
        .await
        .expect_err("the server offers no STARTTLS");

    assert!(sent.contains("admin@example.org"), "{sent}");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].header("Subject"), "os-credits test message");
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("MAIL_SMTP_SERVER and MAIL_SMTP_PORT"),
        "{refused}"
    );
    assert!(format!("{:#}", bad.expect_err("refused")).contains("--to"));
    let plain_server = format!("{plain_server:#}");
    assert!(
        plain_server.contains("STARTTLS is not supported"),
        "{plain_server}"
    );
    assert!(
        plain_server.contains("MAIL_SMTP_TLS=implicit"),
        "{plain_server}"
    );
}

#[tokio::test]
async fn a_held_charge_is_announced_to_the_governance_by_mail_and_webhook_once() {
    let smtp = SmtpServer::start();
    let portal = FixtureExporter::start(Answer::ok("ok")).await;
    let base = portal.url.replace("/metrics", "/portal");
    let world = World::start(
        smtp.port,
        &[
            ("MAIL_CONTACT_URL", &base),
            ("API_CONTACT_KEY", "portal-key"),
        ],
    )
    .await;
    let t = now();
    world.grant("Alpha", 1000).await;
    world.contacts("Alpha", &[OWNER]).await;
    // An hour at 4 vCPU-hours an hour, then the history re-weighted within 5 s.
    world
        .usage(
            "Alpha",
            &[
                (t - hours(2), 197.35),
                (t - hours(1), 201.35),
                (t - hours(1) + ChronoDuration::seconds(5), 1006.79),
            ],
        )
        .await;
    let notifier = world.notifier();
    world.bill(t).await;

    let sent = send(&notifier, t).await;

    assert_eq!(sent.sent, 2, "one mail, one post: {sent:?}");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "exactly one mail");
    let mail = &mails[0];
    assert_eq!(
        mail.envelope_to,
        [GOVERNANCE],
        "the governance, not the owner"
    );
    assert_eq!(
        mail.header("Subject"),
        "Alpha: charge held for review (805.44 credits)"
    );
    for value in [
        "project_vcpu_usage",
        "201.35 to 1006.79",
        "805.44",
        "/approve",
    ] {
        assert!(
            mail.text.contains(value),
            "{value} missing from {}",
            mail.text
        );
    }
    let bodies = portal.bodies.lock().expect("lock").clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let form: BTreeMap<String, String> = url::form_urlencoded::parse(bodies[0].as_bytes())
        .into_owned()
        .collect();
    assert_eq!(form["limit_type"], "charge held for review");
    assert_eq!(form["project_name"], "Alpha");
    assert_eq!(
        form["used_credits"], "4.00",
        "the jump is not in used credits"
    );
    assert_eq!(form["granted_credits"], "1000.00");
    // Nothing more: no threshold crossed, nothing sent twice.
    world.bill(t + ChronoDuration::minutes(1)).await;
    assert_eq!(send(&notifier, t + hours(3)).await, SendSummary::default());
    assert_eq!(smtp.mails().len(), 1);
    // The threshold list of the project does not show it.
    let list: serde_json::Value = world
        .app
        .get("/api/projects/Alpha/notifications")
        .await
        .json()
        .await
        .expect("list");
    assert_eq!(list, json!([]), "held notices are not threshold crossings");
}
