//! The worker's Redis client: a fred pool with a key prefix and a hard per-command timeout.
//! Redis is an accelerator, never the source of truth: every caller has a PostgreSQL path for
//! when a command fails or times out.

use std::{sync::Arc, time::Duration};

use fred::{
    prelude::{Builder, ClientLike, KeysInterface, Pool},
    types::{Expiration, config::ReconnectPolicy},
};

use crate::config::RedisConfig;

/// Why a Redis call produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis command timed out")]
    Timeout,
    #[error(transparent)]
    Redis(#[from] fred::error::Error),
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
        Ok(Self {
            pool,
            prefix: config.key_prefix.as_str().into(),
            timeout,
        })
    }

    /// `prefix + name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, RedisError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout),
        }
    }

    pub async fn get_i64(&self, key: &str) -> Result<Option<i64>, RedisError> {
        self.bounded(self.pool.get::<Option<i64>, _>(key)).await
    }

    pub async fn set_i64(&self, key: &str, value: i64, ttl: Duration) -> Result<(), RedisError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        self.bounded(self.pool.set::<(), _, _>(
            key,
            value,
            Some(Expiration::EX(seconds)),
            None,
            false,
        ))
        .await
    }

    /// Round-trip time of a PING.
    pub async fn ping(&self) -> Result<Duration, RedisError> {
        let started = std::time::Instant::now();
        self.bounded(self.pool.ping::<String>(None)).await?;
        Ok(started.elapsed())
    }
}
