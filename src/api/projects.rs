//! Projects: balances, the detail with burn rate and forecast, grants and manual
//! adjustments. Credits are strings with the exact value rounded to the precision
//! (`"12.30"`); times are RFC 3339 in UTC.

use super::auth::ApiKey;
use super::errors::ErrorBody;
use super::input::{credits_text, decimal_from_json, no_nul, ProjectName};
use super::{ApiError, AppState};
use crate::billing::account::{self, AdjustError, Balance};
use crate::billing::quarantine::{self, QuarantinedView};
use crate::money::round_credits;
use actix_web::{web, HttpResponse};
use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Who grants and adjustments made through the API are booked to.
const ACTOR: &str = "api";

/// A project's totals; credits are exact values rounded to the precision.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ProjectView {
    #[schema(example = "Alpha")]
    name: String,
    #[schema(example = "1000.00")]
    granted_credits: String,
    #[schema(example = "12.30")]
    used_credits: String,
    /// Granted − used; negative when more was used than granted.
    #[schema(example = "987.70")]
    remaining_credits: String,
    /// When a billing run last committed for the project.
    last_billed_at: Option<DateTime<Utc>>,
}

impl ProjectView {
    fn new(balance: &Balance, precision: Decimal) -> Self {
        Self {
            name: balance.name.clone(),
            granted_credits: credits_text(balance.granted, precision),
            used_credits: credits_text(balance.used, precision),
            remaining_credits: credits_text(balance.remaining(), precision),
            last_billed_at: balance.last_billed_at,
        }
    }
}

/// `GET /api/projects` → every project's totals, by name.
#[utoipa::path(get, path = "/api/projects", tag = "projects",
    responses((status = 200, description = "Every project by name", body = Vec<ProjectView>)))]
pub async fn list(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let client = state.client().await?;
    let precision = state.settings.precision;
    let projects: Vec<ProjectView> = account::balances(&client)
        .await?
        .iter()
        .map(|b| ProjectView::new(b, precision))
        .collect();
    Ok(HttpResponse::Ok().json(projects))
}

/// A project's totals, burn rate, forecast and billing progress.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DetailView {
    #[serde(flatten)]
    project: ProjectView,
    created_at: DateTime<Utc>,
    /// Usage credits per hour over the window, four places finer than the precision.
    #[schema(example = "2.000000")]
    burn_rate_per_hour: String,
    /// `FORECAST_WINDOW_HOURS`.
    #[schema(example = 24)]
    burn_rate_window_hours: u64,
    /// Start of the time the burn rate covers: the window, or from the project's
    /// first billed usage when that is younger.
    #[schema(example = "2026-11-21T10:00:00Z")]
    burn_rate_since: DateTime<Utc>,
    /// Now + remaining ÷ burn rate; now when nothing remains; null when nothing
    /// burns, nothing was granted, or it lies after 9999-12-31T23:59:59Z.
    forecast_run_out_at: Option<DateTime<Utc>>,
    /// Per metric, the newest billed sample.
    metrics: Vec<MetricView>,
    /// The latest 100 counter decreases, newest first.
    counter_decreases: Vec<DecreaseView>,
    /// The latest 100 unbilled gauge gaps, newest first.
    unbilled_gaps: Vec<GapView>,
    /// The latest 100 samples billing could not charge and passed (quarantined),
    /// newest first.
    quarantined_samples: Vec<QuarantinedView>,
    /// Credits of the charges held for review and not decided yet (not in used credits).
    #[schema(example = "805.44")]
    held_credits: String,
    /// The latest 100 held charges (open and decided), newest first.
    held_charges: Vec<super::held::HeldView>,
    /// Series a target returned once and no longer returns: their usage is not
    /// billed while they are missing.
    stale_series: Vec<crate::ingest::completeness::StaleSeries>,
}

/// How far billing has come for one metric.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MetricView {
    metric: String,
    friendly_name: Option<String>,
    last_billed_sample_at: DateTime<Utc>,
}

/// A counter decrease recorded while billing.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DecreaseView {
    metric: String,
    #[schema(value_type = Object)]
    labels: serde_json::Value,
    time: DateTime<Utc>,
    from_value: String,
    to_value: String,
    /// `rebase` or `restart`.
    policy: String,
}

/// A gauge step too long to bill.
#[derive(Serialize, utoipa::ToSchema)]
pub struct GapView {
    metric: String,
    #[schema(value_type = Object)]
    labels: serde_json::Value,
    from_time: DateTime<Utc>,
    to_time: DateTime<Utc>,
}

/// Most held charges, quarantined samples and stale series together of a detail the
/// memo holds (each ~300 bytes; a project with more is read from the database).
const MEMO_LIST_ENTRIES: usize = 10;

/// Everything the project detail shows, read in one go and held by the memo: every
/// part's table notifies a change of its project (migrations 0012, 0013).
#[derive(Debug, Clone)]
pub struct FullDetail {
    /// Totals, burn rate inputs, cursors, decreases, gaps.
    pub detail: account::Detail,
    /// The latest held charges.
    pub held: Vec<crate::billing::held::HeldCharge>,
    /// Credits of the charges still held.
    pub held_open: Decimal,
    /// The latest quarantined samples.
    pub quarantined: Vec<quarantine::QuarantinedView>,
    /// Series that stopped arriving.
    pub stale: Vec<crate::ingest::completeness::StaleSeries>,
}

/// `GET /api/projects/{project_name}` → totals, burn rate over `FORECAST_WINDOW_HOURS`,
/// forecast run-out time, billing progress per metric, latest decreases and gaps.
#[utoipa::path(get, path = "/api/projects/{project_name}", tag = "projects",
    params(("project_name" = String, Path, description = "The project")),
    responses(
        (status = 200, description = "The project detail", body = DetailView),
        (status = 400, description = "Blank or over 255 bytes", body = ErrorBody),
        (status = 404, description = "Unknown project", body = ErrorBody)))]
pub async fn detail(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let settings = &state.settings;
    let window = chrono::Duration::from_std(settings.forecast_window)
        .context("forecast window out of range")?;
    let read = state.memo.begin(project.as_str()).await;
    let now = Utc::now();
    let full = match state.memo.detail(&read, project.as_str(), now) {
        Some(held) => held,
        None => {
            let client = state.client().await?;
            let (detail, held, (_, held_open), quarantined, stale) = futures::try_join!(
                account::detail(&client, project.as_str(), window, now),
                crate::billing::held::list(&client, project.as_str(), account::DETAIL_EVENTS),
                crate::billing::held::open_total(&client, project.as_str()),
                quarantine::latest(&client, project.as_str(), 100),
                crate::ingest::completeness::of_project(&client, project.as_str()),
            )?;
            let detail = detail.ok_or_else(|| unknown(&project))?;
            let until = detail.charged_until;
            let full = Arc::new(FullDetail {
                detail,
                held,
                held_open,
                quarantined,
                stale,
            });
            // A detail listing many events is read each time: memory stays bounded.
            if full.held.len() + full.quarantined.len() + full.stale.len() <= MEMO_LIST_ENTRIES {
                state
                    .memo
                    .keep_detail(&read, project.as_str(), full.clone(), until);
            }
            full
        }
    };
    let FullDetail {
        detail,
        held: held_list,
        held_open,
        quarantined,
        stale: stale_series,
    } = Arc::unwrap_or_clone(full);
    let balance = &detail.balance;
    let covered = account::covered(window, now, detail.first_usage);
    let burn_rate = account::burn_rate_per_hour(detail.charged_in_window, covered);
    let rate_quantum = settings.precision * Decimal::new(1, 4);
    let view = DetailView {
        project: ProjectView::new(balance, settings.precision),
        created_at: balance.created_at,
        burn_rate_per_hour: round_credits(burn_rate, rate_quantum).to_string(),
        burn_rate_window_hours: settings.forecast_window.as_secs() / 3600,
        burn_rate_since: now - covered,
        forecast_run_out_at: account::run_out_at(
            now,
            balance.granted,
            balance.remaining(),
            burn_rate,
        ),
        metrics: detail
            .cursors
            .into_iter()
            .map(|c| MetricView {
                friendly_name: settings
                    .rules
                    .get(&c.metric)
                    .and_then(|r| r.friendly_name.clone()),
                metric: c.metric,
                last_billed_sample_at: c.last_billed_sample_at,
            })
            .collect(),
        counter_decreases: detail
            .decreases
            .into_iter()
            .map(|d| DecreaseView {
                metric: d.metric,
                labels: d.labels,
                time: d.time,
                from_value: d.from_value.normalize().to_string(),
                to_value: d.to_value.normalize().to_string(),
                policy: d.policy,
            })
            .collect(),
        unbilled_gaps: detail
            .gaps
            .into_iter()
            .map(|g| GapView {
                metric: g.metric,
                labels: g.labels,
                from_time: g.from_time,
                to_time: g.to_time,
            })
            .collect(),
        quarantined_samples: quarantined,
        held_credits: credits_text(held_open, settings.precision),
        held_charges: held_list
            .into_iter()
            .map(|h| super::held::HeldView::new(h, settings.precision))
            .collect(),
        stale_series,
    };
    Ok(HttpResponse::Ok().json(view))
}

/// Body of `PUT /api/projects/{project_name}/grant`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// The new total grant: a number or a decimal string, zero or more, at most the
    /// precision's decimal places.
    #[schema(value_type = f64, example = 1000)]
    granted_credits: Box<serde_json::value::RawValue>,
    /// Why (optional), kept in the ledger.
    reason: Option<String>,
}

/// `PUT /api/projects/{project_name}/grant` (API key) → sets the total grant,
/// creating the project when needed; answers the project's totals.
#[utoipa::path(put, path = "/api/projects/{project_name}/grant", tag = "projects",
    params(("project_name" = String, Path, description = "The project")),
    request_body = GrantBody,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The grant is set (an unchanged grant writes no ledger row)", body = ProjectView),
        (status = 400, description = "Not a number, negative, too many decimal places, unknown field", body = ErrorBody),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody)))]
pub async fn grant(
    _key: ApiKey,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<GrantBody>,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let precision = state.settings.precision;
    let granted = amount(&body.granted_credits, "granted_credits", precision)?;
    if granted.is_sign_negative() && !granted.is_zero() {
        return Err(ApiError::BadRequest(
            "granted_credits must not be negative".into(),
        ));
    }
    let reason = body
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty());
    if let Some(reason) = reason {
        no_nul(reason, "reason")?;
    }
    let mut client = state.client().await?;
    let tx = client
        .transaction()
        .await
        .context("starting a transaction")?;
    let thresholds = &state.settings.notification_thresholds;
    let outcome = account::set_grant(
        &tx,
        project.as_str(),
        granted,
        reason,
        ACTOR,
        Utc::now(),
        thresholds,
    )
    .await?;
    tx.commit().await.context("committing the grant")?;
    // Returns once every replica answers the new grant.
    crate::store::changes::fence(&client).await;
    tracing::info!(
        project = project.as_str(),
        granted = %granted,
        created = outcome.created,
        changed = outcome.changed,
        "grant set"
    );
    Ok(HttpResponse::Ok().json(ProjectView::new(&outcome.balance, precision)))
}

/// Body of `POST /api/projects/{project_name}/adjustments`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentBody {
    /// Change of used credits, non-zero, a decimal string or a number: positive
    /// charges the project, negative gives credits back.
    #[schema(value_type = String, example = "-5.00")]
    credits: Box<serde_json::value::RawValue>,
    /// Why; required, not blank.
    #[schema(value_type = String, required = true, example = "outage refund")]
    reason: Option<String>,
}

/// An adjustment as booked, with the project's new totals.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AdjustmentView {
    /// The ledger row.
    id: i64,
    time: DateTime<Utc>,
    credits: String,
    reason: String,
    actor: &'static str,
    project: ProjectView,
}

/// `POST /api/projects/{project_name}/adjustments` (API key) → 201 with the ledger
/// row and the project's new totals.
#[utoipa::path(post, path = "/api/projects/{project_name}/adjustments", tag = "projects",
    params(("project_name" = String, Path, description = "The project")),
    request_body = AdjustmentBody,
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Booked", body = AdjustmentView),
        (status = 400, description = "Zero, not a number, too many decimal places, no reason", body = ErrorBody),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 404, description = "Unknown project", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody)))]
pub async fn adjust(
    _key: ApiKey,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<AdjustmentBody>,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let precision = state.settings.precision;
    let credits = amount(&body.credits, "credits", precision)?;
    if credits.is_zero() {
        return Err(ApiError::BadRequest("credits must not be zero".into()));
    }
    let reason = body
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| ApiError::BadRequest("reason is required and must not be empty".into()))?;
    no_nul(reason, "reason")?;
    let mut client = state.client().await?;
    let tx = client
        .transaction()
        .await
        .context("starting a transaction")?;
    let thresholds = &state.settings.notification_thresholds;
    let adjustment = account::adjust(
        &tx,
        project.as_str(),
        credits,
        reason,
        ACTOR,
        Utc::now(),
        thresholds,
    )
    .await
    .map_err(|e| match e {
        AdjustError::UnknownProject(_) => unknown(&project),
        AdjustError::Overflow => ApiError::BadRequest(e.to_string()),
        AdjustError::Unexpected(e) => ApiError::from(e),
    })?;
    tx.commit().await.context("committing the adjustment")?;
    crate::store::changes::fence(&client).await;
    tracing::info!(project = project.as_str(), credits = %credits, reason, "credits adjusted");
    Ok(HttpResponse::Created().json(AdjustmentView {
        id: adjustment.id,
        time: adjustment.time,
        credits: credits_text(adjustment.credits, precision),
        reason: reason.to_owned(),
        actor: ACTOR,
        project: ProjectView::new(&adjustment.balance, precision),
    }))
}

/// An amount of credits from a body: a decimal with at most the precision's places,
/// so what is booked is what is shown.
fn amount(
    value: &serde_json::value::RawValue,
    field: &str,
    precision: Decimal,
) -> Result<Decimal, ApiError> {
    let amount = decimal_from_json(value, field)?;
    if amount.scale() > precision.scale() {
        return Err(ApiError::BadRequest(format!(
            "{field} has more decimal places than OS_CREDITS_PRECISION ({precision}) allows"
        )));
    }
    Ok(amount)
}

fn unknown(project: &ProjectName) -> ApiError {
    ApiError::NotFound(format!("Unknown project {:?}", project.as_str()))
}
