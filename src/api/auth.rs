//! `X-API-KEY` for protected endpoints, compared in constant time.
//!
//! As the old service: no header is 401, a wrong key 403. Unlike it, an empty
//! `API_KEY` refuses every protected request (403) instead of meaning "no key".

use super::{ApiError, AppState};
use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use std::future::{ready, Ready};

/// The header protected endpoints require.
pub const HEADER: &str = "X-API-KEY";

/// Proof that the request carried the configured API key. Put it first among a
/// handler's arguments: extractors run in order, so a refused request is refused
/// before its body is read.
#[derive(Debug)]
pub struct ApiKey;

impl FromRequest for ApiKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(check(req))
    }
}

fn check(req: &HttpRequest) -> Result<ApiKey, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| anyhow::anyhow!("application state missing"))?;
    let expected = state.settings.api_key.expose().as_bytes();
    if expected.is_empty() {
        return Err(ApiError::Forbidden(
            "API_KEY is not configured: protected endpoints are disabled".into(),
        ));
    }
    let Some(given) = req.headers().get(HEADER) else {
        return Err(ApiError::Unauthorized(
            "No API key provided (X-API-KEY)".into(),
        ));
    };
    if constant_time_eq(given.as_bytes(), expected) {
        Ok(ApiKey)
    } else {
        Err(ApiError::Forbidden("Wrong API key".into()))
    }
}

/// Whether `given` equals `expected`, taking time that depends only on the length of
/// `given` (which the caller knows anyway), never on where the first difference is
/// or on the expected key. `expected` must not be empty.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, byte) in given.iter().enumerate() {
        // Cycling through `expected` keeps the loop the same for every key length.
        diff |= byte ^ expected[i % expected.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn only_identical_keys_are_equal() {
        let cases: &[(&str, &[u8], &[u8], bool)] = &[
            ("identical", b"secret", b"secret", true),
            ("one byte differs", b"secres", b"secret", false),
            ("first byte differs", b"Secret", b"secret", false),
            ("a prefix", b"secre", b"secret", false),
            ("longer", b"secret!", b"secret", false),
            ("a repetition of the key", b"secretsecret", b"secret", false),
            ("empty given", b"", b"secret", false),
        ];
        for (case, given, expected, equal) in cases {
            assert_eq!(constant_time_eq(given, expected), *equal, "{case}");
        }
    }
}
