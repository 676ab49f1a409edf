//! `GET /api/credits_history/{project_name}`: a project's usage history as the old
//! service answered it (oldest first, `credits` = the used total after each row),
//! and by name the row charges (`values=charges`), buckets (`step`) and CSV.

use super::errors::ErrorBody;
use super::input::{credits_number, ProjectName};
use super::memo::HistoryAnswer;
use super::{ApiError, AppState};
use crate::billing::history::{self, Point};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// The old service's date format, in UTC.
pub const DATE_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// The longest `step`: ten years.
const MAX_STEP_SECONDS: i64 = 10 * 366 * 86_400;

/// Query parameters; empty values count as absent.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// First instant, `%Y-%m-%d %H:%M:%S` UTC, inclusive (default: the epoch).
    #[param(example = "2026-11-01 00:00:00")]
    start_date: Option<String>,
    /// Last instant, `%Y-%m-%d %H:%M:%S` UTC, inclusive (default: no end).
    #[param(example = "2026-11-22 00:00:00")]
    end_date: Option<String>,
    /// Bucket length: seconds, or a count with `s`, `m`, `h`, `d`, `w`; one point per
    /// metric and bucket.
    #[param(example = "1d")]
    step: Option<String>,
    /// What `credits` holds: `used` (default, as the old service: the project's used
    /// credits after the row, or at the bucket's end) or `charges` (the row's own
    /// charge, or the metric's sum in the bucket).
    #[param(example = "charges")]
    values: Option<String>,
    /// `json` (default) or `csv` (also chosen by `Accept: text/csv`).
    format: Option<String>,
}

/// The old service's history shape: three arrays of equal length, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct HistoryBody {
    /// Row times or bucket starts, `%Y-%m-%d %H:%M:%S` UTC.
    #[schema(example = json!(["2026-11-22 10:00:00"]))]
    timestamps: Vec<String>,
    /// Used credits after the row (or charges with `values=charges`), rounded.
    #[schema(example = json!([12.5]))]
    credits: Vec<serde_json::Value>,
    /// The metric that caused the row.
    #[schema(example = json!(["project_vcpu_usage"]))]
    metrics: Vec<String>,
}

/// The history: JSON `{"timestamps", "credits", "metrics"}` (404 when empty, 400 on
/// bad parameters) or CSV `timestamp,metric,credits,used_after,granted_after`.
#[utoipa::path(get, path = "/api/credits_history/{project_name}", tag = "credits (old service)",
    params(("project_name" = String, Path, description = "The project"), HistoryQuery),
    responses(
        (status = 200, description = "The usage history, oldest first",
            content((HistoryBody = "application/json"),
                    (String = "text/csv", example = "timestamp,metric,credits,used_after,granted_after\n2026-11-22 10:00:00,project_vcpu_usage,0.5,12.5,1000\n"))),
        (status = 400, description = "Bad date, start_date >= end_date, bad step, values or format", body = ErrorBody),
        (status = 404, description = "Nothing in the range", body = ErrorBody)))]
pub async fn credits_history(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<HistoryQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let project = ProjectName::parse(path.into_inner())?;
    let query = query.into_inner();
    let start =
        parse_date(query.start_date.as_deref(), "start_date")?.unwrap_or(DateTime::UNIX_EPOCH);
    let end = parse_date(query.end_date.as_deref(), "end_date")?;
    if end.is_some_and(|end| start >= end) {
        return Err(ApiError::BadRequest(
            "``start_date`` must be older than ``end_date``.".into(),
        ));
    }
    let step = match non_empty(query.step.as_deref()) {
        None => None,
        Some(raw) => Some(parse_step(raw).map_err(ApiError::BadRequest)?),
    };
    let charges = match non_empty(query.values.as_deref()) {
        None | Some("used") => false,
        Some("charges") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "Invalid values {other:?}: expected used or charges"
            )))
        }
    };
    let csv = wants_csv(non_empty(query.format.as_deref()), &req)?;

    let key = format!(
        "{start:?}|{end:?}|{:?}|{charges}|{csv}",
        step.map(|s| s.num_seconds())
    );
    let read = state.memo.begin(project.as_str()).await;
    let answer = match state.memo.history(&read, project.as_str(), &key) {
        Some(held) => held,
        None => {
            let client = state.client().await?;
            let points = history::read(&client, project.as_str(), start, end, step).await?;
            let body = match (points.is_empty(), csv) {
                (true, _) => None,
                (false, true) => Some(Bytes::from(to_csv(&points))),
                (false, false) => Some(Bytes::from(
                    serde_json::to_vec(&to_json(&points, charges, state.settings.precision))
                        .context("encoding the history")?,
                )),
            };
            let answer = HistoryAnswer { csv, body };
            state
                .memo
                .keep_history(&read, project.as_str(), &key, answer.clone());
            answer
        }
    };
    let Some(body) = answer.body else {
        return Err(ApiError::NotFound(
            "No data available for given parameters.".into(),
        ));
    };
    Ok(HttpResponse::Ok()
        .content_type(if answer.csv {
            "text/csv; charset=utf-8"
        } else {
            "application/json"
        })
        .body(body))
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// A `%Y-%m-%d %H:%M:%S` date in UTC; `None` when absent or empty.
fn parse_date(raw: Option<&str>, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(raw) = non_empty(raw) else {
        return Ok(None);
    };
    // Years 1 to 9999 only: what the format's four digits show, and inside
    // PostgreSQL's range (which starts in 4713 BC).
    NaiveDateTime::parse_from_str(raw, DATE_FORMAT)
        .ok()
        .filter(|naive| (1..=9999).contains(&chrono::Datelike::year(naive)))
        .map(|naive| Some(naive.and_utc()))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Invalid content for ``{name}``: expected {DATE_FORMAT}, e.g. 2026-11-22 10:00:00"
            ))
        })
}

/// A bucket length: whole seconds (`900`) or a count with a unit `s`, `m`, `h`, `d`,
/// `w` (`15m`, `1h`, `1d`); more than zero and at most ten years.
fn parse_step(raw: &str) -> Result<Duration, String> {
    let invalid = || {
        format!("Invalid step {raw:?}: expected seconds or a count with s, m, h, d or w (e.g. 15m, 1h, 1d), at most ten years")
    };
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let count: i64 = digits.parse().map_err(|_| invalid())?;
    let unit_seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(invalid()),
    };
    match count.checked_mul(unit_seconds) {
        Some(seconds) if (1..=MAX_STEP_SECONDS).contains(&seconds) => {
            Ok(Duration::seconds(seconds))
        }
        _ => Err(invalid()),
    }
}

/// CSV when `format=csv`, or without `format` when `Accept` names `text/csv`.
fn wants_csv(format: Option<&str>, req: &HttpRequest) -> Result<bool, ApiError> {
    match format.map(str::to_ascii_lowercase).as_deref() {
        Some("csv") => Ok(true),
        Some("json") => Ok(false),
        Some(other) => Err(ApiError::BadRequest(format!(
            "Invalid format {other:?}: expected json or csv"
        ))),
        None => Ok(req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.to_ascii_lowercase().contains("text/csv"))),
    }
}

fn to_json(points: &[Point], charges: bool, precision: Decimal) -> HistoryBody {
    HistoryBody {
        timestamps: points
            .iter()
            .map(|p| p.time.format(DATE_FORMAT).to_string())
            .collect(),
        credits: points
            .iter()
            .map(|p| credits_number(if charges { p.charge } else { p.used_after }, precision))
            .collect(),
        metrics: points.iter().map(|p| p.metric.clone()).collect(),
    }
}

fn to_csv(points: &[Point]) -> String {
    let mut out = String::with_capacity(64 * (points.len() + 1));
    out.push_str("timestamp,metric,credits,used_after,granted_after\n");
    for p in points {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{},{},{},{},{}",
            p.time.format(DATE_FORMAT),
            csv_field(&p.metric),
            p.charge,
            p.used_after,
            p.granted_after
        );
    }
    out
}

/// Quotes a field when it holds a separator, a quote or a line break (RFC 4180).
fn csv_field(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\"")).into()
    } else {
        value.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_seconds_or_counts_with_a_unit() {
        let cases = [
            ("plain seconds", "900", Some(900)),
            ("seconds", "30s", Some(30)),
            ("minutes", "15m", Some(900)),
            ("hours", "1h", Some(3600)),
            ("days", "1d", Some(86_400)),
            ("weeks", "2w", Some(14 * 86_400)),
            ("zero", "0", None),
            ("zero days", "0d", None),
            ("negative", "-1h", None),
            ("fraction", "1.5h", None),
            ("unknown unit", "1y", None),
            ("no count", "h", None),
            ("empty", "", None),
            ("beyond ten years", "4000d", None),
            ("overflowing", "99999999999999999w", None),
        ];
        for (case, raw, expected) in cases {
            let got = parse_step(raw).ok().map(|d| d.num_seconds());
            assert_eq!(got, expected, "{case}: {raw:?}");
        }
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("project_vcpu_usage"), "project_vcpu_usage");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
