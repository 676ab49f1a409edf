//! HTTP API (actix-web): routes per resource, errors as JSON.

mod auth;
mod billing_run;
mod credits;
mod errors;
mod health;
mod held;
mod history;
mod input;
pub mod memo;
mod notifications;
mod openapi;
mod ops;
mod page;
mod projects;

pub use auth::constant_time_eq;
pub use errors::{ApiError, ErrorBody};

use crate::config::Settings;
use crate::store::StorageMode;
use crate::telemetry::LogHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use deadpool_postgres::Pool;
use std::net::TcpListener;
use std::sync::Arc;
use tracing_actix_web::TracingLogger;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Database connections.
    pub pool: Pool,
    /// Storage mode found at start-up.
    pub mode: StorageMode,
    /// The settings in force.
    pub settings: Arc<Settings>,
    /// Run-time log filter control (absent in tests).
    pub logs: Option<LogHandle>,
    /// When the service started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// What the storage is, refreshed by the maintenance worker.
    pub storage: crate::store::storage::SharedReport,
    /// The background workers' states (empty while none run).
    pub workers: crate::workers::Workers,
    /// The database's view behind `/metrics`, shared by scrapes within
    /// `METRICS_REFRESH_INTERVAL`.
    pub metrics_snapshot: Arc<crate::telemetry::shared::SharedSnapshot>,
    /// Answers from memory, kept fresh by change notifications.
    pub memo: Arc<memo::Memo>,
    /// Remote-write pushes (`None` while `REMOTE_WRITE_SENDERS` is empty).
    pub receiver: Option<Arc<crate::receive::Receiver>>,
}

impl AppState {
    /// Bundles the shared state.
    pub fn new(
        pool: Pool,
        mode: StorageMode,
        settings: Arc<Settings>,
        logs: Option<LogHandle>,
    ) -> Self {
        let metrics_snapshot = Arc::new(crate::telemetry::shared::SharedSnapshot::new(
            settings.metrics_refresh_interval,
        ));
        Self {
            pool,
            mode,
            settings,
            logs,
            started_at: chrono::Utc::now(),
            storage: Default::default(),
            workers: crate::workers::Workers::new(),
            metrics_snapshot,
            memo: Arc::default(),
            receiver: None,
        }
    }

    /// Shares the storage report start-up made (and the maintenance worker refreshes).
    pub fn with_storage(mut self, storage: crate::store::storage::SharedReport) -> Self {
        self.storage = storage;
        self
    }

    /// Accepts remote-write pushes through `receiver`.
    pub fn with_receiver(mut self, receiver: Option<Arc<crate::receive::Receiver>>) -> Self {
        self.receiver = receiver;
        self
    }
}

impl AppState {
    /// A pooled database connection; 503 when none can be had.
    pub async fn client(&self) -> Result<deadpool_postgres::Client, ApiError> {
        self.pool
            .get()
            .await
            .map_err(|e| ApiError::Unavailable(anyhow::Error::new(e).context("database pool")))
    }
}

/// Builds the HTTP server on a bound listener. Signals are handled by the caller.
pub fn server(state: AppState, listener: TcpListener) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        // Called on each worker thread as it starts: its listener starts listening
        // before the first request comes.
        data.memo.listen_here();
        App::new()
            // inside the request span, so it sees the request id
            .wrap(actix_web::middleware::from_fn(input::utf8_only))
            .wrap(actix_web::middleware::from_fn(ops::observe))
            .wrap(TracingLogger::default())
            .app_data(data.clone())
            .configure(routes)
            .default_service(web::to(not_found))
    })
    .disable_signals()
    .shutdown_timeout(10)
    .listen(listener)?
    .run();
    Ok(server)
}

/// Every route, with body, query and path errors answered as JSON.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(input::json_config())
        .app_data(input::payload_config())
        .app_data(input::query_config())
        .app_data(input::path_config())
        .service(resource("/ping").get(ping))
        .service(resource("/health").get(health::health))
        .service(resource("/api/metrics").get(credits::metrics))
        .service(resource("/api/costs_per_hour").post(credits::costs_per_hour))
        .service(resource("/api/current_credits/{project_name}").get(credits::current_credits))
        .service(resource("/api/credits_history/{project_name}").get(history::credits_history))
        .service(resource("/credits_history/{project_name}").get(page::history_page))
        .service(resource("/api/rules").get(credits::rules))
        .service(resource("/api/projects").get(projects::list))
        .service(resource("/api/projects/{project_name}").get(projects::detail))
        .service(resource("/api/projects/{project_name}/grant").put(projects::grant))
        .service(resource("/api/projects/{project_name}/adjustments").post(projects::adjust))
        .service(
            resource("/api/projects/{project_name}/contacts")
                .put(notifications::set_contacts)
                .get(notifications::get_contacts),
        )
        .service(resource("/api/projects/{project_name}/notifications").get(notifications::list))
        .service(resource("/api/projects/{project_name}/held").get(held::list))
        .service(resource("/api/held/{id}/approve").post(held::approve))
        .service(resource("/api/held/{id}/reject").post(held::reject))
        .service(resource("/api/notifications/{id}/resend").post(notifications::resend))
        .service(resource("/api/billing/run").post(billing_run::run))
        .service(resource("/api/v1/write").post(crate::receive::http::write))
        .configure(ops::routes)
        .configure(openapi::routes);
}

/// A path whose other methods answer a JSON 405.
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

/// A JSON 405 with the `Allow` header RFC 9110 requires: the methods the OpenAPI
/// description lists for the route (`GET` for the undocumented pages).
async fn method_not_allowed(req: actix_web::HttpRequest) -> HttpResponse {
    let allow = req
        .match_pattern()
        .and_then(|pattern| openapi::allowed_methods(&pattern))
        .unwrap_or("GET");
    let error =
        ApiError::MethodNotAllowed(format!("method not allowed on this endpoint; use {allow}"));
    let mut response = actix_web::ResponseError::error_response(&error);
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(allow) {
        response
            .headers_mut()
            .insert(actix_web::http::header::ALLOW, value);
    }
    response
}

/// `GET /ping` → `Pong`, as the old service (also the container health check).
#[utoipa::path(get, path = "/ping", tag = "service",
    responses((status = 200, description = "The service is up", body = String, content_type = "text/plain", example = "Pong")))]
async fn ping() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body("Pong")
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such endpoint".into()))
}
