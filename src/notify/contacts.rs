//! The addresses a project's notifications go to.

use anyhow::Context;
use lettre::Address;
use std::collections::BTreeSet;
use tokio_postgres::Client;

/// Most addresses one project may have.
pub const MAX_CONTACTS: usize = 50;

/// Checks and normalises a list of addresses: each must parse as an email address
/// (lettre's rules), duplicates (ignoring case) are dropped, order is kept.
pub fn parse(raw: &[String]) -> Result<Vec<String>, String> {
    if raw.len() > MAX_CONTACTS {
        return Err(format!("at most {MAX_CONTACTS} addresses per project"));
    }
    let mut seen = BTreeSet::new();
    let mut emails = Vec::new();
    for entry in raw {
        let address: Address = entry
            .trim()
            .parse()
            .map_err(|e| format!("{entry:?} is not an email address ({e})"))?;
        if seen.insert(address.to_string().to_lowercase()) {
            emails.push(address.to_string());
        }
    }
    Ok(emails)
}

/// Replaces the project's addresses; `false` when the project does not exist.
pub async fn set(client: &Client, project: &str, emails: &[String]) -> anyhow::Result<bool> {
    let written = client
        .execute(
            "INSERT INTO project_contacts (project, emails)
             SELECT name, $2 FROM projects WHERE name = $1
             ON CONFLICT (project) DO UPDATE SET emails = EXCLUDED.emails, updated_at = now()",
            &[&project, &emails],
        )
        .await
        .context("storing contacts")?;
    Ok(written == 1)
}

/// The project's addresses; `None` when the project does not exist.
pub async fn get(client: &Client, project: &str) -> anyhow::Result<Option<Vec<String>>> {
    let row = client
        .query_opt(
            "SELECT coalesce(c.emails, '{}') AS emails FROM projects p
             LEFT JOIN project_contacts c ON c.project = p.name WHERE p.name = $1",
            &[&project],
        )
        .await
        .context("reading contacts")?;
    row.map(|r| crate::store::col(&r, "emails")).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn addresses_are_checked_and_deduplicated() {
        assert_eq!(
            parse(&strings(&[
                " owner@example.org",
                "Owner@example.org",
                "b@example.org"
            ])),
            Ok(strings(&["owner@example.org", "b@example.org"]))
        );
        assert_eq!(parse(&[]), Ok(Vec::new()));
        for bad in [
            "",
            "owner",
            "owner@",
            "@example.org",
            "a b@example.org",
            "a@b\r\nBcc: x@y",
        ] {
            assert!(parse(&strings(&[bad])).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&vec!["a@example.org".to_owned(); MAX_CONTACTS + 1]).is_err());
    }
}
