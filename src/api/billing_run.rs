//! `POST /api/billing/run` (API key): bills every project now and answers the
//! run's summary when it is done.

use super::auth::ApiKey;
use super::errors::ErrorBody;
use super::{ApiError, AppState};
use crate::billing::engine;
use actix_web::{web, HttpResponse};
use anyhow::Context;

/// Runs the billing engine once; 500 with a JSON reason when the run fails.
#[utoipa::path(post, path = "/api/billing/run", tag = "billing",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The run's summary", body = Object, example = json!({
            "started_at": "2026-11-22T10:00:00Z", "duration_ms": 42, "projects_billed": 3,
            "projects_skipped": 0, "projects_failed": 0, "samples_billed": 120,
            "ledger_rows": 6, "credits_billed": "17.25"})),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 500, description = "The run failed (see the log)", body = ErrorBody)))]
pub async fn run(_key: ApiKey, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let summary = engine::run(&state.pool, state.settings.billing(), chrono::Utc::now())
        .await
        .context("billing run requested through the API")?;
    Ok(HttpResponse::Ok().json(summary))
}
