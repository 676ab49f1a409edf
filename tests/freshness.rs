//! Balances answered from memory on several replicas, never stale after a commit:
//! two real replicas of the service on one database, writes on one, reads on the
//! other.

mod common;

use common::{eventually, spawn_app, TestApp};
use os_credits::config::Settings;
use os_credits::startup::{Application, StopHandle};
use serde_json::{json, Value};
use std::time::Duration;

const KEY: &str = "test-key-4711";

/// A second replica on the first one's database; stops with the handle.
async fn second_replica(first: &TestApp) -> (String, StopHandle, tokio::task::JoinHandle<()>) {
    second_replica_with(first, &[]).await
}

/// [`second_replica`] with settings of its own on top of the first one's.
async fn second_replica_with(
    first: &TestApp,
    own: &[(&str, &str)],
) -> (String, StopHandle, tokio::task::JoinHandle<()>) {
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
    (address, stop, task)
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

async fn sql(app: &TestApp, statements: &str) {
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
    let (b, b_stop, b_task) = second_replica(&a).await;
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

    // B answers from memory: a change that notifies nobody stays unseen there...
    assert_eq!(credits("Alpha").await.1["granted_credits"], json!(39.0));
    sql(
        &a,
        "ALTER TABLE projects DISABLE TRIGGER project_changed;
         UPDATE projects SET granted_credits = 777 WHERE name = 'Alpha';
         ALTER TABLE projects ENABLE TRIGGER project_changed",
    )
    .await;
    assert_eq!(
        credits("Alpha").await.1["granted_credits"],
        json!(39.0),
        "answered from memory, not from the database"
    );
    // ...until B's listening connection is lost: B refetches before answering from
    // memory again.
    sql(
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

    b_stop.stop().await;
    b_task.await.expect("second replica stops");
}

#[tokio::test]
async fn the_project_detail_is_answered_from_memory_and_fresh_after_its_other_parts_change() {
    let a = spawn_app(&[("API_KEY", KEY)]).await;
    let (b, b_stop, b_task) = second_replica(&a).await;
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

    b_stop.stop().await;
    b_task.await.expect("second replica stops");
}

/// Pauses (SIGSTOP) PostgreSQL backend processes until dropped (SIGCONT).
struct Paused(Vec<i32>);

impl Paused {
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
    let (b, b_stop, b_task) = second_replica(&a).await;
    let credits = || get_json(&a.http, format!("{b}/api/current_credits/Alpha"));
    grant(&a, "Alpha", 1).await;
    // B holds the balance (the second read is answered from memory).
    for _ in 0..4 {
        assert_eq!(credits().await.1["granted_credits"], json!(1.0));
    }

    // Every listening backend of this database is paused: the grant below commits,
    // but its notification reaches no replica until they go on.
    let pids: Vec<i32> = listening_backends(&a)
        .await
        .iter()
        .map(|&(pid, _)| pid)
        .collect();
    assert!(pids.len() >= 2, "both replicas listen: {pids:?}");
    assert!(
        Paused::signal(&pids, "-STOP"),
        "pausing backends {pids:?} with kill -STOP failed: this test must run as root or as the PostgreSQL server's user"
    );
    let paused = Paused(pids);
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

    b_stop.stop().await;
    b_task.await.expect("second replica stops");
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
    let (b, b_stop, b_task) = second_replica_with(&a, &[("POSTGRES_HOST", &directory)]).await;
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

    b_stop.stop().await;
    b_task.await.expect("second replica stops");
}
