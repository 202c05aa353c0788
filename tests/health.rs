//! Probes, metrics, the OpenAPI document and Swagger UI; and what readiness and the API say when
//! a dependency is down.

mod common;

use common::{INSTANCE, TestDb, assert_problem, serve_app, spawn_app, spawn_app_with, test_config};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

fn assert_ready_shape(body: &Value) {
    assert_eq!(body["instance"], INSTANCE);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptimeSeconds"].is_u64(), "{body}");
    for check in ["database", "redis"] {
        assert!(body["checks"][check]["status"].is_string(), "{body}");
        assert!(
            body["checks"][check].get("latencyMs").is_some(),
            "{check} latencyMs in {body}"
        );
    }
}

#[tokio::test]
async fn live_is_ok() {
    let app = spawn_app().await;
    let resp = app.get("/health/live", None).await;
    assert_eq!(resp.expect(200), &json!({"status": "ok"}));
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(resp.header("x-served-by"), Some(INSTANCE));
}

#[tokio::test]
async fn ready_reports_each_dependency() {
    let app = spawn_app().await;
    for path in ["/health/ready", "/health"] {
        let resp = app.get(path, None).await;
        let body = resp.expect(200);
        assert_ready_shape(body);
        assert_eq!(body["status"], "ok", "{path}");
        assert_eq!(body["checks"]["database"]["status"], "ok");
        assert!(body["checks"]["database"]["latencyMs"].is_number());
        assert_eq!(body["checks"]["redis"]["status"], "ok");
        assert!(body["checks"]["redis"]["latencyMs"].is_number());
    }
}

#[tokio::test]
async fn redis_down_degrades_readiness_but_the_api_keeps_working() {
    // Nothing listens on port 1.
    let app = spawn_app_with(|config| config.redis.url = "redis://127.0.0.1:1".into()).await;
    let resp = app.get("/health/ready", None).await;
    let body = resp.expect(200);
    assert_ready_shape(body);
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["checks"]["database"]["status"], "ok");
    assert_eq!(body["checks"]["redis"]["status"], "down");

    let session = app.register("ada@example.com").await;
    let task = app
        .create_task(session.token(), &json!({"title": "still works"}))
        .await;
    let listed = app.get("/api/v1/tasks", session.token()).await;
    assert_eq!(listed.expect(200)["data"][0]["id"], task["id"]);
    // Revocation still holds without Redis: it falls back to PostgreSQL.
    app.delete("/api/v1/me", session.token()).await.expect(204);
    assert_problem(&app.get("/api/v1/tasks", session.token()).await, 401);
}

#[tokio::test]
async fn postgres_down_is_503_for_readiness_and_the_api() {
    let database = TestDb::reserve();
    // A port nothing listens on; a configured secret lets the worker start without PostgreSQL.
    let mut config = test_config(&database.url.replace(":5432/", ":1/"));
    config.auth.jwt_secret = "a test secret that is at least thirty-two bytes".into();
    config.database.acquire_timeout = std::time::Duration::from_millis(500);
    let app = serve_app(config, None, false).await;

    app.get("/health/live", None).await.expect(200);
    let resp = app.get("/health/ready", None).await;
    let body = resp.expect(503);
    assert_ready_shape(body);
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["database"]["status"], "down");

    let resp = app
        .register_with("ada@example.com", "password123", "Ada")
        .await;
    let problem = assert_problem(&resp, 503);
    assert!(resp.header("retry-after").is_some());
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        !detail.contains("127.0.0.1") && !detail.to_lowercase().contains("connection refused"),
        "no internal text in {detail}"
    );
}

/// A pooled connection that PostgreSQL ended while it sat idle (a server restart, an idle
/// timeout, an administrator) is noticed and replaced before a request gets it: no request fails.
#[tokio::test]
async fn a_pooled_connection_ended_while_idle_is_replaced_unnoticed() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    app.post("/api/v1/tasks", ada.token(), &json!({ "title": "before" }))
        .await
        .expect(201);

    let mut admin = PgConnection::connect(&app.state.config.database.url)
        .await
        .unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(ended >= 1, "the worker held no connection to end");
    // Idle for longer than the pool trusts a connection without checking it.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;

    for title in ["after 1", "after 2", "after 3"] {
        app.post("/api/v1/tasks", ada.token(), &json!({ "title": title }))
            .await
            .expect(201);
    }
    let titles: Vec<String> = sqlx::query_scalar("SELECT title FROM tasks ORDER BY created_at")
        .fetch_all(&mut admin)
        .await
        .unwrap();
    assert_eq!(titles, ["before", "after 1", "after 2", "after 3"]);
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = spawn_app().await;
    app.get("/health/live", None).await.expect(200);
    app.get("/api/v1/me", None).await;
    let resp = app.get("/metrics", None).await;
    resp.expect(200);
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(resp.text.contains("http_requests_total"), "{}", resp.text);
    assert!(
        resp.text.contains("http_request_duration_seconds"),
        "{}",
        resp.text
    );
    assert!(
        resp.text
            .lines()
            .any(|l| l.starts_with("http_requests_total{") && l.contains("status=\"401\"")),
        "{}",
        resp.text
    );
}

/// The value of the one `http_requests_total` series with these labels, if it exists.
fn request_count(metrics: &str, method: &str, route: &str, status: u16) -> Option<f64> {
    let wanted = [
        format!("method=\"{method}\""),
        format!("route=\"{route}\""),
        format!("status=\"{status}\""),
    ];
    metrics
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .find(|l| wanted.iter().all(|w| l.contains(w.as_str())))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn request_counters_count_every_request_and_bound_their_labels() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.get("/api/v1/categories", None).await.expect(401);
    }
    app.get("/api/v1/no-such-route", None).await.expect(404);
    // A made-up method is counted, but under one label whatever its name.
    for method in ["BREW", "PROPFIND"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let status = app
            .send(app.request(method, "/api/v1/categories", None))
            .await
            .status;
        assert_eq!(status, 405);
    }
    let metrics = app.get("/metrics", None).await.text;
    assert_eq!(
        request_count(&metrics, "GET", "/api/v1/categories", 401),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        request_count(&metrics, "GET", "unmatched", 404),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        request_count(&metrics, "OTHER", "/api/v1/categories", 405),
        Some(2.0),
        "{metrics}"
    );
    assert!(
        !metrics.contains("BREW") && !metrics.contains("PROPFIND"),
        "{metrics}"
    );
}

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let app = spawn_app().await;
    let resp = app.get("/openapi.json", None).await;
    let doc = resp.expect(200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let routes: &[(&str, &[&str])] = &[
        ("/api/v1/auth/register", &["post"]),
        ("/api/v1/auth/login", &["post"]),
        ("/api/v1/auth/refresh", &["post"]),
        ("/api/v1/auth/logout", &["post"]),
        ("/api/v1/me", &["get", "patch", "delete"]),
        ("/api/v1/users", &["get"]),
        ("/api/v1/users/{id}", &["get", "patch", "delete"]),
        ("/api/v1/categories", &["get", "post"]),
        ("/api/v1/categories/{id}", &["get", "patch", "delete"]),
        ("/api/v1/tasks", &["get", "post"]),
        ("/api/v1/tasks/{id}", &["get", "patch", "delete"]),
        ("/health/live", &["get"]),
        ("/health/ready", &["get"]),
        ("/health", &["get"]),
        ("/metrics", &["get"]),
    ];
    for (path, methods) in routes {
        let item = &doc["paths"][path];
        assert!(item.is_object(), "{path} missing from the document");
        for method in *methods {
            assert!(item[method].is_object(), "{method} {path} missing");
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn swagger_ui_is_served_from_the_binary() {
    let app = spawn_app().await;
    let resp = app.get("/docs/", None).await;
    resp.expect(200);
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("text/html"),
        "{:?}",
        resp.headers
    );
    assert!(
        resp.text.to_lowercase().contains("swagger"),
        "{}",
        resp.text
    );
    // Its assets come from the worker, not from the internet.
    assert!(!resp.text.contains("https://"), "{}", resp.text);
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "swagger-initializer.js",
    ] {
        let resp = app.get(&format!("/docs/{asset}"), None).await;
        resp.expect(200);
        assert!(!resp.text.is_empty(), "{asset}");
    }
    let initializer = app.get("/docs/swagger-initializer.js", None).await;
    assert!(
        initializer.text.contains("/openapi.json"),
        "{}",
        initializer.text
    );
    // `/docs` itself leads there too.
    app.get("/docs", None).await.expect(200);
}
