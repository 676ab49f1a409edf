//! Notifications: a project's contact addresses, its notifications with each
//! channel's delivery state, and sending one again.

use super::auth::ApiKey;
use super::errors::ErrorBody;
use super::input::{credits_text, ProjectName};
use super::{ApiError, AppState};
use crate::notify::history::{self, Delivery, Notification, ResendError};
use crate::notify::outbox::Channel;
use crate::notify::{contacts, thresholds};
use actix_web::{web, HttpResponse};
use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Notifications a project's list shows at most, newest first.
const LIST_LIMIT: i64 = 100;

/// A project's contact addresses.
#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactsBody {
    /// Email addresses notifications go to (`To`); an empty list removes them all.
    #[schema(example = json!(["owner@example.org"]))]
    emails: Vec<String>,
}

/// `PUT /api/projects/{project_name}/contacts` (API key) → replaces the project's
/// addresses, each checked as an email address; answers the stored list.
#[utoipa::path(put, path = "/api/projects/{project_name}/contacts", tag = "notifications",
    params(("project_name" = String, Path, description = "The project")),
    request_body = ContactsBody,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The stored addresses", body = ContactsBody),
        (status = 400, description = "Not an email address, more than 50, unknown field", body = ErrorBody),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 404, description = "Unknown project", body = ErrorBody)))]
pub async fn set_contacts(
    _key: ApiKey,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<ContactsBody>,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let emails = contacts::parse(&body.emails).map_err(ApiError::BadRequest)?;
    let client = state.client().await?;
    if !contacts::set(&client, project.as_str(), &emails).await? {
        return Err(unknown(&project));
    }
    tracing::info!(
        project = project.as_str(),
        addresses = emails.len(),
        "contacts set"
    );
    Ok(HttpResponse::Ok().json(ContactsBody { emails }))
}

/// `GET /api/projects/{project_name}/contacts` (API key) → the project's addresses.
#[utoipa::path(get, path = "/api/projects/{project_name}/contacts", tag = "notifications",
    params(("project_name" = String, Path, description = "The project")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The stored addresses", body = ContactsBody),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 404, description = "Unknown project", body = ErrorBody)))]
pub async fn get_contacts(
    _key: ApiKey,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let client = state.client().await?;
    let emails = contacts::get(&client, project.as_str())
        .await?
        .ok_or_else(|| unknown(&project))?;
    Ok(HttpResponse::Ok().json(ContactsBody { emails }))
}

/// One threshold crossing and how it was delivered.
#[derive(Serialize, utoipa::ToSchema)]
pub struct NotificationView {
    /// For `POST /api/notifications/{id}/resend`.
    id: i64,
    project: String,
    /// The threshold crossed, a fraction of the grant.
    #[schema(example = "0.5")]
    threshold: String,
    /// As the portal webhook names it.
    #[schema(example = "half limit reached")]
    limit_type: String,
    /// Granted credits at the crossing.
    #[schema(example = "1000.00")]
    granted_credits: String,
    /// Used credits right after the crossing.
    #[schema(example = "503.20")]
    used_credits: String,
    #[schema(example = "50.3")]
    percent_used: String,
    crossed_at: DateTime<Utc>,
    /// `usage` (billing), `grant` (a lowered grant) or `adjustment`.
    cause: String,
    /// Per channel (`email`, `webhook`): `status` (`pending`, `sending`, `sent`,
    /// `failed`, `skipped`, `unknown`), `attempts`, `next_attempt_at`, `last_error`,
    /// `sent_at`.
    #[schema(value_type = Vec<Object>)]
    deliveries: Vec<Delivery>,
}

impl NotificationView {
    fn new(n: Notification, precision: Decimal) -> Self {
        Self {
            id: n.id,
            threshold: n.threshold.to_string(),
            limit_type: n.threshold.limit_type(),
            granted_credits: credits_text(n.level.granted, precision),
            used_credits: credits_text(n.level.used, precision),
            percent_used: thresholds::percent_used(n.level)
                .unwrap_or_default()
                .to_string(),
            project: n.project,
            crossed_at: n.crossed_at,
            cause: n.cause,
            deliveries: n.deliveries,
        }
    }
}

/// `GET /api/projects/{project_name}/notifications` → the project's latest 100
/// notifications, newest first, with each channel's delivery state.
#[utoipa::path(get, path = "/api/projects/{project_name}/notifications", tag = "notifications",
    params(("project_name" = String, Path, description = "The project")),
    responses(
        (status = 200, description = "Newest first", body = Vec<NotificationView>),
        (status = 400, description = "Blank or over 255 bytes", body = ErrorBody),
        (status = 404, description = "Unknown project", body = ErrorBody)))]
pub async fn list(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let client = state.client().await?;
    let precision = state.settings.precision;
    let views: Vec<NotificationView> = history::list(&client, project.as_str(), LIST_LIMIT)
        .await?
        .ok_or_else(|| unknown(&project))?
        .into_iter()
        .map(|n| NotificationView::new(n, precision))
        .collect();
    Ok(HttpResponse::Ok().json(views))
}

/// Query of a resend.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ResendQuery {
    /// `email` or `webhook`; both when absent.
    channel: Option<String>,
}

/// `POST /api/notifications/{id}/resend` (API key) → queues the notification's
/// channels (or the one named by `channel`) again, due now with a fresh attempt
/// count, whatever their state (e.g. `unknown` or `failed`); 409 while it is being
/// sent.
#[utoipa::path(post, path = "/api/notifications/{id}/resend", tag = "notifications",
    params(("id" = i64, Path, description = "The notification"), ResendQuery),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Queued; the notification as it is now", body = NotificationView),
        (status = 400, description = "Unknown channel", body = ErrorBody),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 404, description = "Unknown notification", body = ErrorBody),
        (status = 409, description = "Being sent right now", body = ErrorBody)))]
pub async fn resend(
    _key: ApiKey,
    state: web::Data<AppState>,
    path: web::Path<i64>,
    query: web::Query<ResendQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let channels: Vec<Channel> = match query.channel.as_deref() {
        None => Vec::new(),
        Some(raw) => vec![Channel::parse(raw).ok_or_else(|| {
            ApiError::BadRequest(format!("channel must be email or webhook, got {raw:?}"))
        })?],
    };
    let mut client = state.client().await?;
    let tx = client
        .transaction()
        .await
        .context("starting a transaction")?;
    let notification = match history::resend(&tx, id, &channels, Utc::now()).await {
        Ok(notification) => notification,
        Err(ResendError::Unknown(_)) => {
            return Err(ApiError::NotFound(format!("Unknown notification {id}")))
        }
        Err(e @ ResendError::Sending(_)) => {
            return Ok(HttpResponse::Conflict().json(ErrorBody {
                error: e.to_string(),
            }))
        }
        Err(ResendError::Unexpected(e)) => return Err(ApiError::from(e)),
    };
    tx.commit().await.context("committing the resend")?;
    tracing::info!(id, channels = ?channels, "notification queued again");
    Ok(HttpResponse::Ok().json(NotificationView::new(
        notification,
        state.settings.precision,
    )))
}

fn unknown(project: &ProjectName) -> ApiError {
    ApiError::NotFound(format!("Unknown project {:?}", project.as_str()))
}
