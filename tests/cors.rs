//! CORS (`[worker.cors]`, docs/contract.md §8.2) by its headers: preflights from allowed and
//! other origins, actual requests, what a page may read, and preflights never charged to the
//! rate limit. The same in a real browser: tests/browser.rs.

mod common;

use common::{Resp, TestApp, assert_problem, spawn_app, spawn_app_with};
use reqwest::Method;

const APP: &str = "http://app.example.com:8443";
const OTHER: &str = "http://evil.example.com";
const LIST: &str = "/api/v1/tasks";

async fn cors_app() -> TestApp {
    spawn_app_with(|c| {
        c.worker.cors.allowed_origins = vec![APP.into(), "https://admin.example.com".into()];
        c.rate_limit.anonymous = 3;
    })
    .await
}

/// A preflight of a GET with `Authorization` from `origin`.
async fn preflight(app: &TestApp, origin: &str) -> Resp {
    app.send(
        app.request(Method::OPTIONS, LIST, None)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization"),
    )
    .await
}

/// The comma-separated values of `name`, lower-cased, over all its lines.
fn list(resp: &Resp, name: &str) -> Vec<String> {
    resp.headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_without_charging_the_limit() {
    let app = cors_app().await;
    for _ in 0..6 {
        let resp = preflight(&app, APP).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(resp.header("access-control-allow-origin"), Some(APP));
        let methods = list(&resp, "access-control-allow-methods");
        for method in ["get", "post", "patch", "delete"] {
            assert!(methods.contains(&method.to_owned()), "{methods:?}");
        }
        let headers = list(&resp, "access-control-allow-headers");
        for header in [
            "authorization",
            "content-type",
            "idempotency-key",
            "if-none-match",
        ] {
            assert!(headers.contains(&header.to_owned()), "{headers:?}");
        }
        assert_eq!(resp.header("access-control-max-age"), Some("600"));
        assert_eq!(resp.header("access-control-allow-credentials"), None);
        assert!(list(&resp, "vary").contains(&"origin".to_owned()));
        assert_eq!(
            resp.header("ratelimit-remaining"),
            None,
            "a preflight is not counted"
        );
    }
    // Six preflights went by; the first real request still has the whole anonymous limit (3).
    let first = app
        .send(app.request(Method::GET, LIST, None).header("origin", APP))
        .await;
    assert_problem(&first, 401);
    assert_eq!(first.header("ratelimit-limit"), Some("3"));
    assert_eq!(first.header("ratelimit-remaining"), Some("2"));
    // Errors carry the CORS headers too, so a page can read a 401 or a 429.
    assert_eq!(first.header("access-control-allow-origin"), Some(APP));
}

#[tokio::test]
async fn an_allowed_origin_reads_the_answer_and_the_exposed_headers() {
    let app = cors_app().await;
    let ada = app.register("ada@example.com").await;
    app.create_task(ada.token(), &serde_json::json!({"title": "one"}))
        .await;
    let resp = app
        .send(
            app.request(Method::GET, LIST, ada.token())
                .header("origin", "https://admin.example.com"),
        )
        .await;
    assert_eq!(resp.expect(200)["data"][0]["title"], "one");
    assert_eq!(
        resp.header("access-control-allow-origin"),
        Some("https://admin.example.com")
    );
    assert_eq!(resp.header("access-control-allow-credentials"), None);
    assert!(list(&resp, "vary").contains(&"origin".to_owned()));
    let exposed = list(&resp, "access-control-expose-headers");
    for header in [
        "etag",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "retry-after",
        "x-request-id",
        "idempotent-replayed",
    ] {
        assert!(
            exposed.contains(&header.to_owned()),
            "{header}: {exposed:?}"
        );
    }
}

#[tokio::test]
async fn other_origins_get_no_cors_headers() {
    let app = cors_app().await;
    let ada = app.register("ada@example.com").await;
    // Not exactly an allowed origin: another host, scheme, port, or a trailing slash.
    for origin in [
        OTHER,
        "https://app.example.com:8443",
        "http://app.example.com",
        "http://app.example.com:8443/",
        "null",
    ] {
        let pre = preflight(&app, origin).await;
        assert_eq!(pre.header("access-control-allow-origin"), None, "{origin}");
        let resp = app
            .send(
                app.request(Method::GET, LIST, ada.token())
                    .header("origin", origin),
            )
            .await;
        // The server answers; the browser keeps the answer from the page.
        resp.expect(200);
        assert_eq!(resp.header("access-control-allow-origin"), None, "{origin}");
        assert!(list(&resp, "vary").contains(&"origin".to_owned()));
    }
}

#[tokio::test]
async fn without_allowed_origins_there_are_no_cors_headers_at_all() {
    let app = spawn_app().await;
    let pre = preflight(&app, APP).await;
    assert_problem(&pre, 405);
    let ada = app.register("ada@example.com").await;
    let resp = app
        .send(
            app.request(Method::GET, LIST, ada.token())
                .header("origin", APP),
        )
        .await;
    resp.expect(200);
    for name in [
        "access-control-allow-origin",
        "access-control-expose-headers",
        "access-control-allow-methods",
    ] {
        assert_eq!(resp.header(name), None, "{name}");
    }
    assert!(!list(&resp, "vary").contains(&"origin".to_owned()));
}

#[tokio::test]
async fn the_openapi_document_describes_cors_and_the_preflights() {
    let app = cors_app().await;
    let doc = app.get("/openapi.json", None).await.expect(200).clone();
    let description = doc["info"]["description"].as_str().unwrap();
    assert!(
        description.contains("worker.cors.allowed_origins"),
        "{description}"
    );
    assert!(description.contains("idempotent-replayed"), "{description}");
    let preflight = &doc["paths"]["/api/v1/tasks"]["options"];
    assert_eq!(preflight["summary"], "CORS preflight", "{preflight}");
    let headers = &preflight["responses"]["200"]["headers"];
    for name in [
        "Access-Control-Allow-Origin",
        "Access-Control-Max-Age",
        "Vary",
    ] {
        assert!(headers[name].is_object(), "{name}: {headers}");
    }
    assert!(doc["paths"]["/api/v1/tasks/{id}"]["options"].is_object());
    assert!(doc["paths"]["/health/live"]["options"].is_null());

    // Off (no origins): described, but no preflight is documented, as none is answered.
    let off = spawn_app().await;
    let doc = off.get("/openapi.json", None).await.expect(200).clone();
    assert!(
        doc["info"]["description"]
            .as_str()
            .unwrap()
            .contains("worker.cors")
    );
    assert!(doc["paths"]["/api/v1/tasks"]["options"].is_null());
}
