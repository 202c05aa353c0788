//! The worker's Redis client: a fred pool with a key prefix, a hard per-command timeout and a
//! circuit breaker.
//!
//! Redis is an accelerator, never the source of truth: every caller has a path for when a
//! command fails. The breaker keeps an outage cheap: after `breaker_failures` consecutive
//! failures (a dropped connection counts as one) Redis is skipped — callers get
//! [`RedisError::Unavailable`] at once, and calls still waiting on it give up — until a
//! background probe, a PING every `breaker_cooldown`, is answered. No request ever waits on a
//! Redis that is known to be down. Readiness pings bypass the breaker and count as probes too.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use fred::{
    clients::WithOptions,
    prelude::{Builder, Client, ClientLike, EventInterface, KeysInterface, Options, Pool},
    types::{Expiration, FromValue, config::ReconnectPolicy, scripts::Script},
    util::redis_keyslot,
};
use futures_util::future::try_join_all;
use tokio::sync::Notify;

use anyhow::Context;

use crate::config::{RedisConfig, redact_url};

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
    /// How many times the breaker has opened: lets callers tell that an outage happened since
    /// they last looked, even if it is over now.
    openings: AtomicU64,
    threshold: u32,
    /// How often the background probe tries Redis while the breaker is open.
    cooldown: Duration,
    /// Woken when the breaker opens: calls still waiting on Redis give up at once instead of
    /// running out their timeouts against a server that has gone, and the probe starts.
    opened: Notify,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            failures: AtomicU32::new(0),
            openings: AtomicU64::new(0),
            threshold,
            cooldown,
            opened: Notify::new(),
        }
    }

    /// Whether a call may go to Redis now.
    fn allow(&self) -> bool {
        !self.is_open()
    }

    /// Reports a call that succeeded; `opening` is [`Breaker::openings`] when it began. An answer
    /// to a call sent before the breaker opened says nothing about Redis now (it may be the
    /// last one out of a connection that has since died), so only a call that began under the
    /// current state — a probe while open, any call while closed — closes the breaker.
    fn success(&self, opening: u64) {
        if self.openings.load(Ordering::Acquire) != opening {
            return;
        }
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
            tracing::warn!(
                cooldown = ?self.cooldown,
                "redis failed {failures} times in a row; circuit breaker open"
            );
            metrics::gauge!("redis_breaker_open").set(1.0);
            self.opened.notify_waiters();
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
    /// A Redis Cluster: multi-key commands must stay within one hash slot.
    clustered: bool,
    /// Shared by every clone: one view of Redis health per process.
    breaker: Arc<Breaker>,
    /// Connections use TLS.
    tls: bool,
}

/// A failed TLS handshake: fred reports rustls' errors as I/O errors, recognisable by name only.
fn is_tls_failure(error: &fred::error::Error) -> bool {
    const HANDSHAKE: [&str; 5] = [
        "InvalidCertificate",
        "AlertReceived",
        "InvalidMessage",
        "PeerIncompatible",
        "NoCertificatesPresented",
    ];
    *error.kind() == fred::error::ErrorKind::Tls
        || HANDSHAKE.iter().any(|name| error.details().contains(name))
}

/// A rustls client configuration trusting only the CA certificates in the PEM file `path`.
fn tls_with_ca(path: &str) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("redis.tls_ca: reading {path}"))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("redis.tls_ca: {path} is not PEM"))?;
        roots
            .add(cert)
            .with_context(|| format!("redis.tls_ca: a certificate in {path}"))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "redis.tls_ca: {path} holds no certificate"
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Redis {
    /// Builds the pool and starts connecting in the background, waiting up to a second for the
    /// first connections (commands fail fast: a worker that took requests before it was
    /// connected would treat them as an outage). A worker starts (degraded) while Redis is down,
    /// and recovers by itself when it comes back.
    ///
    /// A TLS handshake that fails (a certificate the configured CA did not sign, a name that
    /// does not match) will not heal by itself: it is a start-up error naming Redis.
    pub async fn connect(config: &RedisConfig) -> anyhow::Result<Self> {
        let mut client_config = fred::types::config::Config::from_url(&config.url)
            .with_context(|| format!("redis.url {}", redact_url(&config.url)))?;
        let clustered = client_config.server.is_clustered();
        client_config.fail_fast = false;
        if let Some(ca) = &config.tls_ca {
            client_config.tls = Some(tls_with_ca(ca)?.into());
        }
        let tls = client_config.tls.is_some();
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
        let breaker = Arc::new(Breaker::new(
            config.breaker_failures,
            config.breaker_cooldown,
        ));
        // A connection that drops counts as a failure at once. Commands sent in the moment
        // before fred starts reconnecting would otherwise queue until their timeouts, and a
        // dead Redis (every connection dropping together) would open the breaker only after
        // `breaker_failures` of them; now it opens within a millisecond and wakes them.
        let tls_failure: Arc<std::sync::OnceLock<String>> = Arc::default();
        for client in pool.clients() {
            let breaker = breaker.clone();
            let tls_failure = tls_failure.clone();
            client.on_error(move |(error, server)| {
                tracing::debug!(%error, ?server, "redis connection error");
                if is_tls_failure(&error) {
                    let _ = tls_failure.set(error.details().to_owned());
                }
                breaker.failure();
                async { Ok(()) }
            });
        }
        tokio::spawn(probe(pool.clone(), breaker.clone(), timeout));
        if tokio::time::timeout(Duration::from_secs(1), pool.wait_for_connect())
            .await
            .is_err()
        {
            if let Some(failure) = tls_failure.get() {
                let _ = pool.quit().await;
                anyhow::bail!(
                    "TLS to Redis at {} failed: {failure} (check redis.tls_ca and the host name \
                     in redis.url)",
                    redact_url(&config.url)
                );
            }
            tracing::warn!("redis is not reachable yet; starting without it");
        }
        Ok(Self {
            pool,
            prefix: config.key_prefix.as_str().into(),
            timeout,
            clustered,
            breaker,
            tls,
        })
    }

    /// Whether connections to Redis use TLS (a `rediss` URL).
    pub fn tls(&self) -> bool {
        self.tls
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

    /// A connected client of the pool whose commands fail at once, instead of queueing for a
    /// reconnection, when its connection is down: callers have a fallback, and a dead Redis
    /// then opens the breaker within a few requests rather than after `breaker_failures`
    /// command timeouts.
    fn client(&self) -> WithOptions<Client> {
        self.pool.next_connected().with_options(&Options {
            fail_fast: true,
            ..Options::default()
        })
    }

    /// Runs one command through the breaker and the timeout; it also gives up as soon as the
    /// breaker opens.
    async fn call<T>(
        &self,
        command: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, RedisError> {
        let opened = self.breaker.opened.notified();
        tokio::pin!(opened);
        // Registered before the check, so an opening between the two is not missed.
        opened.as_mut().enable();
        let opening = self.breaker.openings.load(Ordering::Acquire);
        if !self.breaker.allow() {
            return Err(RedisError::Unavailable);
        }
        let result = tokio::select! {
            biased;
            answer = tokio::time::timeout(self.timeout, command) => match answer {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(error)) => Err(RedisError::Redis(error)),
                Err(_) => Err(RedisError::Timeout),
            },
            () = opened => return Err(RedisError::Unavailable),
        };
        match &result {
            Ok(_) => self.breaker.success(opening),
            Err(_) => self.breaker.failure(),
        }
        result
    }

    pub async fn get_i64(&self, key: &str) -> Result<Option<i64>, RedisError> {
        self.call(self.client().get::<Option<i64>, _>(key)).await
    }

    pub async fn set_i64(&self, key: &str, value: i64, ttl: Duration) -> Result<(), RedisError> {
        self.call(
            self.client()
                .set::<(), _, _>(key, value, Some(ex(ttl)), None, false),
        )
        .await
    }

    /// Values of `keys`, in their order: one `MGET`, or in a cluster (which answers `MGET` only
    /// for keys of one hash slot) one per slot, sent together.
    pub async fn mget(&self, keys: Vec<String>) -> Result<Vec<Option<Bytes>>, RedisError> {
        if !self.clustered {
            return self
                .call(self.client().mget::<Vec<Option<Bytes>>, _>(keys))
                .await;
        }
        let count = keys.len();
        let mut slots: Vec<(u16, Vec<usize>, Vec<String>)> = Vec::new();
        for (index, key) in keys.into_iter().enumerate() {
            let slot = redis_keyslot(key.as_bytes());
            match slots.iter_mut().find(|(s, _, _)| *s == slot) {
                Some((_, indices, keys)) => {
                    indices.push(index);
                    keys.push(key);
                }
                None => slots.push((slot, vec![index], vec![key])),
            }
        }
        let answers = try_join_all(slots.iter_mut().map(|(_, _, keys)| {
            let keys = std::mem::take(keys);
            async move {
                let client = self.client();
                self.call(client.mget::<Vec<Option<Bytes>>, _>(keys)).await
            }
        }))
        .await?;
        let mut values = vec![None; count];
        for ((_, indices, _), answer) in slots.iter().zip(answers) {
            for (&index, value) in indices.iter().zip(answer) {
                values[index] = value;
            }
        }
        Ok(values)
    }

    pub async fn set_bytes(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), RedisError> {
        self.call(
            self.client()
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
            .call(self.client().set(
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
        self.call(self.client().get::<Option<Bytes>, _>(key)).await
    }

    pub async fn del(&self, key: &str) -> Result<(), RedisError> {
        self.call(self.client().del::<(), _>(key)).await
    }

    /// Remaining time to live of `key` (`None` when it has none or does not exist).
    pub async fn ttl(&self, key: &str) -> Result<Option<Duration>, RedisError> {
        let seconds: i64 = self.call(self.client().ttl(key)).await?;
        Ok(u64::try_from(seconds).ok().map(Duration::from_secs))
    }

    /// Runs a Lua script by its SHA, loading it on first use.
    pub async fn script<R: FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, RedisError> {
        let client = self.client();
        self.call(script.evalsha_with_reload(&client, keys, args))
            .await
    }

    /// Round-trip time of a PING. Bypasses the breaker (readiness must see the truth) and
    /// reports to it, so it doubles as the recovery probe.
    pub async fn ping(&self) -> Result<Duration, RedisError> {
        let opening = self.breaker.openings.load(Ordering::Acquire);
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.pool.ping::<String>(None)).await
        {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(error)) => Err(RedisError::Redis(error)),
            Err(_) => Err(RedisError::Timeout),
        };
        match &result {
            Ok(_) => self.breaker.success(opening),
            Err(_) if !self.breaker.is_open() => self.breaker.failure(),
            Err(_) => {}
        }
        result
    }
}

/// While the breaker is open, PINGs Redis every `breaker_cooldown` until it answers, then
/// closes the breaker; sleeps until it opens again. Runs for the life of the pool.
async fn probe(pool: Pool, breaker: Arc<Breaker>, timeout: Duration) {
    loop {
        let opened = breaker.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if !breaker.is_open() {
            opened.await;
        }
        while breaker.is_open() {
            tokio::time::sleep(breaker.cooldown).await;
            let opening = breaker.openings.load(Ordering::Acquire);
            if let Ok(Ok(_)) = tokio::time::timeout(timeout, pool.ping::<String>(None)).await {
                breaker.success(opening);
            }
        }
    }
}

fn ex(ttl: Duration) -> Expiration {
    Expiration::EX(i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, cooldown_ms: u64) -> Breaker {
        Breaker::new(threshold, Duration::from_millis(cooldown_ms))
    }

    fn opening(b: &Breaker) -> u64 {
        b.openings.load(Ordering::Acquire)
    }

    #[test]
    fn opens_after_consecutive_failures_and_only_a_success_closes_it() {
        let b = breaker(3, 50);
        b.failure();
        b.failure();
        b.success(opening(&b));
        b.failure();
        b.failure();
        assert!(b.allow(), "a success resets the count");
        b.failure();
        assert!(b.is_open());
        assert_eq!(opening(&b), 1);
        assert!(!b.allow(), "open: skipped");
        b.failure();
        assert!(!b.allow(), "failed probes keep it open");
        assert_eq!(opening(&b), 1, "and are still the same outage");
        b.success(opening(&b));
        assert!(!b.is_open());
        assert!(b.allow());
    }

    #[test]
    fn a_late_answer_from_before_the_opening_does_not_close_it() {
        let b = breaker(2, 10_000);
        let before = opening(&b);
        b.failure();
        b.failure();
        assert!(b.is_open());
        b.success(before);
        assert!(b.is_open(), "sent before the outage was seen: ignored");
        b.success(opening(&b));
        assert!(!b.is_open(), "a probe's answer closes it");
    }

    #[tokio::test]
    async fn opening_wakes_the_calls_still_waiting() {
        let b = breaker(2, 10_000);
        let waiting = b.opened.notified();
        tokio::pin!(waiting);
        waiting.as_mut().enable();
        b.failure();
        let still = tokio::time::timeout(Duration::from_millis(20), waiting.as_mut()).await;
        assert!(still.is_err(), "one failure does not open it");
        b.failure();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken when the breaker opened");
    }
}
