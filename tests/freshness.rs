//! Balances answered from memory on several replicas, never stale after a write
//! returned: two real replicas of the service on one database, writes on one, reads
//! on the other. Writes made here by SQL send a commit fence afterwards, as the
//! service's writers do (src/store/changes.rs); one write shows how an unfenced one
//! is seen.

mod common;

use common::{eventually, spawn_app, TestApp};
use os_credits::config::Settings;
use os_credits::startup::{Application, StopHandle};
use os_credits::store::changes::{self, Fenced};
use serde_json::{json, Value};
use std::time::Duration;

const KEY: &str = "test-key-4711";

/// A second replica on the first one's database, shown as its address.
struct Replica {
    address: String,
    stop: StopHandle,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Display for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.address)
    }
}

impl Replica {
    async fn stop(self) {
        self.stop.stop().await;
        self.task.await.expect("second replica stops");
    }
}

async fn second_replica(first: &TestApp) -> Replica {
    second_replica_with(first, &[]).await
}

/// [`second_replica`] with settings of its own on top of the first one's.
async fn second_replica_with(first: &TestApp, own: &[(&str, &str)]) -> Replica {
    let mut vars = first.db.vars();
    vars.push(("API_KEY".into(), KEY.into()));
    vars.extend(own.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = Settings::from_vars(vars).expect("settings");
    let app = Application::build(settings, None)
        .await
        .expect("second replica builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let stop = app.stop_handle();
    let task = tokio::spawn(async move {
        app.run_without_workers()
            .await
            .expect("second replica runs");
    });
    Replica {
        address,
        stop,
        task,
    }
}

async fn get_json(http: &reqwest::Client, url: String) -> (u16, Value) {
    let response = http.get(&url).send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn grant(app: &TestApp, project: &str, credits: u32) {
    let response = app
        .http
        .put(format!("{}/api/projects/{project}/grant", app.address))
        .header("X-API-KEY", KEY)
        .body(json!({ "granted_credits": credits }).to_string())
        .send()
        .await
        .expect("grant");
    assert_eq!(response.status().as_u16(), 200, "grant {credits}");
}

/// The listening backends of the app's database (every replica's): process id and
/// client port (-1 for a Unix socket).
async fn listening_backends(app: &TestApp) -> Vec<(i32, i32)> {
    app.db
        .connect()
        .await
        .query(
            "SELECT pid, client_port FROM pg_stat_activity
             WHERE application_name = 'os-credits-listener' AND datname = current_database()",
            &[],
        )
        .await
        .expect("listening backends")
        .iter()
        .map(|row| (row.get("pid"), row.get("client_port")))
        .collect()
}

/// Runs SQL and then a commit fence, as a writer of the service would: every
/// replica answers the write once this returns.
async fn sql(app: &TestApp, statements: &str) {
    let client = app.db.connect().await;
    client
        .batch_execute(statements)
        .await
        .unwrap_or_else(|e| panic!("{statements}: {e}"));
    let fenced = changes::fence(&client).await;
    assert!(
        matches!(fenced, Fenced::Answered { listeners } if listeners >= 2),
        "every replica's listener answers the fence: {fenced:?}"
    );
}

/// Sets Alpha's grant to `expression` in the database without notifying anyone, so
/// only a replica that reads the database sees it.
async fn grant_unheard(app: &TestApp, expression: &str) {
    sql_unfenced(
        app,
        &format!(
            "ALTER TABLE projects DISABLE TRIGGER project_changed;
             UPDATE projects SET granted_credits = {expression} WHERE name = 'Alpha';
             ALTER TABLE projects ENABLE TRIGGER project_changed"
        ),
    )
    .await;
}

/// Runs SQL without a fence.
async fn sql_unfenced(app: &TestApp, statements: &str) {
    app.db
        .connect()
        .await
        .batch_execute(statements)
        .await
        .unwrap_or_else(|e| panic!("{statements}: {e}"));
}

#[tokio::test]
async fn a_grant_put_on_one_replica_is_seen_by_the_very_next_read_on_the_other() {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let b = second_replica(&a).await;
    let http = &a.http;
    let credits = |project: &str| get_json(http, format!("{b}/api/current_credits/{project}"));
    let detail = |project: &str| get_json(http, format!("{b}/api/projects/{project}"));
    let history = |project: &str| {
        get_json(
            http,
            format!("{b}/api/credits_history/{project}?values=charges"),
        )
    };

    // B answers 404 for a project that does not exist (and holds nothing of it: its
    // creation notifies nobody, migration 0015); A creates it.
    assert_eq!(credits("Alpha").await.0, 404);
    grant(&a, "Alpha", 1).await;
    assert_eq!(credits("Alpha").await.1["granted_credits"], json!(1.0));

    // Every read on B right after a write on A returned sees that write.
    for round in 2..40u32 {
        grant(&a, "Alpha", round).await;
        let (_, now) = credits("Alpha").await;
        assert_eq!(
            now["granted_credits"],
            json!(f64::from(round)),
            "round {round}"
        );
        let (_, project) = detail("Alpha").await;
        assert_eq!(
            project["granted_credits"],
            json!(format!("{round}.00")),
            "detail, round {round}"
        );
    }
    // The ledger too: a usage row written on the database shows in B's history.
    assert_eq!(history("Alpha").await.0, 404);
    sql(
        &a,
        "INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price)
         VALUES ('Alpha', now(), 'usage', 'project_vcpu_usage', 2.5, 2.5, 39, now(), 2.5, 1)",
    )
    .await;
    assert_eq!(history("Alpha").await.1["credits"], json!([2.5]));
    // Without a fence a write is seen once its notification arrives (within the
    // lease at the latest).
    sql_unfenced(
        &a,
        "INSERT INTO ledger (project, time, kind, metric, used_delta, used_after, granted_after, usage_from, quantity, price)
         VALUES ('Alpha', now(), 'usage', 'project_vcpu_usage', 1.5, 4, 39, now(), 1.5, 1)",
    )
    .await;
    eventually(changes::LEASE * 2, "B to see an unfenced write", || async {
        (history("Alpha").await.1["credits"] == json!([2.5, 1.5])).then_some(())
    })
    .await;

    // B answers from memory: a change that notifies nobody stays unseen there...
    assert_eq!(credits("Alpha").await.1["granted_credits"], json!(39.0));
    grant_unheard(&a, "777").await;
    assert_eq!(
        credits("Alpha").await.1["granted_credits"],
        json!(39.0),
        "answered from memory, not from the database"
    );
    // ...until B's listening connection is lost: B refetches before answering from
    // memory again.
    sql_unfenced(
        &a,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'os-credits-listener' AND datname = current_database()",
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "B to read the database again",
        || async { (credits("Alpha").await.1["granted_credits"] == json!(777.0)).then_some(()) },
    )
    .await;
    grant(&a, "Alpha", 5).await;
    assert_eq!(
        credits("Alpha").await.1["granted_credits"],
        json!(5.0),
        "fresh right after the write once B listens again (or reads the database)"
    );

    b.stop().await;
}

#[tokio::test]
async fn the_project_detail_is_answered_from_memory_and_fresh_after_its_other_parts_change() {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let b = second_replica(&a).await;
    let http = &a.http;
    let detail = || async {
        let (status, body) = get_json(http, format!("{b}/api/projects/Alpha")).await;
        assert_eq!(status, 200, "{body}");
        body
    };
    grant(&a, "Alpha", 10).await;
    common::seed_series(
        &mut a.db.connect().await,
        "project_vcpu_usage",
        &[("project_name", "Alpha")],
        "Alpha",
    )
    .await;
    let first = detail().await;
    for part in ["stale_series", "quarantined_samples", "held_charges"] {
        assert_eq!(first[part], json!([]), "{part}: {first}");
    }

    // B holds the whole detail: a stale series written without notifying stays unseen.
    sql(
        &a,
        "ALTER TABLE stale_series DISABLE TRIGGER stale_series_changed;
         INSERT INTO stale_series SELECT id, 'hidden', now(), now() FROM series;
         ALTER TABLE stale_series ENABLE TRIGGER stale_series_changed",
    )
    .await;
    assert_eq!(
        detail().await["stale_series"],
        json!([]),
        "answered from memory, not from the database"
    );
    // Each part's change is seen by the very next read on B.
    sql(&a, "UPDATE stale_series SET target = 'site-a'").await;
    let now = detail().await;
    assert_eq!(now["stale_series"][0]["target"], "site-a", "{now}");

    sql(
        &a,
        "INSERT INTO quarantined_samples (series_id, time, value, reason)
         SELECT id, now(), 1e30, 'too large' FROM series",
    )
    .await;
    let now = detail().await;
    assert_eq!(
        now["quarantined_samples"][0]["reason"], "too large",
        "{now}"
    );

    sql(
        &a,
        "INSERT INTO held_charges (project, series_id, metric, from_time, to_time, from_value,
                                   to_value, quantity, credits, reason, held_at)
         SELECT 'Alpha', id, metric, now() - interval '1 hour', now(), 1, 800, 799, 799,
                'jump', now() FROM series",
    )
    .await;
    let now = detail().await;
    assert_eq!(now["held_credits"], "799.00", "{now}");
    assert_eq!(now["held_charges"][0]["reason"], "jump", "{now}");

    sql(
        &a,
        "UPDATE held_charges SET status = 'rejected', decided_at = now(), decided_by = 'op'",
    )
    .await;
    assert_eq!(detail().await["held_credits"], "0.00");
    sql(&a, "DELETE FROM stale_series").await;
    assert_eq!(detail().await["stale_series"], json!([]));

    b.stop().await;
}

/// Pauses (SIGSTOP) PostgreSQL backend processes until dropped (SIGCONT).
struct Paused(Vec<i32>);

impl Paused {
    /// Pauses every listening backend of the app's database (both replicas').
    async fn listeners_of(app: &TestApp) -> Self {
        let pids = listening_pids(app).await;
        assert!(pids.len() >= 2, "both replicas listen: {pids:?}");
        assert!(
            Self::signal(&pids, "-STOP"),
            "pausing backends {pids:?} with kill -STOP failed: this test must run as root or as the PostgreSQL server's user"
        );
        Self(pids)
    }

    fn signal(pids: &[i32], signal: &str) -> bool {
        pids.iter().all(|pid| {
            std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .is_ok_and(|status| status.success())
        })
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        Self::signal(&self.0, "-CONT");
    }
}

#[tokio::test]
async fn a_change_whose_notification_is_late_is_not_answered_around() {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let b = second_replica(&a).await;
    let credits = || get_json(&a.http, format!("{b}/api/current_credits/Alpha"));
    grant(&a, "Alpha", 1).await;
    // B holds the balance (the second read is answered from memory).
    for _ in 0..4 {
        assert_eq!(credits().await.1["granted_credits"], json!(1.0));
    }

    // Every listening backend of this database is paused: the grant below commits,
    // but its notification reaches no replica until they go on.
    let paused = Paused::listeners_of(&a).await;
    grant(&a, "Alpha", 2).await;
    // The write returned, so every read now sees it: B's read barrier cannot pass,
    // so B reads the database instead of answering from memory.
    for round in 0..4 {
        assert_eq!(
            credits().await.1["granted_credits"],
            json!(2.0),
            "read {round} after the grant returned, its notification still on the way"
        );
    }
    drop(paused);
    grant(&a, "Alpha", 3).await;
    assert_eq!(credits().await.1["granted_credits"], json!(3.0));

    b.stop().await;
}

#[tokio::test]
async fn a_replica_reaching_the_database_through_a_unix_socket_listens_and_answers_fresh() {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let directories: String =
        a.db.connect()
            .await
            .query_one("SHOW unix_socket_directories", &[])
            .await
            .expect("unix_socket_directories")
            .get(0);
    let directory = directories
        .split(',')
        .map(str::trim)
        .find(|d| d.starts_with('/'))
        .unwrap_or_else(|| {
            panic!(
                "the test server listens on no Unix socket directory ({directories:?}): \
                 this test needs one (scripts/pg.sh gives its clusters one)"
            )
        })
        .to_owned();
    // POSTGRES_HOST names the socket's directory, as the README says it may.
    let b = second_replica_with(&a, &[("POSTGRES_HOST", &directory)]).await;
    let credits = || get_json(&a.http, format!("{b}/api/current_credits/Alpha"));
    grant(&a, "Alpha", 1).await;
    assert_eq!(credits().await.1["granted_credits"], json!(1.0));
    // B's listening connection came through the socket (no client port), and B
    // answers from memory, fresh right after each write on A.
    let listeners: Vec<i32> = listening_backends(&a)
        .await
        .iter()
        .map(|&(_, client_port)| client_port)
        .collect();
    assert!(
        listeners.contains(&-1),
        "B listens through the Unix socket (client_port -1): {listeners:?}"
    );
    for credits_now in [2, 3, 4] {
        grant(&a, "Alpha", credits_now).await;
        assert_eq!(
            credits().await.1["granted_credits"],
            json!(f64::from(credits_now)),
            "B's read right after grant {credits_now} on A"
        );
    }

    b.stop().await;
}

/// The process ids of the app's database's listening backends.
async fn listening_pids(app: &TestApp) -> Vec<i32> {
    listening_backends(app)
        .await
        .iter()
        .map(|&(pid, _)| pid)
        .collect()
}

#[tokio::test]
async fn within_its_lease_a_replica_answers_from_memory_without_the_database_and_after_it_asks_again(
) {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let b = second_replica(&a).await;
    let credits = || get_json(&a.http, format!("{b}/api/current_credits/Alpha"));
    grant(&a, "Alpha", 1).await;
    for _ in 0..3 {
        assert_eq!(credits().await.1["granted_credits"], json!(1.0));
    }
    // A change that notifies nobody, so only the database knows it.
    grant_unheard(&a, "777").await;
    // With every listening backend paused no read barrier can pass: B answers
    // from memory while its lease holds, without waiting on the database...
    let paused = Paused::listeners_of(&a).await;
    assert_eq!(
        credits().await.1["granted_credits"],
        json!(1.0),
        "answered from memory within the lease"
    );
    // ...and once it ran out, its barrier cannot pass, so B reads the database.
    eventually(
        changes::LEASE * 4,
        "B's lease to run out and B to read the database",
        || async { (credits().await.1["granted_credits"] == json!(777.0)).then_some(()) },
    )
    .await;
    drop(paused);

    b.stop().await;
}

#[tokio::test]
async fn a_fence_waits_for_every_registered_listener_and_no_longer_than_its_bound() {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let b = second_replica(&a).await;
    grant(&a, "Alpha", 1).await;
    let writer = a.db.connect().await;
    let listening = listening_pids(&a).await.len();
    assert!(listening >= 2, "both replicas listen");
    assert_eq!(
        changes::fence(&writer).await,
        Fenced::Answered {
            listeners: listening
        },
        "every listening backend is registered and answers"
    );

    // A registered listener that never answers (it listens on nothing): the fence
    // names it after its bound, and the write has still returned.
    let silent = a.db.connect().await;
    let key: i32 = silent
        .query_one("SELECT register_change_listener(0)", &[])
        .await
        .expect("register")
        .get(0);
    assert_eq!(
        changes::fence(&writer).await,
        Fenced::TimedOut { missing: vec![key] }
    );

    // Gone without unregistering: the next fence waits its lease out (hold_ms),
    // and once that passed the registration is dropped.
    drop(silent);
    let gone = || async {
        writer
            .query_one(
                "SELECT gone_since IS NOT NULL AS gone FROM change_listeners WHERE key = $1",
                &[&key],
            )
            .await
            .map(|row| row.get::<_, bool>("gone"))
    };
    eventually(
        Duration::from_secs(10),
        "the silent session to end",
        || async {
            let live: Vec<i32> = writer
                .query_one("SELECT live FROM change_fence('probe', 60000)", &[])
                .await
                .expect("fence")
                .get("live");
            (!live.contains(&key)).then_some(())
        },
    )
    .await;
    assert_eq!(gone().await.ok(), Some(true), "marked gone, kept");
    let wait_ms: i64 = writer
        .query_one("SELECT wait_ms FROM change_fence('probe', 60000)", &[])
        .await
        .expect("fence")
        .get("wait_ms");
    assert!(
        wait_ms > 0,
        "a fence waits for the lease of a listener gone without unregistering"
    );
    let row = writer
        .query_one("SELECT live, wait_ms FROM change_fence('probe', 0)", &[])
        .await
        .expect("fence");
    assert_eq!(row.get::<_, i64>("wait_ms"), 0, "its lease is over");
    assert!(gone().await.is_err(), "and its registration is dropped");
    assert_eq!(row.get::<_, Vec<i32>>("live").len(), listening);

    b.stop().await;
    // A stopped replica unregisters (or is waited out as gone): fences then answer
    // with the remaining replica's listeners alone.
    eventually(
        Duration::from_secs(15),
        "B's registration to go",
        || async {
            let registered: i64 = writer
                .query_one("SELECT count(*) FROM change_listeners", &[])
                .await
                .expect("registrations")
                .get(0);
            let fenced = changes::fence(&writer).await;
            let listening = listening_pids(&a).await.len();
            (usize::try_from(registered) == Ok(listening)
                && fenced
                    == Fenced::Answered {
                        listeners: listening,
                    })
            .then_some(())
        },
    )
    .await;
}

/// B's answer for Alpha's balance, and the database's.
async fn balance_on_b_and_in_the_database(a: &TestApp, b: &Replica) -> (Value, Value) {
    let (_, on_b) = get_json(&a.http, format!("{b}/api/current_credits/Alpha")).await;
    let row =
        a.db.connect()
            .await
            .query_one(
                "SELECT used_credits::float8 AS used, granted_credits::float8 AS granted
             FROM projects WHERE name = 'Alpha'",
                &[],
            )
            .await
            .expect("balance");
    (
        on_b,
        json!({"current_credits": row.get::<_, f64>("used"), "granted_credits": row.get::<_, f64>("granted")}),
    )
}

#[tokio::test]
async fn every_writer_returns_only_once_every_replica_answers_its_write() {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let b = second_replica(&a).await;
    grant(&a, "Alpha", 10_000).await;
    let mut client = a.db.connect().await;
    let series = common::seed_series(
        &mut client,
        "project_vcpu_usage",
        &[("project_name", "Alpha")],
        "Alpha",
    )
    .await;
    client
        .execute(
            "INSERT INTO usage_samples (series_id, time, value)
             SELECT $1, now() - interval '2 hours' + m * interval '30 minutes', m * 2.5
             FROM generate_series(0, 2) m",
            &[&series],
        )
        .await
        .expect("samples");
    client
        .batch_execute(&format!(
            "INSERT INTO held_charges (project, series_id, metric, from_time, to_time, from_value,
                                       to_value, quantity, credits, reason, held_at)
             VALUES ('Alpha', {series}, 'project_vcpu_usage', now() - interval '1 hour', now(),
                     1, 800, 799, 799, 'jump', now())"
        ))
        .await
        .expect("held charge");
    let held: i64 = client
        .query_one("SELECT id FROM held_charges", &[])
        .await
        .expect("held id")
        .get(0);
    let post = |path: String, body: Value| {
        a.http
            .post(format!("{}{path}", a.address))
            .header("X-API-KEY", KEY)
            .body(body.to_string())
            .send()
    };

    // The portal's grant sync writes through the app's pool, as its worker does.
    let portal =
        common::exporter::FixtureExporter::start(common::exporter::Answer::ok("20000\n")).await;
    let mut vars = a.db.vars();
    vars.push((
        "API_CONTACT_BASE_URL".into(),
        portal.url.trim_end_matches("/metrics").to_owned(),
    ));
    let settings = Settings::from_vars(vars).expect("settings");
    let pool = os_credits::store::pool(&settings.database).expect("pool");
    let portal_http = reqwest::Client::new();

    let writers: [(&str, Option<(String, Value)>); 4] = [
        (
            "an adjustment",
            Some((
                "/api/projects/Alpha/adjustments".into(),
                json!({"credits": 12.5, "reason": "manual charge"}),
            )),
        ),
        (
            "a billing run",
            Some(("/api/billing/run".into(), Value::Null)),
        ),
        (
            "a held charge's approval",
            Some((
                format!("/api/held/{held}/approve"),
                json!({"reason": "checked"}),
            )),
        ),
        ("the portal's grant sync", None),
    ];
    for (writer, request) in writers {
        // B holds the balance (its barriers pass again after the last round).
        eventually(Duration::from_secs(10), "B to hold the balance", || async {
            let (on_b, in_database) = balance_on_b_and_in_the_database(&a, &b).await;
            (on_b == in_database).then_some(())
        })
        .await;
        let (before, _) = balance_on_b_and_in_the_database(&a, &b).await;
        // Every notification is held back: B hears of the write only through the
        // database, once its lease ran out, which the writer waits for.
        let paused = Paused::listeners_of(&a).await;
        // B answers from memory under its lease: a change nobody hears of is unseen.
        grant_unheard(&a, "granted_credits + 1").await;
        let (held, _) = balance_on_b_and_in_the_database(&a, &b).await;
        assert_eq!(held, before, "B answers from memory before {writer}");
        let changed = match request {
            Some((path, body)) => {
                let response = post(path, body).await.expect(writer);
                let status = response.status().as_u16();
                assert!(
                    (200..300).contains(&status),
                    "{writer}: {status} {}",
                    response.text().await.unwrap_or_default()
                );
                "current_credits"
            }
            None => {
                let synced = os_credits::billing::portal::sync_grants(
                    &pool,
                    settings.portal(),
                    &portal_http,
                )
                .await
                .expect("portal sync");
                assert_eq!(synced.changed, 1, "{synced:?}");
                "granted_credits"
            }
        };
        let (after, in_database) = balance_on_b_and_in_the_database(&a, &b).await;
        assert_ne!(
            after[changed], before[changed],
            "{writer} changed {changed}"
        );
        assert_eq!(after, in_database, "B's read right after {writer} returned");
        drop(paused);
    }

    b.stop().await;
}

#[tokio::test]
async fn a_scrape_that_records_a_stale_series_returns_only_once_every_replica_lists_it() {
    let series = |ids: &[&str]| {
        ids.iter().fold(
            String::from("# TYPE project_vcpu_usage gauge\n"),
            |body, id| {
                body + &format!(
                    "project_vcpu_usage{{project_id=\"{id}\",project_name=\"Alpha\"}} 1\n"
                )
            },
        )
    };
    let exporter =
        common::exporter::FixtureExporter::start(common::exporter::Answer::ok(series(&[
            "p1", "p2",
        ])))
        .await;
    let targets = format!(r#"[{{"name": "site", "url": "{}"}}]"#, exporter.url);
    let a = spawn_app(&[("API_KEY", KEY), ("SCRAPE_TARGETS", &targets)]).await;
    let b = second_replica(&a).await;
    let scrape = || async {
        let attempts = a.scrape().await;
        assert!(
            attempts.iter().all(|(_, at)| at.result.is_ok()),
            "{attempts:?}"
        );
    };
    let detail = || async {
        let (status, body) = get_json(&a.http, format!("{b}/api/projects/Alpha")).await;
        assert_eq!(status, 200, "{body}");
        body
    };
    scrape().await;
    grant(&a, "Alpha", 10).await;
    assert_eq!(detail().await["stale_series"], json!([]));

    let paused = Paused::listeners_of(&a).await;
    // B answers from memory under its lease: a change nobody hears of is unseen.
    grant_unheard(&a, "11").await;
    assert_eq!(
        detail().await["granted_credits"],
        "10.00",
        "answered from memory"
    );
    // One series stops appearing; the scrape records it and returns.
    exporter.set(common::exporter::Answer::ok(series(&["p1"])));
    scrape().await;
    let now = detail().await;
    assert_eq!(
        now["stale_series"].as_array().map(Vec::len),
        Some(1),
        "B's read right after the scrape returned: {now}"
    );
    drop(paused);

    b.stop().await;
}

#[tokio::test]
async fn a_fence_that_cannot_be_sent_waits_the_leases_out_instead() {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let writer = a.db.connect().await;
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    sql_unfenced(&a, &format!("SELECT pg_terminate_backend({pid})")).await;
    eventually(
        Duration::from_secs(10),
        "the writer's session to end",
        || async { writer.is_closed().then_some(()) },
    )
    .await;
    // The commit before it may be unknown to any replica: the writer returns only
    // once every lease that could still answer around it has run out.
    let started = std::time::Instant::now();
    assert_eq!(changes::fence(&writer).await, Fenced::Failed);
    assert!(
        started.elapsed() >= changes::FENCE_WAIT,
        "waited {:?}, less than a fence's bound: a replica's lease may still hold",
        started.elapsed()
    );
}
