//! Liveness, readiness and Prometheus metrics.

use std::time::{Duration, Instant};

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;

/// How long readiness waits for each dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(health))
        .routes(routes!(metrics))
}

/// `{"status":"ok"}`
#[derive(Serialize, ToSchema)]
pub struct Live {
    /// Always `ok`.
    status: &'static str,
}

/// The state of one dependency.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// `ok` or `down`.
    status: &'static str,
    /// Round-trip time of the check; null when it failed.
    latency_ms: Option<f64>,
    /// Whether the connection is encrypted: for PostgreSQL as the server reports it
    /// (`pg_stat_ssl`; behind a pooler, the pooler's own link), false when it failed; for Redis,
    /// a `rediss` URL (nothing else is ever used).
    tls: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Checks {
    database: Check,
    redis: Check,
    /// With `database.read_url` only: what the replica poller last saw. Anything but `ok`
    /// degrades readiness (reads then go to the primary).
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<super::replica::ReplicaCheck>,
}

/// Readiness report.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// `ok`; `degraded` when Redis or the replica is down (still serving); `unavailable` when
    /// PostgreSQL is down or the worker is shutting down.
    status: &'static str,
    /// This worker's `X-Served-By` id.
    instance: String,
    version: &'static str,
    uptime_seconds: u64,
    checks: Checks,
}

/// Liveness: the process serves HTTP. Checks no dependency.
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "The process is serving", body = Live)))]
async fn live() -> Json<Live> {
    Json(Live { status: "ok" })
}

/// Readiness: PostgreSQL answers (Redis down only degrades) and the worker is not shutting down.
#[utoipa::path(get, path = "/health/ready", tag = "health", responses(
    (status = 200, description = "Ready (`ok` or `degraded`)", body = Ready),
    (status = 503, description = "PostgreSQL is down or the worker is shutting down", body = Ready)))]
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    readiness(&state).await
}

/// Alias of `/health/ready`.
#[utoipa::path(get, path = "/health", tag = "health", responses(
    (status = 200, description = "Ready (`ok` or `degraded`)", body = Ready),
    (status = 503, description = "PostgreSQL is down or the worker is shutting down", body = Ready)))]
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    readiness(&state).await
}

/// Times `check`, whose answer says whether the connection is encrypted.
async fn timed<E>(check: impl Future<Output = Result<bool, E>>) -> Check {
    let started = Instant::now();
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(tls)) => Check {
            status: "ok",
            latency_ms: Some((started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0),
            tls,
        },
        _ => Check {
            status: "down",
            latency_ms: None,
            tls: false,
        },
    }
}

/// One round trip that also says whether this session is encrypted.
pub const SESSION_TLS: &str =
    "SELECT COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)";

async fn readiness(state: &AppState) -> (StatusCode, Json<Ready>) {
    let (database, redis) = tokio::join!(
        timed(sqlx::query_scalar::<_, bool>(SESSION_TLS).fetch_one(&state.db)),
        timed(async { state.redis.ping().await.map(|_| state.redis.tls()) }),
    );
    let replica = state.replica.as_ref().map(|replica| replica.check());
    let replica_ok = replica.as_ref().is_none_or(|check| check.status == "ok");
    let (code, status) = if state.shutdown.is_cancelled() || database.status != "ok" {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    } else if redis.status != "ok" || !replica_ok {
        (StatusCode::OK, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    let body = Ready {
        status,
        instance: state.instance.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        checks: Checks {
            database,
            redis,
            replica,
        },
    };
    (code, Json(body))
}

/// Prometheus metrics: requests by route and status, latency histogram, connection pool usage.
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let pool = state.db.pool();
    let size = f64::from(pool.size());
    let idle = pool.num_idle() as f64;
    metrics::gauge!("db_pool_connections", "state" => "idle").set(idle);
    metrics::gauge!("db_pool_connections", "state" => "in_use").set(size - idle);
    metrics::gauge!("db_pool_max_connections")
        .set(f64::from(state.config.database.max_connections));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
