//! Logging: `tracing` with a filter that can be changed while the service runs, and
//! the service's own Prometheus metrics ([`metrics`], [`snapshot`]).

pub mod metrics;
pub mod shared;
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
                    .fmt_fields(escaped_fields())
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            ),
            None,
        ),
        // JSON strings escape every control character: a value cannot end its line.
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

/// Text-log fields as `tracing`'s default writes them (`message`, then `name=value`),
/// with line breaks and other control characters escaped: a project name or label
/// value from a user or an exporter cannot start a line of its own (forge an entry)
/// or send terminal escapes.
fn escaped_fields() -> impl for<'w> fmt::FormatFields<'w> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt;
    fmt::format::debug_fn(|writer, field, value| {
        let text = escape_control(&format!("{value:?}")).into_owned();
        match field.name() {
            "message" => writer.write_str(&text),
            name => write!(writer, "{name}={text}"),
        }
    })
    .delimited(" ")
}

/// `text` with control characters (and Unicode line separators) written as escapes:
/// `\n`, `\r`, `\t`, `\u{1b}`.
pub fn escape_control(text: &str) -> std::borrow::Cow<'_, str> {
    let special = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !text.chars().any(special) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if special(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_kept() {
        let cases = [
            ("Alpha Beta", "Alpha Beta"),
            ("a\nb\r\nc\td", "a\\nb\\r\\nc\\td"),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("line\u{2028}sep\u{85}", "line\\u{2028}sep\\u{85}"),
            ("Grüße", "Grüße"),
        ];
        for (raw, escaped) in cases {
            assert_eq!(escape_control(raw), escaped, "{raw:?}");
        }
    }
}
