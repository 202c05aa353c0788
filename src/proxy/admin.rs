//! The operator listener: `GET /status` (JSON) and `GET /metrics` (Prometheus), plus whatever
//! the supervisor adds (its workers, its counters, the dashboard), and the write routes of
//! [`super::control`] behind `admin.token`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::Proxy;

/// What a role running the proxy adds to the admin listener.
pub trait AdminExtension: Send + Sync + 'static {
    /// Extra top-level fields of `/status` (the supervisor's `workers`).
    fn status_fields(&self) -> Map<String, Value>;
    /// Extra Prometheus text appended to `/metrics` (the supervisor fetches its workers').
    fn metrics(&self) -> futures_util::future::BoxFuture<'_, String>;
    /// The HTML page served at `/`, if any.
    fn dashboard(&self) -> Option<&'static str>;
}

#[derive(Clone)]
struct AdminState {
    proxy: Proxy,
    extension: Option<Arc<dyn AdminExtension>>,
}

/// The admin routes over `proxy`, extended by `extension`.
pub fn router(proxy: Proxy, extension: Option<Arc<dyn AdminExtension>>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(AdminState {
            proxy: proxy.clone(),
            extension,
        })
        .merge(super::control::routes(proxy))
}

/// Serves the admin routes until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// The `/status` document of docs/contract.md §5.
pub fn status_document(proxy: &Proxy, extension: Option<&dyn AdminExtension>) -> Value {
    let mut doc = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": proxy.uptime().as_secs(),
        "strategy": proxy.config().strategy.as_str(),
        "upstreams": proxy.upstreams(),
        "connections": proxy.connections(),
    });
    if let (Some(tls), Some(object)) = (proxy.tls(), doc.as_object_mut()) {
        object.insert("tls".into(), json!(tls));
    }
    if let (Some(extension), Some(object)) = (extension, doc.as_object_mut()) {
        object.extend(extension.status_fields());
    }
    doc
}

async fn status(State(state): State<AdminState>) -> Json<Value> {
    Json(status_document(&state.proxy, state.extension.as_deref()))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut text = state.proxy.render_metrics();
    if let Some(extension) = &state.extension {
        text.push_str(&extension.metrics().await);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn dashboard(State(state): State<AdminState>) -> Response {
    match state.extension.as_ref().and_then(|e| e.dashboard()) {
        Some(page) => Html(page).into_response(),
        None => Json(json!({"links": ["/status", "/metrics"]})).into_response(),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/problem+json")],
        json!({
            "type": "/problems/not-found",
            "title": "Not Found",
            "status": 404,
            "detail": "the admin listener serves /status, /metrics and / (and, with admin.token, POST and DELETE /upstreams, POST /upstreams/drain)",
        })
        .to_string(),
    )
        .into_response()
}
