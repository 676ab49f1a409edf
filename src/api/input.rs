//! Parsing requests and shaping numbers: body limits and extractor errors as JSON,
//! project names from paths, decimals from JSON, credits for both API generations.

use super::ApiError;
use crate::billing::money::round_credits;
use actix_web::error::{JsonPayloadError, PayloadError};
use actix_web::web;
use rust_decimal::Decimal;
use std::str::FromStr;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Longest project name accepted in a path, in bytes.
pub const PROJECT_NAME_MAX: usize = 255;

fn too_large() -> ApiError {
    ApiError::PayloadTooLarge(format!("request body larger than {BODY_LIMIT} bytes"))
}

/// JSON bodies: at most [`BODY_LIMIT`], any content type (the old service parsed the
/// body regardless), every failure a JSON 400 (413 when too large).
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(BODY_LIMIT)
        .content_type_required(false)
        .error_handler(|error, _| {
            match error {
                JsonPayloadError::OverflowKnownLength { .. }
                | JsonPayloadError::Overflow { .. }
                | JsonPayloadError::Payload(PayloadError::Overflow) => too_large(),
                JsonPayloadError::Deserialize(e) => {
                    ApiError::BadRequest(format!("Invalid JSON: {e}"))
                }
                other => ApiError::BadRequest(format!("Invalid body: {other}")),
            }
            .into()
        })
}

/// Raw bodies: the same limit.
pub fn payload_config() -> web::PayloadConfig {
    web::PayloadConfig::new(BODY_LIMIT)
}

/// Query strings: errors as JSON 400.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|error, _| {
        ApiError::BadRequest(format!("Invalid query string: {error}")).into()
    })
}

/// Path parameters: errors as JSON 400.
pub fn path_config() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|error, _| ApiError::BadRequest(format!("Invalid path: {error}")).into())
}

/// A project name from a path: not blank, at most [`PROJECT_NAME_MAX`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectName(String);

impl ProjectName {
    /// Checks a decoded path segment.
    pub fn parse(raw: String) -> Result<Self, ApiError> {
        // `{project_name}` is what Swagger UI sends when no name was filled in; the
        // old service refused it with the same reason.
        if raw.trim().is_empty() || raw == "{project_name}" {
            return Err(ApiError::BadRequest(
                "No non-empty ``project_name`` provided".into(),
            ));
        }
        if raw.len() > PROJECT_NAME_MAX {
            return Err(ApiError::BadRequest(format!(
                "project_name is longer than {PROJECT_NAME_MAX} bytes"
            )));
        }
        Ok(Self(raw))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The exact decimal of a JSON number or numeric string (`16`, `0.3`, `"-5.00"`,
/// `1e3`); anything else, NaN and infinities are a 400 naming `field`.
pub fn decimal_from_json(value: &serde_json::Value, field: &str) -> Result<Decimal, ApiError> {
    let text = match value {
        // serde_json prints floats in their shortest round-trip form, so `0.3`
        // stays 0.3 rather than the float's binary expansion.
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => s.trim().to_owned(),
        _ => {
            return Err(ApiError::BadRequest(format!(
                "Parameter {field} had wrong type: expected a number"
            )))
        }
    };
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map(|d| d.normalize())
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "Parameter {field} is not a decimal number (or out of range): {value}"
            ))
        })
}

/// Credits as the old endpoints show them: a JSON number, rounded to the precision.
pub fn credits_number(value: Decimal, precision: Decimal) -> serde_json::Value {
    decimal_number(round_credits(value, precision))
}

/// A decimal as a JSON number: the nearest float, found through the decimal's text.
pub fn decimal_number(value: Decimal) -> serde_json::Value {
    value
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Credits as the new endpoints show them: a string with the exact rounded value,
/// all the precision's places kept (`"12.30"`).
pub fn credits_text(value: Decimal, precision: Decimal) -> String {
    round_credits(value, precision).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decimals_come_from_numbers_and_numeric_strings() {
        let cases = [
            ("an integer", json!(16), Some("16")),
            ("a float keeps its shortest digits", json!(0.3), Some("0.3")),
            ("a numeric string", json!("-5.00"), Some("-5")),
            ("exponent form", json!(1e3), Some("1000")),
            ("exponent string", json!("2.5e-2"), Some("0.025")),
            ("text", json!("twelve"), None),
            ("NaN text", json!("NaN"), None),
            ("infinity text", json!("inf"), None),
            ("a bool", json!(true), None),
            ("null", json!(null), None),
            ("beyond the decimal range", json!(1e300), None),
        ];
        for (case, value, expected) in cases {
            let got = decimal_from_json(&value, "x").ok().map(|d| d.to_string());
            assert_eq!(got.as_deref(), expected, "{case}: {value}");
        }
    }

    #[test]
    fn project_names_are_not_blank_and_not_too_long() {
        assert!(ProjectName::parse("Alpha".into()).is_ok());
        assert!(ProjectName::parse("x".repeat(255)).is_ok());
        assert!(ProjectName::parse("x".repeat(256)).is_err());
        assert!(ProjectName::parse("  ".into()).is_err());
        assert!(ProjectName::parse(String::new()).is_err());
    }

    #[test]
    fn credits_show_rounded_as_numbers_and_exact_strings() {
        let p = Decimal::new(1, 2);
        assert_eq!(credits_number(Decimal::new(12345, 3), p), json!(12.34));
        assert_eq!(credits_text(Decimal::new(123, 1), p), "12.30");
        assert_eq!(credits_text(Decimal::new(-5, 0), p), "-5.00");
    }
}
