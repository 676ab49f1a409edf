//! Subject, plain text and HTML of a notification mail, rendered with minijinja.
//!
//! Built-in defaults live in `templates/mail/`; a file of the same name in
//! `MAIL_TEMPLATE_DIR` replaces one. Every template is compiled and rendered once
//! with sample values at start-up, so a broken one (bad syntax, an unknown
//! placeholder) stops the service naming the file instead of failing at send time.
//! `body.html` is auto-escaped (minijinja escapes templates whose names end in
//! `.html`); the subject loses control characters, so nothing can add a header.

use anyhow::Context;
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use std::path::Path;

/// Template names, each with its built-in source.
const TEMPLATES: [(&str, &str); 3] = [
    (SUBJECT, include_str!("../../templates/mail/subject.txt")),
    (TEXT, include_str!("../../templates/mail/body.txt")),
    (HTML, include_str!("../../templates/mail/body.html")),
];
const SUBJECT: &str = "subject.txt";
const TEXT: &str = "body.txt";
const HTML: &str = "body.html";

/// Longest subject sent, in characters.
const SUBJECT_MAX: usize = 250;

/// The placeholders every template can use.
#[derive(Debug, Clone, Serialize)]
pub struct MailValues {
    /// The project name (raw; escaped in HTML).
    pub project: String,
    /// Credits used when the threshold was crossed, rounded to the precision.
    pub used: String,
    /// Credits granted, rounded.
    pub granted: String,
    /// Granted − used, rounded (negative when overdrawn).
    pub remaining: String,
    /// Used in percent of granted, one place (`50.3`).
    pub percent_used: String,
    /// The threshold as configured (`0.5`).
    pub threshold: String,
    /// The threshold in percent (`50`).
    pub threshold_percent: String,
    /// The old service's words (`half limit reached`).
    pub limit_type: String,
    /// When the credits run out at the recent burn rate (`2026-11-30 14:00 UTC`);
    /// `none` when nothing burns.
    pub forecast_run_out: Option<String>,
    /// Hours of usage behind the forecast (`FORECAST_WINDOW_HOURS`).
    pub forecast_window_hours: u64,
    /// The usage the forecast is based on, in words (`the last 24 hours`, or `the
    /// last 6 minutes` for a project billed for 6 minutes).
    pub forecast_basis: String,
    /// Link to the project's history page; `none` without `PUBLIC_BASE_URL`.
    pub history_url: Option<String>,
}

impl MailValues {
    /// Values that exercise every placeholder, for the start-up check.
    fn sample() -> Self {
        Self {
            project: "<sample> & \"project\"".into(),
            used: "500.00".into(),
            granted: "1000.00".into(),
            remaining: "500.00".into(),
            percent_used: "50".into(),
            threshold: "0.5".into(),
            threshold_percent: "50".into(),
            limit_type: "half limit reached".into(),
            forecast_run_out: Some("2026-11-30 14:00 UTC".into()),
            forecast_window_hours: 24,
            forecast_basis: "the last 24 hours".into(),
            history_url: Some("https://credits.example.org/credits_history/sample".into()),
        }
    }
}

/// A rendered mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// One line, no control characters.
    pub subject: String,
    /// The plain text part.
    pub text: String,
    /// The HTML part.
    pub html: String,
}

/// The compiled templates.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// Compiles the built-in templates, each replaced by the file of the same name
    /// in `dir` when there is one, and renders them once with sample values.
    pub fn load(dir: Option<&Path>) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        // A misspelt placeholder is an error, not an empty string in a mail.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        if let Some(dir) = dir {
            anyhow::ensure!(
                dir.is_dir(),
                "MAIL_TEMPLATE_DIR {} is not a directory",
                dir.display()
            );
        }
        for (name, builtin) in TEMPLATES {
            let path = dir.map(|d| d.join(name)).filter(|p| p.exists());
            let (source, origin) = match &path {
                Some(path) => (
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading template {}", path.display()))?,
                    path.display().to_string(),
                ),
                None => (builtin.to_owned(), format!("built-in template {name}")),
            };
            env.add_template_owned(name, source)
                .with_context(|| format!("template {origin} is broken"))?;
            env.get_template(name)
                .and_then(|t| {
                    t.render(minijinja::Value::from(minijinja::value::Serde(
                        MailValues::sample(),
                    )))
                })
                .with_context(|| format!("template {origin} does not render"))?;
        }
        Ok(Self { env })
    }

    /// Renders subject, text and HTML.
    pub fn render(&self, values: &MailValues) -> anyhow::Result<Rendered> {
        let ctx = minijinja::Value::from(minijinja::value::Serde(values));
        let render = |name: &str| {
            self.env
                .get_template(name)
                .and_then(|t| t.render(ctx.clone()))
                .with_context(|| format!("rendering {name}"))
        };
        Ok(Rendered {
            subject: one_line(&render(SUBJECT)?),
            text: render(TEXT)?,
            html: render(HTML)?,
        })
    }
}

/// Control characters (CR, LF, tabs, …) become spaces, runs of spaces one space, and
/// the result is trimmed and shortened: a header value that cannot start a header.
pub fn one_line(raw: &str) -> String {
    let spaced: String = raw
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    spaced
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(SUBJECT_MAX)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(project: &str) -> MailValues {
        MailValues {
            project: project.into(),
            forecast_run_out: None,
            history_url: None,
            ..MailValues::sample()
        }
    }

    fn dir_with(files: &[(&str, &str)]) -> std::path::PathBuf {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "os-credits-templates-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        for (name, source) in files {
            std::fs::write(dir.join(name), source).unwrap_or_else(|e| panic!("{e}"));
        }
        dir
    }

    fn builtin() -> Templates {
        Templates::load(None).unwrap_or_else(|e| panic!("{e:#}"))
    }

    #[test]
    fn the_built_in_templates_render_every_value() {
        let rendered = builtin()
            .render(&MailValues::sample())
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            rendered.subject,
            "<sample> & \"project\": 50% of the granted credits used"
        );
        for part in [&rendered.text, &rendered.html] {
            for value in [
                "500.00",
                "1000.00",
                "half limit reached",
                "2026-11-30 14:00 UTC",
            ] {
                assert!(part.contains(value), "{value} missing from {part}");
            }
        }
        assert!(rendered
            .text
            .contains("https://credits.example.org/credits_history/sample"));
        // Escaped like every value (`/` too), which HTML reads back as the URL.
        assert!(
            rendered.html.contains(
                "href=\"https:&#x2f;&#x2f;credits.example.org&#x2f;credits_history&#x2f;sample\""
            ),
            "{}",
            rendered.html
        );
    }

    #[test]
    fn html_escapes_the_project_and_the_subject_stays_one_line() {
        let rendered = builtin()
            .render(&values(
                "<script>alert(1)</script>\r\nBcc: evil@example.org",
            ))
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!rendered.html.contains("<script>"), "{}", rendered.html);
        assert!(
            rendered.html.contains("&lt;script&gt;"),
            "{}",
            rendered.html
        );
        assert!(
            !rendered.subject.contains(['\r', '\n']),
            "{:?}",
            rendered.subject
        );
        assert!(rendered
            .subject
            .starts_with("<script>alert(1)</script> Bcc: evil"));
        assert!(
            !rendered.text.contains("forecast"),
            "no forecast, no sentence"
        );
    }

    #[test]
    fn a_template_folder_replaces_single_templates() {
        let dir = dir_with(&[(
            "subject.txt",
            "Credits of {{ project }} at {{ percent_used }}%",
        )]);
        let templates = Templates::load(Some(&dir)).unwrap_or_else(|e| panic!("{e:#}"));
        let rendered = templates
            .render(&values("Alpha"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(rendered.subject, "Credits of Alpha at 50%");
        assert!(
            rendered.text.contains("Alpha"),
            "the other templates stay built in"
        );
    }

    #[test]
    fn a_broken_template_is_refused_naming_the_file() {
        let cases = [
            ("bad syntax", "body.html", "{% if project %}never closed"),
            ("unknown placeholder", "body.txt", "{{ projcet }}"),
            ("unknown filter", "subject.txt", "{{ project | shout }}"),
        ];
        for (case, name, source) in cases {
            let dir = dir_with(&[(name, source)]);
            let error = Templates::load(Some(&dir))
                .err()
                .unwrap_or_else(|| panic!("{case} was accepted"));
            let message = format!("{error:#}");
            assert!(
                message.contains(&dir.join(name).display().to_string()),
                "{case}: {message}"
            );
        }
        assert!(Templates::load(Some(Path::new("/nonexistent/templates"))).is_err());
    }

    #[test]
    fn one_line_removes_control_characters() {
        assert_eq!(one_line("a\r\nBcc: x\t y\u{0} z\n"), "a Bcc: x y z");
        assert_eq!(one_line(&"x".repeat(300)).len(), SUBJECT_MAX);
    }
}
