//! `GET /health`: database reachability, storage mode and per-target scrape status.

use super::AppState;
use crate::store::targets::{self, TargetStatus};
use actix_web::{web, HttpResponse};
use serde::Serialize;
use std::time::Duration;

#[derive(Serialize)]
struct Health {
    status: &'static str,
    database: Database,
    storage_mode: crate::store::StorageMode,
    endpoints_only: bool,
    targets: Vec<TargetStatus>,
}

#[derive(Serialize)]
struct Database {
    reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// 200 with `status` `ok` (or `degraded` when a target's last scrape failed) while
/// the database answers; 503 with `unavailable` when it does not.
#[utoipa::path(get, path = "/health", tag = "service",
    responses(
        (status = 200, description = "The database answers: status ok or degraded, storage mode, per-target scrape status", body = Object),
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
                let configured = &state.settings.scrape_targets;
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
    let status = match (
        database.reachable,
        targets.iter().all(|t| t.up || t.last_attempt_at.is_none()),
    ) {
        (false, _) => "unavailable",
        (true, false) => "degraded",
        (true, true) => "ok",
    };
    let body = Health {
        status,
        database,
        storage_mode: state.mode,
        endpoints_only: state.settings.endpoints_only,
        targets,
    };
    if body.database.reachable {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
