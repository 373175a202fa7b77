//! Log set-up shared by every Tandem binary (`tandem`, `tandem-bank`): one piece of code, so
//! both speak the same format.
//!
//! Two formats, chosen by the binary's `--log-format` flag, else by the environment variable
//! [`LOG_FORMAT_ENV`] (`TANDEM_LOG_FORMAT`), else human:
//! - `human`: tracing's compact text, one line per event with its spans (colour only on a
//!   terminal);
//! - `json`: one JSON object per line, with the event's fields, the current span (`span`) and
//!   every span it is in (`spans`, outermost first). Spans carry the transaction id (`txn`
//!   for 2PC, `saga` for sagas) and the trace id (`trace_id`), so a log pipeline can select one
//!   transaction's lines.
//!
//! The level filter comes from `RUST_LOG` (default: the binary's). Logs go to stderr: stdout
//! belongs to the commands' own output (and the "listening on" line tests read).
//!
//! A binary may add one more layer (the coordinator's OpenTelemetry exporter, feature `otel`),
//! which sees every span the filter lets through.

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The environment variable that chooses the log format when no flag does.
pub const LOG_FORMAT_ENV: &str = "TANDEM_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Text for people.
    #[default]
    Human,
    /// One JSON object per line, for machines.
    Json,
}

impl FromStr for LogFormat {
    type Err = LoggingError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err(LoggingError::UnknownFormat(text.to_string())),
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("unknown log format {0:?}: expected human or json")]
    UnknownFormat(String),
    #[error("{LOG_FORMAT_ENV}: {0}")]
    Environment(Box<LoggingError>),
    #[error("a global log subscriber was already installed: {0}")]
    AlreadySet(String),
}

/// The format to use: `flag` if given, else [`LOG_FORMAT_ENV`] if set, else human.
pub fn resolve_format(flag: Option<LogFormat>) -> Result<LogFormat, LoggingError> {
    if let Some(format) = flag {
        return Ok(format);
    }
    match std::env::var(LOG_FORMAT_ENV) {
        Ok(text) if !text.trim().is_empty() => text
            .parse()
            .map_err(|e| LoggingError::Environment(Box::new(e))),
        _ => Ok(LogFormat::default()),
    }
}

/// A layer a binary adds to the subscriber (for example an exporter).
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the process's log subscriber: `format` on stderr, filtered by `RUST_LOG` (or
/// `default_filter` when it is unset or invalid), plus `extra` if given.
pub fn init(
    format: LogFormat,
    default_filter: &str,
    extra: Option<ExtraLayer>,
) -> Result<(), LoggingError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt_layer = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    Registry::default()
        .with(extra)
        .with(filter)
        .with(fmt_layer)
        .try_init()
        .map_err(|e| LoggingError::AlreadySet(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_by_name_and_unknown_ones_are_named_in_the_error() {
        assert_eq!("human".parse::<LogFormat>().unwrap(), LogFormat::Human);
        assert_eq!(" JSON ".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let error = "xml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(
            error.contains("\"xml\"") && error.contains("human or json"),
            "{error}"
        );
        assert_eq!(
            resolve_format(Some(LogFormat::Json)).unwrap(),
            LogFormat::Json
        );
    }
}
