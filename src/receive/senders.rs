//! `REMOTE_WRITE_SENDERS`: who may push samples, with which credentials and labels.

use crate::domain::{is_label_name, Secret, TargetAuth};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// One Prometheus (or agent) allowed to remote-write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteWriteSender {
    /// Name for status and metrics.
    pub name: String,
    /// Credentials it must send (bearer token or basic auth; never none).
    pub auth: TargetAuth,
    /// Labels added to each of its samples (a label it sends itself wins), e.g. `location`.
    pub labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSender {
    name: String,
    #[serde(default, alias = "token")]
    bearer_token: Option<String>,
    basic_auth: Option<RawBasicAuth>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasicAuth {
    username: String,
    password: String,
}

/// Parses `REMOTE_WRITE_SENDERS` (empty: remote write disabled); the error says which
/// sender is wrong and why.
pub fn parse_senders(raw: &str) -> Result<Vec<RemoteWriteSender>, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    let raw_senders: Vec<RawSender> = serde_json::from_str(raw).map_err(|e| {
        format!("expected a JSON array of objects with \"name\", \"bearer_token\" or \"basic_auth\" {{\"username\", \"password\"}}, and optional \"labels\": {e}")
    })?;
    let mut names = BTreeSet::new();
    let mut credentials = BTreeSet::new();
    let mut senders = Vec::with_capacity(raw_senders.len());
    for (index, raw) in raw_senders.into_iter().enumerate() {
        let which = format!("sender {}", index + 1);
        let name = raw.name.trim().to_owned();
        if name.is_empty() {
            return Err(format!("{which}: \"name\" is empty"));
        }
        if !names.insert(name.clone()) {
            return Err(format!("sender name {name:?} is used twice"));
        }
        let auth = match (raw.bearer_token, raw.basic_auth) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{which}: give either \"bearer_token\" or \"basic_auth\", not both"
                ))
            }
            (None, None) => {
                return Err(format!(
                    "{which}: give \"bearer_token\" or \"basic_auth\"; anonymous pushes are not accepted"
                ))
            }
            (Some(token), None) if token.trim().is_empty() => {
                return Err(format!("{which}: \"bearer_token\" is empty"))
            }
            (Some(token), None) => TargetAuth::Bearer(Secret::new(token)),
            (None, Some(basic)) if basic.username.is_empty() || basic.password.is_empty() => {
                return Err(format!(
                    "{which}: \"basic_auth\" needs a username and a password"
                ))
            }
            (None, Some(basic)) => TargetAuth::Basic {
                username: basic.username,
                password: Secret::new(basic.password),
            },
        };
        if !credentials.insert(expected_authorization(&auth)) {
            return Err(format!(
                "{which}: the same credentials are given to another sender; each sender needs its own"
            ));
        }
        for label in raw.labels.keys() {
            if !is_label_name(label) || label.starts_with("__") {
                return Err(format!(
                    "{which}: {label:?} is not a label name that may be added"
                ));
            }
        }
        senders.push(RemoteWriteSender {
            name,
            auth,
            labels: raw.labels,
        });
    }
    Ok(senders)
}

/// The `Authorization` header value a sender with `auth` sends.
pub fn expected_authorization(auth: &TargetAuth) -> String {
    use base64::Engine;
    match auth {
        TargetAuth::None => String::new(),
        TargetAuth::Bearer(token) => format!("Bearer {}", token.expose()),
        TargetAuth::Basic { username, password } => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{username}:{}", password.expose()))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_need_distinct_names_and_credentials() {
        let ok = parse_senders(
            r#"[{"name": "a", "bearer_token": "t1", "labels": {"location": "x"}},
                {"name": "b", "basic_auth": {"username": "u", "password": "p"}}]"#,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(expected_authorization(&ok[0].auth), "Bearer t1");
        assert_eq!(expected_authorization(&ok[1].auth), "Basic dTpw");
        for bad in [
            r#"[{"name": "a"}]"#,
            r#"[{"name": "a", "token": "t"}, {"name": "a", "token": "u"}]"#,
            r#"[{"name": "a", "token": "t"}, {"name": "b", "token": "t"}]"#,
            r#"[{"name": "a", "token": "t", "labels": {"__x": "1"}}]"#,
            r#"{"name": "a"}"#,
        ] {
            assert!(parse_senders(bad).is_err(), "{bad}");
        }
        assert!(parse_senders("").unwrap().is_empty());
    }
}
