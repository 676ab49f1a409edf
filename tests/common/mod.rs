//! Test harness: a fresh PostgreSQL database per test, the service on a free port,
//! and small real HTTP exporters on loopback.
#![allow(dead_code)]

pub mod exporter;
pub mod invariants;

use os_credits::config::Settings;
use os_credits::scrape::Scraper;
use os_credits::startup::{Application, StopHandle};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the test PostgreSQL server is (`make test` exports these).
pub struct PgServer {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
}

impl PgServer {
    pub fn from_env() -> Self {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        Self {
            host: var("TEST_POSTGRES_HOST", "127.0.0.1"),
            port: var("TEST_POSTGRES_PORT", "5432")
                .parse()
                .expect("TEST_POSTGRES_PORT is a port"),
            user: var("TEST_POSTGRES_USER", "postgres"),
            password: std::env::var("TEST_POSTGRES_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty()),
        }
    }

    fn config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(database);
        if let Some(password) = &self.password {
            config.password(password);
        }
        config.connect_timeout(Duration::from_secs(5));
        config
    }

    /// A connection to the server's `postgres` database.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) = self
            .config("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                "no PostgreSQL for tests at {}:{} as {} ({e}). Run `make test`, which starts one, \
                 or set TEST_POSTGRES_HOST/TEST_POSTGRES_PORT/TEST_POSTGRES_USER",
                self.host, self.port, self.user
            )
            });
        tokio::spawn(connection);
        client
    }
}

/// A database that exists for one test and is dropped after it.
pub struct TestDb {
    pub name: String,
    pub server: PgServer,
}

impl TestDb {
    pub async fn create() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!(
            "osc_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            nanos
        );
        let server = PgServer::from_env();
        server
            .admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        Self { name, server }
    }

    /// A database that stays on plain tables even where the server preloads
    /// TimescaleDB (`os_credits.timescaledb = off`, read by the first migration).
    pub async fn create_plain() -> Self {
        let db = Self::create().await;
        db.server
            .admin()
            .await
            .batch_execute(&format!(
                "ALTER DATABASE {} SET os_credits.timescaledb = off",
                db.name
            ))
            .await
            .expect("keep the test database plain");
        db
    }

    /// Settings pointing at this database, the service on a free loopback port.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            ("POSTGRES_HOST".into(), self.server.host.clone()),
            ("POSTGRES_PORT".into(), self.server.port.to_string()),
            ("POSTGRES_USER".into(), self.server.user.clone()),
            ("POSTGRES_DB".into(), self.name.clone()),
            ("CREDITS_HOST".into(), "127.0.0.1".into()),
            ("CREDITS_PORT".into(), "0".into()),
            ("POSTGRES_POOL_SIZE".into(), "4".into()),
        ];
        vars.push((
            "POSTGRES_PASSWORD".into(),
            self.server.password.clone().unwrap_or_default(),
        ));
        vars
    }

    /// A plain connection to this database.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = self
            .server
            .config(&self.name)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to test database");
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let config = self.server.config("postgres");
        // Drop runs outside async; a short-lived runtime on its own thread does the I/O.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// The service running against a fresh database, driven by the test.
pub struct TestApp {
    pub address: String,
    pub db: TestDb,
    pub app_pool: deadpool_postgres::Pool,
    pub scraper: Option<Arc<Scraper>>,
    pub http: reqwest::Client,
    pub stop: StopHandle,
    pub task: tokio::task::JoinHandle<()>,
    pub mode: os_credits::store::StorageMode,
}

/// Starts the service with `vars` on top of the test database settings. Background
/// workers do not run: tests call `scrape()` themselves, so results are exact.
pub async fn spawn_app(vars: &[(&str, &str)]) -> TestApp {
    spawn_app_on(TestDb::create().await, vars, false).await
}

/// Like `spawn_app` on a given database; `with_workers` runs the scrape loop too.
pub async fn spawn_app_on(db: TestDb, vars: &[(&str, &str)], with_workers: bool) -> TestApp {
    spawn_app_with(db, vars, with_workers, None).await
}

/// Like `spawn_app_on`, with a run-time log filter handle for the service.
pub async fn spawn_app_with(
    db: TestDb,
    vars: &[(&str, &str)],
    with_workers: bool,
    logs: Option<os_credits::telemetry::LogHandle>,
) -> TestApp {
    // Logs show with `TEST_LOG=debug cargo test -- --nocapture`.
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let mut all = db.vars();
    all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = Settings::from_vars(all).expect("test settings are valid");
    let app = Application::build(settings, logs)
        .await
        .expect("application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let app_pool = app.pool().clone();
    let scraper = app.scraper();
    let stop = app.stop_handle();
    let mode = app.storage_mode();
    let task = tokio::spawn(async move {
        let result = if with_workers {
            app.run_until_stopped().await
        } else {
            app.run_without_workers().await
        };
        result.expect("application runs");
    });
    TestApp {
        address,
        db,
        app_pool,
        scraper,
        http: reqwest::Client::new(),
        stop,
        task,
        mode,
    }
}

impl TestApp {
    /// Stops the service like SIGTERM and waits until it has finished; keeps the database.
    pub async fn shutdown(self) -> TestDb {
        self.stop.stop().await;
        self.task.await.expect("application task");
        self.db
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{}", self.address, path))
            .send()
            .await
            .expect("request reaches the service")
    }

    pub async fn health(&self) -> serde_json::Value {
        self.get("/health")
            .await
            .json()
            .await
            .expect("health is JSON")
    }

    /// One scrape cycle of every target.
    pub async fn scrape(&self) -> Vec<(String, os_credits::store::targets::Attempt)> {
        self.scraper
            .as_ref()
            .expect("scraping is configured")
            .scrape_all()
            .await
    }

    pub async fn sample_count(&self) -> i64 {
        self.db
            .connect()
            .await
            .query_one("SELECT count(*) FROM usage_samples", &[])
            .await
            .expect("count")
            .get(0)
    }

    /// (metric, project, labels, time, value) of every stored sample, ordered.
    pub async fn samples(
        &self,
    ) -> Vec<(
        String,
        String,
        serde_json::Value,
        chrono::DateTime<chrono::Utc>,
        f64,
    )> {
        self.db
            .connect()
            .await
            .query(
                "SELECT s.metric, s.project, series_labels(s.series_key) AS labels, u.time, u.value
                 FROM usage_samples u JOIN series s ON s.id = u.series_id
                 ORDER BY s.metric, s.project, s.series_key, u.time",
                &[],
            )
            .await
            .expect("query samples")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    }

    /// The `/health` entry of one target.
    pub async fn target_status(&self, name: &str) -> serde_json::Value {
        let health = self.health().await;
        health["targets"]
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["name"] == name).cloned())
            .unwrap_or_else(|| panic!("target {name} not in {health}"))
    }
}

/// Stores samples `(time, value)` of a series.
pub async fn insert_samples(
    client: &tokio_postgres::Client,
    series_id: i64,
    samples: &[(chrono::DateTime<chrono::Utc>, f64)],
) {
    for (time, value) in samples {
        client
            .execute(
                "INSERT INTO usage_samples (series_id, time, value) VALUES ($1, $2, $3)",
                &[&series_id, time, value],
            )
            .await
            .expect("insert sample");
    }
}

/// Creates a series (or finds it, if it exists) through the service's own series
/// code, with the canonical key ingest gives it; returns its id.
pub async fn seed_series(
    client: &mut tokio_postgres::Client,
    metric: &str,
    labels: &[(&str, &str)],
    project: &str,
) -> i64 {
    seed_series_batch(client, [(metric, labels.iter().copied(), project)]).await[0]
}

/// Creates (or finds) several series `(metric, labels in any order, project)` in one
/// transaction, as ingest does: labels sorted by name, the key from
/// `write_series_key`, `create_or_find` registering their projects too. Returns the
/// ids in the order given.
pub async fn seed_series_batch<M, L, K, V, P>(
    client: &mut tokio_postgres::Client,
    series: impl IntoIterator<Item = (M, L, P)>,
) -> Vec<i64>
where
    M: AsRef<str>,
    L: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
    P: AsRef<str>,
{
    use os_credits::store::series::{create_or_find, write_series_key, NewSeries};
    let new: Vec<NewSeries> = series
        .into_iter()
        .map(|(metric, labels, project)| {
            let metric = metric.as_ref();
            let mut sorted: Vec<(String, String)> = labels
                .into_iter()
                .map(|(name, value)| (name.as_ref().to_owned(), value.as_ref().to_owned()))
                .collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            assert!(
                sorted.windows(2).all(|w| w[0].0 != w[1].0),
                "a label name twice in {metric} {sorted:?}"
            );
            let mut key = String::new();
            write_series_key(
                &mut key,
                metric,
                sorted
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_str())),
            );
            NewSeries {
                key,
                metric: metric.to_owned(),
                project: project.as_ref().to_owned(),
            }
        })
        .collect();
    let tx = client.transaction().await.expect("begin");
    let resolved = create_or_find(&tx, &new).await.expect("create series");
    tx.commit().await.expect("commit series");
    new.iter()
        .map(|s| {
            *resolved
                .ids
                .get(&s.key)
                .unwrap_or_else(|| panic!("no id for {}", s.key))
        })
        .collect()
}

/// A loopback port held for the caller: bound but not listening, so connecting to it
/// is refused, and no other program can take it until the socket is dropped or
/// `listen`ed on (a server "coming back" on the same port, without a race for it).
pub fn reserved_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let port = socket.local_addr().expect("address").port();
    (socket, port)
}

/// Polls `check` until it returns `Some`, failing after `deadline`.
/// Waits until one of the service's sessions (`application_name` `os-credits`) on
/// `db` waits for a lock.
pub async fn a_service_session_waits_for_a_lock(db: &TestDb, deadline: Duration, what: &str) {
    let observer = db.connect().await;
    eventually(deadline, what, || async {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'os-credits'
                   AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        (waiting > 0).then_some(())
    })
    .await;
}

pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the test server can create TimescaleDB (installed and preloaded).
pub async fn server_has_timescaledb(server: &PgServer) -> bool {
    server
        .admin()
        .await
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
                AND coalesce(current_setting('shared_preload_libraries', true), '') LIKE '%timescaledb%'",
            &[],
        )
        .await
        .expect("read the server's TimescaleDB state")
        .get(0)
}

/// The storage this test run is for: `TEST_STORAGE` (`make test` sets it), else
/// what the server offers.
pub async fn expected_storage() -> os_credits::store::StorageMode {
    use os_credits::store::StorageMode;
    match std::env::var("TEST_STORAGE").as_deref() {
        Ok("timescaledb") => StorageMode::Timescaledb,
        Ok("postgresql") => StorageMode::Postgresql,
        _ if server_has_timescaledb(&PgServer::from_env()).await => StorageMode::Timescaledb,
        _ => StorageMode::Postgresql,
    }
}

/// For a test that needs a server preloading TimescaleDB: true when it has one. In
/// a run for plain PostgreSQL (`TEST_STORAGE=postgresql`) the test belongs to the
/// other run and returns false; otherwise a missing TimescaleDB skips the test, or
/// fails it under `CI=true` (CI must run every test).
pub async fn needs_timescaledb(test: &str) -> bool {
    if std::env::var("TEST_STORAGE").as_deref() == Ok("postgresql") {
        eprintln!("{test}: runs in the TEST_STORAGE=timescaledb run, not in this one");
        return false;
    }
    let server = PgServer::from_env();
    if server_has_timescaledb(&server).await {
        return true;
    }
    let why = format!(
        "{test} needs a server preloading TimescaleDB, but {}:{} does not (TEST_STORAGE=timescaledb make test starts one)",
        server.host, server.port
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipped: {why}");
    false
}

/// Waits until a session of this test's database waits for the advisory lock `key`
/// (any bigint: PostgreSQL shows its high half as `classid`, its low half as `objid`).
pub async fn until_someone_waits_for_advisory_lock(client: &tokio_postgres::Client, key: i64) {
    eventually(
        Duration::from_secs(60),
        "a session waiting for the advisory lock",
        || async {
            let waiting: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                     WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 1
                       AND (l.classid::bigint << 32) | l.objid::bigint = $1
                       AND a.datname = current_database()",
                    &[&key],
                )
                .await
                .expect("pg_locks")
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await
}

/// Holds back every transaction that updates the `projects` row named `project`
/// (billing does, when it commits a batch holding it) until [`ProjectGate::open`]:
/// a trigger takes an advisory lock this gate's own session holds. Lets a test stop
/// a run in its middle for certain, instead of hoping to catch it there.
pub struct ProjectGate {
    client: tokio_postgres::Client,
}

const GATE_LOCK: i64 = 0x05c_9a7e;

impl ProjectGate {
    pub async fn close(db: &TestDb, project: &str) -> Self {
        let client = db.connect().await;
        let project = project.replace('\'', "''");
        client
            .batch_execute(&format!(
                "CREATE OR REPLACE FUNCTION osc_test_gate() RETURNS trigger LANGUAGE plpgsql AS $f$
                 BEGIN
                     IF NEW.name = '{project}' THEN PERFORM pg_advisory_xact_lock({GATE_LOCK}); END IF;
                     RETURN NEW;
                 END $f$;
                 CREATE TRIGGER osc_test_gate BEFORE UPDATE ON projects
                     FOR EACH ROW EXECUTE FUNCTION osc_test_gate();"
            ))
            .await
            .expect("gate trigger");
        client
            .execute("SELECT pg_advisory_lock($1)", &[&GATE_LOCK])
            .await
            .expect("gate lock");
        Self { client }
    }

    /// Waits until a transaction is held at the gate.
    pub async fn until_someone_waits(&self) {
        until_someone_waits_for_advisory_lock(&self.client, GATE_LOCK).await
    }

    /// Lets the held transactions go on and removes the trigger.
    pub async fn open(self) {
        self.client
            .execute("SELECT pg_advisory_unlock($1)", &[&GATE_LOCK])
            .await
            .expect("gate unlock");
        self.client
            .batch_execute("DROP TRIGGER osc_test_gate ON projects; DROP FUNCTION osc_test_gate();")
            .await
            .expect("remove the gate");
    }
}
