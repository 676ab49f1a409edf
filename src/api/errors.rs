//! Errors of the HTTP API: a status and a stable JSON body; causes are logged only.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

/// The body of every error answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Why the request failed.
    #[schema(example = "Unknown measurement `project_gpu_usage`")]
    pub error: String,
}

/// An error a handler returns.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; the reason is shown.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no `X-API-KEY` was sent.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a wrong `X-API-KEY`, or none is configured.
    #[error("{0}")]
    Forbidden(String),
    /// 404: nothing there; the reason is shown.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with the current state; the reason is shown.
    #[error("{0}")]
    Conflict(String),
    /// 405: the path exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413: the body is larger than the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 503 with `Retry-After`: the database cannot be reached, or no connection was
    /// free within `POSTGRES_POOL_TIMEOUT`.
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// 503 with `Retry-After`: a lock or statement limit ran out (a project being
    /// billed or changed elsewhere); the reason is shown.
    #[error("{0}")]
    Busy(String),
    /// 500: anything else; logged, never shown.
    #[error("internal error")]
    Unexpected(anyhow::Error),
}

/// Seconds a client is asked to wait after a 503.
const RETRY_AFTER_SECONDS: u32 = 2;

impl From<anyhow::Error> for ApiError {
    /// A bounded wait that ran out is a 503 the client may retry, not a 500.
    fn from(error: anyhow::Error) -> Self {
        match busy_reason(&error) {
            Some(reason) => {
                tracing::warn!(error = %format!("{error:#}"), "request gave up waiting");
                Self::Busy(reason.to_owned())
            }
            None => Self::Unexpected(error),
        }
    }
}

/// Why the database gave up waiting, when it did: a lock wait beyond
/// `POSTGRES_LOCK_TIMEOUT`, a statement beyond `POSTGRES_STATEMENT_TIMEOUT`.
pub fn busy_reason(error: &anyhow::Error) -> Option<&'static str> {
    use tokio_postgres::error::SqlState;
    let code = error
        .chain()
        .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
        .and_then(tokio_postgres::Error::code)?;
    if *code == SqlState::LOCK_NOT_AVAILABLE {
        Some("the project is locked by billing or another change; retry shortly")
    } else if *code == SqlState::QUERY_CANCELED {
        Some("the database did not finish in time; retry shortly")
    } else {
        None
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) | Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Unavailable(cause) | Self::Unexpected(cause) = self {
            tracing::error!(error = %format!("{cause:#}"), "request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        if let Self::Unavailable(_) | Self::Busy(_) = self {
            response.insert_header(("Retry-After", RETRY_AFTER_SECONDS.to_string()));
        }
        response.json(ErrorBody {
            error: self.to_string(),
        })
    }
}
