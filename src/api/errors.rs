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
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Unavailable(cause) | Self::Unexpected(cause) = self {
            tracing::error!(error = %format!("{cause:#}"), "request failed");
        }
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: self.to_string(),
        })
    }
}
