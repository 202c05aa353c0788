//! Response cache for task reads, in Redis and shared by every worker.
//!
//! # Keys (all under `redis.key_prefix`; `{user}` is a cluster hash tag)
//!
//! - `cache:epoch`: deployment-wide generation, bumped by `POST /api/v1/admin/cache/clear`.
//! - `cache:{<user>}:ver`: the user's version, bumped (`INCR`, O(1)) by every write that can
//!   change one of their results.
//! - `cache:{<user>}:<sha256 of kind + canonical query>`: an entry, stamped with the epoch and
//!   version it was computed under. It is served only while both still match; anything else is
//!   a miss. Stale entries are never swept: they are overwritten or expire (`cache.ttl`).
//!
//! The stamp is the version read *before* the database query, so a write that lands during the
//! query makes the fresh entry stale at once: a write is visible to the very next read on any
//! worker. If a bump cannot reach Redis, this worker refuses to use the cache (BYPASS) until it
//! has bumped the epoch, which retires every entry that could be stale. A worker does the same
//! after it found Redis unreachable (its circuit breaker opened), even if it wrote nothing:
//! other workers' bumps may have been lost in that outage too.
//!
//! A read is one `MGET` of the caller's published token version (see [`super::tokens`]), the
//! epoch, the owner's version and the entry: a hit costs one Redis round trip in all.
//!
//! Concurrent misses of one key (under one stamp) in a worker wait for a single database query
//! (single flight).
//!
//! # Compressed variants (`cache.compression`)
//!
//! `cache:{<user>}:<hash>:br` (`:zstd`, `:gzip`): the entry's body in that content coding,
//! stamped like the entry, with its own `ETag` (`"<etag>-br"`). A read whose `Accept-Encoding`
//! picks a coding ([`negotiate`]) asks the `MGET` for that variant instead of the plain entry, so
//! a hit sends stored bytes and compresses nothing. A missing variant is made from the plain
//! entry (a second round trip; `X-Cache: HIT` still, as no query ran) or from the freshly loaded
//! body on a miss, and stored. A body of 1 KiB or less, or one that the coding does not make
//! smaller, is stored as its variant uncompressed, so the next read does not try again. Every
//! cached response carries `Vary: Accept-Encoding`.
//!
//! Per-encoding `ETag`s are strong: the variant's bytes are fixed for its entry (one-shot
//! compression at a fixed level is deterministic), and a validator must differ between
//! codings (RFC 9110 §8.8.3), so `If-None-Match` with the brotli variant's tag answers 304 only
//! to a request that would get the brotli variant.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::{BufMut, Bytes, BytesMut};
use fred::types::scripts::Script;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use uuid::Uuid;

use super::{AppState, error::ApiError, redis::Redis, tokens::Bearer};
use crate::{
    compression::{self, Effort, Encoding, MIN_SIZE, negotiate},
    config::CacheConfig,
};

pub const X_CACHE: &str = "x-cache";

/// `INCR` + `EXPIRE` in one atomic step, so a version key never lingers without a TTL.
const BUMP: &str =
    "local v = redis.call('INCR', KEYS[1]) redis.call('EXPIRE', KEYS[1], ARGV[1]) return v";

/// A cached response body and its validator.
#[derive(Debug, Clone)]
pub struct Cached {
    pub etag: HeaderValue,
    pub body: Bytes,
    /// The body's content coding; `None`: plain JSON.
    pub encoding: Option<Encoding>,
}

impl Cached {
    pub fn new(body: Bytes) -> Self {
        let digest = Sha256::digest(&body);
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header");
        Self {
            etag,
            body,
            encoding: None,
        }
    }

    /// This plain entry's variant in `encoding`: compressed, with the `ETag` `"<etag>-<coding>"`;
    /// or, when the body is small or the coding does not make it smaller, the plain entry.
    pub fn variant(&self, encoding: Encoding) -> Cached {
        let compressed = (self.body.len() as u64 > MIN_SIZE)
            .then(|| compression::compress(encoding, Effort::Stored, &self.body))
            .flatten();
        let Some(body) = compressed else {
            return self.clone();
        };
        let plain = self.etag.to_str().unwrap_or_default();
        let tag = format!(
            "{}-{}\"",
            plain.strip_suffix('"').unwrap_or(plain),
            encoding.as_str()
        );
        Cached {
            etag: HeaderValue::from_str(&tag).unwrap_or_else(|_| self.etag.clone()),
            body,
            encoding: Some(encoding),
        }
    }

    /// The response: 304 when `If-None-Match` names this entity, else 200 with the JSON body
    /// (in its coding). `vary`: whether the answer depends on `Accept-Encoding`.
    pub fn respond(&self, request: &HeaderMap, outcome: &'static str, vary: bool) -> Response {
        let mut response = if not_modified(request, &self.etag) {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                self.body.clone(),
            )
                .into_response()
        };
        let full = response.status() == StatusCode::OK;
        let headers = response.headers_mut();
        if let Some(encoding) = self.encoding
            && full
        {
            headers.insert(header::CONTENT_ENCODING, encoding.header_value());
        }
        if vary {
            headers.insert(
                header::VARY,
                HeaderValue::from_static(header::ACCEPT_ENCODING.as_str()),
            );
        }
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(X_CACHE, HeaderValue::from_static(outcome));
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        );
        response
    }
}

/// RFC 9110 §13.1.2: weak comparison, `*` matches anything.
fn not_modified(request: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.to_str().unwrap_or_default();
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == ours)
}

/// The cache of one worker process.
pub struct Cache {
    redis: Redis,
    enabled: bool,
    /// `cache.compression`: keep and serve compressed variants.
    compression: bool,
    ttl: Duration,
    bump: Script,
    /// Set when a bump could not reach Redis: until the epoch is bumped, entries may be stale.
    dirty: AtomicBool,
    /// The number of Redis outages ([`Redis::outages`]) already followed by an epoch bump.
    outages_cleared: AtomicU64,
    /// Misses being computed, by entry key: followers wait for the leader's result.
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Cached>>>>,
}

/// The stamp of an entry: epoch and user version.
type Stamp = (i64, i64);

/// What a cached read is: whose data (`owner`), which kind of response, and its canonical
/// query. Equal reads share an entry.
#[derive(Debug, Clone, Copy)]
pub struct Read<'a> {
    pub owner: Uuid,
    pub kind: &'a str,
    pub query: &'a str,
}

impl Cache {
    pub fn new(redis: Redis, config: &CacheConfig) -> Self {
        Self {
            redis,
            enabled: config.enabled,
            compression: config.compression,
            ttl: config.ttl,
            bump: Script::from_lua(BUMP),
            dirty: AtomicBool::new(false),
            outages_cleared: AtomicU64::new(0),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn epoch_key(&self) -> String {
        self.redis.key("cache:epoch")
    }

    fn version_key(&self, user: Uuid) -> String {
        self.redis.key(&format!("cache:{{{user}}}:ver"))
    }

    fn entry_key(&self, user: Uuid, kind: &str, query: &str) -> String {
        let digest = Sha256::digest(format!("{kind}\n{query}").as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.redis.key(&format!("cache:{{{user}}}:{hex}"))
    }

    /// The key of the `encoding` variant of the entry at `entry_key` (same hash tag).
    fn variant_key(entry_key: &str, encoding: Encoding) -> String {
        format!("{entry_key}:{}", encoding.as_str())
    }

    /// The coding a read answers in: by `Accept-Encoding`, when variants are on.
    fn encoding_for(&self, request: &HeaderMap) -> Option<Encoding> {
        if self.compression {
            negotiate(request)
        } else {
            None
        }
    }

    /// `plain`'s variant in `encoding`, stored under its stamp for the next reads.
    async fn store_variant(
        &self,
        entry_key: &str,
        stamp: Stamp,
        plain: &Cached,
        encoding: Encoding,
    ) -> Cached {
        let variant = plain.variant(encoding);
        let key = Self::variant_key(entry_key, encoding);
        if let Err(error) = self
            .redis
            .set_bytes(&key, encode(stamp, &variant), self.ttl)
            .await
        {
            tracing::debug!(%error, "could not store a compressed cache variant");
        }
        variant
    }

    /// How long version keys live: longer than every entry stamped with them.
    pub fn keep(&self) -> Duration {
        (self.ttl * 2).max(Duration::from_secs(3600))
    }

    /// The version key a write of `user` must bump, when the cache is on (for callers that bump
    /// it in a script of their own, [`super::replica`]).
    pub fn version_to_bump(&self, user: Uuid) -> Option<String> {
        self.enabled.then(|| self.version_key(user))
    }

    /// A bump of `user`'s version did not reach Redis: bypass until the epoch is bumped.
    pub fn missed_invalidation(&self, user: Uuid) {
        if self.enabled {
            tracing::warn!(%user, "cache invalidation did not reach Redis; bypassing the cache until the epoch is bumped");
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Makes every cached read of `user` stale. Called after each write that can change one
    /// (through [`super::Shared::wrote`]).
    pub async fn invalidate(&self, user: Uuid) {
        if !self.enabled {
            return;
        }
        let keep = self.keep().as_secs().to_string();
        let bumped: Result<i64, _> = self
            .redis
            .script(&self.bump, vec![self.version_key(user)], vec![keep])
            .await;
        if bumped.is_err() {
            self.missed_invalidation(user);
        }
    }

    /// Retires every entry of this deployment (new epoch), without touching other keys.
    pub async fn clear(&self) -> Result<(), ApiError> {
        let keep = Duration::from_secs(400 * 86_400).as_secs().to_string();
        self.redis
            .script::<i64>(&self.bump, vec![self.epoch_key()], vec![keep])
            .await
            .map(|_| ())
            .map_err(|_| ApiError::Unavailable("Redis is unavailable; the cache was not cleared"))
    }

    /// Bumps the epoch after a missed invalidation or an outage; whether the cache is usable now.
    async fn usable(&self) -> bool {
        if !self.enabled || self.redis.is_open() {
            return false;
        }
        let outages = self.redis.outages();
        if !self.dirty.load(Ordering::Acquire)
            && self.outages_cleared.load(Ordering::Acquire) == outages
        {
            return true;
        }
        if self.clear().await.is_ok() {
            self.dirty.store(false, Ordering::Release);
            self.outages_cleared.fetch_max(outages, Ordering::AcqRel);
            tracing::info!(
                "cache epoch bumped after a Redis outage or missed invalidation; cache back in use"
            );
            return true;
        }
        false
    }

    /// Serves `read` from the cache, or computes it with `load` (the JSON body) and stores it.
    /// Errors of `load` pass through uncached. `load` is given the WAL position its query must
    /// see (for [`super::Shared::read`]), read in the same `MGET`.
    ///
    /// `caller` has not been checked for revocation yet: its published token version is read
    /// in the same `MGET` as the entry, so a hit costs one Redis round trip, and nothing is
    /// answered (not even a 304) before the token has passed. Without the cache the check is
    /// made on its own ([`Bearer::verify`], PostgreSQL when Redis cannot answer).
    pub async fn get_or_load<F, Fut>(
        &self,
        caller: &Bearer,
        state: &AppState,
        read: Read<'_>,
        request: &HeaderMap,
        load: F,
    ) -> Result<Response, ApiError>
    where
        F: FnOnce(Option<u64>) -> Fut,
        Fut: Future<Output = Result<Bytes, ApiError>>,
    {
        // The paths that load are boxed: their futures (SQL included) are large, and inline
        // they would make every hit's future as large, to be copied into place per request.
        if !self.usable().await {
            return Box::pin(self.bypass(caller, state, read.owner, request, load)).await;
        }
        let entry_key = self.entry_key(read.owner, read.kind, read.query);
        let encoding = self.encoding_for(request);
        let vary = self.compression;
        let mut keys = vec![
            caller.version_key(&self.redis),
            self.epoch_key(),
            self.version_key(read.owner),
            match encoding {
                Some(encoding) => Self::variant_key(&entry_key, encoding),
                None => entry_key.clone(),
            },
        ];
        if let Some(replica) = &state.replica {
            keys.extend(replica.keys(read.owner));
        }
        let (stamp, needed) = match self.redis.mget(keys).await {
            Ok(values) => {
                let number = |v: &Option<Bytes>| {
                    v.as_deref()
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .and_then(|s| s.parse::<i64>().ok())
                };
                caller.check(state, number(&values[0])).await?;
                let stamp = (
                    number(&values[1]).unwrap_or(0),
                    number(&values[2]).unwrap_or(0),
                );
                if let Some(cached) = values[3].as_ref().and_then(|raw| decode(raw, stamp)) {
                    metrics::counter!("cache_requests_total", "outcome" => "hit").increment(1);
                    return Ok(cached.respond(request, "HIT", vary));
                }
                // No variant in this coding yet: made once from the plain entry, if there is one.
                if let Some(encoding) = encoding {
                    let plain = self.redis.get_bytes(&entry_key).await.ok().flatten();
                    if let Some(plain) = plain.and_then(|raw| decode(&raw, stamp)) {
                        let variant = self
                            .store_variant(&entry_key, stamp, &plain, encoding)
                            .await;
                        metrics::counter!("cache_requests_total", "outcome" => "hit").increment(1);
                        return Ok(variant.respond(request, "HIT", vary));
                    }
                }
                let needed = match &state.replica {
                    Some(replica) => replica.needed(read.owner, &values[4..]).await,
                    None => None,
                };
                (stamp, needed)
            }
            Err(_) => {
                return Box::pin(self.bypass(caller, state, read.owner, request, load)).await;
            }
        };
        metrics::counter!("cache_requests_total", "outcome" => "miss").increment(1);
        let mut cached = Box::pin(self.single_flight(&entry_key, stamp, || load(needed))).await?;
        if let Some(encoding) = encoding {
            cached = self
                .store_variant(&entry_key, stamp, &cached, encoding)
                .await;
        }
        Ok(cached.respond(request, "MISS", vary))
    }

    /// A read without the cache: the token is checked on its own, then `load` answers.
    async fn bypass<F, Fut>(
        &self,
        caller: &Bearer,
        state: &AppState,
        owner: Uuid,
        request: &HeaderMap,
        load: F,
    ) -> Result<Response, ApiError>
    where
        F: FnOnce(Option<u64>) -> Fut,
        Fut: Future<Output = Result<Bytes, ApiError>>,
    {
        caller.verify(state).await?;
        metrics::counter!("cache_requests_total", "outcome" => "bypass").increment(1);
        let needed = state.needed(owner).await;
        let mut cached = Cached::new(load(needed).await?);
        if let Some(encoding) = self.encoding_for(request) {
            cached = cached.variant(encoding);
        }
        Ok(cached.respond(request, "BYPASS", self.compression))
    }

    /// Runs `load` and stores its result under `stamp`, unless the same key is already loading
    /// under the same stamp in this worker; then waits for that result instead (and loads itself
    /// only if the leader failed). A load under an older stamp may predate a write this request
    /// must see, so it is not followed.
    async fn single_flight<F, Fut>(
        &self,
        key: &str,
        stamp: Stamp,
        load: F,
    ) -> Result<Cached, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, ApiError>>,
    {
        enum Role {
            Lead(watch::Sender<Option<Cached>>),
            Follow(watch::Receiver<Option<Cached>>),
        }
        let flight = format!("{key} {} {}", stamp.0, stamp.1);
        let role = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(&flight) {
                Some(receiver) => Role::Follow(receiver.clone()),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    inflight.insert(flight.clone(), receiver);
                    Role::Lead(sender)
                }
            }
        };
        match role {
            Role::Lead(sender) => self.lead(key, &flight, stamp, sender, load).await,
            Role::Follow(mut receiver) => {
                let shared = receiver
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|r| r.clone());
                match shared {
                    Some(cached) => Ok(cached),
                    // The leader failed or was dropped: load for ourselves.
                    None => Ok(Cached::new(load().await?)),
                }
            }
        }
    }

    async fn lead<F, Fut>(
        &self,
        key: &str,
        flight: &str,
        stamp: Stamp,
        sender: watch::Sender<Option<Cached>>,
        load: F,
    ) -> Result<Cached, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, ApiError>>,
    {
        // Removes the entry however this ends (error, or the request being dropped).
        struct Done<'a>(
            &'a Mutex<HashMap<String, watch::Receiver<Option<Cached>>>>,
            &'a str,
        );
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.lock().expect("inflight lock").remove(self.1);
            }
        }
        let _done = Done(&self.inflight, flight);
        // This request's miss may have been read just before a previous leader stored the entry
        // and left `inflight`: look again rather than query the database a second time.
        let stored = self.redis.get_bytes(key).await.ok().flatten();
        if let Some(cached) = stored.and_then(|raw| decode(&raw, stamp)) {
            let _ = sender.send(Some(cached.clone()));
            return Ok(cached);
        }
        let cached = Cached::new(load().await?);
        let _ = sender.send(Some(cached.clone()));
        // Stored before the flight ends, so a request that misses later finds the entry.
        if let Err(error) = self
            .redis
            .set_bytes(key, encode(stamp, &cached), self.ttl)
            .await
        {
            tracing::debug!(%error, "could not store a cache entry");
        }
        Ok(cached)
    }
}

/// Entry layout: `<epoch> <version> <etag>\n<body>`; a compressed variant's adds its coding:
/// `<epoch> <version> <etag> <coding>\n<body>` (a worker of an older release never reads
/// variant keys).
fn encode(stamp: Stamp, cached: &Cached) -> Bytes {
    let etag = cached.etag.to_str().unwrap_or_default();
    let head = match cached.encoding {
        Some(encoding) => format!("{} {} {etag} {}\n", stamp.0, stamp.1, encoding.as_str()),
        None => format!("{} {} {etag}\n", stamp.0, stamp.1),
    };
    let mut out = BytesMut::with_capacity(head.len() + cached.body.len());
    out.put_slice(head.as_bytes());
    out.put_slice(&cached.body);
    out.freeze()
}

/// The entry when its stamp is `current`.
fn decode(raw: &Bytes, current: Stamp) -> Option<Cached> {
    let newline = raw.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&raw[..newline]).ok()?;
    let mut parts = head.split(' ');
    let epoch: i64 = parts.next()?.parse().ok()?;
    let version: i64 = parts.next()?.parse().ok()?;
    let etag = HeaderValue::from_str(parts.next()?).ok()?;
    let encoding = match parts.next() {
        Some(token) => Some(Encoding::parse(token)?),
        None => None,
    };
    ((epoch, version) == current).then(|| Cached {
        etag,
        body: raw.slice(newline + 1..),
        encoding,
    })
}

/// The query string with parameters sorted, so equivalent queries share an entry.
pub fn canonical_query(query: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or_default();
    pairs.sort();
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_served_only_under_their_stamp() {
        let cached = Cached::new(Bytes::from_static(b"{\"data\":[]}"));
        let raw = encode((2, 7), &cached);
        let back = decode(&raw, (2, 7)).unwrap();
        assert_eq!(back.body, cached.body);
        assert_eq!(back.etag, cached.etag);
        assert!(decode(&raw, (2, 8)).is_none(), "user version bumped");
        assert!(decode(&raw, (3, 7)).is_none(), "epoch bumped");
        assert!(decode(&Bytes::from_static(b"garbage"), (0, 0)).is_none());
    }

    #[test]
    fn variants_keep_their_coding_and_a_tag_of_their_own() {
        let plain = Cached::new(Bytes::from("{\"title\":\"quarterly report\"},".repeat(60)));
        let br = plain.variant(Encoding::Br);
        assert_eq!(br.encoding, Some(Encoding::Br));
        let tag = plain.etag.to_str().unwrap();
        assert_eq!(
            br.etag.to_str().unwrap(),
            format!("{}-br\"", &tag[..tag.len() - 1])
        );
        let back = decode(&encode((1, 2), &br), (1, 2)).unwrap();
        assert_eq!(
            (back.body, back.etag, back.encoding),
            (br.body, br.etag, br.encoding)
        );
        // Small bodies stay plain, under the plain tag.
        let small = Cached::new(Bytes::from_static(b"{\"data\":[]}")).variant(Encoding::Gzip);
        assert_eq!(small.encoding, None);
        let raw = Bytes::from_static(b"1 2 \"x\" lzma\n{}");
        assert!(
            decode(&raw, (1, 2)).is_none(),
            "an unknown coding is no entry"
        );
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let etag = HeaderValue::from_static("\"abc\"");
        let mut headers = HeaderMap::new();
        assert!(!not_modified(&headers, &etag));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"abc\""),
        );
        assert!(not_modified(&headers, &etag));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(not_modified(&headers, &etag));
    }

    #[test]
    fn canonical_query_sorts_parameters() {
        assert_eq!(
            canonical_query(Some("sort=title&limit=5&status=pending")),
            canonical_query(Some("status=pending&sort=title&limit=5"))
        );
        assert_ne!(
            canonical_query(Some("limit=5")),
            canonical_query(Some("limit=6"))
        );
    }
}
