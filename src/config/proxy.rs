//! `[proxy]` (with `tls`, `health`, `passive`) and `[admin]`: the load balancer and its
//! operator listener; parsing of upstream entries.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// How the proxy picks an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each healthy upstream in turn.
    RoundRobin,
    /// The healthy upstream with the fewest requests in flight (ties in turn).
    LeastConn,
}

impl Strategy {
    /// The configuration spelling, as shown in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastConn => "least_conn",
        }
    }
}

/// `[proxy]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address clients connect to. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Upstreams, `http://host:port`, optionally followed by ` weight=N` (1-1000, default 1: a
    /// share of requests in proportion, as NGINX's `server ... weight=N`). Host names are
    /// resolved on each new connection. Default none; `taskd proxy --upstream` flags replace
    /// them, `taskd serve` sets its own.
    pub upstreams: Vec<String>,
    /// Names whose every address is an upstream (`host:port`, e.g. a Kubernetes headless
    /// Service), re-resolved every `dns_interval`: new addresses join (with `slow_start`),
    /// vanished ones drain and are removed. A failed lookup keeps the current set. Default none;
    /// `taskd proxy --upstream-dns` flags replace them.
    pub upstream_dns: Vec<String>,
    /// How often `upstream_dns` names are resolved again. Default 5s.
    #[serde(with = "humantime_serde")]
    pub dns_interval: Duration,
    /// An upstream that joins a running proxy (a new DNS address, an admin `POST /upstreams`)
    /// gets a share of requests that grows from a tenth to its full weight over this long, so a
    /// cold worker is not handed its full share at once. 0s turns it off. Default 10s.
    #[serde(with = "humantime_serde")]
    pub slow_start: Duration,
    /// `round_robin` (default) or `least_conn`.
    pub strategy: Strategy,
    /// Threads serving clients, each with its own runtime and `SO_REUSEPORT` listener.
    /// Default 0: one per CPU.
    pub threads: usize,
    /// Longest wait for a TCP connection to an upstream (for a host name: the lookup, then each
    /// address in turn). Default 1s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for an upstream's response headers before answering 504. Default 60s.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Idle keep-alive connections (client side and pooled upstream side) are closed after
    /// this long. Default 60s. Client side, this and the HTTP/1 wait for `response_timeout` are
    /// checked every tenth of the shorter one (at most every second), so each ends up to two
    /// checks late; HTTP/2 requests and streamed uploads have a timer of their own.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Extra tries on other upstreams after a failure that is safe to retry. Default 2.
    pub retries: u32,
    /// When an upstream is ejected (failed health checks, or passive ejection), how much longer
    /// its in-flight requests that are safe to resend may wait for response headers before they
    /// are cancelled and retried on another upstream: a host that vanished costs a request at
    /// most this past the ejection, not `response_timeout`. Default 1s.
    #[serde(with = "humantime_serde")]
    pub retry_after_ejection: Duration,
    /// Largest request body kept in memory so that a request which reached an upstream can
    /// be retried (idempotent methods and POSTs with `Idempotency-Key`); larger bodies are
    /// streamed and only retried when they never left the proxy. Default 1MiB.
    pub retry_body_limit: ByteSize,
    /// Idle upstream connections kept per upstream and thread; 0 keeps none. Default 256.
    pub max_idle_per_upstream: usize,
    /// Longest wait between two reads of a request body, buffered or streamed; then 408 (or,
    /// once the upstream answered, the connection is closed). Default 30s.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Longest a response may make no progress towards a client (a reader that stopped, a zero
    /// HTTP/2 window); then the client connection is closed and the upstream freed. Default 30s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Most client connections open at once, all serving threads together; past it new ones
    /// wait in the kernel backlog. Default 10000.
    pub max_connections: usize,
    /// Compress responses that arrive uncompressed, as they stream: br, zstd or gzip by the
    /// client's `Accept-Encoding`, for compressible types (text, JSON, XML, JavaScript, SVG)
    /// over 1 KiB, with `Vary: Accept-Encoding`; never for `Range` or `HEAD` requests,
    /// `Cache-Control: no-transform` or responses already encoded. Default true.
    pub compression: bool,
    /// Peers whose `X-Forwarded-For` is extended rather than replaced (CIDRs). Default none.
    pub trusted_proxies: Vec<IpNet>,
    /// An upgraded connection (WebSocket or another HTTP/1.1 `Upgrade`) with no bytes either
    /// way for this long is closed. Default 5m.
    #[serde(with = "humantime_serde")]
    pub upgrade_idle_timeout: Duration,
    /// How long in-flight requests (upgraded connections included) may run after SIGTERM before
    /// the proxy exits anyway. Default 10s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// HTTPS: TLS termination on a second listener.
    pub tls: ProxyTlsConfig,
    /// Active health checks.
    pub health: HealthCheckConfig,
    /// Passive health: ejection after repeated failures of real requests.
    pub passive: PassiveHealthConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            upstreams: Vec::new(),
            upstream_dns: Vec::new(),
            dns_interval: Duration::from_secs(5),
            slow_start: Duration::from_secs(10),
            strategy: Strategy::RoundRobin,
            threads: 0,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            retries: 2,
            retry_after_ejection: Duration::from_secs(1),
            retry_body_limit: ByteSize::mib(1),
            max_idle_per_upstream: 256,
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            compression: true,
            trusted_proxies: Vec::new(),
            upgrade_idle_timeout: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(10),
            tls: ProxyTlsConfig::default(),
            health: HealthCheckConfig::default(),
            passive: PassiveHealthConfig::default(),
        }
    }
}

/// `[proxy.tls]`: on when `cert` and `key` are both set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyTlsConfig {
    /// Address of the HTTPS listener (served by the same threads, connection cap and timeouts
    /// as `proxy.listen`). Default `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// PEM file of the certificate chain, the server's certificate first (e.g. an ACME client's
    /// `fullchain.pem`). Read again on SIGHUP and when the file changes. Default: none (no HTTPS).
    pub cert: Option<PathBuf>,
    /// PEM file of the certificate's private key (PKCS#8, PKCS#1 or SEC1). Read again with
    /// `cert`. Default: none.
    pub key: Option<PathBuf>,
    /// Answer every request on `proxy.listen` with a 308 redirect to the same URL over HTTPS.
    /// Default false.
    pub redirect_http: bool,
    /// Longest a client may take over its TLS handshake, from the TCP connection on; then the
    /// connection is closed. Default 10s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for ProxyTlsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            cert: None,
            key: None,
            redirect_http: false,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl ProxyTlsConfig {
    /// The certificate and key files, when HTTPS is on.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        Some((self.cert.as_deref()?, self.key.as_deref()?))
    }
}

/// `[proxy.health]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Path probed with GET on each upstream. Default `/health/ready`.
    pub path: String,
    /// Time between probes of one upstream (plus up to 10 % jitter). Default 1s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A probe not answered 2xx within this is a failure. Default 1s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passing probes that make an unhealthy upstream healthy. Default 2.
    pub rise: u32,
    /// Consecutive failing probes that make a healthy upstream unhealthy. Default 2.
    pub fall: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/health/ready".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 2,
        }
    }
}

/// `[proxy.passive]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthConfig {
    /// Failed requests (connection errors, timeouts) within `fail_timeout` that eject an
    /// upstream; 0 disables ejection. Default 3.
    pub max_fails: u32,
    /// The window failures are counted in, and how long an ejected upstream gets no
    /// requests. Default 10s.
    #[serde(with = "humantime_serde")]
    pub fail_timeout: Duration,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        Self {
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of `/status`, `/metrics` and the dashboard. Default `127.0.0.1:8081`: keep it
    /// off public addresses; its read routes have no authentication.
    pub listen: SocketAddr,
    /// Bearer token of the write routes (`POST /upstreams`, `POST /upstreams/drain`,
    /// `DELETE /upstreams`). Empty (the default): the write routes are off.
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            token: String::new(),
        }
    }
}

/// Most an upstream's `weight=` may be.
pub const MAX_WEIGHT: u32 = 1000;

/// An entry of `proxy.upstreams` (`http://host:port [weight=N]`): the URL as
/// [`parse_upstream_url`] returns it, and the weight (default 1).
pub fn parse_upstream(raw: &str) -> Result<(String, u32), String> {
    let mut words = raw.split_whitespace();
    let url = parse_upstream_url(words.next().unwrap_or_default())?;
    let mut weight = 1;
    for word in words {
        weight = word
            .strip_prefix("weight=")
            .and_then(|w| w.parse().ok())
            .filter(|w| (1..=MAX_WEIGHT).contains(w))
            .ok_or_else(|| {
                format!("{raw:?}: after the URL only weight=N (1 to {MAX_WEIGHT}) may follow")
            })?;
    }
    Ok((url, weight))
}

/// An entry of `proxy.upstream_dns`: `host:port`, host a name (or an address).
pub fn parse_dns_target(raw: &str) -> Result<(String, u16), String> {
    let (host, port) = raw
        .rsplit_once(':')
        .ok_or_else(|| format!("{raw:?}: expected host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{raw:?}: the port must be 1 to 65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(format!("{raw:?}: expected host:port"));
    }
    Ok((host.to_owned(), port))
}

/// Checks an upstream URL (`http://host:port`, no path) and returns it without a trailing
/// slash, the form the proxy reports it in.
pub fn parse_upstream_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?}: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!("{raw:?}: only http:// upstreams are supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{raw:?}: no host"));
    }
    if !(url.path() == "/" || url.path().is_empty()) || url.query().is_some() {
        return Err(format!(
            "{raw:?}: an upstream is a host and port, with no path"
        ));
    }
    let host = url.host_str().unwrap_or_default();
    Ok(match url.port_or_known_default() {
        Some(port) => format!("http://{host}:{port}"),
        None => format!("http://{host}"),
    })
}
