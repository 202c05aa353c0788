//! `[supervisor]` and `[telemetry]`: the local cluster and logging.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// `[supervisor]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Worker processes. Default 4.
    pub instances: u16,
    /// First worker port; workers start on 127.0.0.1 `base_port..base_port+instances-1`, and
    /// `base_port+instances` is kept spare for the replacement during a rolling restart (after
    /// one, workers may sit on any port of that range; `/status` says where). Default 3000.
    pub base_port: u16,
    /// Time between liveness probes (`GET /health/live`) of one worker. Default 1s.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe not answered within this is a failure. Default 1s.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Consecutive failed probes after which a worker is restarted. Default 3.
    pub probe_threshold: u32,
    /// Time between SIGTERM and SIGKILL when a worker is stopped. Default 10s.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Longest a new worker may take to become ready before it counts as failed. Default 30s.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Wait before the second restart of a crash-looping worker; doubles on each further
    /// crash (the first restart is immediate). Default 500ms.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest wait between restarts. Default 30s.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A worker whose process lived this long (from spawn) did not crash-loop: its death
    /// restarts it immediately and resets its backoff. Default 2s: a failed start (bad
    /// configuration, busy port, database down) dies well within it, while a worker that served
    /// for a few seconds and then died (OOM kill, kill -9) is back at once. Like PM2's
    /// `min_uptime` and supervisord's `startsecs`.
    #[serde(with = "humantime_serde")]
    pub min_uptime: Duration,
    /// Private PostgreSQL and Redis for a machine that has the servers installed but not
    /// running (`supervisor::stores`). `auto`: started when `database.url` / `redis.url` are the
    /// defaults and nothing answers there; `always`: started whatever answers (on free ports
    /// when the default ones are taken); `never`: only the configured URLs. Default `auto`.
    pub stores: StoresMode,
    /// Where the private stores keep their data and logs (kept between runs). Default `.taskd`,
    /// relative to the working directory.
    pub stores_dir: PathBuf,
}

/// `supervisor.stores`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoresMode {
    Auto,
    Always,
    Never,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            instances: 4,
            base_port: 3000,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            probe_threshold: 3,
            grace_period: Duration::from_secs(10),
            start_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            min_uptime: Duration::from_secs(2),
            stores: StoresMode::Auto,
            stores_dir: PathBuf::from(".taskd"),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[telemetry]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `pretty` (default) or `json`.
    pub log_format: LogFormat,
    /// A tracing filter: `info` (default), `debug`, or directives like `taskd=debug,sqlx=warn`.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_level: "info".into(),
        }
    }
}
