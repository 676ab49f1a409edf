//! Operators' endpoints: `GET /metrics` (the service's own Prometheus metrics),
//! `GET /stats` (as the old service, plus the billing backlog and last runs),
//! `GET`/`POST /logconfig` (the log filter, changed without a restart), and the
//! middleware that measures every request by its route template.

use super::auth::ApiKey;
use super::errors::ErrorBody;
use super::{resource, ApiError, AppState};
use crate::store::targets::TargetStatus;
use crate::telemetry::metrics::{self, LastBillingRun};
use crate::telemetry::snapshot::{self, Snapshot};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing_actix_web::RequestId;

/// How long reading the database's state for `/metrics` or `/stats` may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// The operators' routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/metrics").get(prometheus))
        .service(resource("/stats").get(stats))
        .service(
            resource("/logconfig")
                .get(get_logconfig)
                .post(set_logconfig),
        );
}

/// Counts and times every request by method, route template and status, tags the
/// answer with the request id of its log span (`X-Request-Id`), and logs it at
/// `debug` (`os_credits::http=debug` turns the access log on).
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = method_label(req.method());
    // The template (`/api/current_credits/{project_name}`), never the raw path: one
    // series per route, not per project name.
    let route = req.match_pattern();
    let request_id = req.extensions().get::<RequestId>().copied();
    let result = next.call(req).await;
    let status = match &result {
        Ok(res) => res.status(),
        Err(e) => e.as_response_error().status_code(),
    };
    let elapsed = started.elapsed();
    tracing::debug!(
        target: "os_credits::http",
        method,
        route = route.as_deref().unwrap_or("unmatched"),
        status = status.as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    metrics::http_request(method, route, status.as_u16(), elapsed);
    let mut res = result?;
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(&id.to_string()).ok()) {
        res.headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), id);
    }
    Ok(res)
}

/// A method as a label: the standard ones by name, anything else `other` (a client
/// could otherwise invent a series per request).
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Reads the database's view, within [`SNAPSHOT_TIMEOUT`].
async fn snapshot(state: &AppState) -> Result<Snapshot, String> {
    let billed: Vec<&str> = state
        .settings
        .rules
        .iter()
        .map(|r| r.metric.as_str())
        .collect();
    let targets: Vec<&str> = state
        .settings
        .scrape
        .targets
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let read = async {
        let mut client = state.pool.get().await?;
        Snapshot::read(&mut client, &billed, &targets).await
    };
    match tokio::time::timeout(SNAPSHOT_TIMEOUT, read).await {
        Ok(Ok(snapshot)) => Ok(snapshot),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!("timed out after {SNAPSHOT_TIMEOUT:?}")),
    }
}

/// The connection pool at one moment.
#[derive(Serialize)]
struct PoolState {
    /// Connections at most (`POSTGRES_POOL_SIZE`).
    max_size: usize,
    /// Connections open.
    size: usize,
    /// Open connections not in use.
    available: usize,
    /// Tasks waiting for a connection.
    waiting: usize,
}

impl PoolState {
    fn of(state: &AppState) -> Self {
        let status = state.pool.status();
        Self {
            max_size: status.max_size,
            size: status.size,
            available: status.available,
            waiting: status.waiting,
        }
    }
}

/// `GET /metrics`: this process's counters and histograms, the connection pool, and
/// the database's state (backlog, lag, series, targets, notifications).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String,
        content_type = "text/plain; version=0.0.4")))]
pub async fn prometheus(state: web::Data<AppState>) -> HttpResponse {
    let mut out = metrics::render();
    let pool = PoolState::of(&state);
    // At most one database read per METRICS_REFRESH_INTERVAL, whatever the call rate.
    let shared = state.metrics_snapshot.get(|| snapshot(&state));
    let database = tokio::time::timeout(SNAPSHOT_TIMEOUT, shared)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {SNAPSHOT_TIMEOUT:?}")));
    for (name, help, value) in [
        (
            "os_credits_db_pool_max_connections",
            "Connections the pool may open (POSTGRES_POOL_SIZE).",
            pool.max_size as f64,
        ),
        (
            "os_credits_db_pool_connections",
            "Connections the pool holds open.",
            pool.size as f64,
        ),
        (
            "os_credits_db_pool_idle_connections",
            "Open connections not in use.",
            pool.available as f64,
        ),
        (
            "os_credits_db_pool_waiting",
            "Tasks waiting for a connection.",
            pool.waiting as f64,
        ),
        (
            "os_credits_uptime_seconds",
            "Seconds since the service started.",
            uptime(&state).as_secs_f64(),
        ),
        (
            "os_credits_database_up",
            "1 when the database answered this scrape.",
            f64::from(u8::from(database.is_ok())),
        ),
    ] {
        snapshot::gauge(&mut out, name, help, [(vec![], value)]);
    }
    let version = vec![("version", env!("CARGO_PKG_VERSION").to_owned())];
    snapshot::gauge(
        &mut out,
        "os_credits_build_info",
        "The running version (always 1).",
        [(version, 1.0)],
    );
    match database {
        Ok(snapshot) => snapshot.write_prometheus(&mut out),
        Err(e) => tracing::warn!(error = %e, "/metrics without the database's state"),
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(out)
}

fn uptime(state: &AppState) -> Duration {
    (Utc::now() - state.started_at).to_std().unwrap_or_default()
}

/// `?verbose=…`: as the old service, any value but empty or `false` (or `0`).
#[derive(Deserialize)]
pub struct StatsQuery {
    verbose: Option<String>,
}

/// The answer of `GET /stats`.
#[derive(Serialize)]
struct Stats {
    /// Scrapes and billing batches running at once (`OS_CREDITS_WORKERS`), as the old service.
    number_of_workers: usize,
    /// Samples stored but not billed yet (`null` while the database does not answer).
    queue_size: Option<i64>,
    /// Time since start, as the old service (Python's `timedelta`: `2 days, 3:04:05.250000`).
    uptime: String,
    uptime_seconds: f64,
    started_at: DateTime<Utc>,
    version: &'static str,
    storage_mode: crate::store::StorageMode,
    endpoints_only: bool,
    /// Configured scrape targets.
    scrape_targets: usize,
    /// Projects known.
    projects: Option<i64>,
    /// Now minus the oldest unbilled sample of any metric, in seconds.
    billing_lag_seconds: Option<f64>,
    /// The last billing run of this process (`null` before the first).
    last_billing_run: Option<LastBillingRun>,
    /// When any replica last billed a project.
    last_billed_at: Option<DateTime<Utc>>,
    /// Why the database's part is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    database_error: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    verbose: Option<Verbose>,
}

/// What `?verbose=true` adds.
#[derive(Serialize)]
struct Verbose {
    /// Per billed metric.
    backlog: BTreeMap<String, MetricBacklog>,
    /// Per configured scrape target, as `/health`.
    targets: Vec<TargetStatus>,
    /// Per remote-write sender, as `/health`.
    remote_write_senders: Vec<crate::receive::SenderStatus>,
    database_pool: PoolState,
    /// Deliveries by channel, then status.
    notifications: Option<BTreeMap<String, BTreeMap<String, i64>>>,
    /// The log filter in force (`null` when it cannot be changed).
    log_filter: Option<String>,
}

impl Verbose {
    fn new(state: &AppState, db: Option<&Snapshot>, now: DateTime<Utc>) -> Self {
        let backlog = db.map(|s| &s.backlog).into_iter().flatten();
        let mut notifications: Option<BTreeMap<String, BTreeMap<String, i64>>> = None;
        if let Some(deliveries) = db.and_then(|s| s.notifications.as_ref()) {
            let by_channel = notifications.get_or_insert_with(BTreeMap::new);
            for ((channel, status), count) in deliveries {
                let channel = by_channel.entry(channel.clone()).or_default();
                channel.insert(status.clone(), *count);
            }
        }
        Self {
            backlog: backlog
                .map(|(metric, b)| {
                    let view = MetricBacklog {
                        series: b.series,
                        unbilled_samples: b.unbilled_samples,
                        oldest_unbilled_at: b.oldest_unbilled_at,
                        lag_seconds: b.lag_seconds(now),
                    };
                    (metric.clone(), view)
                })
                .collect(),
            targets: db.map(|s| s.targets.clone()).unwrap_or_default(),
            remote_write_senders: state
                .receiver
                .as_ref()
                .map(|r| r.statuses())
                .unwrap_or_default(),
            database_pool: PoolState::of(state),
            notifications,
            log_filter: state.logs.as_ref().and_then(|l| l.current()),
        }
    }
}

#[derive(Serialize)]
struct MetricBacklog {
    series: i64,
    unbilled_samples: i64,
    oldest_unbilled_at: Option<DateTime<Utc>>,
    lag_seconds: f64,
}

/// `GET /stats` (`?verbose=true` for more).
#[utoipa::path(get, path = "/stats", tag = "operations",
    params(("verbose" = Option<bool>, Query, description = "Add per-metric backlog, per-target status, the pool, notifications and the log filter")),
    responses((status = 200, description = "Workers, backlog, uptime, last runs", body = Object, example = json!({
        "number_of_workers": 10, "queue_size": 240, "uptime": "1 day, 2:03:04.500000",
        "uptime_seconds": 93784.5, "started_at": "2026-11-21T08:00:00Z", "version": "0.1.0",
        "storage_mode": "postgresql", "endpoints_only": false, "scrape_targets": 1, "projects": 20,
        "billing_lag_seconds": 118.2, "last_billing_run": {"finished_at": "2026-11-22T10:00:00Z",
        "outcome": "success", "started_at": "2026-11-22T10:00:00Z", "duration_ms": 42,
        "projects_billed": 20, "projects_skipped": 0, "projects_failed": 0, "samples_billed": 40,
        "ledger_rows": 40, "credits_billed": "17.25"}, "last_billed_at": "2026-11-22T10:00:00Z"}))))]
pub async fn stats(state: web::Data<AppState>, query: web::Query<StatsQuery>) -> HttpResponse {
    let verbose = query
        .verbose
        .as_deref()
        .is_some_and(|v| !matches!(v, "" | "false" | "0"));
    let database = snapshot(&state).await;
    let uptime = uptime(&state);
    let db = database.as_ref().ok();
    let now = Utc::now();
    let body = Stats {
        number_of_workers: state.settings.workers,
        queue_size: db.map(Snapshot::unbilled_samples),
        uptime: python_timedelta(uptime),
        uptime_seconds: uptime.as_secs_f64(),
        started_at: state.started_at,
        version: env!("CARGO_PKG_VERSION"),
        storage_mode: state.mode,
        endpoints_only: state.settings.endpoints_only,
        scrape_targets: state.settings.scrape.targets.len(),
        projects: db.map(|s| s.projects),
        billing_lag_seconds: db.map(|s| {
            s.backlog
                .values()
                .map(|b| b.lag_seconds(now))
                .fold(0.0, f64::max)
        }),
        last_billing_run: metrics::last_billing_run(),
        last_billed_at: db.and_then(|s| s.last_billed_at),
        database_error: database.as_ref().err().cloned(),
        verbose: verbose.then(|| Verbose::new(&state, db, now)),
    };
    HttpResponse::Ok().json(body)
}

/// A duration as Python's `str(timedelta)`, which the old service's `uptime` was.
fn python_timedelta(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let clock = format!("{}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60);
    let micros = d.subsec_micros();
    let clock = match micros {
        0 => clock,
        _ => format!("{clock}.{micros:06}"),
    };
    match days {
        0 => clock,
        1 => format!("1 day, {clock}"),
        _ => format!("{days} days, {clock}"),
    }
}

/// The filter in force.
#[derive(Serialize, utoipa::ToSchema)]
pub struct LogFilter {
    /// `RUST_LOG` syntax.
    #[schema(example = "os_credits::billing=debug,info")]
    filter: String,
}

fn no_log_control() -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(ErrorBody {
        error: "the log filter cannot be read or changed in this process".into(),
    })
}

/// `GET /logconfig`: the log filter in force.
#[utoipa::path(get, path = "/logconfig", tag = "operations",
    responses(
        (status = 200, description = "The filter in force", body = LogFilter),
        (status = 503, description = "This process has no run-time log control", body = ErrorBody)))]
pub async fn get_logconfig(state: web::Data<AppState>) -> HttpResponse {
    match state.logs.as_ref().and_then(|l| l.current()) {
        Some(filter) => HttpResponse::Ok().json(LogFilter { filter }),
        None => no_log_control(),
    }
}

/// `POST /logconfig` (API key): replaces the log filter until the next change or
/// restart. The body is the directives as plain text, or `{"filter": "…"}`.
#[utoipa::path(post, path = "/logconfig", tag = "operations",
    security(("api_key" = [])),
    request_body(content = String, description = "`RUST_LOG` directives as plain text, or JSON `{\"filter\": \"…\"}`",
        example = "os_credits::billing=debug,info"),
    responses(
        (status = 200, description = "The filter now in force", body = LogFilter),
        (status = 400, description = "Not a valid filter; nothing changed", body = ErrorBody),
        (status = 401, description = "No X-API-KEY", body = ErrorBody),
        (status = 403, description = "Wrong X-API-KEY, or API_KEY not configured", body = ErrorBody),
        (status = 503, description = "This process has no run-time log control", body = ErrorBody)))]
pub async fn set_logconfig(
    _key: ApiKey,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let directives = directives(req.content_type(), &body)?;
    let Some(logs) = &state.logs else {
        return Ok(no_log_control());
    };
    let previous = logs.current();
    logs.set(&directives)
        .map_err(|e| ApiError::BadRequest(format!("Invalid log filter `{directives}`: {e}")))?;
    let filter = logs.current().unwrap_or(directives);
    tracing::info!(%filter, previous = previous.as_deref().unwrap_or(""), "log filter changed");
    Ok(HttpResponse::Ok().json(LogFilter { filter }))
}

/// The directives of a `POST /logconfig` body: JSON `{"filter": "…"}` (by content
/// type or a leading `{`), else the trimmed text.
fn directives(content_type: &str, body: &[u8]) -> Result<String, ApiError> {
    #[derive(Deserialize)]
    struct Body {
        filter: String,
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("the body is not UTF-8 text".into()))?
        .trim();
    let filter = if content_type == "application/json" || text.starts_with('{') {
        serde_json::from_str::<Body>(text)
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "expected {{\"filter\": \"…\"}} or plain-text directives: {e}"
                ))
            })?
            .filter
    } else {
        text.to_owned()
    };
    match filter.trim() {
        "" => Err(ApiError::BadRequest(
            "empty log filter: send directives such as `os_credits::billing=debug,info`".into(),
        )),
        filter => Ok(filter.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_reads_like_pythons_timedelta() {
        let cases = [
            (Duration::from_secs(0), "0:00:00"),
            (Duration::from_secs(65), "0:01:05"),
            (Duration::from_millis(3_723_250), "1:02:03.250000"),
            (Duration::from_secs(86_400 + 7), "1 day, 0:00:07"),
            (Duration::from_secs(2 * 86_400 + 36_000), "2 days, 10:00:00"),
        ];
        for (duration, expected) in cases {
            assert_eq!(python_timedelta(duration), expected, "{duration:?}");
        }
    }

    #[test]
    fn log_filters_come_as_text_or_json() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "text/plain",
                "os_credits::billing=debug,info\n",
                Some("os_credits::billing=debug,info"),
            ),
            ("", "warn", Some("warn")),
            ("application/json", r#"{"filter": "debug"}"#, Some("debug")),
            (
                "application/x-www-form-urlencoded",
                r#"{"filter": "info"}"#,
                Some("info"),
            ),
            ("application/json", r#"{"level": "debug"}"#, None),
            ("text/plain", "   ", None),
            ("application/json", r#"{"filter": " "}"#, None),
        ];
        for (content_type, body, expected) in cases {
            let got = directives(content_type, body.as_bytes()).ok();
            assert_eq!(got.as_deref(), *expected, "{content_type}: {body}");
        }
    }
}
