//! TLS to the stores, against real servers made by the test: a PostgreSQL that accepts only TLS
//! (`sslmode=verify-full` with the test's own CA) and a Redis that speaks only TLS (`rediss://`
//! with `redis.tls_ca`). The API's core flows work over them and readiness says so; a CA that
//! did not sign the server's certificate stops the worker at start with an error naming the
//! store. A TLS Redis Cluster (`rediss-cluster://`) and a TLS Sentinel (`rediss-sentinel://`)
//! serve the cache and idempotency keys.

mod common;

use std::time::Duration;

use common::{
    postgres::PgServer,
    serve_app, test_config,
    tls::{TestCa, TlsRedis, TlsRedisCluster, TlsRedisSentinel},
};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use taskd::{config::Config, worker::AppState};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn pg_url(server: &PgServer, database: &str, mode: &str, ca: &TestCa) -> String {
    format!(
        "postgres://postgres@localhost:{}/{database}?sslmode={mode}&sslrootcert={}",
        server.port,
        ca.ca.display()
    )
}

fn tls_config(pg: &PgServer, redis: &TlsRedis, pg_ca: &TestCa, redis_ca: &TestCa) -> Config {
    let name = format!("taskd_test_{}", Uuid::new_v4().simple());
    let mut config = test_config(&pg_url(pg, &name, "verify-full", pg_ca));
    config.redis.url = redis.url();
    config.redis.tls_ca = Some(redis_ca.ca.display().to_string());
    config
}

/// A worker whose Redis is `url` (trusting `ca`); asserts readiness `ok` with `redis.tls`.
async fn app_on_tls_redis(url: String, ca: &TestCa) -> common::TestApp {
    let ca_path = ca.ca.display().to_string();
    let app = common::spawn_app_with(|config| {
        config.redis.url = url;
        config.redis.tls_ca = Some(ca_path);
    })
    .await;
    let body = app.get("/health/ready", None).await.expect(200).clone();
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["checks"]["redis"]["tls"], true, "{body}");
    app
}

#[tokio::test]
async fn core_flows_work_over_verify_full_postgres_and_rediss() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "good");
    let pg = PgServer::spawn_tls(dir.path(), &ca).await;
    let redis = TlsRedis::spawn(&ca).await;

    // The servers really refuse plain connections, and `prefer` does not fall back to one.
    let plain = PgConnection::connect(&pg_url(&pg, "postgres", "disable", &ca)).await;
    assert!(plain.is_err(), "a plain connection was accepted");
    let mut preferred = PgConnection::connect(&pg_url(&pg, "postgres", "prefer", &ca))
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut preferred)
        .await
        .unwrap();
    assert!(ssl, "sslmode=prefer connected without TLS");

    let app = serve_app(tls_config(&pg, &redis, &ca, &ca), None, true).await;
    let ready = app.get("/health/ready", None).await;
    let body = ready.expect(200);
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["checks"]["database"]["tls"], true, "{body}");
    assert_eq!(body["checks"]["redis"]["tls"], true, "{body}");

    // Register, create, list through the cache (a miss, then a hit from the TLS Redis).
    let ada = app.register("ada@example.com").await;
    let token = ada.token();
    app.create_task(token, &json!({"title": "over TLS"})).await;
    let first = app.get("/api/v1/tasks", token).await;
    assert_eq!(first.expect(200)["pagination"]["total"], 1);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let second = app.get("/api/v1/tasks", token).await;
    assert_eq!(second.header("x-cache"), Some("HIT"));

    // An idempotent replay, kept in the TLS Redis.
    let keyed = json!({"title": "keyed"});
    let first = app
        .post_keyed("/api/v1/tasks", token, "tls-key", &keyed)
        .await;
    first.expect(201);
    let again = app
        .post_keyed("/api/v1/tasks", token, "tls-key", &keyed)
        .await;
    again.expect(201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));

    // Revocation: a password change ends the old token at once.
    app.change_password(token).await;
    common::assert_problem(&app.get("/api/v1/tasks", token).await, 401);
}

#[tokio::test]
async fn a_wrong_ca_is_a_start_up_error_naming_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "good");
    let wrong = TestCa::new(dir.path(), "wrong");
    let pg = PgServer::spawn_tls(dir.path(), &ca).await;
    let redis = TlsRedis::spawn(&ca).await;

    common::init_tracing();
    let start = |config: Config| async move {
        let started = tokio::time::timeout(
            Duration::from_secs(20),
            AppState::new(config, CancellationToken::new(), true),
        )
        .await
        .expect("start-up did not end");
        match started {
            Ok(_) => panic!("the worker started with a CA that did not sign the certificate"),
            Err(error) => format!("{error:#}"),
        }
    };
    let error = start(tls_config(&pg, &redis, &wrong, &ca)).await;
    assert!(
        error.contains("postgres") && error.contains("certificate"),
        "{error}"
    );
    let error = start(tls_config(&pg, &redis, &ca, &wrong)).await;
    assert!(
        error.contains("TLS to Redis") && error.contains("redis.tls_ca"),
        "{error}"
    );
}

/// `rediss-cluster://` with `redis.tls_ca`: the worker finds every node over TLS; the cache and
/// idempotency keys work across the cluster's slots.
#[tokio::test]
async fn a_tls_redis_cluster_serves_the_cache_and_idempotency() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "cluster");
    let cluster = TlsRedisCluster::spawn(&ca).await;
    let app = app_on_tls_redis(cluster.url(), &ca).await;
    let ada = app.register("ada@example.com").await;
    let token = ada.token();
    app.create_task(token, &json!({"title": "clustered"})).await;
    assert_eq!(
        app.get("/api/v1/tasks", token).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        app.get("/api/v1/tasks", token).await.header("x-cache"),
        Some("HIT")
    );
    let keyed = json!({"title": "keyed"});
    let first = app
        .post_keyed("/api/v1/tasks", token, "cluster-key", &keyed)
        .await;
    first.expect(201);
    let again = app
        .post_keyed("/api/v1/tasks", token, "cluster-key", &keyed)
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // One user's keys share a hash tag, so they may all live on one node: more users, until
    // the keys are on at least two of the three (each new user lands on a random slot).
    for n in 0..20 {
        let keys = cluster.keys(&ca);
        if keys.iter().filter(|&&k| k > 0).count() >= 2 {
            return;
        }
        let user = app.register(&format!("user{n}@example.com")).await;
        assert_eq!(app.get("/api/v1/tasks", user.token()).await.status, 200);
    }
    panic!(
        "the keys did not spread over the nodes: {:?}",
        cluster.keys(&ca)
    );
}

/// `rediss-sentinel://` with `redis.tls_ca`: the worker asks the Sentinel over TLS for the
/// primary and speaks TLS to it.
#[tokio::test]
async fn a_tls_sentinel_leads_to_a_tls_primary() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "sentinel");
    let sentinel = TlsRedisSentinel::spawn(&ca).await;
    let app = app_on_tls_redis(sentinel.url(), &ca).await;
    let ada = app.register("ada@example.com").await;
    let token = ada.token();
    assert_eq!(
        app.get("/api/v1/tasks", token).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        app.get("/api/v1/tasks", token).await.header("x-cache"),
        Some("HIT")
    );
    let keys = ca.dbsize(sentinel.primary.port);
    assert!(keys > 0, "nothing reached the primary the Sentinel names");
}
