//! Typed settings, loaded once from the environment and validated at start-up.
//!
//! Names follow de.NBI's `os_credits` where it had them; a bad value stops the
//! program with a message that names the variable and what was expected.

use crate::billing::rules::Rules;
use crate::domain::{MetricName, Price};
pub use crate::domain::{Secret, TargetAuth};
pub use crate::ingest::IngestSettings;
use crate::notify::thresholds::{self, Threshold};
pub use crate::notify::{MailSettings, NotifySettings, SmtpTls};
pub use crate::receive::ReceiveSettings;
pub use crate::scrape::targets::ScrapeTarget;
pub use crate::scrape::ScrapeSettings;
use lettre::message::Mailbox;
use rust_decimal::Decimal;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {reason}")]
pub struct SettingError {
    /// The environment variable.
    pub name: &'static str,
    /// What was wrong and what was expected.
    pub reason: String,
}

fn bad(name: &'static str, reason: impl Into<String>) -> SettingError {
    SettingError {
        name,
        reason: reason.into(),
    }
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `POSTGRES_HOST`: host name or address (or a unix socket directory).
    pub host: String,
    /// `POSTGRES_PORT`.
    pub port: u16,
    /// `POSTGRES_USER`.
    pub user: String,
    /// `POSTGRES_PASSWORD`.
    pub password: Secret,
    /// `POSTGRES_DB`: the database holding samples, ledger and outbox.
    pub database: String,
    /// `POSTGRES_POOL_SIZE`: connections the service keeps at most.
    pub pool_size: usize,
    /// `POSTGRES_POOL_TIMEOUT`: how long a request or worker waits for a free
    /// connection before giving up (HTTP 503), so a full pool never hangs callers.
    pub pool_timeout: Duration,
    /// `POSTGRES_LOCK_TIMEOUT`: longest wait for a lock (a project another replica or
    /// request holds); the API answers 503 with `Retry-After` instead of hanging.
    pub lock_timeout: Duration,
    /// `POSTGRES_STATEMENT_TIMEOUT`: longest run of one statement.
    pub statement_timeout: Duration,
    /// `POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT`: the server ends a session idle inside
    /// a transaction this long, freeing the locks of a frozen or stopped holder.
    pub idle_in_transaction_timeout: Duration,
}

/// All settings of the service.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL connection.
    pub database: DatabaseSettings,
    /// `CREDITS_HOST`: address the HTTP server binds.
    pub host: String,
    /// `CREDITS_PORT`: port the HTTP server binds (0 picks a free one).
    pub port: u16,
    /// `API_KEY`: value of `X-API-KEY` that protected endpoints require; empty refuses them.
    pub api_key: Secret,
    /// `ENDPOINTS_ONLY`: serve the API without scraping or billing (as the old service).
    pub endpoints_only: bool,
    /// `METRICS_TO_BILL`: metric → credits per unit.
    pub metrics_to_bill: BTreeMap<MetricName, Price>,
    /// `PROJECT_LABEL` and `OS_CREDITS_PROJECT_WHITELIST`: which samples are kept,
    /// whatever their source (the whitelist limits billing too).
    pub ingest: IngestSettings,
    /// `OS_CREDITS_PRECISION`: the quantum credits are rounded to (e.g. 0.01).
    pub precision: Decimal,
    /// `OS_CREDITS_WORKERS`: how many scrapes (and later billing runs) run at once.
    pub workers: usize,
    /// `SCRAPE_*`: what and how to scrape.
    pub scrape: ScrapeSettings,
    /// `REMOTE_WRITE_*`: who may push with Prometheus remote write, and limits.
    pub receive: ReceiveSettings,
    /// `SAMPLES_RETENTION_DAYS`: samples older than this and already billed are removed
    /// (0 keeps all); `os-credits migrate` applies a change.
    pub samples_retention_days: u32,
    /// `MAINTENANCE_INTERVAL`: time between two maintenance rounds (retention, drift check).
    pub maintenance_interval: Duration,
    /// `LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// Billing rules: `METRICS_TO_BILL` plus the optional `BILLING_RULES_FILE`.
    pub rules: Arc<Rules>,
    /// `BILLING_RULES_FILE`: TOML or JSON file with per-metric rules (kind, label prices, price changes).
    pub billing_rules_file: Option<PathBuf>,
    /// `BILLING_INTERVAL`: time between two billing runs.
    pub billing_interval: Duration,
    /// `BILLING_BATCH_SAMPLES`: samples one billing transaction reads at most, so memory
    /// stays flat whatever the backlog (a backlog is billed in several passes).
    pub billing_batch_samples: usize,
    /// `FORECAST_WINDOW_HOURS`: how far back the burn rate for the run-out forecast looks.
    pub forecast_window: Duration,
    /// `API_CONTACT_BASE_URL`: the portal's API; when set, granted credits are fetched from it.
    pub api_contact_base_url: Option<url::Url>,
    /// `API_CONTACT_KEY`: `X-Api-Key` sent to the portal.
    pub api_contact_key: Secret,
    /// `METRICS_REFRESH_INTERVAL`: the database-derived gauges of `/metrics` are
    /// read at most this often and shared by every scrape in between, so scraping
    /// often costs the database nothing more (0: read at every scrape, concurrent
    /// scrapes still share one read).
    pub metrics_refresh_interval: Duration,
    /// `API_CONTACT_SYNC_INTERVAL`: time between two rounds of fetching grants from
    /// the portal (its own worker: billing never waits for the portal).
    pub api_contact_sync_interval: Duration,
    /// `API_CONTACT_SYNC_DEADLINE`: longest time one round of fetching grants may
    /// take; a hung portal fails the round, not billing.
    pub api_contact_sync_deadline: Duration,
    /// `NOTIFICATION_THRESHOLDS`: fractions of the grant used that notify, ascending.
    pub notification_thresholds: Vec<Threshold>,
    /// Email and portal notifications (`MAIL_*`, `NOTIFICATION_TO_OVERWRITE`,
    /// `CLOUD_GOVERNANCE_MAIL`).
    pub mail: MailSettings,
    /// `PUBLIC_BASE_URL`: where people reach this service; mails link to the
    /// history page there (no link when unset).
    pub public_base_url: Option<url::Url>,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every environment variable the service reads: `Settings::from_vars` reads all but
/// `RUST_LOG`, which the telemetry reads. `.default.env`, the compose file and the
/// README are checked against this list (`tests/config_agreement.rs`).
pub const SETTINGS: &[&str] = &[
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "POSTGRES_POOL_SIZE",
    "POSTGRES_POOL_TIMEOUT",
    "POSTGRES_LOCK_TIMEOUT",
    "POSTGRES_STATEMENT_TIMEOUT",
    "POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT",
    "CREDITS_HOST",
    "CREDITS_PORT",
    "API_KEY",
    "ENDPOINTS_ONLY",
    "METRICS_TO_BILL",
    "OS_CREDITS_PROJECT_WHITELIST",
    "OS_CREDITS_PRECISION",
    "OS_CREDITS_WORKERS",
    "SCRAPE_TARGETS",
    "SCRAPE_INTERVAL",
    "SCRAPE_TIMEOUT",
    "SCRAPE_MAX_BYTES",
    "PROJECT_LABEL",
    "REMOTE_WRITE_SENDERS",
    "REMOTE_WRITE_MAX_BYTES",
    "REMOTE_WRITE_STALE_AFTER",
    "SAMPLES_RETENTION_DAYS",
    "MAINTENANCE_INTERVAL",
    "BILLING_INTERVAL",
    "BILLING_BATCH_SAMPLES",
    "BILLING_RULES_FILE",
    "FORECAST_WINDOW_HOURS",
    "API_CONTACT_BASE_URL",
    "API_CONTACT_KEY",
    "API_CONTACT_SYNC_INTERVAL",
    "METRICS_REFRESH_INTERVAL",
    "API_CONTACT_SYNC_DEADLINE",
    "NOTIFICATION_THRESHOLDS",
    "MAIL_SMTP_SERVER",
    "MAIL_SMTP_PORT",
    "MAIL_SMTP_TLS",
    "MAIL_NOT_STARTTLS",
    "MAIL_SMTP_USER",
    "MAIL_SMTP_PASSWORD",
    "MAIL_SMTP_TIMEOUT",
    "MAIL_FROM",
    "MAIL_FILE_DIR",
    "MAIL_TEMPLATE_DIR",
    "NOTIFICATION_TO_OVERWRITE",
    "CLOUD_GOVERNANCE_MAIL",
    "MAIL_CONTACT_URL",
    "PUBLIC_BASE_URL",
    "LOG_FORMAT",
    "RUST_LOG",
];

/// Default `METRICS_TO_BILL`, the old service's prices.
pub const DEFAULT_METRICS_TO_BILL: &str = r#"{"project_vcpu_usage": 1.0, "project_mb_usage": 0.3}"#;

impl Settings {
    /// What the notification sender reads of these settings.
    pub fn notify(&self) -> NotifySettings {
        NotifySettings {
            mail: self.mail.clone(),
            forecast_window: self.forecast_window,
            public_base_url: self.public_base_url.clone(),
            precision: self.precision,
            api_contact_key: self.api_contact_key.clone(),
        }
    }

    /// What the portal's grant sync reads of these settings.
    pub fn portal(&self) -> crate::billing::portal::PortalSettings<'_> {
        crate::billing::portal::PortalSettings {
            base_url: self.api_contact_base_url.as_ref(),
            key: self.api_contact_key.expose(),
            project_whitelist: self.ingest.project_whitelist.as_ref(),
            concurrency: self.workers,
            thresholds: &self.notification_thresholds,
        }
    }

    /// What billing reads of these settings.
    pub fn billing(&self) -> crate::billing::engine::BillingSettings<'_> {
        crate::billing::engine::BillingSettings {
            rules: &self.rules,
            thresholds: &self.notification_thresholds,
            project_whitelist: self.ingest.project_whitelist.as_ref(),
            batch_samples: self.billing_batch_samples,
            concurrency: self.workers,
        }
    }

    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, SettingError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the settings from the given variables (tests pass their own).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingError> {
        Self::read(&Env::new(vars))
    }

    fn read(env: &Env) -> Result<Self, SettingError> {
        let workers = env.positive("OS_CREDITS_WORKERS", 10)?;
        // The rules are the one source of truth for billed metrics: read once, here,
        // and handed to every stage that needs them.
        let metrics_to_bill =
            parse_metrics_to_bill(&env.string("METRICS_TO_BILL", DEFAULT_METRICS_TO_BILL))?;
        let billing_rules_file = env.get("BILLING_RULES_FILE").map(PathBuf::from);
        let rules = Arc::new(load_rules(&metrics_to_bill, billing_rules_file.as_deref())?);
        Ok(Settings {
            database: DatabaseSettings {
                host: env.string("POSTGRES_HOST", "localhost"),
                port: env.parse("POSTGRES_PORT", 5432, "a port number (1-65535)")?,
                user: env.string("POSTGRES_USER", "postgres"),
                password: Secret::new(env.string("POSTGRES_PASSWORD", "password")),
                database: env.string("POSTGRES_DB", "credits_db"),
                pool_size: env.positive("POSTGRES_POOL_SIZE", 16)?,
                pool_timeout: env.seconds("POSTGRES_POOL_TIMEOUT", 10)?,
                lock_timeout: env.seconds("POSTGRES_LOCK_TIMEOUT", 2)?,
                statement_timeout: env.seconds("POSTGRES_STATEMENT_TIMEOUT", 300)?,
                idle_in_transaction_timeout: env
                    .seconds("POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT", 60)?,
            },
            host: env.string("CREDITS_HOST", "0.0.0.0"),
            port: env.parse("CREDITS_PORT", 8000, "a port number (0-65535)")?,
            api_key: Secret::new(env.string("API_KEY", "")),
            endpoints_only: env.boolean("ENDPOINTS_ONLY", false)?,
            metrics_to_bill,
            precision: parse_precision(&env.string("OS_CREDITS_PRECISION", "0.01"))?,
            workers,
            scrape: ScrapeSettings {
                targets: crate::scrape::targets::parse_targets(&env.string("SCRAPE_TARGETS", ""))
                    .map_err(|reason| bad("SCRAPE_TARGETS", reason))?,
                interval: env.seconds("SCRAPE_INTERVAL", 30)?,
                timeout: env.seconds("SCRAPE_TIMEOUT", 10)?,
                max_bytes: env.positive("SCRAPE_MAX_BYTES", 64 * 1024 * 1024)?,
                concurrency: workers,
            },
            receive: ReceiveSettings {
                senders: crate::receive::senders::parse_senders(
                    &env.string("REMOTE_WRITE_SENDERS", ""),
                )
                .map_err(|reason| bad("REMOTE_WRITE_SENDERS", reason))?,
                max_bytes: env.positive("REMOTE_WRITE_MAX_BYTES", 32 * 1024 * 1024)?,
                stale_after: env.seconds("REMOTE_WRITE_STALE_AFTER", 300)?,
            },
            ingest: IngestSettings {
                project_label: parse_label_name(&env.string("PROJECT_LABEL", "project_name"))?,
                project_whitelist: parse_whitelist(&env.string("OS_CREDITS_PROJECT_WHITELIST", "")),
            },
            samples_retention_days: env.parse(
                "SAMPLES_RETENTION_DAYS",
                0,
                "a whole number of days (0 keeps samples forever)",
            )?,
            maintenance_interval: env.seconds("MAINTENANCE_INTERVAL", 3600)?,
            billing_interval: env.seconds("BILLING_INTERVAL", 300)?,
            billing_batch_samples: env.positive(
                "BILLING_BATCH_SAMPLES",
                crate::billing::engine::DEFAULT_BATCH_SAMPLES,
            )?,
            forecast_window: Duration::from_secs(
                env.parse::<u64>("FORECAST_WINDOW_HOURS", 24, "a whole number of hours")?
                    .max(1)
                    * 3600,
            ),
            api_contact_base_url: match env.get("API_CONTACT_BASE_URL") {
                None => None,
                Some(raw) => Some(
                    url::Url::parse(raw.trim_end_matches('/'))
                        .ok()
                        .filter(|u| matches!(u.scheme(), "http" | "https"))
                        .ok_or_else(|| {
                            bad(
                                "API_CONTACT_BASE_URL",
                                format!("expected an http(s) URL, got {raw:?}"),
                            )
                        })?,
                ),
            },
            api_contact_key: Secret::new(env.string("API_CONTACT_KEY", "")),
            api_contact_sync_interval: env.seconds("API_CONTACT_SYNC_INTERVAL", 300)?,
            metrics_refresh_interval: {
                let expected = "a number of seconds, 0 or more";
                let secs = env.parse::<f64>("METRICS_REFRESH_INTERVAL", 15.0, expected)?;
                Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| d.as_secs() < 1_000_000_000)
                    .ok_or_else(|| {
                        bad(
                            "METRICS_REFRESH_INTERVAL",
                            format!("expected {expected}, got {secs}"),
                        )
                    })?
            },
            api_contact_sync_deadline: env.seconds("API_CONTACT_SYNC_DEADLINE", 60)?,
            notification_thresholds: thresholds::parse_list(
                &env.string("NOTIFICATION_THRESHOLDS", "0.5,1.0"),
            )
            .map_err(|e| bad("NOTIFICATION_THRESHOLDS", e))?,
            mail: parse_mail(env)?,
            public_base_url: http_url(env, "PUBLIC_BASE_URL")?,
            billing_rules_file,
            rules,
            log_format: match env
                .string("LOG_FORMAT", "text")
                .to_ascii_lowercase()
                .as_str()
            {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(bad(
                        "LOG_FORMAT",
                        format!("expected `text` or `json`, got {other:?}"),
                    ))
                }
            },
        })
    }
}

/// Environment lookups with the error messages the settings share.
struct Env {
    vars: HashMap<String, String>,
    /// Every name looked up, so a test can hold `SETTINGS` to what is really read.
    read: RefCell<BTreeSet<String>>,
}

impl Env {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            vars: vars.into_iter().collect(),
            read: RefCell::default(),
        }
    }

    /// Whether the variable is set at all, even to an empty value.
    fn is_present(&self, name: &str) -> bool {
        self.read.borrow_mut().insert(name.to_owned());
        self.vars.contains_key(name)
    }

    /// The trimmed value, or `None` when unset or empty.
    fn get(&self, name: &str) -> Option<&str> {
        self.read.borrow_mut().insert(name.to_owned());
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_owned()
    }

    fn parse<T: FromStr>(
        &self,
        name: &'static str,
        default: T,
        expected: &str,
    ) -> Result<T, SettingError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .parse()
                .map_err(|_| bad(name, format!("expected {expected}, got {raw:?}"))),
        }
    }

    fn positive(&self, name: &'static str, default: usize) -> Result<usize, SettingError> {
        let value = self.parse(name, default, "a whole number greater than 0")?;
        if value == 0 {
            return Err(bad(name, "expected a whole number greater than 0, got 0"));
        }
        Ok(value)
    }

    fn seconds(&self, name: &'static str, default: u64) -> Result<Duration, SettingError> {
        match self.get(name) {
            None => Ok(Duration::from_secs(default)),
            Some(raw) => match raw.parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
                    Ok(Duration::from_secs_f64(secs))
                }
                _ => Err(bad(
                    name,
                    format!("expected a number of seconds greater than 0, got {raw:?}"),
                )),
            },
        }
    }

    fn boolean(&self, name: &'static str, default: bool) -> Result<bool, SettingError> {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(other) => Err(bad(name, format!("expected true or false, got {other:?}"))),
        }
    }
}

fn parse_metrics_to_bill(raw: &str) -> Result<BTreeMap<MetricName, Price>, SettingError> {
    const NAME: &str = "METRICS_TO_BILL";
    let value: serde_json::Value = serde_json::from_str(raw)
        .map_err(|e| bad(NAME, format!("expected a JSON object of metric name to price, e.g. {DEFAULT_METRICS_TO_BILL}: {e}")))?;
    let object = value.as_object().ok_or_else(|| {
        bad(
            NAME,
            format!(
                "expected a JSON object of metric name to price, e.g. {DEFAULT_METRICS_TO_BILL}"
            ),
        )
    })?;
    let mut metrics = BTreeMap::new();
    for (name, price) in object {
        let metric = MetricName::parse(name).map_err(|e| bad(NAME, e))?;
        let price_text = match price {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => {
                return Err(bad(
                    NAME,
                    format!("price of {name:?} must be a number, got {other}"),
                ))
            }
        };
        let price =
            Price::parse(&price_text).map_err(|e| bad(NAME, format!("price of {name:?}: {e}")))?;
        metrics.insert(metric, price);
    }
    if metrics.is_empty() {
        return Err(bad(NAME, "expected at least one metric to bill"));
    }
    Ok(metrics)
}

fn load_rules(
    metrics: &BTreeMap<MetricName, Price>,
    file: Option<&Path>,
) -> Result<Rules, SettingError> {
    const NAME: &str = "BILLING_RULES_FILE";
    let Some(path) = file else {
        return Rules::from_settings(metrics, None, "toml").map_err(|e| bad("METRICS_TO_BILL", e));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(NAME, format!("cannot read {}: {e}", path.display())))?;
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "json",
        Some("toml") => "toml",
        _ => {
            return Err(bad(
                NAME,
                format!("{} must end in .toml or .json", path.display()),
            ))
        }
    };
    Rules::from_settings(metrics, Some(&text), format)
        .map_err(|e| bad(NAME, format!("{}: {e}", path.display())))
}

fn parse_mail(env: &Env) -> Result<MailSettings, SettingError> {
    let mailbox = |name: &'static str, raw: &str| {
        Mailbox::from_str(raw.trim()).map_err(|e| {
            bad(
                name,
                format!("expected an email address, got {raw:?} ({e})"),
            )
        })
    };
    let tls = match env
        .get("MAIL_SMTP_TLS")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => None,
        Some("starttls") => Some(SmtpTls::Starttls),
        Some("implicit") => Some(SmtpTls::Implicit),
        Some("none") => Some(SmtpTls::None),
        Some(other) => {
            return Err(bad(
                "MAIL_SMTP_TLS",
                format!("expected starttls, implicit or none, got {other:?}"),
            ))
        }
    };
    // As the old service: the variable being present (even empty) skips STARTTLS.
    let not_starttls =
        env.is_present("MAIL_NOT_STARTTLS") && env.boolean("MAIL_NOT_STARTTLS", true)?;
    let tls = match (tls, not_starttls) {
        (Some(SmtpTls::Starttls), true) => {
            return Err(bad(
                "MAIL_NOT_STARTTLS",
                "contradicts MAIL_SMTP_TLS=starttls; unset one of them",
            ))
        }
        (Some(tls), _) => tls,
        (None, true) => SmtpTls::None,
        (None, false) => SmtpTls::Starttls,
    };
    let smtp_user = env.get("MAIL_SMTP_USER").map(str::to_owned);
    let smtp_password = Secret::new(env.string("MAIL_SMTP_PASSWORD", ""));
    if smtp_user.is_none() && !smtp_password.is_empty() {
        return Err(bad(
            "MAIL_SMTP_PASSWORD",
            "is set but MAIL_SMTP_USER is not: set both to log in, or neither",
        ));
    }
    Ok(MailSettings {
        smtp_server: env.get("MAIL_SMTP_SERVER").map(str::to_owned),
        smtp_port: env.parse("MAIL_SMTP_PORT", 25, "a port number (1-65535)")?,
        smtp_user,
        smtp_password,
        tls,
        timeout: env.seconds("MAIL_SMTP_TIMEOUT", 10)?,
        from: mailbox("MAIL_FROM", &env.string("MAIL_FROM", "cloud@denbi.de"))?,
        file_dir: PathBuf::from(env.string("MAIL_FILE_DIR", ".dev/mail")),
        to_overwrite: env
            .get("NOTIFICATION_TO_OVERWRITE")
            .map(|raw| mailbox("NOTIFICATION_TO_OVERWRITE", raw))
            .transpose()?,
        governance: env
            .get("CLOUD_GOVERNANCE_MAIL")
            .map(|raw| {
                raw.split(',')
                    .filter(|a| !a.trim().is_empty())
                    .map(|a| mailbox("CLOUD_GOVERNANCE_MAIL", a))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default(),
        contact_url: http_url(env, "MAIL_CONTACT_URL")?,
        template_dir: env.get("MAIL_TEMPLATE_DIR").map(PathBuf::from),
    })
}

/// An optional http(s) URL, without a trailing slash.
fn http_url(env: &Env, name: &'static str) -> Result<Option<url::Url>, SettingError> {
    env.get(name)
        .map(|raw| {
            url::Url::parse(raw.trim_end_matches('/'))
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                .ok_or_else(|| bad(name, format!("expected an http(s) URL, got {raw:?}")))
        })
        .transpose()
}

fn parse_whitelist(raw: &str) -> Option<BTreeSet<String>> {
    let projects: BTreeSet<String> = raw
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    (!projects.is_empty()).then_some(projects)
}

/// `OS_CREDITS_PRECISION` is a quantum (`0.01`) or, as in the old service, a number
/// of decimal places (`2`).
fn parse_precision(raw: &str) -> Result<Decimal, SettingError> {
    const NAME: &str = "OS_CREDITS_PRECISION";
    let expected =
        "expected a power of ten such as 0.01, or a number of decimal places from 0 to 10";
    if let Ok(places) = raw.parse::<u32>() {
        if places > 10 {
            return Err(bad(NAME, format!("{expected}, got {raw:?}")));
        }
        return Ok(Decimal::new(1, places));
    }
    let quantum =
        Decimal::from_str(raw).map_err(|_| bad(NAME, format!("{expected}, got {raw:?}")))?;
    let normalized = quantum.normalize();
    if normalized.mantissa() != 1 || normalized.scale() > 10 {
        return Err(bad(NAME, format!("{expected}, got {raw:?}")));
    }
    Ok(normalized)
}

fn parse_label_name(raw: &str) -> Result<String, SettingError> {
    let mut chars = raw.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(bad(
            "PROJECT_LABEL",
            format!("expected a Prometheus label name such as project_name, got {raw:?}"),
        ));
    }
    Ok(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, SettingError> {
        Settings::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn settings_lists_exactly_the_variables_that_are_read() {
        // With nothing set every setting falls back to its default: each is looked up.
        let env = Env::new(Vec::new());
        Settings::read(&env).expect("defaults are valid");
        let read = env.read.into_inner();
        let listed: BTreeSet<String> = SETTINGS
            .iter()
            .filter(|name| **name != "RUST_LOG")
            .map(|name| name.to_string())
            .collect();
        assert_eq!(read, listed, "SETTINGS and the lookups of from_vars differ");
        assert_eq!(SETTINGS.len(), listed.len() + 1, "SETTINGS has duplicates");
    }

    #[test]
    fn defaults_match_the_old_service() {
        let s = settings(&[]).expect("defaults are valid");
        assert_eq!(s.database.database, "credits_db");
        assert_eq!(s.database.host, "localhost");
        assert_eq!(s.database.port, 5432);
        assert_eq!(s.database.user, "postgres");
        assert_eq!(s.database.password.expose(), "password");
        assert_eq!(s.precision, Decimal::new(1, 2));
        assert_eq!(s.workers, 10);
        assert_eq!(s.scrape.interval, Duration::from_secs(30));
        assert_eq!(s.scrape.timeout, Duration::from_secs(10));
        assert_eq!(s.ingest.project_label, "project_name");
        assert_eq!(s.metrics_to_bill.len(), 2);
        assert!(s.ingest.project_whitelist.is_none());
        assert!(s.scrape.targets.is_empty());
        assert!(!s.endpoints_only);
    }

    #[test]
    fn precision_accepts_a_quantum_or_decimal_places() {
        for (raw, expected) in [
            ("0.01", Decimal::new(1, 2)),
            ("2", Decimal::new(1, 2)),
            ("0", Decimal::ONE),
            ("0.001", Decimal::new(1, 3)),
            ("1", Decimal::new(1, 1)),
        ] {
            let s =
                settings(&[("OS_CREDITS_PRECISION", raw)]).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(s.precision, expected, "OS_CREDITS_PRECISION={raw}");
        }
    }

    #[test]
    fn whitelist_is_semicolon_separated() {
        let s = settings(&[("OS_CREDITS_PROJECT_WHITELIST", "a; b;;c ")]).expect("valid");
        let expected: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(s.ingest.project_whitelist, Some(expected));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            ("POSTGRES_PORT", "abc"),
            ("POSTGRES_PORT", "70000"),
            ("POSTGRES_POOL_SIZE", "0"),
            ("CREDITS_PORT", "-1"),
            ("ENDPOINTS_ONLY", "maybe"),
            ("METRICS_TO_BILL", "not json"),
            ("METRICS_TO_BILL", "[1,2]"),
            ("METRICS_TO_BILL", "{}"),
            ("METRICS_TO_BILL", r#"{"bad-name": 1}"#),
            ("METRICS_TO_BILL", r#"{"m": -1}"#),
            ("METRICS_TO_BILL", r#"{"m": true}"#),
            ("OS_CREDITS_PRECISION", "0.02"),
            ("OS_CREDITS_PRECISION", "x"),
            ("OS_CREDITS_WORKERS", "0"),
            ("SCRAPE_INTERVAL", "0"),
            ("SCRAPE_INTERVAL", "soon"),
            ("SCRAPE_TIMEOUT", "-3"),
            ("SCRAPE_MAX_BYTES", "lots"),
            ("SCRAPE_TARGETS", "not a url"),
            ("SCRAPE_TARGETS", r#"[{"url": "ftp://x"}]"#),
            ("PROJECT_LABEL", "project-name"),
            ("SAMPLES_RETENTION_DAYS", "-1"),
            ("LOG_FORMAT", "xml"),
            ("NOTIFICATION_THRESHOLDS", "half"),
            ("NOTIFICATION_THRESHOLDS", "0.5,0"),
            ("NOTIFICATION_THRESHOLDS", ","),
            ("MAIL_SMTP_PORT", "smtp"),
            ("MAIL_SMTP_TLS", "ssl"),
            ("MAIL_SMTP_TIMEOUT", "0"),
            ("MAIL_NOT_STARTTLS", "perhaps"),
            ("MAIL_FROM", "not an address"),
            ("MAIL_SMTP_PASSWORD", "no user"),
            ("NOTIFICATION_TO_OVERWRITE", "a@b@c"),
            ("CLOUD_GOVERNANCE_MAIL", "gov@example.org, nobody"),
            ("MAIL_CONTACT_URL", "portal.example.org"),
            ("PUBLIC_BASE_URL", "ftp://x"),
        ];
        for (name, value) in cases {
            match settings(&[(name, value)]) {
                Ok(_) => panic!("{name}={value:?} was accepted"),
                Err(e) => {
                    assert_eq!(e.name, name, "{name}={value:?} blamed {}", e.name);
                    assert!(
                        e.to_string().contains(name),
                        "message names the setting: {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn mail_settings_default_to_the_old_service_and_files() {
        let s = settings(&[]).expect("defaults are valid");
        assert_eq!(s.mail.smtp_server, None, "no server: .eml files");
        assert_eq!(s.mail.file_dir, PathBuf::from(".dev/mail"));
        assert_eq!(s.mail.smtp_port, 25);
        assert_eq!(s.mail.tls, SmtpTls::Starttls);
        assert_eq!(s.mail.from.to_string(), "cloud@denbi.de");
        assert_eq!(
            s.notification_thresholds
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["0.5", "1"]
        );
        let s = settings(&[(
            "CLOUD_GOVERNANCE_MAIL",
            "gov@example.org, Cloud Team <team@example.org>",
        )])
        .expect("valid");
        assert_eq!(s.mail.governance.len(), 2);
    }

    #[test]
    fn mail_not_starttls_is_set_by_its_presence_as_in_the_old_service() {
        let cases: &[(&[(&str, &str)], SmtpTls)] = &[
            (&[("MAIL_NOT_STARTTLS", "")], SmtpTls::None),
            (&[("MAIL_NOT_STARTTLS", "1")], SmtpTls::None),
            (&[("MAIL_NOT_STARTTLS", "true")], SmtpTls::None),
            (&[("MAIL_NOT_STARTTLS", "false")], SmtpTls::Starttls),
            (&[("MAIL_SMTP_TLS", "implicit")], SmtpTls::Implicit),
            (&[("MAIL_SMTP_TLS", "NONE")], SmtpTls::None),
            (
                &[("MAIL_SMTP_TLS", "implicit"), ("MAIL_NOT_STARTTLS", "")],
                SmtpTls::Implicit,
            ),
        ];
        for (vars, expected) in cases {
            let s = settings(vars).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
            assert_eq!(s.mail.tls, *expected, "{vars:?}");
        }
        let e = settings(&[("MAIL_SMTP_TLS", "starttls"), ("MAIL_NOT_STARTTLS", "")])
            .expect_err("a contradiction is refused");
        assert_eq!(e.name, "MAIL_NOT_STARTTLS");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let s = settings(&[
            ("POSTGRES_PASSWORD", "pg-secret-value"),
            ("API_KEY", "api-secret-value"),
            ("MAIL_SMTP_USER", "mailer"),
            ("MAIL_SMTP_PASSWORD", "smtp-secret-value"),
            ("SCRAPE_TARGETS", r#"[{"url": "http://127.0.0.1:1/metrics", "bearer_token": "tok-secret-value"}, {"url": "http://127.0.0.1:2/metrics", "basic_auth": {"username": "u", "password": "basic-secret-value"}}]"#),
        ])
        .expect("valid");
        let debug = format!("{s:?}");
        for secret in [
            "pg-secret-value",
            "api-secret-value",
            "tok-secret-value",
            "basic-secret-value",
            "smtp-secret-value",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked into {debug}");
        }
    }
}
