//! `Idempotency-Key` on POST: a retried POST replays the first response instead of acting
//! twice, whichever worker it reaches.
//!
//! Per (identity, key) Redis holds either `running <fingerprint>` (while the first request runs;
//! it expires after `worker.request_timeout` plus a margin, so a worker dying mid-request does
//! not block the key for a day) or the finished response, kept `idempotency.ttl` (24 h). The
//! fingerprint is a SHA-256 of method, path and body: the same key with another request is a
//! 422, and a repeat while the first still runs is a 409. Responses with a 5xx status are not
//! kept, so the client's retry runs again. When Redis cannot answer, requests run without the
//! guarantee (`idempotency.fail_open`, default) or get a 503.

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

use super::{AppState, error::ApiError, middleware::ClientIp, ratelimit::Identity};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// Responses larger than this are passed through but not kept for replay.
const MAX_STORED_BODY: usize = 1 << 20;

/// What Redis holds for a key.
#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum Record {
    Running {
        fingerprint: String,
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
    match guarded(&state, client, request, next).await {
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
    let request = Request::from_parts(parts, Body::from(body));

    let running = serde_json::to_vec(&Record::Running {
        fingerprint: fingerprint.clone(),
    })
    .expect("record serialises");
    let lock_ttl = state.config.worker.request_timeout + Duration::from_secs(30);
    match state
        .redis
        .set_new(&redis_key, running.into(), lock_ttl)
        .await
    {
        Ok(true) => {}
        Ok(false) => return Err(replay(state, &redis_key, &fingerprint).await),
        Err(error) if config.fail_open => {
            tracing::debug!(%error, "idempotency skipped: Redis unavailable");
            return Ok(next.run(request).await);
        }
        Err(_) => {
            return Err(
                ApiError::Unavailable("idempotency keys are unavailable; retry shortly")
                    .into_response(),
            );
        }
    }

    let response = next.run(request).await;
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

/// The answer to a key that is already taken.
async fn replay(state: &AppState, redis_key: &str, fingerprint: &str) -> Response {
    let record = match state.redis.get_bytes(redis_key).await {
        Ok(Some(raw)) => serde_json::from_slice::<Record>(&raw).ok(),
        // Gone between SET NX and GET (expired): ask the client to retry.
        Ok(None) => None,
        Err(_) => {
            return ApiError::Unavailable("idempotency keys are unavailable; retry shortly")
                .into_response();
        }
    };
    let reused = || {
        ApiError::invalid_field(
            "Idempotency-Key",
            "was already used with a different request",
        )
        .into_response()
    };
    match record {
        Some(Record::Running { fingerprint: first }) if first == fingerprint => ApiError::Conflict(
            "a request with this Idempotency-Key is still being processed; retry shortly".into(),
        )
        .into_response(),
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
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            metrics::counter!("idempotent_replays_total").increment(1);
            response
        }
        Some(_) => reused(),
        None => ApiError::Conflict(
            "a request with this Idempotency-Key is still being processed; retry shortly".into(),
        )
        .into_response(),
    }
}
