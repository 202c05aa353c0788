//! The API process (`taskd worker`): a stateless axum server over PostgreSQL and Redis.
//!
//! [`AppState`] (in `state.rs`) is what handlers share; [`app`] builds the router so tests can
//! serve it on any listener; [`run`] serves it until the shutdown token fires and in-flight
//! requests finish.

pub(crate) mod cache;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod listing;
pub(crate) mod model;
pub(crate) mod ratelimit;
pub mod redis;
pub(crate) mod replica;
pub(crate) mod store;
pub(crate) mod tokens;

mod admin;
mod auth;
mod categories;
mod cors;
mod health;
mod idempotency;
pub(crate) mod middleware;
mod openapi;
mod server;
mod state;
mod tasks;
pub(crate) mod users;

use std::net::SocketAddr;

use anyhow::Context;
use axum::{Router, extract::DefaultBodyLimit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;

pub use state::{AppState, Shared};

/// Every documented route, with its OpenAPI description; with `state`, also the `/api/v1`
/// middleware (rate limit outermost, then idempotency keys), which the document does not need.
///
/// `/auth/*` is outside the idempotency layer: its answers carry credentials, which must not
/// sit in Redis for a day, and replaying a refresh would hand out the same pair twice and
/// defeat re-use detection. A key sent there is ignored; a repeated refresh is a re-use.
fn routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    let mut keyed = OpenApiRouter::new()
        .merge(users::router())
        .merge(categories::router())
        .merge(tasks::router())
        .merge(admin::router());
    if let Some(state) = state {
        keyed = keyed.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotency,
        ));
    }
    let mut api = OpenApiRouter::new().merge(auth::router()).merge(keyed);
    if let Some(state) = state {
        api = api.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ratelimit::limit,
        ));
    }
    OpenApiRouter::with_openapi(openapi::base())
        .nest("/api/v1", api)
        .merge(health::router())
}

/// The OpenAPI document served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = routes(None).split_for_parts().1;
    openapi::document_cors(&mut doc, &crate::config::CorsConfig::default());
    doc
}

/// The whole HTTP application: API, health, metrics and docs, with the observing middleware.
pub fn app(state: AppState) -> Router {
    let (router, mut spec) = routes(Some(&state)).split_for_parts();
    openapi::document_cors(&mut spec, &state.config.worker.cors);
    router
        .merge(openapi::docs(spec))
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            middleware::panic_response,
        ))
        .layer(DefaultBodyLimit::max(
            state.config.worker.body_limit.as_u64() as usize,
        ))
        // Outside the rate limit (preflights are free), inside `observe` (they are logged,
        // with a request id).
        .layer(tower::util::option_layer(cors::layer(
            &state.config.worker.cors,
        )))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .with_state(state)
}

/// Serves `app(state)` on `listener` until `shutdown` fires, then lets in-flight requests
/// finish for up to `worker.shutdown_timeout`. Connection limits: [`server`].
pub async fn serve(listener: TcpListener, state: AppState) -> anyhow::Result<()> {
    let config = &state.config.worker;
    // Readiness turns 503 on `state.shutdown`; the listener closes `drain_delay` later.
    let shutdown = lame_duck(state.shutdown.clone(), config.drain_delay);
    let limits = server::Limits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        shutdown_timeout: config.shutdown_timeout,
    };
    server::serve(listener, app(state), limits, shutdown)
        .await
        .context("serving HTTP")
}

/// A token cancelled `delay` after `shutdown`: meanwhile the worker is a lame duck, answering
/// readiness 503 (so balancers stop sending it requests) and serving whatever still arrives.
fn lame_duck(shutdown: CancellationToken, delay: std::time::Duration) -> CancellationToken {
    if delay.is_zero() {
        return shutdown;
    }
    let stop = CancellationToken::new();
    let later = stop.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tracing::info!(
            drain_delay = %humantime::format_duration(delay),
            "draining: readiness answers 503, still serving until the drain delay has passed"
        );
        tokio::time::sleep(delay).await;
        later.cancel();
    });
    stop
}

/// `taskd worker`: migrate, bind, serve until `shutdown` (SIGTERM/SIGINT, or whatever else the
/// caller wires to it).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = SocketAddr::new(config.worker.host, config.worker.port);
    let state = AppState::new(config, shutdown, true).await?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, instance = %state.instance, "worker listening");
    serve(listener, state).await?;
    tracing::info!("worker stopped");
    Ok(())
}
