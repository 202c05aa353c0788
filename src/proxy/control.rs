//! The admin listener's write routes: an operator changes the upstream set of a running proxy.
//!
//! - `POST /upstreams` `{"url", "weight"?}`: adds an upstream (trusted once its health checks
//!   pass, its share growing over `proxy.slow_start`) → 201 and its `/status` entry; 409 when
//!   it is one already.
//! - `POST /upstreams/drain` `{"url"}`: no new requests; those in flight finish (for at most
//!   `proxy.shutdown_timeout`), then it is removed → 202 and its entry, `state: "draining"`
//!   (`/status` shows `inFlight` and `drainingForMs` meanwhile).
//! - `DELETE /upstreams` `{"url"}`: removed at once, requests in flight still finish → 204.
//!
//! Only with `Authorization: Bearer <admin.token>` (401 otherwise); with `admin.token` empty the
//! routes are off (403). Under `taskd serve` the workers' upstreams are the supervisor's: the
//! routes refuse to drain or remove them (409; a rolling restart is SIGHUP). Errors are
//! problem+json.

use axum::{
    Json, Router,
    extract::{FromRequest, Request, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::post,
};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{
    Proxy,
    upstream::{Joining, Origin},
};
use crate::config::{MAX_WEIGHT, parse_upstream_url};

/// The write routes, behind the token check.
pub(super) fn routes(proxy: Proxy) -> Router {
    Router::new()
        .route("/upstreams", post(add).delete(remove))
        .route("/upstreams/drain", post(drain))
        .layer(axum::middleware::from_fn_with_state(
            proxy.clone(),
            require_token,
        ))
        .with_state(proxy)
}

/// A problem+json answer.
fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({
        "type": format!("/problems/{}", status.canonical_reason().unwrap_or("error").to_lowercase().replace(' ', "-")),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

/// 403 while `admin.token` is empty, 401 without the right bearer token.
async fn require_token(
    State(proxy): State<Proxy>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let token = proxy.admin_token();
    if token.is_empty() {
        return problem(
            StatusCode::FORBIDDEN,
            "the admin write routes are off: set admin.token (TASKD_ADMIN__TOKEN) to use them",
        );
    }
    let offered = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Digests compared, so the time taken says nothing about how much of the token matched.
    if Sha256::digest(offered.as_bytes()) != Sha256::digest(token.as_bytes()) {
        let mut response = problem(
            StatusCode::UNAUTHORIZED,
            "the admin write routes need Authorization: Bearer <admin.token>",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"taskd-admin\""),
        );
        return response;
    }
    next.run(request).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    url: String,
    weight: Option<u32>,
}

/// A JSON body whose rejection is a problem+json 400.
struct Body(Target);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        match Json::<Target>::from_request(request, state).await {
            Ok(Json(target)) => Ok(Self(target)),
            Err(rejection) => Err(bad_body(&rejection)),
        }
    }
}

fn bad_body(rejection: &JsonRejection) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        &format!("expected a JSON body {{\"url\": \"http://host:port\"}}: {rejection}"),
    )
}

/// The upstream's `/status` entry.
fn entry(proxy: &Proxy, url: &str) -> serde_json::Value {
    proxy
        .upstreams()
        .into_iter()
        .find(|u| u.url == url)
        .map_or(serde_json::Value::Null, |u| json!(u))
}

async fn add(State(proxy): State<Proxy>, Body(target): Body) -> Response {
    let url = match parse_upstream_url(&target.url) {
        Ok(url) => url,
        Err(error) => return problem(StatusCode::BAD_REQUEST, &format!("url: {error}")),
    };
    let weight = target.weight.unwrap_or(1);
    if !(1..=MAX_WEIGHT).contains(&weight) {
        return problem(
            StatusCode::BAD_REQUEST,
            &format!("weight: must be 1 to {MAX_WEIGHT}"),
        );
    }
    let joining = Joining {
        weight,
        origin: Origin::Admin,
        healthy: false,
        slow_start: proxy.config().slow_start,
    };
    match proxy.join(&url, joining) {
        Ok(()) => {
            tracing::info!(upstream = %url, weight, "upstream added by the admin API");
            (StatusCode::CREATED, Json(entry(&proxy, &url))).into_response()
        }
        Err(error) => problem(StatusCode::CONFLICT, &error),
    }
}

/// The upstream `url` names, unless it is unknown (404) or a worker of `taskd serve` (409):
/// then the status and why.
fn managed_elsewhere(proxy: &Proxy, url: &str) -> Result<String, (StatusCode, String)> {
    let url = parse_upstream_url(url).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    match proxy.upstreams().into_iter().find(|u| u.url == url) {
        None => Err((StatusCode::NOT_FOUND, format!("{url} is not an upstream"))),
        Some(u) if u.origin == Origin::Supervisor => Err((
            StatusCode::CONFLICT,
            format!(
                "{url} is a worker of taskd serve, which manages it (SIGHUP rolls the workers)"
            ),
        )),
        Some(_) => Ok(url),
    }
}

async fn drain(State(proxy): State<Proxy>, Body(target): Body) -> Response {
    let url = match managed_elsewhere(&proxy, &target.url) {
        Ok(url) => url,
        Err((status, why)) => return problem(status, &why),
    };
    proxy.retire(&url);
    tracing::info!(upstream = %url, "upstream draining by the admin API");
    (StatusCode::ACCEPTED, Json(entry(&proxy, &url))).into_response()
}

async fn remove(State(proxy): State<Proxy>, Body(target): Body) -> Response {
    let url = match managed_elsewhere(&proxy, &target.url) {
        Ok(url) => url,
        Err((status, why)) => return problem(status, &why),
    };
    proxy.remove_upstream(&url);
    tracing::info!(upstream = %url, "upstream removed by the admin API");
    StatusCode::NO_CONTENT.into_response()
}
