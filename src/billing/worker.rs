//! The billing loop: a run at start-up, then every `BILLING_INTERVAL`; each run first
//! fetches grants from the portal when `API_CONTACT_BASE_URL` is set.

use super::{engine, portal};
use crate::config::Settings;
use chrono::Utc;
use deadpool_postgres::Pool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Bills until `cancel` fires; a run in progress is finished first (each project is
/// its own transaction, so stopping between runs loses nothing).
pub async fn run(pool: Pool, settings: Arc<Settings>, cancel: CancellationToken) {
    // Without a client (no TLS provider) grants are not synced; billing still runs.
    let http = crate::outbound::portal_client()
        .inspect_err(|e| tracing::error!(error = %e, "cannot build the portal's HTTP client; grants are not synced"))
        .ok();
    let mut ticker = tokio::time::interval(settings.billing_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let synced = match &http {
            Some(http) => portal::sync_grants(&pool, &settings, http).await,
            None => Ok(portal::SyncSummary::default()),
        };
        match synced {
            Ok(synced) if synced.changed + synced.failed > 0 => {
                tracing::info!(
                    changed = synced.changed,
                    failed = synced.failed,
                    "synced grants from the portal"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not sync grants from the portal")
            }
        }
        if let Err(e) = engine::run(&pool, &settings, Utc::now()).await {
            tracing::error!(error = %format!("{e:#}"), "billing run failed; retrying next interval");
        }
    }
    tracing::info!("billing stopped");
}
