//! The billing worker's and the grant sync worker's steps; [`crate::workers`] runs
//! them (billing every `BILLING_INTERVAL`, at start-up first).

use super::{engine, portal};
use crate::config::Settings;
use chrono::Utc;
use deadpool_postgres::Pool;
use std::sync::Arc;

/// One billing run over every project. Each project is its own transaction, so
/// stopping between runs loses nothing. A run that could not start, or could not
/// bill some project (the others are billed), is a failed step: the worker shows it
/// and tries again after a backoff.
pub async fn bill(pool: Pool, settings: Arc<Settings>) -> anyhow::Result<()> {
    let summary = engine::run(&pool, settings.billing(), Utc::now()).await?;
    match summary.first_error {
        None => Ok(()),
        Some(first) => anyhow::bail!(
            "{} of {} projects could not be billed; the first: {first}",
            summary.projects_failed,
            summary.projects_failed + summary.projects_billed + summary.projects_skipped
        ),
    }
}

/// One round of fetching grants from the portal (no-op without
/// `API_CONTACT_BASE_URL`), within `API_CONTACT_SYNC_DEADLINE`: a round cut off
/// rolls back the grant it was writing; those written before stay, and the next
/// round starts after the last project this one started (`rotation`, kept by the
/// worker), so hanging answers cannot starve the projects behind them.
pub async fn sync_grants(
    pool: Pool,
    settings: Arc<Settings>,
    http: reqwest::Client,
    rotation: Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<()> {
    let deadline = settings.api_contact_sync_deadline;
    let round = portal::sync_grants_from(&pool, settings.portal(), &http, &rotation);
    let synced = tokio::time::timeout(deadline, round)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the round took longer than API_CONTACT_SYNC_DEADLINE ({deadline:?}); the portal may hang"
            )
        })??;
    if synced.changed + synced.failed > 0 {
        tracing::info!(
            changed = synced.changed,
            failed = synced.failed,
            "synced grants from the portal"
        );
    }
    match synced.first_error {
        None => Ok(()),
        Some(first) => anyhow::bail!(
            "{} grants could not be synced ({} changed, {} unchanged); the first: {first}",
            synced.failed,
            synced.changed,
            synced.unchanged
        ),
    }
}
