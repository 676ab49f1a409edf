//! Granted credits from the portal, as the old service fetched them:
//! `GET {API_CONTACT_BASE_URL}/secure/granted-credits/?project_name=…` with
//! `X-Api-Key: {API_CONTACT_KEY}`, a plain number in the body. A changed grant is
//! written like one set through the API (ledger row + total, one transaction).

use super::account;
use crate::notify::thresholds::Threshold;
use anyhow::Context;
use chrono::Utc;
use deadpool_postgres::Pool;
use futures::StreamExt;
use rust_decimal::Decimal;
use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long one portal request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read: a grant is one number; more is not a grant, and reading
/// it whole could exhaust the memory.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What the grant sync reads of the settings (`Settings::portal`).
#[derive(Debug, Clone, Copy)]
pub struct PortalSettings<'a> {
    /// `API_CONTACT_BASE_URL`: the portal; without it nothing is fetched.
    pub base_url: Option<&'a url::Url>,
    /// `API_CONTACT_KEY`: sent as `X-Api-Key`.
    pub key: &'a str,
    /// `OS_CREDITS_PROJECT_WHITELIST`: only these projects are looked at.
    pub project_whitelist: Option<&'a BTreeSet<String>>,
    /// `OS_CREDITS_WORKERS`: portal requests at once.
    pub concurrency: usize,
    /// `NOTIFICATION_THRESHOLDS`: a changed grant may cross one.
    pub thresholds: &'a [Threshold],
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncSummary {
    /// Projects whose grant changed.
    pub changed: u64,
    /// Projects whose grant was fetched and unchanged.
    pub unchanged: u64,
    /// Projects whose fetch or write failed (logged; retried next round).
    pub failed: u64,
    /// Why the first of them failed.
    pub first_error: Option<String>,
}

/// Fetches the grant of every project billing looks at from the portal; no-op without
/// `API_CONTACT_BASE_URL`. Every project is tried; those that failed are counted,
/// with the first one's cause.
pub async fn sync_grants(
    pool: &Pool,
    settings: PortalSettings<'_>,
    http: &reqwest::Client,
) -> anyhow::Result<SyncSummary> {
    sync_grants_from(pool, settings, http, &AtomicUsize::new(0)).await
}

/// Like [`sync_grants`], starting at project number `rotation` (modulo their count)
/// and counting up `rotation` for each project it starts: a round cut off by its
/// deadline leaves `rotation` after the last project it started, so the next round
/// begins with projects this one never reached, and projects whose portal answer
/// hangs cannot starve the ones behind them.
pub async fn sync_grants_from(
    pool: &Pool,
    settings: PortalSettings<'_>,
    http: &reqwest::Client,
    rotation: &AtomicUsize,
) -> anyhow::Result<SyncSummary> {
    let Some(base) = settings.base_url else {
        return Ok(SyncSummary::default());
    };
    let mut projects = super::engine::project_names(pool, settings.project_whitelist).await?;
    if !projects.is_empty() {
        let start = rotation.load(Ordering::Relaxed) % projects.len();
        projects.rotate_left(start);
        rotation.store(start, Ordering::Relaxed);
    }
    let mut summary = SyncSummary::default();
    let mut results = futures::stream::iter(0..projects.len())
        .map(|i| {
            let project = &projects[i];
            async move {
                rotation.fetch_add(1, Ordering::Relaxed);
                (project, sync_one(pool, settings, http, base, project).await)
            }
        })
        .buffer_unordered(settings.concurrency);
    while let Some((project, result)) = results.next().await {
        match result {
            Ok(true) => summary.changed += 1,
            Ok(false) => summary.unchanged += 1,
            Err(e) => {
                summary.failed += 1;
                tracing::warn!(%project, error = %format!("{e:#}"), "could not fetch granted credits from the portal; retrying next round");
                summary
                    .first_error
                    .get_or_insert_with(|| format!("{project}: {e:#}"));
            }
        }
    }
    if summary.changed > 0 {
        // Once per round: every replica answers the new grants when it returns.
        crate::store::changes::fence_pool(pool).await;
    }
    Ok(summary)
}

/// The body as text, refused once it exceeds `limit` bytes (checked while reading,
/// so an endless answer costs at most `limit`).
async fn read_limited(mut response: reqwest::Response, limit: usize) -> anyhow::Result<String> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        anyhow::bail!("the answer is larger than {limit} bytes");
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        anyhow::ensure!(
            body.len() + chunk.len() <= limit,
            "the answer is larger than {limit} bytes"
        );
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).context("the answer is not UTF-8 text")
}

async fn sync_one(
    pool: &Pool,
    settings: PortalSettings<'_>,
    http: &reqwest::Client,
    base: &url::Url,
    project: &str,
) -> anyhow::Result<bool> {
    let granted = fetch_granted(http, base, settings.key, project).await?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let outcome = account::set_grant(
        &tx,
        project,
        granted,
        Some("granted credits from the portal"),
        "portal",
        Utc::now(),
        settings.thresholds,
    )
    .await?;
    tx.commit().await?;
    Ok(outcome.changed)
}

/// One project's grant as the portal states it.
pub async fn fetch_granted(
    http: &reqwest::Client,
    base: &url::Url,
    key: &str,
    project: &str,
) -> anyhow::Result<Decimal> {
    let mut url = base.clone();
    url.set_path(&format!(
        "{}/secure/granted-credits/",
        base.path().trim_end_matches('/')
    ));
    url.query_pairs_mut().append_pair("project_name", project);
    let mut request = http.get(url);
    // An empty API_CONTACT_KEY sends no header rather than an empty one.
    if !key.is_empty() {
        request = request.header("X-Api-Key", key);
    }
    let response = request
        .timeout(TIMEOUT)
        .send()
        .await
        .context("requesting granted credits")?;
    if let Some(redirect) = crate::outbound::refused_redirect(&response) {
        anyhow::bail!("the portal {redirect}");
    }
    let status = response.status();
    let body = read_limited(response, MAX_ANSWER_BYTES)
        .await
        .context("reading granted credits")?;
    anyhow::ensure!(status.is_success(), "the portal answered {status}");
    let text = body.trim().trim_matches('"');
    let granted = Decimal::from_str(text)
        .or_else(|_| Decimal::from_scientific(text))
        .with_context(|| {
            format!(
                "the portal's answer {:?} is not a number",
                body.chars().take(40).collect::<String>()
            )
        })?;
    anyhow::ensure!(
        !granted.is_sign_negative(),
        "the portal's grant {granted} is negative"
    );
    Ok(granted)
}
