//! `GET /health`: database reachability, storage mode and per-target scrape status.

use super::AppState;
use crate::store::targets::{self, TargetStatus};
use crate::workers::WorkerStatus;
use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Serialize)]
struct Health {
    status: &'static str,
    database: Database,
    storage_mode: crate::store::StorageMode,
    /// Why that mode, what to do, and policy drift.
    storage: crate::store::storage::StorageReport,
    endpoints_only: bool,
    targets: Vec<TargetStatus>,
    /// Remote-write senders (absent while none is configured).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    senders: Vec<crate::receive::SenderStatus>,
    workers: BTreeMap<String, WorkerStatus>,
}

#[derive(Serialize)]
struct Database {
    reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// 200 with `status` `ok` (or `degraded` when a target's last scrape failed or it
/// returns no billed series although it did before, a
/// worker's last step failed, or billing has not completed a run for 2 ×
/// `BILLING_INTERVAL`) while the database answers; 503 with `unavailable` when it
/// does not.
#[utoipa::path(get, path = "/health", tag = "service",
    responses(
        (status = 200, description = "The database answers: status ok or degraded, storage mode, per-target scrape status, per-worker state and last success", body = Object),
        (status = 503, description = "The database does not answer", body = Object)))]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let probe = tokio::time::timeout(Duration::from_secs(3), async {
        let client = state.pool.get().await?;
        client.execute("SELECT 1", &[]).await?;
        targets::statuses(&client).await
    })
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
    let (database, targets) = match probe {
        Ok(mut targets) => (
            Database {
                reachable: true,
                error: None,
            },
            {
                // A target removed from SCRAPE_TARGETS keeps its row (its history), but
                // is no longer this service's concern.
                let configured = &state.settings.scrape.targets;
                targets.retain(|t| configured.iter().any(|c| c.name == t.name));
                targets
            },
        ),
        Err(e) => (
            Database {
                reachable: false,
                error: Some(format!("{e:#}")),
            },
            Vec::new(),
        ),
    };
    let workers = state.workers.snapshot();
    let senders = state
        .receiver
        .as_ref()
        .map(|r| r.statuses())
        .unwrap_or_default();
    let senders_up = senders
        .iter()
        .all(|s| (s.up || s.last_push_at.is_none()) && s.problem.is_none());
    let status = match (
        database.reachable,
        targets
            .iter()
            .all(|t| (t.up || t.last_attempt_at.is_none()) && t.problem.is_none())
            && senders_up
            && workers_healthy(&workers, state.settings.billing_interval, Utc::now()),
    ) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let body = Health {
        status,
        database,
        storage_mode: state.mode,
        storage: state.storage.read().map(|r| r.clone()).unwrap_or_default(),
        endpoints_only: state.settings.endpoints_only,
        targets,
        senders,
        workers,
    };
    if body.database.reachable {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// No worker's last step failed, and billing (when it runs here) completed a run
/// within 2 × `BILLING_INTERVAL` (counted from the start before its first).
fn workers_healthy(
    workers: &BTreeMap<String, WorkerStatus>,
    billing_interval: Duration,
    now: DateTime<Utc>,
) -> bool {
    let stale_after =
        chrono::Duration::from_std(billing_interval * 2).unwrap_or(chrono::Duration::MAX);
    let billing_current = workers
        .get("billing")
        .is_none_or(|billing| now - billing.last_progress_at() <= stale_after);
    billing_current && workers.values().all(|w| w.consecutive_failures == 0)
}
