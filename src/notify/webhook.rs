//! The portal webhook, as the old service posted it: `POST
//! {MAIL_CONTACT_URL}/credits-limit/` with a form and `X-Api-Key: {API_CONTACT_KEY}`;
//! only `200 OK` counts as delivered; a redirect is not followed (see [`crate::outbound`]).

use super::SendError;
use std::time::Duration;

/// How long one post may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The form the portal receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitForm {
    /// The project.
    pub project_name: String,
    /// Granted credits, rounded to the precision.
    pub granted_credits: String,
    /// Used credits at the crossing, rounded to the precision.
    pub used_credits: String,
    /// The crossing, Unix seconds.
    pub timestamp: i64,
    /// `half limit reached`, `full limit reached` or `"{percent}% limit reached"`.
    pub limit_type: String,
}

impl LimitForm {
    /// The `application/x-www-form-urlencoded` body.
    pub fn encode(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("project_name", &self.project_name)
            .append_pair("granted_credits", &self.granted_credits)
            .append_pair("used_credits", &self.used_credits)
            .append_pair("timestamp", &self.timestamp.to_string())
            .append_pair("limit_type", &self.limit_type)
            .finish()
    }
}

/// `{base}/credits-limit/`.
pub fn endpoint(base: &url::Url) -> url::Url {
    let mut url = base.clone();
    url.set_path(&format!(
        "{}/credits-limit/",
        base.path().trim_end_matches('/')
    ));
    url
}

/// Posts the form; any answer but 200 is a (retried) failure.
pub async fn post(
    http: &reqwest::Client,
    base: &url::Url,
    key: &str,
    form: &LimitForm,
) -> Result<(), SendError> {
    let url = endpoint(base);
    let mut request = http.post(url.clone());
    // An empty API_CONTACT_KEY sends no header rather than an empty one.
    if !key.is_empty() {
        request = request.header("X-Api-Key", key);
    }
    let response = request
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(form.encode())
        .timeout(TIMEOUT)
        .send()
        .await
        .map_err(|e| SendError::Transient(format!("posting to {url}: {e}")))?;
    if let Some(redirect) = crate::outbound::refused_redirect(&response) {
        return Err(SendError::Transient(format!(
            "the portal {redirect} ({url})"
        )));
    }
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        Ok(())
    } else {
        Err(SendError::Transient(format!(
            "the portal answered {status} to {url}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_has_the_old_services_fields() {
        let form = LimitForm {
            project_name: "Alpha & <Beta>".into(),
            granted_credits: "1000.00".into(),
            used_credits: "500.25".into(),
            timestamp: 1_795_000_000,
            limit_type: "half limit reached".into(),
        };
        assert_eq!(
            form.encode(),
            "project_name=Alpha+%26+%3CBeta%3E&granted_credits=1000.00&used_credits=500.25\
             &timestamp=1795000000&limit_type=half+limit+reached"
        );
    }

    #[test]
    fn the_endpoint_is_below_the_base() {
        for (base, expected) in [
            (
                "https://portal.example.org",
                "https://portal.example.org/credits-limit/",
            ),
            (
                "https://portal.example.org/api",
                "https://portal.example.org/api/credits-limit/",
            ),
            (
                "https://portal.example.org/api/",
                "https://portal.example.org/api/credits-limit/",
            ),
        ] {
            let base = url::Url::parse(base).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(endpoint(&base).as_str(), expected);
        }
    }
}
