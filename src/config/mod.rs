//! The typed configuration tree.
//!
//! Every value comes from one of four layers, later layers winning:
//! built-in defaults < `config.toml` < environment < command-line flags.
//! The environment layer understands `DATABASE_URL`, `REDIS_URL` and
//! `TASKD_<SECTION>__<KEY>` (for example `TASKD_WORKER__PORT=3001`).
//! Unknown keys and invalid values are rejected with a message naming the key,
//! so a typo never silently falls back to a default.

use std::{path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
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

mod data;
mod proxy;
mod supervisor;
mod worker;

use self::worker::is_exact_origin;
pub use self::{data::*, proxy::*, supervisor::*, worker::*};

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

/// Loads the configuration again from where it first came from (the same file, environment and
/// command line): what SIGHUP calls to reload.
pub type Reloader = std::sync::Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

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
    use bytesize::ByteSize;

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
