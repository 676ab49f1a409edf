//! `GET /credits_history/{project_name}`: the history page for people, as the old
//! service had. One self-contained HTML document (script inlined, no CDN) that reads
//! the JSON API from the same origin; the project name is taken from the URL by the
//! script and only ever written as text, so no name can inject markup.

use actix_web::HttpResponse;
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

/// The same page for every project; the script asks the API about it.
pub async fn history_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .body(page())
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
