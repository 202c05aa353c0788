//! Reads from a streaming replica (`database.read_url`) that keep read-your-writes.
//!
//! # How a read chooses
//!
//! After every write, the worker asks the primary for its WAL position (`pg_current_wal_lsn()`,
//! which is past the write's commit record) and raises the owner's key `db:{<user>}:lsn` to it,
//! in the same Redis script that bumps the owner's cache version. A background task asks the
//! replica every [`POLL`] how far it has replayed (`pg_last_wal_replay_lsn()`). A read of an
//! owner's data goes to the replica only when that replayed position is at or past the owner's
//! key, the replica answered its last poll, and its lag is within `database.max_replica_lag`;
//! otherwise to the primary. A read that fails on the replica is sent again to the primary.
//!
//! The owner's key travels in the `MGET` the cache already makes, so choosing costs no round
//! trip on a cached read. Nothing that must hold depends on a key surviving:
//!
//! - a missing owner key (expired, evicted, lost with a Redis restart) is filled with the
//!   primary's position now, which is past every write of the owner that has committed;
//! - a position that could not be published (Redis down during a write) marks this worker
//!   unsure, as does any Redis outage it saw (other workers' publishes may have been lost too):
//!   before it trusts the keys again it raises the deployment-wide floor `db:lsn-floor`, which
//!   every read takes into account, to the primary's position;
//! - while Redis cannot answer at all, reads go to the primary.
//!
//! A replica result is therefore never older than the owner's last write, so the cache can store
//! it under the stamp read with the key, exactly as it stores a primary result.
//!
//! # Lag
//!
//! The poll samples the primary's position first, then the replica's. The lag is the age of the
//! oldest sample the replica has not replayed (zero when it has replayed the newest), which is
//! right for an idle primary too, where the time since the last replayed transaction is not.

use std::{
    collections::VecDeque,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use fred::types::scripts::Script;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{error::ApiError, redis::Redis};
use crate::db::Db;

/// How often the replica's replay position (and the primary's, for the lag) is read.
pub const POLL: Duration = Duration::from_millis(200);

/// Upper bound on one poll query.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// A replica whose last good poll is older than this is treated as down.
const STALE_AFTER: Duration = Duration::from_millis(1500);

/// Raises `KEYS[1]` to `ARGV[1]` (16 hex digits: equal lengths compare as numbers) and sets its
/// TTL to `ARGV[2]` seconds; never lowers it. With `ARGV[3] = "1"`, first bumps the cache version
/// `KEYS[2]` as `cache::BUMP` does. Returns the version (0 when not bumped).
pub const RECORD: &str = "\
local v = 0 \
if ARGV[3] == '1' then v = redis.call('INCR', KEYS[2]) redis.call('EXPIRE', KEYS[2], ARGV[2]) end \
local cur = redis.call('GET', KEYS[1]) \
if not cur or cur < ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) \
else redis.call('EXPIRE', KEYS[1], ARGV[2]) end \
return v";

/// How long position keys live (refreshed by every write).
const KEEP: Duration = Duration::from_secs(86_400);

/// `pg_lsn` as a 64-bit number: `pg_lsn - '0/0'` is numeric; it fits in `int8`.
const PRIMARY_LSN: &str = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8";
const REPLAYED_LSN: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8, \
     COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)";

/// The replica of one worker and what its poller last saw.
pub struct Replica {
    pool: Db,
    primary: Db,
    redis: Redis,
    max_lag: Duration,
    /// TTL of position keys (and of the cache versions bumped with them).
    keep: Duration,
    seen: RwLock<Seen>,
    record: Script,
    /// A position could not be published: the floor must be raised before keys are trusted.
    unsure: AtomicBool,
    /// The number of Redis outages already followed by raising the floor.
    outages_floored: AtomicU64,
}

/// The last poll's findings.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// When the replica last answered.
    answered: Option<Instant>,
    replayed: u64,
    latency: Duration,
    lag: Duration,
    /// Why the replica is not used, when the last poll failed.
    problem: Option<&'static str>,
    /// The poll's session was encrypted.
    tls: bool,
}

/// `checks.replica` in readiness.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCheck {
    /// `ok`; `lagging` past `database.max_replica_lag`; `down` when it does not answer as a
    /// standby. Reads go to the primary unless `ok`.
    pub status: &'static str,
    /// Round-trip time of the last poll; null when it failed.
    pub latency_ms: Option<f64>,
    /// Replay lag behind the primary, by WAL position; null when unknown.
    pub lag_ms: Option<u64>,
    /// Whether the poll's connection is encrypted.
    pub tls: bool,
}

/// A position as stored in Redis: fixed width, so string order is numeric order.
fn hex(lsn: u64) -> String {
    format!("{lsn:016x}")
}

fn parse(raw: Option<&Bytes>) -> Option<u64> {
    let text = std::str::from_utf8(raw?).ok()?;
    u64::from_str_radix(text, 16).ok()
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

/// The age of the oldest primary sample past `replayed`; zero when none is.
fn lag(history: &VecDeque<(Instant, u64)>, replayed: u64, now: Instant) -> Duration {
    history
        .iter()
        .find(|(_, lsn)| *lsn > replayed)
        .map_or(Duration::ZERO, |(at, _)| now.saturating_duration_since(*at))
}

impl Replica {
    pub fn new(
        pool: Db,
        primary: Db,
        redis: Redis,
        max_lag: Duration,
        cache_keep: Duration,
    ) -> Self {
        Self {
            pool,
            primary,
            redis,
            max_lag,
            keep: cache_keep.max(KEEP),
            seen: RwLock::new(Seen {
                problem: Some("not polled yet"),
                ..Seen::default()
            }),
            record: Script::from_lua(RECORD),
            unsure: AtomicBool::new(false),
            outages_floored: AtomicU64::new(0),
        }
    }

    fn owner_key(&self, owner: Uuid) -> String {
        self.redis.key(&format!("db:{{{owner}}}:lsn"))
    }

    fn floor_key(&self) -> String {
        self.redis.key("db:lsn-floor")
    }

    /// The keys a read of `owner` needs, to be fetched with the cache's `MGET`.
    pub fn keys(&self, owner: Uuid) -> [String; 2] {
        [self.owner_key(owner), self.floor_key()]
    }

    /// Polls until `shutdown`.
    pub async fn poll(self: Arc<Self>, shutdown: CancellationToken) {
        let mut history: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.poll_once(&mut history).await;
        }
    }

    async fn poll_once(&self, history: &mut VecDeque<(Instant, u64)>) {
        // The primary first: a sample taken before the replica's answer never makes the lag
        // look smaller than it is.
        let primary = sqlx::query_scalar::<_, i64>(PRIMARY_LSN).fetch_one(&self.primary);
        if let Ok(Ok(lsn)) = tokio::time::timeout(POLL_TIMEOUT, primary).await {
            history.push_back((Instant::now(), lsn as u64));
        }
        let keep = self.max_lag + Duration::from_secs(2);
        while history.len() > 1 && history.front().is_some_and(|(at, _)| at.elapsed() > keep) {
            history.pop_front();
        }
        let started = Instant::now();
        let replica = sqlx::query_as::<_, (Option<i64>, bool)>(REPLAYED_LSN).fetch_one(&self.pool);
        let answer = tokio::time::timeout(POLL_TIMEOUT, replica).await;
        let now = Instant::now();
        let mut seen = self.seen.write().expect("replica lock");
        match answer {
            Ok(Ok((Some(replayed), tls))) => {
                let replayed = replayed as u64;
                *seen = Seen {
                    answered: Some(now),
                    replayed,
                    latency: now - started,
                    lag: lag(history, replayed, now),
                    problem: None,
                    tls,
                };
            }
            Ok(Ok((None, _))) => seen.problem = Some("database.read_url is not a standby"),
            Ok(Err(_)) | Err(_) => seen.problem = Some("the replica does not answer"),
        }
        if let Some(problem) = seen.problem {
            tracing::debug!(problem, "replica not used");
        }
    }

    /// Whether reads may use the replica at all, and how far it has replayed.
    fn replayed(&self) -> Option<u64> {
        let seen = self.seen.read().expect("replica lock");
        let fresh = seen.answered.is_some_and(|at| at.elapsed() < STALE_AFTER);
        (fresh && seen.problem.is_none() && seen.lag <= self.max_lag).then_some(seen.replayed)
    }

    /// Readiness: what the last poll saw.
    pub fn check(&self) -> ReplicaCheck {
        let seen = self.seen.read().expect("replica lock");
        let fresh = seen.answered.is_some_and(|at| at.elapsed() < STALE_AFTER);
        let status = if !fresh || seen.problem.is_some() {
            "down"
        } else if seen.lag > self.max_lag {
            "lagging"
        } else {
            "ok"
        };
        ReplicaCheck {
            status,
            latency_ms: (status != "down").then(|| millis(seen.latency)),
            lag_ms: (status != "down").then(|| seen.lag.as_millis() as u64),
            tls: status != "down" && seen.tls,
        }
    }

    /// The primary's position now: past every write that has committed.
    async fn primary_lsn(&self) -> Option<u64> {
        let query = sqlx::query_scalar::<_, i64>(PRIMARY_LSN).fetch_one(&self.primary);
        match tokio::time::timeout(POLL_TIMEOUT, query).await {
            Ok(Ok(lsn)) => Some(lsn as u64),
            _ => None,
        }
    }

    /// Raises `key` to `lsn` (and bumps the cache version `bump` when given).
    async fn raise(&self, key: String, lsn: u64, bump: Option<String>) -> bool {
        // Only the keys the script touches: in a cluster they must share a slot (`{owner}`).
        let flag = if bump.is_some() { "1" } else { "0" };
        let keys = std::iter::once(key).chain(bump).collect();
        let args = vec![hex(lsn), self.keep.as_secs().to_string(), flag.into()];
        self.redis
            .script::<i64>(&self.record, keys, args)
            .await
            .is_ok()
    }

    /// After a write of `owner`: records the primary's position and, with `version` (the owner's
    /// cache version key), bumps that version in the same step. False when the version could
    /// not be bumped (the cache must then treat itself as stale).
    pub async fn wrote(&self, owner: Uuid, version: Option<String>) -> bool {
        let bumping = version.is_some();
        let Some(lsn) = self.primary_lsn().await else {
            // Unknown position: nothing to publish, so keys may be behind this write.
            self.unsure.store(true, Ordering::Release);
            tracing::warn!(%owner, "could not read the primary's WAL position after a write; replica reads wait for the floor");
            return !bumping;
        };
        if self.raise(self.owner_key(owner), lsn, version).await {
            return true;
        }
        self.unsure.store(true, Ordering::Release);
        tracing::warn!(%owner, "could not publish a write's WAL position; replica reads wait for the floor");
        false
    }

    /// The position a read of `owner` must see, from the values of [`Self::keys`]; fills a
    /// missing owner key and raises the floor when this worker is unsure. `None`: use the
    /// primary.
    pub async fn needed(&self, owner: Uuid, values: &[Option<Bytes>]) -> Option<u64> {
        let mut floor = parse(values.get(1).and_then(Option::as_ref)).unwrap_or(0);
        let outages = self.redis.outages();
        if self.unsure.load(Ordering::Acquire)
            || self.outages_floored.load(Ordering::Acquire) != outages
        {
            let lsn = self.primary_lsn().await?;
            if !self.raise(self.floor_key(), lsn, None).await {
                return None;
            }
            self.unsure.store(false, Ordering::Release);
            self.outages_floored.fetch_max(outages, Ordering::AcqRel);
            tracing::info!("replica floor raised after a Redis outage or a lost position");
            floor = floor.max(lsn);
        }
        let owner_lsn = match parse(values.first().and_then(Option::as_ref)) {
            Some(lsn) => lsn,
            None => {
                let lsn = self.primary_lsn().await?;
                if !self.raise(self.owner_key(owner), lsn, None).await {
                    return None;
                }
                lsn
            }
        };
        Some(owner_lsn.max(floor))
    }

    /// [`Self::needed`] with its own `MGET`, for reads outside the cache.
    pub async fn lookup(&self, owner: Uuid) -> Option<u64> {
        if self.redis.is_open() {
            return None;
        }
        let values = self.redis.mget(self.keys(owner).to_vec()).await.ok()?;
        self.needed(owner, &values).await
    }

    /// Runs `query` on the replica when it has replayed `needed`, else (or when it fails there)
    /// on the primary.
    pub async fn read<T, F, Fut>(&self, needed: Option<u64>, query: F) -> Result<T, ApiError>
    where
        F: Fn(Db) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let usable = needed.zip(self.replayed()).is_some_and(|(n, r)| r >= n);
        if usable {
            match query(self.pool.clone()).await {
                Ok(value) => {
                    metrics::counter!("db_reads_total", "target" => "replica").increment(1);
                    return Ok(value);
                }
                // A client error is the same on the primary.
                Err(error) if error.status().is_client_error() => return Err(error),
                Err(_) => {
                    metrics::counter!("db_replica_failures_total").increment(1);
                }
            }
        }
        metrics::counter!("db_reads_total", "target" => "primary").increment(1);
        query(self.primary.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_compare_as_strings_in_numeric_order() {
        let (a, b) = (hex(0x0_FFFF_FFFF), hex(0x1_0000_0000));
        assert!(a < b);
        assert_eq!(a.len(), 16);
        assert_eq!(parse(Some(&Bytes::from(b))), Some(0x1_0000_0000));
        assert_eq!(parse(Some(&Bytes::from_static(b"zz"))), None);
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unreplayed_sample() {
        let now = Instant::now();
        let history: VecDeque<_> = [
            (now - Duration::from_secs(3), 10),
            (now - Duration::from_secs(2), 20),
            (now - Duration::from_secs(1), 30),
        ]
        .into();
        assert_eq!(lag(&history, 30, now), Duration::ZERO);
        assert_eq!(lag(&history, 25, now), Duration::from_secs(1));
        assert_eq!(lag(&history, 15, now), Duration::from_secs(2));
        assert_eq!(lag(&history, 5, now), Duration::from_secs(3));
    }
}
