//! Cross-origin requests from browser pages (`[worker.cors]`, docs/contract.md §8.2), with
//! tower-http's CORS layer.
//!
//! - Exact-origin allowlist: `Access-Control-Allow-Origin` echoes the request's `Origin` only
//!   when it is one of `worker.cors.allowed_origins`, byte for byte; any other origin gets no
//!   CORS headers, and the browser keeps the response from its page. No list (the default): no
//!   layer at all.
//! - `Vary: Origin` (and the preflight request headers) on every response, so a shared cache
//!   never serves one origin's answer to another.
//! - Credentials off: the API authenticates with `Authorization: Bearer`, which a page sends
//!   itself; cookies and TLS client certificates are never asked for.
//! - Preflights (`OPTIONS`) are answered by this layer, which wraps every route outside the rate
//!   limit and idempotency layers: they charge no limit and carry no `RateLimit-*` headers. With
//!   the layer on, every `OPTIONS` request is answered this way (200, empty).
//! - Pages may read `ETag`, `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`,
//!   `Retry-After`, `X-Request-Id` and `Idempotent-Replayed`.

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsConfig;

/// Methods of the API's routes.
pub const ALLOWED_METHODS: [Method; 4] = [Method::GET, Method::POST, Method::PATCH, Method::DELETE];

/// Request headers a page may send besides the CORS-safelisted ones.
pub const ALLOWED_HEADERS: [HeaderName; 5] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::IF_NONE_MATCH,
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static("x-request-id"),
];

/// Response headers a page may read besides the CORS-safelisted ones (docs/contract.md §8.2).
pub const EXPOSED_HEADERS: [HeaderName; 7] = [
    header::ETAG,
    HeaderName::from_static("ratelimit-limit"),
    HeaderName::from_static("ratelimit-remaining"),
    HeaderName::from_static("ratelimit-reset"),
    header::RETRY_AFTER,
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("idempotent-replayed"),
];

/// The layer for `config`; `None` when no origin is allowed.
pub fn layer(config: &CorsConfig) -> Option<CorsLayer> {
    if config.allowed_origins.is_empty() {
        return None;
    }
    // Checked by `Config::validate`: each is a valid header value.
    let origins = config
        .allowed_origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok());
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods(ALLOWED_METHODS)
            .allow_headers(ALLOWED_HEADERS)
            .expose_headers(EXPOSED_HEADERS)
            .allow_credentials(false)
            .max_age(config.max_age),
    )
}
