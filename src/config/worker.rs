//! `[worker]` and `[worker.cors]`: the API process.

use std::{net::IpAddr, time::Duration};

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// `[worker]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Address the API binds. Default `0.0.0.0`.
    pub host: IpAddr,
    /// Port the API binds. Default 3000.
    pub port: u16,
    /// Name reported in `X-Served-By` and logs. Default: `<hostname>:<port>`.
    pub instance_id: Option<String>,
    /// Runtime threads of the worker. Default 0: one per CPU — except under `taskd serve`, where
    /// 0 means CPUs / instances (at least 1), so that N workers on a few cores do not fight
    /// over them. With 1 the worker runs tokio's single-threaded scheduler.
    pub threads: usize,
    /// Longest a request may take before it is answered 503. Default 30s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request body accepted; larger ones get 413. Default 1MiB.
    pub body_limit: ByteSize,
    /// Peers whose `X-Forwarded-For` is believed when finding the client address.
    /// Default loopback (`127.0.0.0/8`, `::1/128`).
    pub trusted_proxies: Vec<IpNet>,
    /// How long in-flight requests may run after SIGTERM before the worker exits anyway. Default 10s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Lame duck: after SIGTERM, how long the worker answers `/health/ready` 503 while still
    /// serving everything else, before it stops accepting. Set it to the time the balancer in
    /// front needs to notice (a Kubernetes endpoint update, a few `proxy.health.interval`s), so
    /// no request is sent to a worker that has closed its port. Default 0s.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Longest from the first byte of a request to the end of its headers; past it the
    /// connection is closed. Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client connection with nothing in flight and no traffic for this long is closed.
    /// Default 75s: above `proxy.idle_timeout`, so the proxy retires its pooled connections
    /// first.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most open client connections; past it new ones wait in the kernel's backlog.
    /// Default 10000.
    pub max_connections: usize,
    /// Cross-origin requests from browsers.
    pub cors: CorsConfig,
}

/// `[worker.cors]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins (`scheme://host[:port]`, exactly as browsers send them) whose pages may call the
    /// API. Default none: no CORS headers at all, and browsers keep other origins out.
    pub allowed_origins: Vec<String>,
    /// How long a browser may reuse a preflight answer (`Access-Control-Max-Age`). Default 10m.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_age: Duration::from_secs(600),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 3000,
            instance_id: None,
            threads: 0,
            request_timeout: Duration::from_secs(30),
            body_limit: ByteSize::mib(1),
            trusted_proxies: vec![
                "127.0.0.0/8".parse().expect("valid CIDR"),
                "::1/128".parse().expect("valid CIDR"),
            ],
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 10_000,
            cors: CorsConfig::default(),
        }
    }
}

/// Whether `origin` is an HTTP(S) origin serialised as browsers send it in `Origin`, so that an
/// exact comparison with the header can match it.
pub(super) fn is_exact_origin(origin: &str) -> bool {
    url::Url::parse(origin).is_ok_and(|url| {
        matches!(url.scheme(), "http" | "https") && url.origin().ascii_serialization() == origin
    })
}
