//! The worker's Redis client: a fred pool with a key prefix, a hard per-command timeout and a
//! circuit breaker.
//!
//! Redis is an accelerator, never the source of truth: every caller has a path for when a
//! command fails. The breaker keeps an outage cheap: after `breaker_failures` consecutive
//! failures Redis is skipped (callers get [`RedisError::Unavailable`] at once) for
//! `breaker_cooldown`; then one call is let through as a probe, and its success closes the
//! breaker again. Readiness pings bypass the breaker and count as probes, so recovery is noticed
//! within one probe interval even when no request touches Redis.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use fred::{
    prelude::{Builder, ClientLike, KeysInterface, Pool},
    types::{Expiration, FromValue, config::ReconnectPolicy, scripts::Script},
};

use crate::config::RedisConfig;

/// Why a Redis call produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis command timed out")]
    Timeout,
    #[error("redis is skipped while the circuit breaker is open")]
    Unavailable,
    #[error(transparent)]
    Redis(#[from] fred::error::Error),
}

/// Consecutive-failure circuit breaker, lock-free.
struct Breaker {
    /// Consecutive failures; the breaker is open while this is at or above `threshold`.
    failures: AtomicU32,
    /// While open: when the next probe may go, in milliseconds since `origin`.
    retry_at_ms: AtomicU64,
    /// How many times the breaker has opened: lets callers tell that an outage happened since
    /// they last looked, even if it is over now.
    openings: AtomicU64,
    threshold: u32,
    cooldown: Duration,
    origin: Instant,
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Whether a call may go to Redis now. When the cool-down has passed exactly one caller
    /// wins the right to probe; the others keep skipping until it reports.
    fn allow(&self) -> bool {
        if self.failures.load(Ordering::Acquire) < self.threshold {
            return true;
        }
        let now = self.now_ms();
        let retry_at = self.retry_at_ms.load(Ordering::Acquire);
        now >= retry_at
            && self
                .retry_at_ms
                .compare_exchange(
                    retry_at,
                    now + self.cooldown.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    fn success(&self) {
        if self.failures.swap(0, Ordering::AcqRel) >= self.threshold {
            tracing::info!("redis is back; circuit breaker closed");
            metrics::gauge!("redis_breaker_open").set(0.0);
        }
    }

    fn failure(&self) {
        metrics::counter!("redis_errors_total").increment(1);
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures == self.threshold {
            self.openings.fetch_add(1, Ordering::AcqRel);
            self.retry_at_ms.store(
                self.now_ms() + self.cooldown.as_millis() as u64,
                Ordering::Release,
            );
            tracing::warn!(
                cooldown = ?self.cooldown,
                "redis failed {failures} times in a row; circuit breaker open"
            );
            metrics::gauge!("redis_breaker_open").set(1.0);
        }
    }

    fn is_open(&self) -> bool {
        self.failures.load(Ordering::Acquire) >= self.threshold
    }
}

/// A cheap-to-clone handle on the pool.
#[derive(Clone)]
pub struct Redis {
    /// Connections, reconnected in the background with exponential backoff.
    pool: Pool,
    /// Prepended to every key (`redis.key_prefix`), so deployments can share a server.
    prefix: Arc<str>,
    /// Upper bound for one command, including waiting for a connection.
    timeout: Duration,
    /// Shared by every clone: one view of Redis health per process.
    breaker: Arc<Breaker>,
}

impl Redis {
    /// Builds the pool and starts connecting in the background: a worker starts (degraded)
    /// while Redis is down, and recovers by itself when it comes back.
    pub fn connect(config: &RedisConfig) -> anyhow::Result<Self> {
        let mut client_config = fred::types::config::Config::from_url(&config.url)?;
        client_config.fail_fast = false;
        let timeout = config.command_timeout;
        let pool = Builder::from_config(client_config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build_pool(config.pool_size)?;
        let connecting = pool.clone();
        tokio::spawn(async move {
            // Resolves only when the pool shuts down; reconnection happens inside.
            let _ = connecting.connect().await;
        });
        metrics::gauge!("redis_breaker_open").set(0.0);
        Ok(Self {
            pool,
            prefix: config.key_prefix.as_str().into(),
            timeout,
            breaker: Arc::new(Breaker {
                failures: AtomicU32::new(0),
                retry_at_ms: AtomicU64::new(0),
                openings: AtomicU64::new(0),
                threshold: config.breaker_failures,
                cooldown: config.breaker_cooldown,
                origin: Instant::now(),
            }),
        })
    }

    /// `prefix + name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether the breaker currently skips Redis.
    pub fn is_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// How many times the breaker has opened since this client was built.
    pub fn outages(&self) -> u64 {
        self.breaker.openings.load(Ordering::Acquire)
    }

    /// Runs one command through the breaker and the timeout.
    async fn call<T>(
        &self,
        command: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, RedisError> {
        if !self.breaker.allow() {
            return Err(RedisError::Unavailable);
        }
        let result = match tokio::time::timeout(self.timeout, command).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(RedisError::Redis(error)),
            Err(_) => Err(RedisError::Timeout),
        };
        match &result {
            Ok(_) => self.breaker.success(),
            Err(_) => self.breaker.failure(),
        }
        result
    }

    pub async fn get_i64(&self, key: &str) -> Result<Option<i64>, RedisError> {
        self.call(self.pool.get::<Option<i64>, _>(key)).await
    }

    pub async fn set_i64(&self, key: &str, value: i64, ttl: Duration) -> Result<(), RedisError> {
        self.call(
            self.pool
                .set::<(), _, _>(key, value, Some(ex(ttl)), None, false),
        )
        .await
    }

    /// Values of `keys` in one round trip (`MGET`; in a cluster the keys must share a slot).
    pub async fn mget(&self, keys: Vec<String>) -> Result<Vec<Option<Bytes>>, RedisError> {
        self.call(self.pool.mget::<Vec<Option<Bytes>>, _>(keys))
            .await
    }

    pub async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), RedisError> {
        self.call(
            self.pool
                .set::<(), _, _>(key, value, Some(ex(ttl)), None, false),
        )
        .await
    }

    /// `SET key value NX EX ttl`: whether this call created the key.
    pub async fn set_new(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let created: Option<String> = self
            .call(self.pool.set(
                key,
                value,
                Some(ex(ttl)),
                Some(fred::types::SetOptions::NX),
                false,
            ))
            .await?;
        Ok(created.is_some())
    }

    pub async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, RedisError> {
        self.call(self.pool.get::<Option<Bytes>, _>(key)).await
    }

    pub async fn del(&self, key: &str) -> Result<(), RedisError> {
        self.call(self.pool.del::<(), _>(key)).await
    }

    /// Remaining time to live of `key` (`None` when it has none or does not exist).
    pub async fn ttl(&self, key: &str) -> Result<Option<Duration>, RedisError> {
        let seconds: i64 = self.call(self.pool.ttl(key)).await?;
        Ok(u64::try_from(seconds).ok().map(Duration::from_secs))
    }

    /// Runs a Lua script by its SHA, loading it on first use.
    pub async fn script<R: FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, RedisError> {
        let client = self.pool.next();
        self.call(script.evalsha_with_reload(client, keys, args))
            .await
    }

    /// Round-trip time of a PING. Bypasses the breaker (readiness must see the truth) and
    /// reports to it, so it doubles as the recovery probe.
    pub async fn ping(&self) -> Result<Duration, RedisError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.pool.ping::<String>(None)).await
        {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(error)) => Err(RedisError::Redis(error)),
            Err(_) => Err(RedisError::Timeout),
        };
        match &result {
            Ok(_) => self.breaker.success(),
            Err(_) if !self.breaker.is_open() => self.breaker.failure(),
            Err(_) => {}
        }
        result
    }
}

fn ex(ttl: Duration) -> Expiration {
    Expiration::EX(i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, cooldown_ms: u64) -> Breaker {
        Breaker {
            failures: AtomicU32::new(0),
            retry_at_ms: AtomicU64::new(0),
            openings: AtomicU64::new(0),
            threshold,
            cooldown: Duration::from_millis(cooldown_ms),
            origin: Instant::now(),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_lets_one_probe_through() {
        let b = breaker(3, 50);
        b.failure();
        b.failure();
        b.success();
        b.failure();
        b.failure();
        assert!(b.allow(), "a success resets the count");
        b.failure();
        assert!(b.is_open());
        assert_eq!(b.openings.load(Ordering::Acquire), 1);
        assert!(!b.allow(), "open: skipped");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow(), "cool-down over: one probe");
        assert!(!b.allow(), "only one probe at a time");
        b.success();
        assert!(!b.is_open());
        assert!(b.allow());
    }

    #[test]
    fn a_failed_probe_keeps_it_open() {
        let b = breaker(1, 30);
        b.failure();
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        b.failure();
        assert!(!b.allow());
        let openings = b.openings.load(Ordering::Acquire);
        assert_eq!(openings, 1, "a failed probe is still the same outage");
    }
}
