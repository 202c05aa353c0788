//! Cross-cutting HTTP behaviour: problem+json for every error class, request ids, `X-Served-By`.

mod common;

use common::{INSTANCE, assert_field_error, assert_problem, spawn_app};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn success_responses_carry_served_by_and_a_generated_request_id() {
    let app = spawn_app().await;
    let first = app.get("/health/live", None).await;
    first.expect(200);
    let second = app.get("/health/live", None).await;
    assert_eq!(first.header("x-served-by"), Some(INSTANCE));
    let (a, b) = (
        first.header("x-request-id").unwrap(),
        second.header("x-request-id").unwrap(),
    );
    assert!(!a.is_empty());
    assert_ne!(a, b, "each request gets its own id");
}

#[tokio::test]
async fn a_client_request_id_is_echoed_in_the_header_and_the_problem() {
    let app = spawn_app().await;
    let resp = app
        .send(
            app.request(Method::GET, "/api/v1/me", None)
                .header("X-Request-Id", "client-chosen-42"),
        )
        .await;
    assert_eq!(resp.header("x-request-id"), Some("client-chosen-42"));
    let body = assert_problem(&resp, 401);
    assert_eq!(body["requestId"], "client-chosen-42");

    let ok = app
        .send(
            app.request(Method::GET, "/health/live", None)
                .header("X-Request-Id", "another-id"),
        )
        .await;
    ok.expect(200);
    assert_eq!(ok.header("x-request-id"), Some("another-id"));
}

#[tokio::test]
async fn unknown_routes_are_404_problems() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    for path in ["/nope", "/api/v1/nope", "/api/v1/tasks/a/b"] {
        let resp = app.get(path, session.token()).await;
        assert_problem(&resp, 404);
    }
}

#[tokio::test]
async fn wrong_methods_are_405_problems() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let cases = [
        (Method::PUT, "/api/v1/tasks"),
        (Method::DELETE, "/api/v1/tasks"),
        (Method::POST, "/api/v1/me"),
        (Method::GET, "/api/v1/auth/login"),
        (Method::POST, "/health/live"),
        (
            Method::PUT,
            "/api/v1/categories/0190a6a4-0000-7000-8000-000000000000",
        ),
    ];
    for (method, path) in cases {
        let resp = app
            .send(app.request(method.clone(), path, session.token()))
            .await;
        assert_problem(&resp, 405);
        assert!(resp.header("allow").is_some(), "{method} {path}: no Allow");
    }
    let resp = app
        .send(app.request(Method::PUT, "/api/v1/tasks", session.token()))
        .await;
    let allow = resp.header("allow").unwrap().to_uppercase();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
}

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    for body in [
        "{",
        "",
        "{\"title\": \"a\"} trailing",
        "{'title': 'a'}",
        "nul",
    ] {
        let resp = app
            .send_raw(
                Method::POST,
                "/api/v1/tasks",
                session.token(),
                "application/json",
                body,
            )
            .await;
        assert_problem(&resp, 400);
    }
    let resp = app
        .send_raw(
            Method::POST,
            "/api/v1/auth/login",
            None,
            "application/json",
            "{\"email\":",
        )
        .await;
    assert_problem(&resp, 400);
}

#[tokio::test]
async fn deeply_nested_json_is_a_client_error() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let body = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let resp = app
        .send_raw(
            Method::POST,
            "/api/v1/tasks",
            session.token(),
            "application/json",
            body,
        )
        .await;
    assert!(resp.status.is_client_error(), "{}", resp.status);
    assert_problem(&resp, resp.status.as_u16());
}

#[tokio::test]
async fn non_json_bodies_are_415() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let resp = app
        .send_raw(
            Method::POST,
            "/api/v1/tasks",
            session.token(),
            "text/plain",
            "{\"title\": \"a\"}",
        )
        .await;
    assert_problem(&resp, 415);
    // No Content-Type at all.
    let resp = app
        .send(
            app.request(Method::POST, "/api/v1/auth/register", None)
                .body("{\"email\":\"x@y.z\",\"password\":\"12345678\",\"name\":\"X\"}"),
        )
        .await;
    assert_problem(&resp, 415);
    let resp = app
        .send_raw(
            Method::PATCH,
            "/api/v1/me",
            session.token(),
            "application/x-www-form-urlencoded",
            "name=x",
        )
        .await;
    assert_problem(&resp, 415);
    // JSON with a charset or a +json type is JSON.
    let resp = app
        .send_raw(
            Method::POST,
            "/api/v1/tasks",
            session.token(),
            "application/json; charset=utf-8",
            "{\"title\": \"a\"}",
        )
        .await;
    resp.expect(201);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let description = "x".repeat(1024 * 1024 + 1);
    let resp = app
        .post(
            "/api/v1/tasks",
            session.token(),
            &json!({"title": "big", "description": description}),
        )
        .await;
    assert_problem(&resp, 413);
    let resp = app
        .post(
            "/api/v1/auth/register",
            None,
            &json!({"email": "big@example.com", "password": description, "name": "Big"}),
        )
        .await;
    assert_problem(&resp, 413);
    // Just under the limit is read (and then refused for its content, not its size).
    let description = "x".repeat(1024 * 1024 - 100);
    let resp = app
        .post(
            "/api/v1/tasks",
            session.token(),
            &json!({"title": "big", "description": description}),
        )
        .await;
    assert_field_error(&resp, 422, "description");
}

#[tokio::test]
async fn bad_path_ids_are_400() {
    let app = spawn_app().await;
    let admin = app.register_admin("root@example.com").await;
    for path in [
        "/api/v1/tasks/not-a-uuid",
        "/api/v1/tasks/123",
        "/api/v1/categories/zzz",
        "/api/v1/users/42",
    ] {
        let resp = app.get(path, admin.token()).await;
        assert_field_error(&resp, 400, "id");
        let resp = app.delete(path, admin.token()).await;
        assert_problem(&resp, 400);
        let resp = app.patch(path, admin.token(), &json!({})).await;
        assert_problem(&resp, 400);
    }
}

#[tokio::test]
async fn unauthenticated_api_requests_are_401_with_a_bearer_challenge() {
    let app = spawn_app().await;
    let id = "0190a6a4-0000-7000-8000-000000000000";
    let cases = [
        (Method::GET, "/api/v1/me".to_owned()),
        (Method::PATCH, "/api/v1/me".to_owned()),
        (Method::DELETE, "/api/v1/me".to_owned()),
        (Method::GET, "/api/v1/users".to_owned()),
        (Method::GET, format!("/api/v1/users/{id}")),
        (Method::PATCH, format!("/api/v1/users/{id}")),
        (Method::DELETE, format!("/api/v1/users/{id}")),
        (Method::GET, "/api/v1/categories".to_owned()),
        (Method::POST, "/api/v1/categories".to_owned()),
        (Method::GET, format!("/api/v1/categories/{id}")),
        (Method::PATCH, format!("/api/v1/categories/{id}")),
        (Method::DELETE, format!("/api/v1/categories/{id}")),
        (Method::GET, "/api/v1/tasks".to_owned()),
        (Method::POST, "/api/v1/tasks".to_owned()),
        (Method::GET, format!("/api/v1/tasks/{id}")),
        (Method::PATCH, format!("/api/v1/tasks/{id}")),
        (Method::DELETE, format!("/api/v1/tasks/{id}")),
    ];
    for (method, path) in cases {
        let resp = app
            .send(app.request(method.clone(), &path, None).json(&json!({})))
            .await;
        assert_problem(&resp, 401);
        let resp = app
            .send(
                app.request(method.clone(), &path, "not.a.jwt")
                    .json(&json!({})),
            )
            .await;
        assert_problem(&resp, 401);
    }
}

#[tokio::test]
async fn inputs_postgres_cannot_store_are_client_errors() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let cases = [
        ("/api/v1/tasks", json!({"title": "nul \u{0} byte"})),
        (
            "/api/v1/tasks",
            json!({"title": "t", "description": "\u{0}"}),
        ),
        ("/api/v1/categories", json!({"name": "a\u{0}b"})),
    ];
    for (path, body) in cases {
        let resp = app.post(path, session.token(), &body).await;
        assert!(
            resp.status.is_client_error(),
            "{path} {body}: {}",
            resp.text
        );
        assert_problem(&resp, resp.status.as_u16());
    }
    let resp = app
        .register_with("nul\u{0}@example.com", "password123", "N")
        .await;
    assert!(resp.status.is_client_error(), "{}", resp.text);
    let resp = app.login("nul\u{0}@example.com", "password123").await;
    assert!(resp.status.is_client_error(), "{}", resp.text);
    let resp = app
        .get("/api/v1/tasks?search=%00abc", session.token())
        .await;
    resp.expect(200);
}
