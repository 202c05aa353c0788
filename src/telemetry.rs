//! Logging setup: one subscriber for the process, pretty or JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global subscriber, writing to stderr so stdout stays for command output
/// (`taskd config`, `taskd user create`). Colours only on a terminal. Calling it twice (as tests
/// may) keeps the first one.
pub fn init(config: &TelemetryConfig) {
    let ansi = std::io::stderr().is_terminal();
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.log_format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_target(false),
            )
            .try_init(),
    };
    // Already installed (a test harness or an earlier call): keep it.
    drop(result);
}
