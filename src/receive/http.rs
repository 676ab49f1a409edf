//! `POST /api/v1/write`: the HTTP side of remote write.

use super::ReceiveError;
use crate::api::{ApiError, AppState};
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;

/// Stores a Prometheus remote-write 1.0 push (snappy-compressed protobuf
/// `WriteRequest`) from a sender configured in `REMOTE_WRITE_SENDERS`. 204 when stored
/// (samples already stored are not stored again, so a retried batch is harmless);
/// 400 for a body that can never be read (the sender drops it); 413 over
/// `REMOTE_WRITE_MAX_BYTES`; 503 when the database cannot store it (the sender
/// retries); 401 without, 403 with unknown credentials; 404 while no sender is
/// configured.
#[utoipa::path(post, path = "/api/v1/write", tag = "ingest",
    request_body(content = Vec<u8>, content_type = "application/x-protobuf", description = "Snappy-compressed remote-write 1.0 WriteRequest"),
    responses(
        (status = 204, description = "Stored (or already stored)"),
        (status = 400, description = "Not snappy or not a WriteRequest; the sender should drop it", body = crate::api::ErrorBody),
        (status = 401, description = "No credentials", body = crate::api::ErrorBody),
        (status = 403, description = "Credentials of no configured sender", body = crate::api::ErrorBody),
        (status = 404, description = "Remote write is not enabled (REMOTE_WRITE_SENDERS is empty)", body = crate::api::ErrorBody),
        (status = 413, description = "Larger than REMOTE_WRITE_MAX_BYTES", body = crate::api::ErrorBody),
        (status = 503, description = "The database cannot store it now; retry", body = crate::api::ErrorBody)))]
pub async fn write(
    state: web::Data<AppState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let Some(receiver) = state.receiver.as_ref() else {
        return Err(ApiError::NotFound(
            "remote write is not enabled: configure REMOTE_WRITE_SENDERS".into(),
        ));
    };
    let Some(authorization) = req.headers().get(actix_web::http::header::AUTHORIZATION) else {
        return Err(ApiError::Unauthorized(
            "send the sender's bearer token or basic auth credentials".into(),
        ));
    };
    let Some(index) = receiver.authenticate(authorization.as_bytes()) else {
        return Err(ApiError::Forbidden(
            "these credentials belong to no configured remote-write sender".into(),
        ));
    };
    if let Some(encoding) = req.headers().get(actix_web::http::header::CONTENT_ENCODING) {
        if !encoding.as_bytes().eq_ignore_ascii_case(b"snappy") {
            return Err(ApiError::BadRequest(format!(
                "Content-Encoding must be snappy, not {:?}",
                String::from_utf8_lossy(encoding.as_bytes())
            )));
        }
    }
    let max = receiver.max_bytes();
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > max {
            return Err(ApiError::PayloadTooLarge(
                ReceiveError::TooLarge(max).to_string(),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    match receiver.receive(index, &body).await {
        Ok(outcome) => {
            tracing::debug!(sender = receiver.sender_name(index), stored = outcome.stored, duplicates = outcome.duplicates, skipped = ?outcome.skipped, "remote write stored");
            Ok(HttpResponse::NoContent().finish())
        }
        Err(e @ ReceiveError::Invalid(_)) => Err(ApiError::BadRequest(e.to_string())),
        Err(e @ ReceiveError::TooLarge(_)) => Err(ApiError::PayloadTooLarge(e.to_string())),
        Err(e @ ReceiveError::Unavailable(_)) => {
            tracing::warn!(sender = receiver.sender_name(index), error = %e, "remote write not stored; the sender will retry");
            Err(ApiError::Unavailable(anyhow::anyhow!(e)))
        }
    }
}
