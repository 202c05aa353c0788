//! Rate limits shared by all workers: a sliding-window counter per identity in Redis, checked
//! and counted by one Lua script so concurrent requests through any number of workers can never
//! admit more than the limit.
//!
//! The identity is the user of a validly signed access token (limit by tier), else the client IP
//! (anonymous limit). Every `/api/v1` response carries `RateLimit-Limit`, `RateLimit-Remaining`
//! and `RateLimit-Reset`; a 429 adds `Retry-After`. When Redis cannot answer, requests pass
//! (`rate_limit.fail_open`, default) without the headers, or get a 503.
//!
//! Failed logins are limited separately, per (client IP, email): see [`LoginGuard`].

use std::{net::IpAddr, time::Duration};

use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderValue},
    middleware::Next,
    response::{IntoResponse, Response},
};
use chrono::Utc;
use fred::types::scripts::Script;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{
    AppState,
    error::ApiError,
    middleware::ClientIp,
    model::Tier,
    tokens::{self, Claims, SignedClaims},
};
use crate::config::RateLimitConfig;

/// Sliding-window counter: the previous window's count, weighted by how much of it still
/// overlaps the sliding window, plus the current window's count.
/// KEYS: current window, previous window. ARGV: limit, window ms, ms elapsed in the window.
/// Returns {admitted (0|1), current count (after counting), previous count}.
const SLIDING_WINDOW: &str = r"
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local elapsed = tonumber(ARGV[3])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local used = math.floor(previous * (window - elapsed) / window) + current
if used >= limit then
  return {0, current, previous}
end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], window * 2)
return {1, current + 1, previous}
";

/// Reserves one password attempt, atomically, before the (slow) password check runs: refused
/// when `limit` attempts are already counted. A reservation is an assumed failure; a success
/// clears the counter. Checking first and counting after the check would let every one of
/// many concurrent guesses through.
/// KEYS: counter. ARGV: limit, window ms. Returns {reserved (0|1), ms until the window ends}.
const RESERVE_ATTEMPT: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    ttl = tonumber(ARGV[2])
  end
  return {0, ttl}
end
n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, 0}
";

/// Who a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    User { id: Uuid, tier: Tier },
    Anonymous(IpAddr),
}

impl Identity {
    /// The user of a validly signed bearer token, else the client address. Revocation is not
    /// checked here (that costs a lookup): a revoked token still counts against its user.
    pub fn of(state: &AppState, headers: &HeaderMap, client: IpAddr) -> Self {
        Self::from_claims(signed_claims(state, headers).as_ref(), client)
    }

    fn from_claims(claims: Option<&Claims>, client: IpAddr) -> Self {
        claims
            .map(|claims| Identity::User {
                id: claims.sub,
                tier: claims.tier,
            })
            .unwrap_or(Identity::Anonymous(client))
    }

    /// Stable text form, used in Redis keys.
    pub fn key(&self) -> String {
        match self {
            Identity::User { id, .. } => format!("u:{id}"),
            Identity::Anonymous(ip) => format!("ip:{ip}"),
        }
    }

    fn limit(&self, config: &RateLimitConfig) -> u64 {
        match self {
            Identity::User {
                tier: Tier::Free, ..
            } => config.free,
            Identity::User {
                tier: Tier::Pro, ..
            } => config.pro,
            Identity::User {
                tier: Tier::Enterprise,
                ..
            } => config.enterprise,
            Identity::Anonymous(_) => config.anonymous,
        }
    }
}

/// The claims of the request's bearer token when it is validly signed and unexpired.
fn signed_claims(state: &AppState, headers: &HeaderMap) -> Option<Claims> {
    let token = tokens::bearer_token(headers).ok()?;
    state.tokens.decode(token).ok()
}

/// The per-process handles: compiled scripts.
pub struct Limiter {
    window: Script,
    attempt: Script,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            window: Script::from_lua(SLIDING_WINDOW),
            attempt: Script::from_lua(RESERVE_ATTEMPT),
        }
    }
}

/// The state of one identity's window after a request.
#[derive(Debug, PartialEq, Eq)]
struct Decision {
    admitted: bool,
    limit: u64,
    remaining: u64,
    /// Until the current window ends.
    reset: Duration,
    /// Until a request would be admitted again (only meaningful when refused).
    retry_after: Duration,
}

fn decide(
    limit: u64,
    window_ms: u64,
    elapsed_ms: u64,
    admitted: bool,
    current: u64,
    previous: u64,
) -> Decision {
    let weighted =
        |prev: u64, elapsed: u64| prev * (window_ms - elapsed.min(window_ms)) / window_ms;
    let used = weighted(previous, elapsed_ms) + current;
    let reset_ms = window_ms - elapsed_ms;
    // Smallest wait after which the estimate drops below the limit.
    let retry_ms = if current < limit {
        // Within this window, as the previous window's weight decays.
        let allowed_prev = limit - current; // weighted(previous) must fall below this
        let needed_overlap = (allowed_prev * window_ms).div_ceil(previous.max(1));
        (window_ms - elapsed_ms)
            .saturating_sub(needed_overlap.saturating_sub(1))
            .max(1)
    } else {
        // This window is full: in the next one, `current` becomes the decaying previous count.
        let needed_overlap = (limit * window_ms).div_ceil(current.max(1));
        reset_ms + (window_ms - needed_overlap.saturating_sub(1).min(window_ms))
    };
    Decision {
        admitted,
        limit,
        remaining: limit.saturating_sub(used),
        reset: Duration::from_millis(reset_ms),
        retry_after: Duration::from_millis(retry_ms),
    }
}

fn seconds_up(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

fn put_headers(headers: &mut HeaderMap, decision: &Decision) {
    headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert(
        "ratelimit-reset",
        HeaderValue::from(seconds_up(decision.reset)),
    );
}

/// Middleware for `/api/v1`: counts the request and refuses it with 429 past the limit.
pub async fn limit(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    mut request: Request,
    next: Next,
) -> Response {
    let claims = signed_claims(&state, request.headers());
    let identity = Identity::from_claims(claims.as_ref(), client);
    request.extensions_mut().insert(identity.clone());
    if let Some(claims) = claims {
        request.extensions_mut().insert(SignedClaims(claims));
    }
    let config = &state.config.rate_limit;
    if !config.enabled {
        return next.run(request).await;
    }
    let limit = identity.limit(config);
    let window_ms = config.window.as_millis().max(1) as u64;
    let now_ms = Utc::now().timestamp_millis() as u64;
    let index = now_ms / window_ms;
    let elapsed_ms = now_ms % window_ms;
    let base = format!("rl:{{{}}}:", identity.key());
    let keys = vec![
        state.redis.key(&format!("{base}{index}")),
        state.redis.key(&format!("{base}{}", index - 1)),
    ];
    let args = vec![
        limit.to_string(),
        window_ms.to_string(),
        elapsed_ms.to_string(),
    ];
    // Boxed: the Redis call's future is large, and inline it would make this middleware's
    // future (copied into place for every request, also with limits off) as large.
    let result: Result<(u64, u64, u64), _> =
        Box::pin(state.redis.script(&state.limiter.window, keys, args)).await;
    let decision = match result {
        Ok((admitted, current, previous)) => decide(
            limit,
            window_ms,
            elapsed_ms,
            admitted == 1,
            current,
            previous,
        ),
        Err(error) if config.fail_open => {
            tracing::debug!(%error, "rate limit skipped: Redis unavailable");
            return next.run(request).await;
        }
        Err(_) => {
            return ApiError::Unavailable("rate limiting is unavailable; retry shortly")
                .into_response();
        }
    };
    if !decision.admitted {
        metrics::counter!("rate_limited_total", "kind" => "request").increment(1);
        let mut response = ApiError::TooManyRequests {
            detail: format!(
                "rate limit of {limit} requests per {} exceeded",
                humantime::format_duration(config.window)
            ),
            retry_after: decision.retry_after,
        }
        .into_response();
        put_headers(response.headers_mut(), &decision);
        return response;
    }
    let mut response = next.run(request).await;
    put_headers(response.headers_mut(), &decision);
    response
}

/// The limit on password guesses: per (client IP, email) for logins, per user for the
/// `currentPassword` of a password change (a stolen access token must not be a free oracle).
/// `rate_limit.login_attempts` per `rate_limit.login_window`, counted across all workers.
pub struct LoginGuard {
    key: String,
}

impl LoginGuard {
    pub fn new(state: &AppState, client: IpAddr, email: &str) -> Self {
        let digest = Sha256::digest(email.as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            key: state.redis.key(&format!("login:{{{client}}}:{hex}")),
        }
    }

    /// The guard on `user`'s current password.
    pub fn for_user(state: &AppState, user: Uuid) -> Self {
        Self {
            key: state.redis.key(&format!("pwcheck:{{{user}}}")),
        }
    }

    /// Reserves one attempt before the password is checked; 429 when they are used up.
    pub async fn reserve(&self, state: &AppState) -> Result<(), ApiError> {
        let config = &state.config.rate_limit;
        if !config.enabled {
            return Ok(());
        }
        let args = vec![
            config.login_attempts.to_string(),
            config.login_window.as_millis().max(1).to_string(),
        ];
        let reserved: Result<(i64, i64), _> = state
            .redis
            .script(&state.limiter.attempt, vec![self.key.clone()], args)
            .await;
        match reserved {
            Ok((1, _)) => Ok(()),
            Ok((_, wait_ms)) => {
                metrics::counter!("rate_limited_total", "kind" => "login").increment(1);
                let wait = Duration::from_millis(wait_ms.max(1) as u64);
                Err(ApiError::TooManyRequests {
                    detail: format!(
                        "too many failed password attempts; try again in {}",
                        humantime::format_duration(Duration::from_secs(seconds_up(wait)))
                    ),
                    retry_after: wait,
                })
            }
            Err(_) if config.fail_open => Ok(()),
            Err(_) => Err(ApiError::Unavailable(
                "rate limiting is unavailable; retry shortly",
            )),
        }
    }

    /// The password was right: the failures counted so far are forgiven.
    pub async fn succeeded(&self, state: &AppState) {
        if state.config.rate_limit.enabled {
            let _ = state.redis.del(&self.key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_counts_the_weighted_previous_window() {
        // Half-way through the window, 40 of the previous window's 100 still count.
        let d = decide(100, 60_000, 36_000, true, 10, 100);
        assert_eq!(d.remaining, 100 - 40 - 10);
        assert_eq!(d.reset, Duration::from_secs(24));
    }

    #[test]
    fn retry_after_waits_until_the_estimate_drops_below_the_limit() {
        // Current window full at its start: next window, then until 100 * overlap < 100.
        let d = decide(100, 60_000, 0, false, 100, 0);
        assert!(!d.admitted);
        let wait = d.retry_after.as_millis() as u64;
        assert!(wait > 60_000 && wait <= 60_600, "{wait}");
        // After waiting, the estimate is below the limit.
        let later = 60_000 + (wait - 60_000);
        let elapsed = later - 60_000;
        assert!(100 * (60_000 - elapsed) / 60_000 < 100);
        // Previous window full, nothing yet in this one: wait for the weight to decay.
        let d = decide(10, 10_000, 0, false, 0, 10);
        let wait = d.retry_after.as_millis() as u64;
        assert!((1..=1_000).contains(&wait), "{wait}");
        assert!(10 * (10_000 - wait) / 10_000 < 10);
    }
}
