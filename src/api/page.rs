//! `GET /credits_history/{project_name}`: the history page for people, as the old
//! service had. One self-contained HTML document (script inlined, no CDN) that reads
//! the JSON API from the same origin; the project name is taken from the URL by the
//! script and only ever written as text, so no name can inject markup.

use super::input::credits_text;
use super::AppState;
use crate::billing::account;
use actix_web::{web, HttpResponse};
use chrono::Utc;
use std::sync::OnceLock;

const HTML: &str = include_str!("../../static/history.html");
const SCRIPT: &str = include_str!("../../static/history.js");
/// Where `history.html` wants the script.
const SCRIPT_SLOT: &str = "/*HISTORY_JS*/";

/// The page with its script inlined, built once.
fn page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| HTML.replacen(SCRIPT_SLOT, SCRIPT, 1))
}

/// Where `history.html` wants the server-rendered summary.
const SUMMARY_SLOT: &str = "<!--SUMMARY-->";

/// The page; the numbers at the top (granted, used, remaining, run-out) are in the
/// HTML sent, so the page says something useful before (or without) its script,
/// which asks the API about the rest and replaces them. Without a database, or for
/// an unknown project, the summary is left to the script.
pub async fn history_page(state: web::Data<AppState>, path: web::Path<String>) -> HttpResponse {
    let summary = summary(&state, &path).await.unwrap_or_default();
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .body(page().replacen(SUMMARY_SLOT, &summary, 1))
}

/// The summary items as HTML (escaped), `None` when they cannot be read.
async fn summary(state: &AppState, project: &str) -> Option<String> {
    let window = chrono::Duration::from_std(state.settings.forecast_window).ok()?;
    let now = Utc::now();
    let client = state.pool.get().await.ok()?;
    let detail = account::detail(&client, project, window, now)
        .await
        .ok()??;
    let precision = state.settings.precision;
    let b = &detail.balance;
    let covered = account::covered(window, now, detail.first_usage);
    let rate = account::burn_rate_per_hour(detail.charged_in_window, covered);
    let run_out = account::run_out_at(now, b.granted, b.remaining(), rate).map_or_else(
        || "none".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
    );
    let items = [
        ("granted", credits_text(b.granted, precision)),
        ("used", credits_text(b.used, precision)),
        ("remaining", credits_text(b.remaining(), precision)),
        ("forecast run-out", run_out),
    ];
    Some(
        items
            .iter()
            .map(|(label, value)| {
                format!("<div><span>{label}</span><b>{}</b></div>", escape(value))
            })
            .collect(),
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_script_is_inlined_and_cannot_close_its_tag() {
        assert!(
            !super::SCRIPT.contains("</script"),
            "would end the inline script"
        );
        assert!(super::page().contains("function renderChart"));
        assert!(!super::page().contains(super::SCRIPT_SLOT));
    }
}
