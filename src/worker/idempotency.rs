//! `Idempotency-Key` on POST: a retried POST replays the first response instead of acting
//! twice, whichever worker it reaches.
//!
//! Per (identity, key) Redis holds either a `running` record (while the first request runs) or
//! the finished response, kept `idempotency.ttl` (24 h). The fingerprint is a SHA-256 of
//! method, path and body: the same key with another request is a 422. Responses with a 5xx
//! status are not kept, so the client's retry runs again. When Redis cannot answer, requests
//! run without the Redis guarantee (`idempotency.fail_open`, default) or get a 503.
//!
//! Not on `/auth/*` (see `routes` in `worker/mod.rs`): nothing in Redis may hold a usable
//! token, and a refresh must never be replayed.
//!
//! # A worker dying mid-request
//!
//! The `running` record is a lease of [`LEASE`], renewed while the request runs, so a worker
//! killed mid-request frees the key within a second, not after the request timeout. A repeat
//! that finds the key running waits (up to the lease and a margin) for the first to finish
//! and replays its answer, takes over when the lease lapses, and answers 409 only when the
//! first is still running after that. Taking over must not act twice when the dead worker had
//! already committed: so the resource a keyed POST creates gets an id derived from identity,
//! key and fingerprint ([`IdempotentId`]), and a second insert with that id returns the row the
//! first one wrote. This is what lets the proxy retry a keyed POST whose worker was killed.

use std::time::Duration;

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AppState, error::ApiError, middleware::ClientIp, ratelimit::Identity, store::Created};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// Responses larger than this are passed through but not kept for replay.
const MAX_STORED_BODY: usize = 1 << 20;

/// How long a `running` record lives without renewal: the longest a key stays blocked after
/// its worker died, and so how long the proxy's retry of a keyed POST waits on another worker.
/// Short, because a retry that waits is exposed to the next worker death too (the chaos run
/// once lost a keyed POST to three deaths in a row with a 3 s lease). Taking over a lease whose
/// holder is only slow is safe: the insert's id is derived from the key ([`IdempotentId`]).
const LEASE: Duration = Duration::from_secs(1);
/// How often a running request renews its lease (four chances before it lapses).
const RENEW_EVERY: Duration = Duration::from_millis(250);
/// How often a repeat checks whether the first request has finished.
const POLL_EVERY: Duration = Duration::from_millis(25);

/// The id a keyed POST gives the resource it creates: the same for every repeat of the same
/// request, so an insert that already happened is found instead of done twice.
#[derive(Debug, Clone, Copy)]
pub struct IdempotentId(pub uuid::Uuid);

/// The 201 of a create. When a keyed create found its row already there (an earlier run of the
/// same request committed it, then its worker died or its lease lapsed before the answer was
/// kept) nothing was created now, and the answer says so as a replay does: `Idempotent-Replayed`.
pub fn created<T: Serialize>(created: Created<T>) -> Response {
    let mut response = (StatusCode::CREATED, axum::Json(created.row)).into_response();
    if created.existed {
        mark_replayed(&mut response);
    }
    response
}

/// Marks an answer as a replay (`Idempotent-Replayed: true`) and counts it.
fn mark_replayed(response: &mut Response) {
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    metrics::counter!("idempotent_replays_total").increment(1);
}

/// Renews a lease only while it is still ours (the value is unique per attempt).
static RENEW: std::sync::LazyLock<fred::types::scripts::Script> = std::sync::LazyLock::new(|| {
    fred::types::scripts::Script::from_lua(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
    )
});

/// What Redis holds for a key.
#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum Record {
    Running {
        fingerprint: String,
        /// Unique per attempt, so only the lease holder renews it.
        #[serde(default)]
        attempt: String,
    },
    Done {
        fingerprint: String,
        status: u16,
        content_type: Option<String>,
        /// Base64 of the body.
        body: String,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Middleware for `/api/v1`: applies only to POST requests carrying the header.
pub async fn idempotency(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::POST || !request.headers().contains_key(IDEMPOTENCY_KEY) {
        return next.run(request).await;
    }
    // Boxed: its future is large, and inline it would be copied along with every request's.
    match Box::pin(guarded(&state, client, request, next)).await {
        Ok(response) | Err(response) => response,
    }
}

async fn guarded(
    state: &AppState,
    client: std::net::IpAddr,
    request: Request,
    next: Next,
) -> Result<Response, Response> {
    let config = &state.config.idempotency;
    let key = request
        .headers()
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| (1..=255).contains(&k.len()))
        .ok_or_else(|| {
            ApiError::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")
                .into_response()
        })?
        .to_owned();
    let identity = request
        .extensions()
        .get::<Identity>()
        .cloned()
        .unwrap_or_else(|| Identity::of(state, request.headers(), client));
    let (parts, body) = request.into_parts();
    let limit = state.config.worker.body_limit.as_u64() as usize;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge.into_response())?;
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str());
    hasher.update(b" ");
    hasher.update(parts.uri.path_and_query().map_or("", |p| p.as_str()));
    hasher.update(b"\n");
    hasher.update(&body);
    let fingerprint = hex(&hasher.finalize());
    let redis_key = state.redis.key(&format!(
        "idem:{{{}}}:{}",
        identity.key(),
        hex(&Sha256::digest(key.as_bytes())[..16])
    ));
    let derived = Sha256::digest(format!("{}\n{key}\n{fingerprint}", identity.key()));
    let mut id = [0u8; 16];
    id.copy_from_slice(&derived[..16]);
    let mut request = Request::from_parts(parts, Body::from(body));
    request.extensions_mut().insert(IdempotentId(
        uuid::Builder::from_custom_bytes(id).into_uuid(),
    ));

    let running = serde_json::to_vec(&Record::Running {
        fingerprint: fingerprint.clone(),
        attempt: uuid::Uuid::new_v4().simple().to_string(),
    })
    .expect("record serialises");
    let waited_since = std::time::Instant::now();
    loop {
        match state
            .redis
            .set_new(&redis_key, running.clone().into(), LEASE)
            .await
        {
            Ok(true) => break,
            Ok(false) => match taken(state, &redis_key, &fingerprint).await {
                Taken::Answer(response) => return Err(response),
                Taken::Running if waited_since.elapsed() > LEASE + Duration::from_secs(1) => {
                    return Err(ApiError::Conflict(
                        "a request with this Idempotency-Key is still being processed; retry shortly"
                            .into(),
                    )
                    .into_response());
                }
                Taken::Running | Taken::Gone => tokio::time::sleep(POLL_EVERY).await,
            },
            Err(error) if config.fail_open => {
                tracing::debug!(%error, "idempotency skipped: Redis unavailable");
                return Ok(next.run(request).await);
            }
            Err(_) => {
                return Err(ApiError::Unavailable(
                    "idempotency keys are unavailable; retry shortly",
                )
                .into_response());
            }
        }
    }

    let renewal = tokio::spawn(renew_lease(
        state.clone(),
        redis_key.clone(),
        String::from_utf8(running).expect("JSON is UTF-8"),
    ));
    let response = next.run(request).await;
    renewal.abort();
    let (parts, body) = response.into_parts();
    let body = match axum::body::to_bytes(body, MAX_STORED_BODY).await {
        Ok(body) => body,
        Err(error) => {
            let _ = state.redis.del(&redis_key).await;
            tracing::warn!(%error, "response too large to keep for Idempotency-Key replay");
            return Ok(
                ApiError::Internal(anyhow::anyhow!("response body: {error}")).into_response(),
            );
        }
    };
    if parts.status.is_server_error() {
        let _ = state.redis.del(&redis_key).await;
    } else {
        let done = Record::Done {
            fingerprint,
            status: parts.status.as_u16(),
            content_type: parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: STANDARD.encode(&body),
        };
        let record = serde_json::to_vec(&done).expect("record serialises");
        if let Err(error) = state
            .redis
            .set_bytes(&redis_key, record.into(), config.ttl)
            .await
        {
            tracing::warn!(%error, "could not keep the response for Idempotency-Key replay");
        }
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}

/// Keeps a running request's lease alive until the task is aborted.
async fn renew_lease(state: AppState, redis_key: String, running: String) {
    let lease_ms = LEASE.as_millis().to_string();
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let renewed: Result<i64, _> = state
            .redis
            .script(
                &RENEW,
                vec![redis_key.clone()],
                vec![running.clone(), lease_ms.clone()],
            )
            .await;
        if let Err(error) = renewed {
            tracing::debug!(%error, "could not renew an idempotency lease");
        }
    }
}

/// What a key that is already taken means for a repeat.
enum Taken {
    /// Finished (a replay), reused with another request (422), or Redis failed (503).
    Answer(Response),
    /// The first request still holds the lease.
    Running,
    /// The record vanished (lease lapsed): try to take the key.
    Gone,
}

async fn taken(state: &AppState, redis_key: &str, fingerprint: &str) -> Taken {
    let record = match state.redis.get_bytes(redis_key).await {
        Ok(Some(raw)) => serde_json::from_slice::<Record>(&raw).ok(),
        Ok(None) => return Taken::Gone,
        Err(_) => {
            return Taken::Answer(
                ApiError::Unavailable("idempotency keys are unavailable; retry shortly")
                    .into_response(),
            );
        }
    };
    let reused = || {
        Taken::Answer(
            ApiError::invalid_field(
                "Idempotency-Key",
                "was already used with a different request",
            )
            .into_response(),
        )
    };
    match record {
        Some(Record::Running {
            fingerprint: first, ..
        }) if first == fingerprint => Taken::Running,
        Some(Record::Done {
            fingerprint: first,
            status,
            content_type,
            body,
        }) if first == fingerprint => {
            let body = STANDARD.decode(body).unwrap_or_default();
            let mut response = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                Bytes::from(body),
            )
                .into_response();
            if let Some(value) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            mark_replayed(&mut response);
            Taken::Answer(response)
        }
        Some(_) => reused(),
        // Unreadable (another version's format): let the lease or TTL clear it.
        None => Taken::Running,
    }
}
