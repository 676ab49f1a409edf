//! HTTP API (actix-web): routes per resource, errors as JSON.

mod errors;
mod health;

pub use errors::ApiError;

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
}

impl AppState {
    /// Bundles the shared state.
    pub fn new(
        pool: Pool,
        mode: StorageMode,
        settings: Arc<Settings>,
        logs: Option<LogHandle>,
    ) -> Self {
        Self {
            pool,
            mode,
            settings,
            logs,
            started_at: chrono::Utc::now(),
        }
    }
}

/// Builds the HTTP server on a bound listener. Signals are handled by the caller.
pub fn server(state: AppState, listener: TcpListener) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
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

/// Every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ping", web::get().to(ping))
        .route("/health", web::get().to(health::health));
}

/// `GET /ping` → `Pong`, as the old service (also the container health check).
async fn ping() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body("Pong")
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such endpoint".into()))
}
