//! `SCRAPE_TARGETS`: a comma-separated URL list, or a JSON array of target objects.

use crate::domain::{is_label_name, Secret, TargetAuth};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// One exporter to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeTarget {
    /// Stable name for status and leases (defaults to the URL without credentials).
    pub name: String,
    /// What is fetched, with federation `match[]` selectors already in the query.
    pub url: url::Url,
    /// Labels added to every sample of this target (e.g. `location`).
    pub labels: BTreeMap<String, String>,
    /// Credentials.
    pub auth: TargetAuth,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    url: String,
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    bearer_token: Option<String>,
    basic_auth: Option<RawBasicAuth>,
    #[serde(default, rename = "match")]
    match_selectors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasicAuth {
    username: String,
    #[serde(default)]
    password: String,
}

/// Parses `SCRAPE_TARGETS`; the error says which target is wrong and why.
pub fn parse_targets(raw: &str) -> Result<Vec<ScrapeTarget>, String> {
    let raw = raw.trim();
    let raw_targets: Vec<RawTarget> = if raw.is_empty() {
        Vec::new()
    } else if raw.starts_with('[') {
        serde_json::from_str(raw).map_err(|e| {
            format!("expected a JSON array of objects with \"url\" and optional \"name\", \"labels\", \"bearer_token\", \"basic_auth\", \"match\": {e}")
        })?
    } else {
        raw.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|url| RawTarget {
                url: url.to_owned(),
                name: None,
                labels: BTreeMap::new(),
                bearer_token: None,
                basic_auth: None,
                match_selectors: Vec::new(),
            })
            .collect()
    };
    let mut names = BTreeSet::new();
    let mut targets = Vec::with_capacity(raw_targets.len());
    for (index, raw_target) in raw_targets.into_iter().enumerate() {
        let target = build_target(raw_target).map_err(|e| format!("target {}: {e}", index + 1))?;
        if !names.insert(target.name.clone()) {
            return Err(format!(
                "target name {:?} is used twice; give each target its own \"name\"",
                target.name
            ));
        }
        targets.push(target);
    }
    Ok(targets)
}

fn build_target(raw: RawTarget) -> Result<ScrapeTarget, String> {
    let mut url =
        url::Url::parse(&raw.url).map_err(|e| format!("{:?} is not a URL: {e}", raw.url))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{:?} must be an http:// or https:// URL with a host",
            raw.url
        ));
    }
    // Credentials in the URL become basic auth, so they never show in names or logs.
    let url_auth = (!url.username().is_empty()).then(|| TargetAuth::Basic {
        username: url.username().to_owned(),
        password: Secret::new(url.password().unwrap_or_default()),
    });
    let _ = url.set_username("");
    let _ = url.set_password(None);
    for selector in &raw.match_selectors {
        url.query_pairs_mut().append_pair("match[]", selector);
    }
    let auth = match (raw.bearer_token, raw.basic_auth, url_auth) {
        (Some(_), Some(_), _) => {
            return Err("give either \"bearer_token\" or \"basic_auth\", not both".into())
        }
        (Some(token), None, _) => TargetAuth::Bearer(Secret::new(token)),
        (None, Some(basic), _) => TargetAuth::Basic {
            username: basic.username,
            password: Secret::new(basic.password),
        },
        (None, None, Some(auth)) => auth,
        (None, None, None) => TargetAuth::None,
    };
    for name in raw.labels.keys() {
        if !is_label_name(name) || name.starts_with("__") {
            return Err(format!("{name:?} is not a label name that may be added"));
        }
    }
    let name = match raw.name {
        Some(name) if !name.trim().is_empty() => name.trim().to_owned(),
        Some(_) => return Err("\"name\" is empty".into()),
        None => url.to_string(),
    };
    Ok(ScrapeTarget {
        name,
        url,
        labels: raw.labels,
        auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_list_is_the_simple_case() {
        let targets =
            parse_targets("http://127.0.0.1:9100/metrics, https://exporter.example/metrics")
                .expect("valid");
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].name, "http://127.0.0.1:9100/metrics");
        assert_eq!(targets[0].auth, TargetAuth::None);
        assert!(parse_targets("  ").expect("empty is valid").is_empty());
    }

    #[test]
    fn the_json_form_carries_labels_auth_and_federation_selectors() {
        let targets = parse_targets(
            r#"[{"url": "http://127.0.0.1:9090/federate", "name": "bielefeld", "labels": {"location": "Bielefeld", "location_id": "1"},
                "bearer_token": "t0k", "match": ["{__name__=~\"project_.*\"}"]}]"#,
        )
        .expect("valid");
        let t = &targets[0];
        assert_eq!(t.name, "bielefeld");
        assert_eq!(
            t.labels.get("location").map(String::as_str),
            Some("Bielefeld")
        );
        assert_eq!(t.auth, TargetAuth::Bearer(Secret::new("t0k")));
        let pairs: Vec<(String, String)> = t
            .url
            .query_pairs()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert_eq!(
            pairs,
            vec![(
                "match[]".to_string(),
                "{__name__=~\"project_.*\"}".to_string()
            )]
        );
    }

    #[test]
    fn credentials_in_the_url_become_basic_auth_and_leave_the_name() {
        let targets = parse_targets("http://user:pw@127.0.0.1:9100/metrics").expect("valid");
        assert_eq!(targets[0].name, "http://127.0.0.1:9100/metrics");
        assert_eq!(
            targets[0].auth,
            TargetAuth::Basic {
                username: "user".into(),
                password: Secret::new("pw")
            }
        );
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        let cases = [
            ("ftp://x/metrics", "http"),
            ("not a url", "not a URL"),
            (
                r#"[{"url": "http://a/m", "bearer_token": "x", "basic_auth": {"username": "u"}}]"#,
                "not both",
            ),
            (
                r#"[{"url": "http://a/m", "labels": {"bad-label": "x"}}]"#,
                "label name",
            ),
            (r#"[{"url": "http://a/m", "unknown": 1}]"#, "unknown field"),
            ("http://a/m,http://a/m", "used twice"),
            (r#"[{"url": "http://a/m", "name": " "}]"#, "empty"),
        ];
        for (raw, expected) in cases {
            match parse_targets(raw) {
                Ok(t) => panic!("{raw} was accepted as {t:?}"),
                Err(e) => assert!(
                    e.contains(expected),
                    "{raw}: error {e:?} should mention {expected:?}"
                ),
            }
        }
    }
}
