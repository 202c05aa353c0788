//! Credentials: argon2id password hashes, JWT access tokens, opaque refresh tokens, and the
//! [`AuthUser`] extractor that checks them.
//!
//! Access tokens carry the user's `token_version`. When it changes (password, role or tier
//! change, or deletion) the new version is published in Redis for one access-token lifetime, so
//! every worker refuses older tokens from the next request on while a valid token costs one Redis
//! GET and no SQL — or nothing extra on a cached read, where that key travels in the cache's own
//! `MGET` ([`Bearer`]). If Redis cannot answer, the check falls back to PostgreSQL.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::SaltString,
};
use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, request::Parts},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::Utc;
use fred::types::scripts::Script;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{
    AppState,
    error::ApiError,
    model::{Role, Tier},
    redis::Redis,
    store,
};
use crate::config::AuthConfig;

/// Marker value published for a deleted user.
const DELETED: i64 = -1;

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// The user's token version when the token was issued.
    pub ver: i32,
    pub role: Role,
    pub tier: Tier,
    pub iat: i64,
    pub exp: i64,
}

/// Most access tokens [`TokenKeys`] remembers as verified (a few hundred bytes each).
const VERIFIED_TOKENS_MAX: usize = 4096;

/// Signing keys and lifetimes.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Access tokens whose signature and claims were checked, by their exact text. A client
    /// sends the same token with every request until it expires; checking the HMAC and parsing
    /// the claims each time was ~6 % of a worker's time on a cached read. Expiry is checked on
    /// every use; revocation is not this cache's business (the token version is checked per
    /// request, see [`Bearer`]).
    verified: Mutex<HashMap<Box<str>, Claims>>,
    /// Writes a token version unless Redis already holds a later one ([`RAISE_VERSION`]).
    raise: Script,
    /// Revocations of this worker that have not reached Redis yet. While there are any, every
    /// token is checked against PostgreSQL instead of Redis.
    unpublished: Arc<AtomicUsize>,
    /// Lifetime of access tokens; also how long a revocation is kept in Redis.
    pub access_ttl: Duration,
    /// Lifetime of refresh tokens.
    pub refresh_ttl: Duration,
}

impl TokenKeys {
    pub fn new(secret: &[u8], config: &AuthConfig) -> Self {
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            verified: Mutex::default(),
            raise: Script::from_lua(RAISE_VERSION),
            unpublished: Arc::default(),
            access_ttl: config.access_ttl,
            refresh_ttl: config.refresh_ttl,
        }
    }

    /// A signed access token for the user at `version`.
    pub fn access_token(&self, user: Uuid, version: i32, role: Role, tier: Tier) -> String {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: user,
            ver: version,
            role,
            tier,
            iat: now,
            exp: now + self.access_ttl.as_secs() as i64,
        };
        jsonwebtoken::encode(&Header::default(), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// The claims of a valid access token: signed with our key, not expired (with the same
    /// leeway as the full check).
    pub fn decode(&self, token: &str) -> Result<Claims, ApiError> {
        let now = Utc::now().timestamp();
        let unexpired = |claims: &Claims| claims.exp >= now - self.validation.leeway as i64;
        let known = self.verified_claims().get(token).cloned();
        if let Some(claims) = known.filter(unexpired) {
            return Ok(claims);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    ApiError::Unauthorized("the access token has expired")
                }
                _ => ApiError::Unauthorized("the access token is invalid"),
            })?;
        let mut verified = self.verified_claims();
        // Bounded: past this many live tokens the cache starts over (expired ones go with it).
        if verified.len() >= VERIFIED_TOKENS_MAX {
            verified.clear();
        }
        verified.insert(token.into(), claims.clone());
        Ok(claims)
    }

    /// Whether a revocation of this worker is still waiting to reach Redis.
    fn publishing(&self) -> bool {
        self.unpublished.load(Ordering::Acquire) > 0
    }

    fn verified_claims(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Claims>> {
        // A panic while holding it cannot leave the map half-updated in a harmful way.
        self.verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A new random refresh token (256 bits, base64url) and the hash stored for it.
pub fn new_refresh_token() -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_refresh_token(&token);
    (token, hash)
}

pub fn hash_refresh_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Argon2id hashing, off the async threads and at most `max_concurrent_hashes` at once: a login
/// burst queues instead of taking 19 MiB per request.
pub struct Passwords {
    params: Params,
    permits: Semaphore,
    /// Verified against when the email is unknown, so both cases take the same time.
    dummy_hash: String,
}

impl Passwords {
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let params = Params::new(config.argon2_memory_kib, config.argon2_iterations, 1, None)
            .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        let dummy_hash = hash_with(&params, "dummy password for timing")?;
        Ok(Self {
            params,
            permits: Semaphore::new(config.max_concurrent_hashes),
            dummy_hash,
        })
    }

    pub async fn hash(&self, password: &str) -> Result<String, ApiError> {
        let _permit = self.permits.acquire().await.map_err(anyhow::Error::from)?;
        let params = self.params.clone();
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || hash_with(&params, &password))
            .await
            .map_err(anyhow::Error::from)?
            .map_err(ApiError::Internal)
    }

    /// Whether `password` matches `hash`; with `None` verifies against a dummy and says no.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, ApiError> {
        let _permit = self.permits.acquire().await.map_err(anyhow::Error::from)?;
        let known = hash.is_some();
        let hash = hash.unwrap_or(&self.dummy_hash).to_owned();
        let password = password.to_owned();
        let matched = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .map_err(anyhow::Error::from)?;
        Ok(known && matched)
    }
}

fn hash_with(params: &Params, password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

/// The Redis key under which `user`'s current token version is published. `{<user>}` is a
/// cluster hash tag, the same as the user's cache keys have: in a Redis Cluster a cache read of
/// one's own data stays one `MGET` on one node (plus the deployment-wide epoch).
fn version_key(redis: &Redis, user: Uuid) -> String {
    redis.key(&format!("tokver:{{{user}}}"))
}

/// Sets `KEYS[1]` to `ARGV[1]` (for `ARGV[2]` ms) unless it holds a later version or the
/// deleted mark (-1), which is final. Versions only rise, so a slow fill from PostgreSQL can
/// never overwrite the revocation a password change published meanwhile. Returns the value
/// the key holds afterwards.
const RAISE_VERSION: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]))
local value = tonumber(ARGV[1])
if current ~= nil and (current == -1 or (value ~= -1 and current >= value)) then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return value
"#;

/// Writes `version` as `user`'s published token version unless a later one is there.
async fn raise_version(
    state: &AppState,
    user: Uuid,
    version: i64,
    ttl: Duration,
) -> Result<i64, crate::worker::redis::RedisError> {
    state
        .redis
        .script(
            &state.tokens.raise,
            vec![version_key(&state.redis, user)],
            vec![version.to_string(), ttl.as_millis().max(1).to_string()],
        )
        .await
}

/// How often a revocation that could not reach Redis is tried again.
const REPUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Makes every worker refuse access tokens of `user` older than `version` (`None`: the user is
/// deleted, refuse all). Kept for one access-token lifetime, after which those tokens have
/// expired anyway (a key that is gone before then is filled again from PostgreSQL, see
/// [`Bearer::check`]). When Redis cannot take it, it is retried in the background every
/// second for that lifetime, and until it lands this worker checks every token against
/// PostgreSQL.
pub async fn publish_version(state: &AppState, user: Uuid, version: Option<i32>) {
    let value = version.map_or(DELETED, i64::from);
    let ttl = state.tokens.access_ttl + Duration::from_secs(60);
    let Err(error) = raise_version(state, user, value, ttl).await else {
        return;
    };
    tracing::warn!(%error, %user, "token revocation not published to Redis yet; retrying");
    metrics::counter!("token_revocations_unpublished_total").increment(1);
    let unpublished = Arc::clone(&state.tokens.unpublished);
    unpublished.fetch_add(1, Ordering::AcqRel);
    let state = state.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + ttl;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(REPUBLISH_EVERY).await;
            if raise_version(&state, user, value, ttl).await.is_ok() {
                tracing::info!(%user, "token revocation published to Redis");
                break;
            }
        }
        unpublished.fetch_sub(1, Ordering::AcqRel);
    });
}

/// The authenticated caller.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser {
    pub id: Uuid,
    pub role: Role,
    pub tier: Tier,
}

impl AuthUser {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::User => Err(ApiError::Forbidden("this requires the admin role")),
        }
    }
}

/// A bearer access token whose signature and expiry are checked, but not yet whether it has
/// been revoked. Handlers that read through the cache take this and let the cache check the
/// revocation in the same Redis round trip as the entry ([`crate::worker::cache::Cache`]);
/// everything else takes [`AuthUser`], which checks it at once.
#[derive(Debug)]
pub struct Bearer {
    claims: Claims,
}

impl Bearer {
    /// Who the token says the caller is. Not proof until [`Bearer::check`] or
    /// [`Bearer::verify`] has passed: use it only to decide what to look up, never to answer.
    pub fn claimed(&self) -> AuthUser {
        AuthUser {
            id: self.claims.sub,
            role: self.claims.role,
            tier: self.claims.tier,
        }
    }

    /// The Redis key that holds the caller's published token version.
    pub fn version_key(&self, redis: &Redis) -> String {
        version_key(redis, self.claims.sub)
    }

    /// The caller, if `published` (the value read under [`Bearer::version_key`]) does not
    /// revoke this token. Nothing published is not a pass: the version is then read from
    /// PostgreSQL and cached for the next request. So is everything while this worker has a
    /// revocation it could not publish.
    pub async fn check(
        &self,
        state: &AppState,
        published: Option<i64>,
    ) -> Result<AuthUser, ApiError> {
        match published {
            Some(version) if !state.tokens.publishing() => self.accept(version),
            _ => self.accept(self.fill(state).await?),
        }
    }

    fn accept(&self, published: i64) -> Result<AuthUser, ApiError> {
        if published != i64::from(self.claims.ver) {
            return Err(ApiError::Unauthorized("the access token has been revoked"));
        }
        Ok(self.claimed())
    }

    /// The caller's version from PostgreSQL ([`DELETED`] for a user that no longer exists),
    /// written to Redis unless it holds a later one. Redis failing here costs nothing: the
    /// answer came from the source of truth.
    async fn fill(&self, state: &AppState) -> Result<i64, ApiError> {
        let user = self.claims.sub;
        let version = store::users::token_version(&state.db, user)
            .await?
            .map_or(DELETED, i64::from);
        if !state.redis.is_open() {
            let ttl = state.tokens.access_ttl + Duration::from_secs(60);
            if let Err(error) = raise_version(state, user, version, ttl).await {
                tracing::debug!(%error, "token version not cached in Redis");
            }
        }
        Ok(version)
    }

    /// `error`, unless the token has been revoked: then the 401. For requests refused before
    /// the revocation check would have travelled with the cache lookup.
    pub async fn refuse(&self, state: &AppState, error: ApiError) -> ApiError {
        match self.verify(state).await {
            Ok(_) => error,
            Err(revoked) => revoked,
        }
    }

    /// Checks the revocation on its own: one Redis GET, or PostgreSQL when Redis cannot answer
    /// or holds nothing for this user.
    pub async fn verify(&self, state: &AppState) -> Result<AuthUser, ApiError> {
        if state.tokens.publishing() {
            return self.check(state, None).await;
        }
        match state.redis.get_i64(&self.version_key(&state.redis)).await {
            Ok(published) => self.check(state, published).await,
            Err(error) => {
                tracing::debug!(%error, "token version check falls back to PostgreSQL");
                let version = store::users::token_version(&state.db, self.claims.sub)
                    .await?
                    .map_or(DELETED, i64::from);
                self.accept(version)
            }
        }
    }
}

/// Claims whose signature and expiry have been checked, left in the request's extensions by
/// the rate limiter (which decodes the token to know whom to count) so that it is decoded once.
#[derive(Debug, Clone)]
pub struct SignedClaims(pub Claims);

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized("an access token is required"))?;
    header
        .to_str()
        .ok()
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <access token>`",
        ))
}

impl FromRequestParts<AppState> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let claims = match parts.extensions.remove::<SignedClaims>() {
            Some(SignedClaims(claims)) => claims,
            None => state.tokens.decode(bearer_token(&parts.headers)?)?,
        };
        Ok(Bearer { claims })
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Bearer::from_request_parts(parts, state)
            .await?
            .verify(state)
            .await
    }
}
