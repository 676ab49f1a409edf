//! Scraping: a thin source. Fetch each exporter (or a site Prometheus' `/federate`)
//! on its own schedule and hand the body to the one ingest path (`crate::ingest`).

pub mod targets;

use crate::billing::rules::Rules;
use crate::domain::TargetAuth;
use crate::ingest::{
    self, completeness, IngestContext, IngestError, IngestOutcome, IngestSettings,
};
use crate::store::series::SeriesCache;
use crate::store::targets::{self as target_store, Attempt};
use anyhow::Context;
use chrono::Utc;
use deadpool_postgres::Pool;
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use targets::ScrapeTarget;

/// Why one scrape failed. The text is what `/health` shows as the target's last error.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Connection refused, DNS, TLS, timeout or a broken body stream.
    #[error("fetch failed: {0}")]
    Fetch(String),
    /// The exporter answered with a non-success status.
    #[error("HTTP status {0}")]
    Status(reqwest::StatusCode),
    /// The body exceeded `SCRAPE_MAX_BYTES`.
    #[error("body larger than SCRAPE_MAX_BYTES ({0} bytes)")]
    TooLarge(usize),
    /// The body is not UTF-8 text.
    #[error("body is not UTF-8 text")]
    NotUtf8,
    /// The body was fetched but not stored (unparseable, or the database failed).
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

impl ScrapeError {
    /// The `outcome` label of a failed scrape: a few fixed words, never the message.
    pub fn kind(&self) -> &'static str {
        match self {
            ScrapeError::Fetch(_) => "unreachable",
            ScrapeError::Status(_) => "bad_status",
            ScrapeError::TooLarge(_) => "too_large",
            ScrapeError::NotUtf8 => "not_utf8",
            ScrapeError::Ingest(e) => e.kind(),
        }
    }
}

/// What scraping reads of the settings.
#[derive(Debug, Clone)]
pub struct ScrapeSettings {
    /// `SCRAPE_TARGETS`: the exporters to scrape.
    pub targets: Vec<ScrapeTarget>,
    /// `SCRAPE_INTERVAL`: time between two scrapes of a target.
    pub interval: Duration,
    /// `SCRAPE_TIMEOUT`: a scrape taking longer fails.
    pub timeout: Duration,
    /// `SCRAPE_MAX_BYTES`: a body larger than this (after decompression) fails.
    pub max_bytes: usize,
    /// `OS_CREDITS_WORKERS`: how many scrapes run at once.
    pub concurrency: usize,
}

/// Scrapes the configured targets ([`Scraper::scrape_all`], run every
/// `SCRAPE_INTERVAL` by a supervised worker).
pub struct Scraper {
    http: reqwest::Client,
    pool: Pool,
    cache: SeriesCache,
    targets: Vec<(ScrapeTarget, Arc<IngestContext>)>,
    owner: String,
    interval: Duration,
    timeout: Duration,
    max_bytes: usize,
    concurrency: usize,
    completeness: completeness::Completeness,
}

impl Scraper {
    /// Prepares a scraper for the targets in `settings`.
    pub fn new(
        settings: &ScrapeSettings,
        ingest: &IngestSettings,
        rules: &Rules,
        pool: Pool,
        cache: SeriesCache,
    ) -> anyhow::Result<Self> {
        let http = crate::outbound::scrape_client(settings.timeout)?;
        let targets = settings
            .targets
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    Arc::new(IngestContext::new(ingest, rules, t.labels.clone())),
                )
            })
            .collect();
        let owner = format!(
            "{}-{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "os-credits".into()),
            std::process::id(),
            Utc::now().timestamp_micros()
        );
        Ok(Self {
            http,
            pool,
            cache,
            targets,
            owner,
            interval: settings.interval,
            timeout: settings.timeout,
            max_bytes: settings.max_bytes,
            concurrency: settings.concurrency,
            completeness: completeness::Completeness::default(),
        })
    }

    /// Gives up this replica's leases (at shutdown) so another takes over at once.
    pub async fn release(&self) {
        let result = async {
            let client = self.pool.get().await?;
            target_store::release(&client, &self.owner).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %format!("{e:#}"), "could not release scrape leases");
        }
    }

    /// Creates the status rows of the configured targets (at start-up, before scraping).
    pub async fn register(&self) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        for (target, _) in &self.targets {
            target_store::register(&client, &target.name, target.url.as_str()).await?;
        }
        Ok(())
    }

    /// One cycle: every target this replica can claim, `OS_CREDITS_WORKERS` at a time.
    /// Returns each scraped target's name and attempt; a failing target does not
    /// disturb the others.
    pub async fn scrape_all(&self) -> Vec<(String, Attempt)> {
        // Indices rather than references: a closure over borrowed items is not general
        // enough for the spawned scrape loop.
        futures::stream::iter(0..self.targets.len())
            .map(|index| async move {
                self.scrape_one(index).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %format!("{e:#}"), "scrape not claimed or not recorded");
                    None
                })
            })
            .buffer_unordered(self.concurrency)
            .filter_map(|done| async move { done })
            .collect()
            .await
    }

    /// How many targets are configured (each runs on its own schedule, by index).
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// The name of the target at `index`.
    pub fn target_name(&self, index: usize) -> Option<&str> {
        self.targets.get(index).map(|(t, _)| t.name.as_str())
    }

    /// One scrape of the target at `index`, when this replica can claim it. A failed
    /// scrape is an `Ok` attempt (recorded for `/health`); `Err` means the database
    /// could not claim or record it.
    pub async fn scrape_one(&self, index: usize) -> anyhow::Result<Option<(String, Attempt)>> {
        let Some((target, ctx)) = self.targets.get(index) else {
            return Ok(None);
        };
        if !self.claim(target).await.context("claiming the target")? {
            return Ok(None);
        }
        let attempt = self.scrape_target(target, ctx).await;
        let client = self.pool.get().await.context("recording the scrape")?;
        target_store::record(&client, &target.name, &attempt)
            .await
            .context("recording the scrape")?;
        Ok(Some((target.name.clone(), attempt)))
    }

    async fn claim(&self, target: &ScrapeTarget) -> anyhow::Result<bool> {
        let client = self.pool.get().await?;
        let lease = self.interval * 2 + self.timeout;
        target_store::claim(&client, &target.name, &self.owner, lease).await
    }

    #[tracing::instrument(skip_all, fields(target = %target.name))]
    async fn scrape_target(&self, target: &ScrapeTarget, ctx: &Arc<IngestContext>) -> Attempt {
        let started_at = Utc::now();
        let clock = Instant::now();
        let result = async {
            let body = fetch(&self.http, target, self.timeout, self.max_bytes).await?;
            let outcome: IngestOutcome =
                ingest::ingest_text(&self.pool, &self.cache, ctx.clone(), body, started_at).await?;
            Ok::<_, ScrapeError>(outcome)
        }
        .await;
        let duration = clock.elapsed();
        crate::telemetry::metrics::scrape_finished(
            &target.name,
            result
                .as_ref()
                .map(|o| o.counts())
                .map_err(ScrapeError::kind),
            duration,
        );
        let result = match result {
            Ok(outcome) => {
                tracing::debug!(stored = outcome.stored, duplicates = outcome.duplicates, skipped = ?outcome.skipped, "scraped");
                let skipped = outcome.skipped;
                if skipped.bad_project + skipped.nul_label > 0 {
                    tracing::warn!(
                        bad_project = skipped.bad_project,
                        nul_label = skipped.nul_label,
                        stored = outcome.stored,
                        "dropped samples that cannot be stored or served (a project name that is blank, over 255 bytes or holds a NUL; a label value with a NUL); the rest was stored"
                    );
                }
                self.check_completeness(&target.name, started_at, outcome.series)
                    .await;
                Ok(outcome.stored)
            }
            Err(e) => {
                tracing::warn!(error = %e, "scrape failed");
                Err(e.to_string())
            }
        };
        Attempt {
            started_at,
            duration,
            result,
        }
    }
}

impl Scraper {
    /// Records which billed series a target returned (see [`completeness`]); a
    /// failure is logged, the scrape itself stands.
    async fn check_completeness(&self, target: &str, at: chrono::DateTime<Utc>, series: Vec<i64>) {
        let change = self.completeness.observe(target, at, series);
        let result = async {
            let client = self.pool.get().await?;
            completeness::record(&client, target, at, &change).await
        }
        .await;
        match result {
            Ok(stale) => crate::telemetry::metrics::stale_series(target, stale),
            Err(e) => {
                tracing::warn!(%target, error = %format!("{e:#}"), "could not record the target's billed series")
            }
        }
    }
}

/// Fetches a target's exposition text within `timeout` and `max_bytes`.
pub async fn fetch(
    http: &reqwest::Client,
    target: &ScrapeTarget,
    timeout: Duration,
    max_bytes: usize,
) -> Result<String, ScrapeError> {
    let mut request = http.get(target.url.clone()).timeout(timeout).header(
        reqwest::header::ACCEPT,
        "text/plain;version=0.0.4;q=0.9,*/*;q=0.1",
    );
    request = match &target.auth {
        TargetAuth::None => request,
        TargetAuth::Bearer(token) => request.bearer_auth(token.expose()),
        TargetAuth::Basic { username, password } => {
            request.basic_auth(username, Some(password.expose()))
        }
    };
    let fetch_error = |e: reqwest::Error| {
        // reqwest's own message names the URL; walking the sources gives the cause.
        let mut message = if e.is_timeout() {
            "timed out".to_owned()
        } else {
            e.to_string()
        };
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        ScrapeError::Fetch(message)
    };
    let mut response = request.send().await.map_err(fetch_error)?;
    if !response.status().is_success() {
        return Err(ScrapeError::Status(response.status()));
    }
    if response
        .content_length()
        .is_some_and(|len| len > max_bytes as u64)
    {
        return Err(ScrapeError::TooLarge(max_bytes));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(fetch_error)? {
        if body.len() + chunk.len() > max_bytes {
            return Err(ScrapeError::TooLarge(max_bytes));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| ScrapeError::NotUtf8)
}
