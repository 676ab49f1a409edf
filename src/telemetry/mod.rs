//! Logging: `tracing` with a filter that can be changed while the service runs, and
//! the service's own Prometheus metrics ([`metrics`], [`snapshot`]).

pub mod metrics;
pub mod snapshot;

use crate::config::LogFormat;
use std::io::IsTerminal;
use std::sync::Arc;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Changes the log filter at run time (e.g. `os_credits::scrape=debug`).
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    /// Keeps the filter of a [`detached`](Self::detached) handle alive: a reload
    /// handle only reaches its filter while the layer exists.
    _layer: Option<Arc<reload::Layer<EnvFilter, Registry>>>,
}

impl LogHandle {
    /// A handle to a filter that no installed subscriber uses: it reads and changes
    /// like the real one, so tests can drive `/logconfig` in a process whose global
    /// subscriber belongs to the test harness.
    pub fn detached(directives: &str) -> Result<Self, String> {
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        let (layer, handle) = reload::Layer::new(filter);
        Ok(Self {
            handle,
            _layer: Some(Arc::new(layer)),
        })
    }

    /// Replaces the filter; the directive syntax is `RUST_LOG`'s. A directive that
    /// does not parse changes nothing.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }

    /// The filter in force.
    pub fn current(&self) -> Option<String> {
        self.handle.with_current(|f| f.to_string()).ok()
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
    Ok(LogHandle {
        handle,
        _layer: None,
    })
}
