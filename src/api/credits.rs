//! The old service's credit endpoints (same paths, shapes and status codes) and the
//! full rules.

use super::errors::ErrorBody;
use super::input::{credits_number, decimal_from_json, decimal_number, ProjectName};
use super::{ApiError, AppState};
use crate::billing::account;
use crate::money::round_credits;
use actix_web::{web, HttpResponse};
use chrono::Utc;
use rust_decimal::Decimal;
use std::collections::BTreeMap;

/// `GET /api/metrics` → metric → current default price, as JSON numbers.
#[utoipa::path(get, path = "/api/metrics", tag = "credits (old service)",
    responses((status = 200, description = "Metric → current price per unit",
        body = BTreeMap<String, f64>,
        example = json!({"project_mb_usage": 0.3, "project_vcpu_usage": 1.0}))))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let now = Utc::now();
    let prices: BTreeMap<&str, serde_json::Value> = state
        .settings
        .rules
        .iter()
        .map(|rule| {
            let price = rule.price_at(now, &BTreeMap::new()).value();
            // Prices are shown as configured, not rounded to the precision.
            (rule.metric.as_str(), decimal_number(price))
        })
        .collect();
    HttpResponse::Ok().json(prices)
}

/// `POST /api/costs_per_hour` with metric → units in use → credits per hour as a
/// JSON number: Σ (units × current default price, rounded to the precision).
#[utoipa::path(post, path = "/api/costs_per_hour", tag = "credits (old service)",
    request_body(content = BTreeMap<String, f64>, description = "Metric → units in use (numbers or numeric strings)",
        example = json!({"project_vcpu_usage": 16, "project_mb_usage": 32})),
    responses(
        (status = 200, description = "Credits per hour, rounded", body = f64, example = json!(25.6)),
        (status = 400, description = "Not a JSON object, or a value that is not a number or is negative", body = ErrorBody),
        (status = 404, description = "Unknown measurement", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody)))]
pub async fn costs_per_hour(
    state: web::Data<AppState>,
    body: web::Json<BTreeMap<String, Box<serde_json::value::RawValue>>>,
) -> Result<HttpResponse, ApiError> {
    let settings = &state.settings;
    let now = Utc::now();
    let mut total = Decimal::ZERO;
    for (metric, value) in body.iter() {
        let rule = settings
            .rules
            .get(metric)
            .ok_or_else(|| ApiError::NotFound(format!("Unknown measurement `{metric}`")))?;
        let amount = decimal_from_json(value, metric)?;
        if amount.is_sign_negative() && !amount.is_zero() {
            return Err(ApiError::BadRequest(format!(
                "Parameter {metric} must not be negative"
            )));
        }
        // Each metric's cost is rounded before summing, as the old service did.
        total = amount
            .checked_mul(rule.price_at(now, &BTreeMap::new()).value())
            .map(|cost| round_credits(cost, settings.precision))
            .and_then(|cost| total.checked_add(cost))
            .ok_or_else(|| ApiError::BadRequest("The costs are too large".into()))?;
    }
    Ok(HttpResponse::Ok().json(credits_number(total, settings.precision)))
}

/// `GET /api/current_credits/{project_name}` → `{"current_credits": used,
/// "granted_credits": granted}` as JSON numbers rounded to the precision; 404 for an
/// unknown project.
#[utoipa::path(get, path = "/api/current_credits/{project_name}", tag = "credits (old service)",
    params(("project_name" = String, Path, description = "The project")),
    responses(
        (status = 200, description = "Used and granted credits, rounded", body = Object,
            example = json!({"current_credits": 12.34, "granted_credits": 1000.0})),
        (status = 400, description = "Blank or over 255 bytes", body = ErrorBody),
        (status = 404, description = "Unknown project", body = ErrorBody)))]
pub async fn current_credits(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let read = state.memo.begin(project.as_str()).await;
    let balance = match state.memo.balance(&read, project.as_str()) {
        Some(held) => held,
        None => {
            let client = state.client().await?;
            let balance = account::balance(&client, project.as_str())
                .await?
                .ok_or_else(|| {
                    ApiError::NotFound(format!("No credits found for {}.", project.as_str()))
                })?;
            state.memo.keep_balance(&read, project.as_str(), &balance);
            balance
        }
    };
    let precision = state.settings.precision;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "current_credits": credits_number(balance.used, precision),
        "granted_credits": credits_number(balance.granted, precision),
    })))
}

/// `GET /api/rules` → every billing rule (kind, names, unit, price versions).
#[utoipa::path(get, path = "/api/rules", tag = "billing",
    responses((status = 200, description = "Every rule: metric, kind, friendly_name, description, unit, decrease_policy, max_gap_seconds, prices (valid_from, default, label, by_label)",
        body = Vec<Object>)))]
pub async fn rules(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.settings.rules.as_ref())
}
