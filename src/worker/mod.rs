//! The API process (`taskd worker`): a stateless axum server over PostgreSQL and Redis.
//!
//! [`app`] builds the router so tests can serve it on any listener; [`run`] serves it until the
//! shutdown token fires and in-flight requests finish.

pub mod cache;
pub mod error;
pub mod extract;
pub mod listing;
pub mod model;
pub mod ratelimit;
pub mod redis;
pub mod replica;
pub mod store;
pub mod tokens;

mod admin;
mod auth;
mod categories;
mod cors;
mod health;
mod idempotency;
pub mod middleware;
mod openapi;
mod server;
mod tasks;
mod users;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use anyhow::Context;
use axum::{Router, extract::DefaultBodyLimit, http::HeaderValue};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;

/// Everything a request handler needs: one `Arc`, since axum clones the state for every
/// middleware layer of every request.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    /// Primary PostgreSQL: all writes and reads that must see them.
    pub db: crate::db::Db,
    /// `database.read_url`: reads that have seen their owner's last write ([`replica`]).
    pub replica: Option<Arc<replica::Replica>>,
    /// Shared ephemeral state: token revocations, cache, rate limits, idempotency keys.
    pub redis: redis::Redis,
    /// Response cache of task reads.
    pub cache: Arc<cache::Cache>,
    /// Rate-limit scripts.
    pub limiter: Arc<ratelimit::Limiter>,
    pub config: Arc<Config>,
    /// JWT keys, shared by every worker through `auth.jwt_secret` or the settings table.
    pub tokens: Arc<tokens::TokenKeys>,
    pub passwords: Arc<tokens::Passwords>,
    /// `X-Served-By` value: `worker.instance_id`, default `<hostname>:<port>`.
    pub instance: Arc<str>,
    /// `instance` as a header value, made once.
    pub served_by: HeaderValue,
    /// For `uptimeSeconds` in readiness.
    pub started: Instant,
    /// Cancelled when the worker begins shutting down; readiness then answers 503.
    pub shutdown: CancellationToken,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// Connects the stores (PostgreSQL must answer: the JWT secret lives there), applying
    /// migrations first when `migrate` is set.
    pub async fn new(
        config: Config,
        shutdown: CancellationToken,
        migrate: bool,
    ) -> anyhow::Result<Self> {
        if migrate {
            // On `direct_url` when set; the pool it returns is for administrative work.
            crate::db::migrate(&config.database).await?.close().await;
        }
        let db = crate::db::Db::new(&config.database, &config.database.url)?;
        let secret = match store::settings::jwt_secret(&db, &config.auth.jwt_secret).await {
            Ok(secret) => secret,
            // 42P05 duplicate_prepared_statement, 26000 invalid_sql_statement_name: named
            // statements through a pooler that hands each transaction another server.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P05" | "26000")) =>
            {
                anyhow::bail!(
                    "loading the JWT secret from PostgreSQL: {e}; behind a transaction-mode \
                     pooler (PgBouncer) set database.prepared_statements = false"
                )
            }
            Err(e) => Err(e).context("loading the JWT secret from PostgreSQL")?,
        };
        let tokens = Arc::new(tokens::TokenKeys::new(&secret, &config.auth));
        let passwords = Arc::new(tokens::Passwords::new(&config.auth)?);
        let redis = redis::Redis::connect(&config.redis).await?;
        let cache = Arc::new(cache::Cache::new(redis.clone(), &config.cache));
        let replica = match &config.database.read_url {
            Some(url) => {
                let replica = Arc::new(replica::Replica::new(
                    crate::db::Db::new(&config.database, url)?,
                    db.clone(),
                    redis.clone(),
                    config.database.max_replica_lag,
                    cache.keep(),
                ));
                tokio::spawn(replica.clone().poll(shutdown.clone()));
                Some(replica)
            }
            None => None,
        };
        let instance = config
            .worker
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", hostname(), config.worker.port));
        Ok(Self(Arc::new(Shared {
            db,
            replica,
            redis,
            cache,
            limiter: Arc::default(),
            tokens,
            passwords,
            served_by: HeaderValue::from_str(&instance)
                .context("worker.instance_id must be a valid header value")?,
            instance: instance.into(),
            started: Instant::now(),
            shutdown,
            metrics: middleware::metrics_handle(),
            config: Arc::new(config),
        })))
    }
}

impl Shared {
    /// After a write that can change `owner`'s reads: retires their cached reads and, with a
    /// replica, records the write's WAL position so their next reads wait for it.
    pub async fn wrote(&self, owner: uuid::Uuid) {
        match &self.replica {
            None => self.cache.invalidate(owner).await,
            Some(replica) => {
                if !replica
                    .wrote(owner, self.cache.version_to_bump(owner))
                    .await
                {
                    self.cache.missed_invalidation(owner);
                }
            }
        }
    }

    /// Runs a read `query` on the replica when it has replayed `needed` (see [`replica`]), else
    /// on the primary.
    pub async fn read<T, F, Fut>(&self, needed: Option<u64>, query: F) -> Result<T, error::ApiError>
    where
        F: Fn(crate::db::Db) -> Fut,
        Fut: Future<Output = Result<T, error::ApiError>>,
    {
        match &self.replica {
            Some(replica) => replica.read(needed, query).await,
            None => query(self.db.clone()).await,
        }
    }

    /// The position a read of `owner` outside the cache must see (`None` without a replica).
    pub async fn needed(&self, owner: uuid::Uuid) -> Option<u64> {
        match &self.replica {
            Some(replica) => replica.lookup(owner).await,
            None => None,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

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
    let shutdown = state.shutdown.clone();
    let config = &state.config.worker;
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
