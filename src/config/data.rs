//! The worker's stores and policies: `[database]`, `[redis]`, `[cache]`, `[rate_limit]`,
//! `[idempotency]`, `[auth]`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
