//! Held charges: counter steps the jump guard held for review (see
//! `crate::billing::guard`), listed per project and approved or rejected by an
//! operator.

use super::auth::ApiKey;
use super::errors::ErrorBody;
use super::input::{credits_text, ProjectName};
use super::{ApiError, AppState};
use crate::billing::held::{self, DecideError, Decision, HeldCharge};
use actix_web::{web, HttpResponse};
use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Who decisions made through the API are booked to when the body names no one.
const ACTOR: &str = "api";
/// How many held charges a project lists at most (newest first).
pub const LIST_LIMIT: i64 = 500;

/// A held charge.
#[derive(Serialize, utoipa::ToSchema)]
pub struct HeldView {
    id: i64,
    #[schema(example = "project_vcpu_usage")]
    metric: String,
    /// The series' full label set.
    #[schema(value_type = Object)]
    series: serde_json::Value,
    /// The held step's first and last sample times.
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// Counter values before and after the step.
    #[schema(example = "201.35")]
    from_value: String,
    #[schema(example = "1006.79")]
    to_value: String,
    /// Usage of the step in the metric's unit.
    #[schema(example = "805.44")]
    quantity: String,
    /// Credits it costs when approved (rounded to the precision).
    #[schema(example = "805.44")]
    credits: String,
    /// Why it was held.
    reason: String,
    held_at: DateTime<Utc>,
    /// `held`, `approved` or `rejected`.
    #[schema(example = "held")]
    status: String,
    decided_at: Option<DateTime<Utc>>,
    decided_by: Option<String>,
    decision_reason: Option<String>,
    /// Approved: the usage ledger row that billed it.
    ledger_id: Option<i64>,
}

impl HeldView {
    /// The view of a held charge, credits rounded to `precision`.
    pub fn new(h: HeldCharge, precision: Decimal) -> Self {
        Self {
            id: h.id,
            metric: h.metric,
            series: h.labels,
            from: h.from,
            to: h.to,
            from_value: h.from_value.normalize().to_string(),
            to_value: h.to_value.normalize().to_string(),
            quantity: h.quantity.normalize().to_string(),
            credits: credits_text(h.credits, precision),
            reason: h.reason,
            held_at: h.held_at,
            status: h.status,
            decided_at: h.decided_at,
            decided_by: h.decided_by,
            decision_reason: h.decision_reason,
            ledger_id: h.ledger_id,
        }
    }
}

/// `GET /api/projects/{project_name}/held` → the project's held charges (open,
/// approved and rejected), newest first.
#[utoipa::path(get, path = "/api/projects/{project_name}/held", tag = "projects",
    params(("project_name" = String, Path, description = "The project")),
    responses(
        (status = 200, description = "Held charges, newest first (at most 500)", body = Vec<HeldView>),
        (status = 400, description = "Blank or over 255 bytes", body = ErrorBody),
        (status = 404, description = "Unknown project", body = ErrorBody)))]
pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let client = state.client().await?;
    if crate::billing::account::balance(&client, project.as_str())
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound(format!(
            "Unknown project {:?}",
            project.as_str()
        )));
    }
    let precision = state.settings.precision;
    let held: Vec<HeldView> = held::list(&client, project.as_str(), LIST_LIMIT)
        .await?
        .into_iter()
        .map(|h| HeldView::new(h, precision))
        .collect();
    Ok(HttpResponse::Ok().json(held))
}

/// Body of `POST /api/held/{id}/approve` and `/reject`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// Why; required, not blank. Kept with the decision (and in the ledger row).
    #[schema(value_type = String, required = true, example = "weights were raised on purpose")]
    reason: Option<String>,
    /// Who decides (kept as the ledger row's actor); default `api`.
    #[schema(example = "alice")]
    actor: Option<String>,
}

/// `POST /api/held/{id}/approve` (API key) → bills the held charge: a usage ledger
/// row booked now, naming the actor; answers the decided charge.
#[utoipa::path(post, path = "/api/held/{id}/approve", tag = "projects",
    params(("id" = i64, Path, description = "The held charge")),
    request_body = DecisionBody,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Billed", body = HeldView),
        (status = 400, description = "No reason, unknown field", body = ErrorBody),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 404, description = "No such held charge", body = ErrorBody),
        (status = 409, description = "Already approved or rejected", body = ErrorBody)))]
pub async fn approve(
    key: ApiKey,
    state: web::Data<AppState>,
    path: web::Path<i64>,
    body: web::Json<DecisionBody>,
) -> Result<HttpResponse, ApiError> {
    decide(
        key,
        state,
        path.into_inner(),
        body.into_inner(),
        Decision::Approve,
    )
    .await
}

/// `POST /api/held/{id}/reject` (API key) → drops the held charge with a reason.
#[utoipa::path(post, path = "/api/held/{id}/reject", tag = "projects",
    params(("id" = i64, Path, description = "The held charge")),
    request_body = DecisionBody,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Rejected", body = HeldView),
        (status = 400, description = "No reason, unknown field", body = ErrorBody),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 404, description = "No such held charge", body = ErrorBody),
        (status = 409, description = "Already approved or rejected", body = ErrorBody)))]
pub async fn reject(
    key: ApiKey,
    state: web::Data<AppState>,
    path: web::Path<i64>,
    body: web::Json<DecisionBody>,
) -> Result<HttpResponse, ApiError> {
    decide(
        key,
        state,
        path.into_inner(),
        body.into_inner(),
        Decision::Reject,
    )
    .await
}

async fn decide(
    _key: ApiKey,
    state: web::Data<AppState>,
    id: i64,
    body: DecisionBody,
    decision: Decision,
) -> Result<HttpResponse, ApiError> {
    let text = |value: Option<String>| value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let reason = text(body.reason)
        .ok_or_else(|| ApiError::BadRequest("reason is required and must not be empty".into()))?;
    let actor = text(body.actor).unwrap_or_else(|| ACTOR.to_owned());
    if actor.len() > 255 {
        return Err(ApiError::BadRequest(
            "actor is longer than 255 bytes".into(),
        ));
    }
    let mut client = state.client().await?;
    let tx = client
        .transaction()
        .await
        .context("starting a transaction")?;
    let thresholds = &state.settings.notification_thresholds;
    let decided = held::decide(&tx, id, decision, &actor, &reason, Utc::now(), thresholds)
        .await
        .map_err(|e| match e {
            DecideError::Unknown(_) => ApiError::NotFound(e.to_string()),
            DecideError::Decided { .. } => ApiError::Conflict(e.to_string()),
            DecideError::Overflow => ApiError::BadRequest(e.to_string()),
            DecideError::Unexpected(e) => ApiError::Unexpected(e),
        })?;
    tx.commit().await.context("committing the decision")?;
    crate::store::changes::fence(&client).await;
    let word = match decision {
        Decision::Approve => "approved",
        Decision::Reject => "rejected",
    };
    crate::telemetry::metrics::held_charge_decided(word);
    tracing::info!(held = id, project = %decided.project, %actor, %reason, decision = word, "held charge decided");
    Ok(HttpResponse::Ok().json(HeldView::new(decided, state.settings.precision)))
}
