//! Parsing requests and shaping numbers: body limits and extractor errors as JSON,
//! project names from paths, decimals from JSON, credits for both API generations.

use super::ApiError;
use crate::money::round_credits;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::{JsonPayloadError, PayloadError};
use actix_web::middleware::Next;
use actix_web::web;
use rust_decimal::Decimal;
use serde_json::value::RawValue;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Credits and amounts sent to the API stay below this in magnitude (10^15): far
/// beyond any real grant, far inside what a decimal and the ledger hold.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(2_764_472_320, 232_830, 0, false, 0);

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

/// Refuses text with a NUL character, which PostgreSQL cannot store.
pub fn no_nul(text: &str, field: &str) -> Result<(), ApiError> {
    match text.contains('\0') {
        true => Err(ApiError::BadRequest(format!(
            "{field} must not contain a NUL character"
        ))),
        false => Ok(()),
    }
}

/// Percent-decodes a path or query and refuses what is not UTF-8, so that no two
/// paths reach one project through replacement characters.
pub fn check_utf8(raw: &str) -> Result<(), ApiError> {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or_default() * 16 + hex(l).unwrap_or_default();
                decoded.push(u8::try_from(value).unwrap_or_default());
                i += 3;
            }
            (b, ..) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    match std::str::from_utf8(&decoded) {
        Ok(_) => Ok(()),
        Err(_) => Err(ApiError::BadRequest(
            "the path or query is not UTF-8 after percent-decoding".into(),
        )),
    }
}

/// Refuses a request whose path or query is not UTF-8 (`%FF`) with a JSON 400.
pub async fn utf8_only(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    check_utf8(req.path())?;
    check_utf8(req.query_string())?;
    next.call(req).await
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
        no_nul(&raw, "project_name")?;
        Ok(Self(raw))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The exact decimal of a JSON number or numeric string (`16`, `0.3`, `"-5.00"`,
/// `1e3`), parsed from the number's text (never through a float): JSON's number
/// syntax, at most 28 significant digits. Anything else is a 400 naming `field`.
pub fn decimal_from_json(raw: &RawValue, field: &str) -> Result<Decimal, ApiError> {
    let text = raw.get().trim();
    let number = if text.starts_with('"') {
        serde_json::from_str::<String>(text)
            .map(|s| s.trim().to_owned())
            .ok()
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Some(text.to_owned())
    } else {
        None
    }
    .ok_or_else(|| {
        ApiError::BadRequest(format!(
            "Parameter {field} had wrong type: expected a number"
        ))
    })?;
    exact_decimal(&number)
        .filter(|d| d.abs() < MAX_AMOUNT)
        .ok_or_else(|| {
        ApiError::BadRequest(format!(
            "Parameter {field} is not a decimal number below 10^15 in magnitude (JSON number syntax): {}",
            text.chars().take(60).collect::<String>()
        ))
    })
}

/// The decimal a JSON number's text states, or `None` for other syntax (`1_000`,
/// `+5`, `.5`, `NaN`) or a value a decimal cannot hold exactly.
fn exact_decimal(text: &str) -> Option<Decimal> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    let unsigned = mantissa.strip_prefix('-').unwrap_or(mantissa);
    let (int, frac) = match unsigned.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (unsigned, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let syntax = digits(int)
        && !(int.len() > 1 && int.starts_with('0'))
        && frac.is_none_or(digits)
        && exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    let significant = format!("{int}{}", frac.unwrap_or_default());
    let significant = significant.trim_start_matches('0');
    let significant = match frac {
        Some(_) => significant.trim_end_matches('0'),
        None => significant,
    };
    if !syntax || significant.len() > 28 {
        return None;
    }
    match exponent {
        None => Decimal::from_str_exact(text).ok(),
        Some(_) => Decimal::from_scientific(text).ok(),
    }
    .map(|d| d.normalize())
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
    fn decimals_come_exactly_from_the_numbers_text() {
        let cases = [
            ("an integer", "16", Some("16")),
            ("a fraction keeps its digits", "0.3", Some("0.3")),
            ("a numeric string", r#""-5.00""#, Some("-5")),
            ("exponent form", "1e3", Some("1000")),
            ("exponent string", r#""2.5e-2""#, Some("0.025")),
            (
                "beyond a float's precision, exactly",
                "1.00000000000000000000001",
                Some("1.00000000000000000000001"),
            ),
            (
                "28 significant digits",
                "0.1234567890123456789012345678",
                Some("0.1234567890123456789012345678"),
            ),
            (
                "29 significant digits",
                "1.0000000000000000000000000001",
                None,
            ),
            ("underscores", r#""1_000""#, None),
            ("a plus sign", r#""+5""#, None),
            ("a leading dot", r#"".5""#, None),
            ("leading zeros", r#""007""#, None),
            ("text", r#""twelve""#, None),
            ("NaN text", r#""NaN""#, None),
            ("infinity text", r#""inf""#, None),
            ("a bool", "true", None),
            ("null", "null", None),
            ("beyond the decimal range", "1e300", None),
            ("beyond the amount limit", "1e20", None),
        ];
        for (case, raw, expected) in cases {
            let raw =
                RawValue::from_string(raw.to_owned()).unwrap_or_else(|e| panic!("{raw}: {e}"));
            let got = decimal_from_json(&raw, "x").ok().map(|d| d.to_string());
            assert_eq!(got.as_deref(), expected, "{case}: {raw}");
        }
    }

    #[test]
    fn the_amount_limit_is_ten_to_the_fifteenth() {
        assert_eq!(MAX_AMOUNT, Decimal::from(1_000_000_000_000_000_i64));
        let raw = |t: &str| RawValue::from_string(t.to_owned()).unwrap_or_else(|e| panic!("{e}"));
        assert!(decimal_from_json(&raw("999999999999999.99"), "x").is_ok());
        assert!(decimal_from_json(&raw("1e15"), "x").is_err());
        assert!(decimal_from_json(&raw("-1000000000000000"), "x").is_err());
    }

    #[test]
    fn paths_must_be_utf8_after_decoding() {
        for (raw, ok) in [
            ("/api/current_credits/Gr%C3%BC%C3%9Fe", true),
            ("/api/current_credits/%FF", false),
            ("/api/current_credits/%C3", false),
            ("/api/current_credits/100%", true),
            ("a=%E2%82%AC", true),
        ] {
            assert_eq!(check_utf8(raw).is_ok(), ok, "{raw}");
        }
    }

    #[test]
    fn project_names_and_reasons_refuse_nul() {
        assert!(ProjectName::parse("a\0b".into()).is_err());
        assert!(no_nul("outage\0", "reason").is_err());
        assert!(no_nul("outage", "reason").is_ok());
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
