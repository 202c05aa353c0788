//! Logging setup: one subscriber for the process, pretty or JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global subscriber, writing to stderr so stdout stays for command output
/// (`taskd config`, `taskd user create`). Colours only on a terminal. Calling it twice (as tests
/// may) keeps the first one.
pub fn init(config: &TelemetryConfig) {
    let ansi = std::io::stderr().is_terminal();
    let mut filter =
        EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    // PostgreSQL's NOTICEs ("relation _sqlx_migrations already exists, skipping", once per
    // process that migrates) are not news at INFO; a filter that names sqlx decides itself.
    if !config.log_level.contains("sqlx") {
        if let Ok(directive) = "sqlx::postgres::notice=warn".parse() {
            filter = filter.add_directive(directive);
        }
    }
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

/// Whether a client-chosen `X-Request-Id` is kept (by the proxy and the worker alike): 1 to 128
/// bytes of letters, digits and `-_.:`, enough for UUIDs, hex and base64url ids, and nothing
/// that could forge a log line or inject markup where the id is shown. Anything else is
/// replaced by a generated id.
pub fn is_safe_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}
