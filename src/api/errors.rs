//! Errors of the HTTP API: a status and a stable JSON body; causes are logged only.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

/// An error a handler returns.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; the reason is shown.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or wrong `X-API-KEY`.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: nothing there; the reason is shown.
    #[error("{0}")]
    NotFound(String),
    /// 503: the database cannot be reached.
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// 500: anything else; logged, never shown.
    #[error("internal error")]
    Unexpected(#[from] anyhow::Error),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Unavailable(cause) | Self::Unexpected(cause) = self {
            tracing::error!(error = %format!("{cause:#}"), "request failed");
        }
        HttpResponse::build(self.status_code())
            .json(serde_json::json!({ "error": self.to_string() }))
    }
}
