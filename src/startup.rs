//! Wiring: pool, migrations, HTTP server and background workers, and their shutdown.

use crate::api::{self, AppState};
use crate::billing;
use crate::config::Settings;
use crate::demo_exporter::{self, DemoConfig};
use crate::notify::{self, Notifier};
use crate::scrape::Scraper;
use crate::store::storage::{self as storage_check, SharedReport, StorageReport};
use crate::store::{self, series::SeriesCache, StorageMode};
use crate::telemetry::LogHandle;
use crate::workers::{Backoff, Workers};
use actix_web::dev::{Server, ServerHandle};
use anyhow::Context;
use deadpool_postgres::Pool;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long start-up waits for the database to answer.
const DATABASE_WAIT: Duration = Duration::from_secs(30);

/// How long the workers get, after the HTTP server has stopped (which allows
/// in-flight requests 10 s), to finish their current step: a scrape, a billing run,
/// a delivery. Then they are dropped, which rolls back a billing transaction still
/// open; the next start bills it. Keeps a stop within about 25 s.
const WORKER_GRACE: Duration = Duration::from_secs(15);

/// A built service: listening, migrated, with workers ready to run.
pub struct Application {
    port: u16,
    server: Server,
    pool: Pool,
    mode: StorageMode,
    storage: SharedReport,
    scraper: Option<Arc<Scraper>>,
    receiver: Option<Arc<crate::receive::Receiver>>,
    notifier: Option<Arc<Notifier>>,
    settings: Arc<Settings>,
    cancel: CancellationToken,
    workers: Workers,
}

impl Application {
    /// Connects, migrates, binds `CREDITS_HOST:CREDITS_PORT` (port 0 picks a free one)
    /// and prepares the workers `run_until_stopped` starts.
    pub async fn build(settings: Settings, logs: Option<LogHandle>) -> anyhow::Result<Self> {
        crate::telemetry::metrics::install();
        let pool = store::pool(&settings.database)?;
        store::wait_until_reachable(&pool, DATABASE_WAIT).await.with_context(|| {
            format!(
                "cannot reach PostgreSQL at {}:{} (database {:?}, user {:?}); check POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB, POSTGRES_USER, POSTGRES_PASSWORD",
                settings.database.host, settings.database.port, settings.database.database, settings.database.user
            )
        })?;
        migrate_pool(&pool).await?;
        let storage = Arc::new(std::sync::RwLock::new(
            check_storage(&pool, settings.samples_retention_days).await?,
        ));
        let mode = storage
            .read()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .mode;

        let cache = SeriesCache::default();
        let receiver = match settings.endpoints_only {
            true => None,
            false => crate::receive::Receiver::new(
                &settings.receive,
                &settings.ingest,
                &settings.rules,
                pool.clone(),
                cache.clone(),
            )
            .map(Arc::new),
        };
        let scraper = match (settings.endpoints_only, settings.scrape.targets.is_empty()) {
            (true, _) => {
                tracing::info!("ENDPOINTS_ONLY is set: serving the API without scraping");
                None
            }
            (false, true) => {
                tracing::warn!("SCRAPE_TARGETS is empty: nothing will be scraped");
                None
            }
            (false, false) => {
                let scraper = Scraper::new(
                    &settings.scrape,
                    &settings.ingest,
                    &settings.rules,
                    pool.clone(),
                    cache,
                )?;
                scraper
                    .register()
                    .await
                    .context("registering scrape targets")?;
                Some(Arc::new(scraper))
            }
        };

        let listener =
            TcpListener::bind((settings.host.as_str(), settings.port)).with_context(|| {
                format!(
                    "binding {}:{} (CREDITS_HOST, CREDITS_PORT)",
                    settings.host, settings.port
                )
            })?;
        let port = listener.local_addr()?.port();
        let settings = Arc::new(settings);
        // Templates are checked here: a broken one stops the start.
        let notifier = match settings.endpoints_only {
            true => None,
            false => Some(Arc::new(Notifier::new(pool.clone(), settings.notify())?)),
        };
        let cancel = CancellationToken::new();
        let state = AppState::new(pool.clone(), mode, settings.clone(), logs)
            .with_storage(storage.clone())
            .with_receiver(receiver.clone());
        // Balances are answered from memory while the HTTP worker threads listen
        // (see api::memo); they run with or without the other workers, supervised
        // like them. The callback holds the memo weakly: the memo holds the callback.
        let memo = Arc::downgrade(&state.memo);
        let on_change: store::changes::OnChange = Arc::new(move |change| {
            if let Some(memo) = memo.upgrade() {
                memo.on_change(change);
            }
        });
        let mut listen_config = store::pg_config(&settings.database);
        listen_config.application_name(store::changes::APPLICATION_NAME);
        state.memo.listen(api::memo::Listen {
            config: listen_config,
            on_change,
            cancel: cancel.clone(),
            workers: state.workers.clone(),
        });
        let workers = state.workers.clone();
        let server = api::server(state, listener)?;
        tracing::info!(port, "listening");
        Ok(Self {
            port,
            server,
            pool,
            mode,
            storage,
            scraper,
            receiver,
            notifier,
            settings,
            cancel,
            workers,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection pool (tests inspect the database through it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Which storage mode the schema runs in.
    pub fn storage_mode(&self) -> StorageMode {
        self.mode
    }

    /// The scraper, when scraping is enabled.
    pub fn scraper(&self) -> Option<Arc<Scraper>> {
        self.scraper.clone()
    }

    /// A handle that stops the application like SIGTERM does.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            server: self.server.handle(),
            cancel: self.cancel.clone(),
        }
    }

    /// Runs the HTTP server and, unless `without_workers` was used, the background
    /// workers, until SIGTERM/SIGINT or a [`StopHandle`]: the server stops accepting and
    /// finishes in-flight requests, then the workers finish their current step.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run(true).await
    }

    /// Like [`run_until_stopped`](Self::run_until_stopped) but with no background
    /// workers: tests drive scrapes themselves.
    pub async fn run_without_workers(self) -> anyhow::Result<()> {
        self.run(false).await
    }

    async fn run(self, with_workers: bool) -> anyhow::Result<()> {
        let stop = self.stop_handle();
        let workers = match with_workers {
            true => self.spawn_workers()?,
            false => Vec::new(),
        };
        let signals = tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            tokio::spawn(async move { stop.stop().await });
            wait_for_signal().await;
            // Safe: everything written commits atomically or not at all.
            tracing::warn!("second signal: exiting at once");
            std::process::exit(1);
        });
        let served = self.server.await;
        self.cancel.cancel();
        stop_workers(workers).await;
        signals.abort();
        if let Some(scraper) = &self.scraper {
            scraper.release().await;
        }
        tracing::info!("stopped");
        served.context("HTTP server failed")
    }
}

impl Application {
    /// Starts every background worker under supervision ([`crate::workers`]).
    fn spawn_workers(&self) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let (settings, pool, cancel) = (&self.settings, &self.pool, &self.cancel);
        let backoff = Backoff::default();
        let mut handles = Vec::new();
        // Each target on its own schedule, as Prometheus does: a slow target delays
        // only itself.
        for index in 0..self.scraper.as_ref().map_or(0, |s| s.target_count()) {
            let Some(scraper) = self.scraper.clone() else {
                break;
            };
            let name = format!("scrape:{}", scraper.target_name(index).unwrap_or_default());
            handles.push(self.workers.spawn(
                name,
                settings.scrape.interval,
                backoff,
                cancel.clone(),
                move || {
                    let scraper = scraper.clone();
                    async move { scraper.scrape_one(index).await.map(|_| ()) }
                },
            ));
        }
        // Retention (both modes) and the storage check; one replica at a time.
        if !settings.endpoints_only {
            let (pool, days, report) = (
                pool.clone(),
                settings.samples_retention_days,
                self.storage.clone(),
            );
            handles.push(self.workers.spawn(
                "maintenance",
                settings.maintenance_interval,
                backoff,
                cancel.clone(),
                move || crate::maintenance::step(pool.clone(), days, report.clone()),
            ));
        }
        if !settings.endpoints_only {
            let (pool, s) = (pool.clone(), settings.clone());
            handles.push(self.workers.spawn(
                "billing",
                settings.billing_interval,
                backoff,
                cancel.clone(),
                move || billing::worker::bill(pool.clone(), s.clone()),
            ));
        }
        if !settings.endpoints_only && settings.api_contact_base_url.is_some() {
            let (pool, s) = (pool.clone(), settings.clone());
            let http = crate::outbound::portal_client()?;
            let rotation = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            handles.push(self.workers.spawn(
                "grant_sync",
                settings.api_contact_sync_interval,
                backoff,
                cancel.clone(),
                move || {
                    billing::worker::sync_grants(
                        pool.clone(),
                        s.clone(),
                        http.clone(),
                        rotation.clone(),
                    )
                },
            ));
        }
        if let Some(receiver) = self.receiver.clone() {
            handles.push(self.workers.spawn(
                "remote_write_completeness",
                receiver.check_interval(),
                backoff,
                cancel.clone(),
                move || {
                    let receiver = receiver.clone();
                    async move { receiver.check_completeness().await }
                },
            ));
        }
        if let Some(notifier) = self.notifier.clone() {
            let token = cancel.clone();
            handles.push(self.workers.spawn(
                "notifications",
                notify::worker::POLL,
                backoff,
                cancel.clone(),
                move || notify::worker::send_pending(notifier.clone(), token.clone()),
            ));
        }
        Ok(handles)
    }
}

/// Stops a running [`Application`].
#[derive(Clone)]
pub struct StopHandle {
    server: ServerHandle,
    cancel: CancellationToken,
}

impl StopHandle {
    /// Graceful stop: no new requests or work are taken, in-flight requests and the
    /// workers' current steps finish (both at once); returns when the server stopped.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.server.stop(true).await;
    }
}

/// Waits for the cancelled workers, at most [`WORKER_GRACE`], then drops the rest.
async fn stop_workers(mut workers: Vec<JoinHandle<()>>) {
    let all = async {
        for worker in &mut workers {
            if let Err(e) = worker.await {
                tracing::error!(error = %e, "worker ended abnormally");
            }
        }
    };
    if tokio::time::timeout(WORKER_GRACE, all).await.is_err() {
        let late = workers.iter().filter(|w| !w.is_finished()).count();
        tracing::warn!(
            workers = late,
            "workers did not finish within {WORKER_GRACE:?}: dropping their current step (an open billing transaction rolls back and is billed at the next start)"
        );
        workers.iter().for_each(JoinHandle::abort);
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Applies migrations and reports the storage mode.
async fn migrate_pool(pool: &Pool) -> anyhow::Result<StorageMode> {
    let mut client = pool.get().await.context("connecting for migrations")?;
    store::migrations::run(&mut client).await?;
    store::storage_mode(&client).await
}

/// What the storage is and whether its policies are what `migrate` sets: logged,
/// never changed (a new database records `SAMPLES_RETENTION_DAYS` once, as it gets
/// its schema).
async fn check_storage(pool: &Pool, retention_days: u32) -> anyhow::Result<StorageReport> {
    let client = pool
        .get()
        .await
        .context("connecting to inspect the storage")?;
    storage_check::record_retention_days(&client, retention_days, true).await?;
    let mut report = storage_check::inspect(&client).await?;
    report.drift = storage_check::drift(&client, &report, retention_days).await?;
    tracing::info!(storage_mode = ?report.mode, why = %report.why, "database ready");
    if let Some(advice) = &report.advice {
        tracing::warn!(storage_mode = ?report.mode, "{}: {advice}", report.why);
    }
    for drift in &report.drift {
        tracing::warn!(drift = %drift, "storage policy drift");
    }
    Ok(report)
}

/// `os-credits migrate`: apply migrations and the policies (`SAMPLES_RETENTION_DAYS`,
/// compression), print what was done, and exit.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database)?;
    store::wait_until_reachable(&pool, DATABASE_WAIT).await?;
    let mode = migrate_pool(&pool).await?;
    let client = pool.get().await?;
    storage_check::apply_policies(&client, settings.samples_retention_days, |step| {
        println!("{step}")
    })
    .await?;
    let report = storage_check::inspect(&client).await?;
    tracing::info!(storage_mode = ?mode, "migrations applied");
    println!("storage: {:?} ({})", report.mode, report.why);
    if let Some(advice) = report.advice {
        println!("to do: {advice}");
    }
    Ok(())
}

/// `os-credits migrate --to-timescaledb [--dry-run]`: convert plain tables to
/// hypertables, printing an estimate first and progress while it runs.
pub async fn migrate_to_timescaledb(settings: &Settings, dry_run: bool) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database)?;
    store::wait_until_reachable(&pool, DATABASE_WAIT).await?;
    migrate_pool(&pool).await?;
    let mut client = pool.get().await?;
    let report = storage_check::inspect(&client).await?;
    println!("found: {}", report.why);
    let estimates = storage_check::conversion_estimate(&client, &report).await?;
    if estimates.is_empty() {
        println!("nothing to convert: usage_samples and ledger are hypertables");
    }
    for e in &estimates {
        println!(
            "{}: ~{} rows, {} → hypertable with {} chunks (create_hypertable migrate_data => true copies every row into chunks, holding an exclusive lock on {} until done: writers wait; needs about {} of free disk meanwhile)",
            e.table,
            e.rows,
            storage_check::human_bytes(e.bytes),
            e.chunk,
            e.table,
            storage_check::human_bytes(e.bytes)
        );
    }
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    let after =
        storage_check::convert_to_timescaledb(&mut client, |step| println!("{step}")).await?;
    storage_check::apply_policies(&client, settings.samples_retention_days, |step| {
        println!("{step}")
    })
    .await?;
    println!("storage: {:?} ({})", after.mode, after.why);
    Ok(())
}

/// `os-credits maintain`: one maintenance round now (retention, drift check); prints
/// what it did as JSON.
pub async fn maintain(settings: &Settings) -> anyhow::Result<()> {
    let pool = store::pool(&settings.database)?;
    store::wait_until_reachable(&pool, DATABASE_WAIT).await?;
    migrate_pool(&pool).await?;
    let done = crate::maintenance::round(
        &pool,
        settings.samples_retention_days,
        None,
        chrono::Utc::now(),
    )
    .await?;
    crate::maintenance::log_round(&done);
    println!("{}", serde_json::to_string(&done)?);
    Ok(())
}

/// Writes `port` and a newline to `path` (`--port-file`): to a temporary file first,
/// then renamed, so a reader polling for the file never sees it half written.
pub fn write_port_file(path: &Path, port: u16) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, format!("{port}\n"))
        .and_then(|()| std::fs::rename(&temporary, path))
        .with_context(|| format!("writing the bound port to {} (--port-file)", path.display()))
}

/// `os-credits demo-exporter`: serve synthetic usage until SIGTERM/SIGINT.
pub async fn run_demo_exporter(
    config: DemoConfig,
    host: &str,
    port: u16,
    port_file: Option<&Path>,
) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind((host, port)).with_context(|| format!("binding {host}:{port}"))?;
    let address = listener.local_addr()?;
    if let Some(path) = port_file {
        write_port_file(path, address.port())?;
    }
    tracing::info!(%address, projects = config.projects, seed = config.seed, "demo exporter serving /metrics");
    let server = demo_exporter::server(config, listener)?;
    let handle = server.handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        handle.stop(true).await;
    });
    server.await.context("demo exporter failed")
}
