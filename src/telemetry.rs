//! Logging: `tracing` with a filter that can be changed while the service runs.

use crate::config::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Changes the log filter at run time (e.g. `os_credits::scrape=debug`).
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Replaces the filter; the directive syntax is `RUST_LOG`'s.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }

    /// The filter in force.
    pub fn current(&self) -> Option<String> {
        self.0.with_current(|f| f.to_string()).ok()
    }
}

/// Installs the global subscriber; `RUST_LOG` gives the filter (default `info`).
pub fn init(format: LogFormat) -> anyhow::Result<LogHandle> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            ),
            None,
        ),
        LogFormat::Json => (None, Some(fmt::layer().json().with_writer(std::io::stderr))),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init()?;
    Ok(LogHandle(handle))
}
