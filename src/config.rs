//! The typed configuration tree.
//!
//! Every value comes from one of four layers, later layers winning:
//! built-in defaults < `config.toml` < environment < command-line flags.
//! The environment layer understands `DATABASE_URL`, `REDIS_URL` and
//! `TASKD_<SECTION>__<KEY>` (for example `TASKD_WORKER__PORT=3001`).
//! Unknown keys and invalid values are rejected with a message naming the key,
//! so a typo never silently falls back to a default.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use bytesize::ByteSize;
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Why the configuration could not be used. The message always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value has the wrong shape or an unknown key.
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    /// A value parsed but is out of range.
    #[error("invalid configuration: `{key}` {message}")]
    Invalid { key: &'static str, message: String },
}

/// The whole configuration. Each section maps to a `[section]` table in `config.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PostgreSQL, the only durable store.
    pub database: DatabaseConfig,
    /// Redis, for state shared between workers that may be lost.
    pub redis: RedisConfig,
    /// Tokens and password hashing.
    pub auth: AuthConfig,
    /// Response cache of task reads (Redis).
    pub cache: CacheConfig,
    /// Per-identity request limits and the failed-login limit (Redis).
    pub rate_limit: RateLimitConfig,
    /// `Idempotency-Key` handling of POST requests (Redis).
    pub idempotency: IdempotencyConfig,
    /// The API process (`taskd worker`).
    pub worker: WorkerConfig,
    /// The load balancer (`taskd proxy`, and inside `taskd serve`).
    pub proxy: ProxyConfig,
    /// The operator listener of the proxy: `/status`, `/metrics`, dashboard.
    pub admin: AdminConfig,
    /// The local cluster (`taskd serve`): worker processes, probes, restarts.
    pub supervisor: SupervisorConfig,
    /// Logging.
    pub telemetry: TelemetryConfig,
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Primary PostgreSQL URL; the database is created when missing.
    /// Default `postgres://postgres@127.0.0.1:5432/taskd`; `DATABASE_URL` overrides it.
    pub url: String,
    /// Optional streaming replica for reads that have seen the caller's last write (listings,
    /// single tasks, categories); see `worker::replica`. Default: none (reads go to `url`).
    pub read_url: Option<String>,
    /// Optional URL for what needs a session of its own, bypassing a transaction pooler:
    /// migrations (and their advisory lock), `taskd user create`, `taskd seed`. Default: `url`.
    pub direct_url: Option<String>,
    /// Named, cached prepared statements (the fastest). `false` in front of a transaction-mode
    /// pooler that cannot track them (PgBouncer before 1.21): each statement then runs unnamed
    /// in a transaction of its own (`db::Db`). Default true.
    pub prepared_statements: bool,
    /// Past this replay lag the replica is not read from. Default 5s.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Duration,
    /// Connections per worker process. Default 10.
    pub max_connections: u32,
    /// How long a request waits for a free connection before answering 503. Default 3s.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Server-side limit on one statement of the pool's sessions, so a runaway query cannot pin a
    /// connection (migrations run without it, see `db::migrate`). Default 5s.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/taskd".into(),
            read_url: None,
            direct_url: None,
            prepared_statements: true,
            max_replica_lag: Duration::from_secs(5),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// `[redis]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://`, `redis-cluster://` or `redis-sentinel://` URL; `rediss://`,
    /// `rediss-cluster://`, `rediss-sentinel://` for TLS. Default `redis://127.0.0.1:6379`;
    /// `REDIS_URL` overrides it.
    pub url: String,
    /// With a `rediss` URL: PEM file of the CA(s) that sign the server's certificate, trusted
    /// instead of the system's roots. Default: none (the system's roots).
    pub tls_ca: Option<String>,
    /// Prefix of every key this deployment writes, so several deployments can share one Redis.
    /// Default `taskd:`.
    pub key_prefix: String,
    /// Connections per worker process. Default 1: the commands of concurrent requests are
    /// pipelined on it, and one connection carries a worker's load in fewer, fuller writes and
    /// reads (for the worker and for Redis) than several; more suit a worker with many threads.
    pub pool_size: usize,
    /// Upper bound on one Redis command; past it the request carries on without Redis. Default 250ms.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Consecutive failures (a dropped connection counts as one) after which Redis is skipped
    /// (circuit breaker open). Default 3.
    pub breaker_failures: u32,
    /// While the breaker is open, how often a background PING tries Redis; an answer closes it.
    /// Default 1s.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            tls_ca: None,
            key_prefix: "taskd:".into(),
            pool_size: 1,
            command_timeout: Duration::from_millis(250),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Serve `GET /api/v1/tasks` and single-task reads from Redis. Default true.
    pub enabled: bool,
    /// Lifetime of an entry; writes invalidate entries at once regardless. Default 60s.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Keep br, zstd and gzip variants of cached bodies over 1 KiB next to the plain entry,
    /// each made once (on the first read that asks for it) and then served as stored, with an
    /// `ETag` of its own, to clients whose `Accept-Encoding` takes it. A variant is never larger
    /// than the plain body. Default true.
    pub compression: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Duration::from_secs(60),
            compression: true,
        }
    }
}

/// `[rate_limit]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Enforce the limits. Default true.
    pub enabled: bool,
    /// The sliding window the limits count over. Default 1m.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Requests per window without a valid token, per client IP. Default 100.
    pub anonymous: u64,
    /// Requests per window for a user of tier `free`. Default 1000.
    pub free: u64,
    /// Requests per window for a user of tier `pro`. Default 10000.
    pub pro: u64,
    /// Requests per window for a user of tier `enterprise`. Default 100000.
    pub enterprise: u64,
    /// Password attempts allowed per (client IP, email) at login, and per user for the
    /// `currentPassword` of a password change, within `login_window`; reserved before the
    /// password is checked, forgiven on success. Default 5.
    pub login_attempts: u32,
    /// Window of the failed-login limit. Default 15m.
    #[serde(with = "humantime_serde")]
    pub login_window: Duration,
    /// When Redis cannot answer: true lets requests through unlimited, false answers 503.
    /// Default true.
    pub fail_open: bool,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_secs(60),
            anonymous: 100,
            free: 1_000,
            pro: 10_000,
            enterprise: 100_000,
            login_attempts: 5,
            login_window: Duration::from_secs(15 * 60),
            fail_open: true,
        }
    }
}

/// `[idempotency]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// How long a finished response is kept for replay. Default 24h.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// When Redis cannot answer: true runs the request without the guarantee, false answers
    /// 503. Default true.
    pub fail_open: bool,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            fail_open: true,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC secret for access tokens (at least 32 bytes). Empty (default): one is generated once
    /// and stored in PostgreSQL, so every worker shares it.
    pub jwt_secret: String,
    /// Lifetime of an access token. Default 15m.
    #[serde(with = "humantime_serde")]
    pub access_ttl: Duration,
    /// Lifetime of a refresh token. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub refresh_ttl: Duration,
    /// Argon2id memory cost in KiB. Default 19456 (19 MiB, the OWASP minimum).
    pub argon2_memory_kib: u32,
    /// Argon2id iterations. Default 2.
    pub argon2_iterations: u32,
    /// Password hashes computed at once per worker; bounds the memory a login burst takes.
    /// Default 2.
    pub max_concurrent_hashes: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            max_concurrent_hashes: 2,
        }
    }
}

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

impl Config {
    /// Loads the layers. `file` is the explicit `--config` path (which must exist); without it
    /// `./config.toml` is read when present. `overrides` are the command-line flags, as a nested
    /// JSON object (`{"worker": {"port": 3001}}`).
    pub fn load(file: Option<&Path>, overrides: serde_json::Value) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError::Invalid {
                        key: "--config",
                        message: format!("file {} does not exist", path.display()),
                    });
                }
                figment = figment.merge(Toml::file_exact(path));
            }
            None => figment = figment.merge(Toml::file("config.toml")),
        }
        let config: Config = figment
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(Env::raw().only(&["REDIS_URL"]).map(|_| "redis.url".into()))
            // Only `SECTION__KEY` names: `TASKD_PASSWORD` (used by `user create`) is not config.
            .merge(
                Env::prefixed("TASKD_")
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            )
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Range checks that the types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, key: &'static str, message: &str) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    message: message.into(),
                })
            }
        }
        check(
            self.database.url.starts_with("postgres://")
                || self.database.url.starts_with("postgresql://"),
            "database.url",
            "must be a postgres:// URL",
        )?;
        for (key, url) in [
            ("database.read_url", &self.database.read_url),
            ("database.direct_url", &self.database.direct_url),
        ] {
            if let Some(url) = url {
                check(
                    url.starts_with("postgres://") || url.starts_with("postgresql://"),
                    key,
                    "must be a postgres:// URL",
                )?;
            }
        }
        check(
            self.database.max_connections >= 1,
            "database.max_connections",
            "must be at least 1",
        )?;
        check(
            !self.database.acquire_timeout.is_zero(),
            "database.acquire_timeout",
            "must be greater than zero",
        )?;
        check(
            fred::types::config::Config::from_url(&self.redis.url).is_ok(),
            "redis.url",
            "is not a valid redis://, redis-cluster:// or redis-sentinel:// URL \
             (rediss… for TLS)",
        )?;
        check(
            self.redis.tls_ca.is_none() || self.redis.url.starts_with("rediss"),
            "redis.tls_ca",
            "needs a rediss://, rediss-cluster:// or rediss-sentinel:// redis.url",
        )?;
        check(
            (1..=64).contains(&self.redis.pool_size),
            "redis.pool_size",
            "must be between 1 and 64",
        )?;
        check(
            !self.redis.command_timeout.is_zero(),
            "redis.command_timeout",
            "must be greater than zero",
        )?;
        check(
            self.auth.jwt_secret.is_empty() || self.auth.jwt_secret.len() >= 32,
            "auth.jwt_secret",
            "must be empty (generated) or at least 32 bytes",
        )?;
        check(
            self.auth.access_ttl >= Duration::from_secs(1),
            "auth.access_ttl",
            "must be at least 1s",
        )?;
        check(
            self.auth.refresh_ttl > self.auth.access_ttl,
            "auth.refresh_ttl",
            "must be longer than auth.access_ttl",
        )?;
        check(
            self.auth.argon2_memory_kib >= 8,
            "auth.argon2_memory_kib",
            "must be at least 8",
        )?;
        check(
            self.auth.argon2_iterations >= 1,
            "auth.argon2_iterations",
            "must be at least 1",
        )?;
        check(
            self.auth.max_concurrent_hashes >= 1,
            "auth.max_concurrent_hashes",
            "must be at least 1",
        )?;
        check(
            !self.worker.request_timeout.is_zero(),
            "worker.request_timeout",
            "must be greater than zero",
        )?;
        check(
            !self.worker.header_read_timeout.is_zero(),
            "worker.header_read_timeout",
            "must be greater than zero",
        )?;
        check(
            !self.worker.idle_timeout.is_zero(),
            "worker.idle_timeout",
            "must be greater than zero",
        )?;
        check(
            self.worker.max_connections >= 1,
            "worker.max_connections",
            "must be at least 1",
        )?;
        check(
            self.worker.body_limit.as_u64() >= 1024,
            "worker.body_limit",
            "must be at least 1KiB",
        )?;
        check(
            self.redis.breaker_failures >= 1,
            "redis.breaker_failures",
            "must be at least 1",
        )?;
        check(
            !self.cache.ttl.is_zero(),
            "cache.ttl",
            "must be greater than zero",
        )?;
        check(
            self.rate_limit.window >= Duration::from_secs(1),
            "rate_limit.window",
            "must be at least 1s",
        )?;
        check(
            self.rate_limit.login_window >= Duration::from_secs(1),
            "rate_limit.login_window",
            "must be at least 1s",
        )?;
        check(
            self.idempotency.ttl >= Duration::from_secs(1),
            "idempotency.ttl",
            "must be at least 1s",
        )?;
        for origin in &self.worker.cors.allowed_origins {
            check(
                is_exact_origin(origin),
                "worker.cors.allowed_origins",
                &format!(
                    "has {origin:?}, which is not an origin as browsers send it \
                     (scheme://host[:port], lower case, no path or trailing slash)"
                ),
            )?;
        }
        let tls = &self.proxy.tls;
        check(
            tls.cert.is_some() || tls.key.is_none(),
            "proxy.tls.cert",
            "is needed with proxy.tls.key (--tls-cert)",
        )?;
        check(
            tls.key.is_some() || tls.cert.is_none(),
            "proxy.tls.key",
            "is needed with proxy.tls.cert (--tls-key)",
        )?;
        check(
            !tls.redirect_http || tls.files().is_some(),
            "proxy.tls.redirect_http",
            "needs HTTPS: set proxy.tls.cert and proxy.tls.key",
        )?;
        check(
            tls.files().is_none() || tls.listen != self.proxy.listen,
            "proxy.tls.listen",
            "must differ from proxy.listen",
        )?;
        for upstream in &self.proxy.upstreams {
            if let Err(error) = parse_upstream(upstream) {
                check(false, "proxy.upstreams", &format!("has {error}"))?;
            }
        }
        for name in &self.proxy.upstream_dns {
            check(
                parse_dns_target(name).is_ok(),
                "proxy.upstream_dns",
                &format!("has {name:?}, which is not host:port"),
            )?;
        }
        check(
            !self.proxy.dns_interval.is_zero(),
            "proxy.dns_interval",
            "must be above 0s",
        )?;
        for (ok, key) in [
            (self.proxy.threads <= 256, "proxy.threads"),
            (self.worker.threads <= 256, "worker.threads"),
            (
                !self.proxy.connect_timeout.is_zero(),
                "proxy.connect_timeout",
            ),
            (
                !self.proxy.response_timeout.is_zero(),
                "proxy.response_timeout",
            ),
            (!self.proxy.idle_timeout.is_zero(), "proxy.idle_timeout"),
            (!self.proxy.body_timeout.is_zero(), "proxy.body_timeout"),
            (!self.proxy.write_timeout.is_zero(), "proxy.write_timeout"),
            (
                !self.proxy.upgrade_idle_timeout.is_zero(),
                "proxy.upgrade_idle_timeout",
            ),
            (
                !self.proxy.tls.handshake_timeout.is_zero(),
                "proxy.tls.handshake_timeout",
            ),
            (self.proxy.max_connections >= 1, "proxy.max_connections"),
            (self.proxy.retries <= 16, "proxy.retries"),
            (self.proxy.health.path.starts_with('/'), "proxy.health.path"),
            (
                !self.proxy.health.interval.is_zero(),
                "proxy.health.interval",
            ),
            (!self.proxy.health.timeout.is_zero(), "proxy.health.timeout"),
            (self.proxy.health.rise >= 1, "proxy.health.rise"),
            (self.proxy.health.fall >= 1, "proxy.health.fall"),
            (
                !self.proxy.passive.fail_timeout.is_zero(),
                "proxy.passive.fail_timeout",
            ),
            (
                (1..=256).contains(&self.supervisor.instances),
                "supervisor.instances",
            ),
            (
                !self.supervisor.probe_interval.is_zero(),
                "supervisor.probe_interval",
            ),
            (
                !self.supervisor.probe_timeout.is_zero(),
                "supervisor.probe_timeout",
            ),
            (
                self.supervisor.probe_threshold >= 1,
                "supervisor.probe_threshold",
            ),
            (
                !self.supervisor.start_timeout.is_zero(),
                "supervisor.start_timeout",
            ),
            (
                !self.supervisor.backoff_initial.is_zero(),
                "supervisor.backoff_initial",
            ),
            (
                self.supervisor.backoff_max >= self.supervisor.backoff_initial,
                "supervisor.backoff_max",
            ),
        ] {
            check(
                ok,
                key,
                "is out of range (see config.toml for what it means)",
            )?;
        }
        check(
            u32::from(self.supervisor.base_port) + u32::from(self.supervisor.instances) <= 65535
                && self.supervisor.base_port > 0,
            "supervisor.base_port",
            "leaves no room for every instance's port and the spare one",
        )?;
        check(
            tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).is_ok(),
            "telemetry.log_level",
            "is not a valid level or filter directive",
        )?;
        Ok(())
    }

    /// The configuration as TOML with secrets replaced, for `taskd config`.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = redact_url(&shown.database.url);
        shown.database.read_url = shown.database.read_url.as_deref().map(redact_url);
        shown.database.direct_url = shown.database.direct_url.as_deref().map(redact_url);
        shown.redis.url = redact_url(&shown.redis.url);
        if !shown.auth.jwt_secret.is_empty() {
            shown.auth.jwt_secret = "<redacted>".into();
        }
        if !shown.admin.token.is_empty() {
            shown.admin.token = "<redacted>".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Whether `origin` is an HTTP(S) origin serialised as browsers send it in `Origin`, so that an
/// exact comparison with the header can match it.
fn is_exact_origin(origin: &str) -> bool {
    url::Url::parse(origin).is_ok_and(|url| {
        matches!(url.scheme(), "http" | "https") && url.origin().ascii_serialization() == origin
    })
}

/// Loads the configuration again from where it first came from (the same file, environment and
/// command line): what SIGHUP calls to reload.
pub type Reloader = std::sync::Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

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

/// The URL with its secrets replaced, for logs and `taskd config`: the password of the
/// userinfo and every query parameter whose name contains `password` (`?password=`,
/// `sslpassword`, fred's `sentinelPassword`). Works on text rather than a parsed URL, so that
/// what no URL parser reads (`redis-sentinel://:p@h1:26379,h2:26379/…`) is redacted too.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut shown = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((userinfo, hosts)) => {
                    let userinfo = match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:REDACTED"),
                        None => userinfo.to_owned(),
                    };
                    format!("{scheme}://{userinfo}@{hosts}{path}")
                }
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                    format!("{name}=REDACTED")
                }
                _ => pair.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&pairs.join("&"));
    }
    shown
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail fixes the closure signature
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    /// The committed `config.toml` documents every key with its default value.
    #[test]
    fn committed_config_toml_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let committed: Config = Figment::from(Toml::file_exact(&path)).extract().unwrap();
        let render = |c: &Config| toml::to_string(c).unwrap();
        assert_eq!(render(&committed), render(&Config::default()));
        let text = std::fs::read_to_string(&path).unwrap();
        for key in [
            "read_url",
            "direct_url",
            "instance_id",
            "tls_ca",
            "cert =",
            "key =",
        ] {
            assert!(text.contains(key), "config.toml does not mention {key}");
        }
    }

    #[test]
    fn redacts_url_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:REDACTED@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=secret&sslmode=require&sslpassword=k"),
            "postgres://u@h/db?password=REDACTED&sslmode=require&sslpassword=REDACTED"
        );
        assert_eq!(
            redact_url("redis-sentinel://:secret@h1:26379,h2:26379/0?sentinelPassword=s2&x=1"),
            "redis-sentinel://:REDACTED@h1:26379,h2:26379/0?sentinelPassword=REDACTED&x=1"
        );
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "config.toml",
                "[worker]\nport = 4000\nbody_limit = \"2MiB\"\n[auth]\naccess_ttl = \"5m\"\n",
            )?;
            jail.set_env("TASKD_WORKER__PORT", "4001");
            jail.set_env("DATABASE_URL", "postgres://x@db/taskd");
            jail.set_env("TASKD_PASSWORD", "not-a-config-key");
            let config = Config::load(None, serde_json::json!({})).unwrap();
            assert_eq!(config.worker.port, 4001);
            assert_eq!(config.worker.body_limit, ByteSize::mib(2));
            assert_eq!(config.auth.access_ttl, Duration::from_secs(300));
            assert_eq!(config.database.url, "postgres://x@db/taskd");
            let config = Config::load(None, serde_json::json!({"worker": {"port": 4002}})).unwrap();
            assert_eq!(config.worker.port, 4002);

            jail.set_env("TASKD_WORKER__PROT", "1");
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("prot"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("config.toml", "[database]\nacquire_timeout = \"soon\"\n")?;
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("acquire_timeout"), "{err}");
            jail.create_file("config.toml", "[redis]\npool_size = 0\n")?;
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("redis.pool_size"), "{err}");
            jail.create_file(
                "config.toml",
                "[worker.cors]\nallowed_origins = [\"https://app.example.com/\"]\n",
            )?;
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(
                err.to_string().contains("worker.cors.allowed_origins"),
                "{err}"
            );
            jail.create_file("config.toml", "[worker.cors]\nallowed_origin = []\n")?;
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("allowed_origin"), "{err}");
            jail.create_file("config.toml", "[redis]\ntls_ca = \"/etc/ca.pem\"\n")?;
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("redis.tls_ca"), "{err}");
            jail.create_file("config.toml", "[proxy.tls]\ncert = \"/etc/cert.pem\"\n")?;
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("proxy.tls.key"), "{err}");
            jail.create_file("config.toml", "[proxy.tls]\nredirect_http = true\n")?;
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("proxy.tls.redirect_http"), "{err}");
            jail.create_file("config.toml", "[proxy.tls]\ncrt = \"/etc/cert.pem\"\n")?;
            let err = Config::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("crt"), "{err}");
            Ok(())
        });
    }
}
