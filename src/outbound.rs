//! HTTP clients for the peers this service calls with a secret.
//!
//! The portal (grant API and webhook) gets `X-Api-Key` on every request: its client
//! follows no redirect, so the key goes to the configured origin only, and a `3xx`
//! is a failure that names where it pointed. Scrape targets may redirect (as
//! Prometheus allows); reqwest drops `Authorization` when a redirect leaves the
//! origin (scheme, host, port), so a target's credentials stay with the target.

use std::time::Duration;

/// Redirects a scrape may follow (Prometheus follows up to 10 too).
const SCRAPE_REDIRECTS: usize = 10;

/// The client for the portal: no redirects, no `Referer`.
pub fn portal_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("os-credits/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .build()
}

/// The client for scrape targets: redirects followed within one target's
/// credentials only (reqwest removes `Authorization` across origins), no `Referer`.
pub fn scrape_client(connect_timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("os-credits/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::limited(SCRAPE_REDIRECTS))
        .referer(false)
        .build()
}

/// For a `3xx` answer, why it is not followed: the status and the `Location` it
/// names (escaped, at most 200 characters), so the operator can fix the URL.
pub fn refused_redirect(response: &reqwest::Response) -> Option<String> {
    if !response.status().is_redirection() {
        return None;
    }
    let location = response.headers().get(reqwest::header::LOCATION).map(|l| {
        String::from_utf8_lossy(l.as_bytes())
            .chars()
            .take(200)
            .collect::<String>()
    });
    Some(match location {
        Some(location) => format!(
            "answered {} redirecting to {location:?}; redirects are not followed (the API key goes to the configured URL only): configure the final URL",
            response.status()
        ),
        None => format!(
            "answered {} (a redirect without Location); redirects are not followed",
            response.status()
        ),
    })
}
