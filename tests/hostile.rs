//! Hostile and careless clients against one worker: what a handful of cheap requests must not
//! be able to do (exhaust the pool, outrun the login limiter, revive a revoked token, read
//! credentials back from Redis, push the server into a 5xx).

mod common;

use std::{sync::Arc, time::Duration};

use common::{PASSWORD, Resp, Session, TestApp, assert_problem, spawn_app, spawn_app_with};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// No request holds one pooled connection while it waits for a second: concurrent refreshes
/// on a two-connection pool all succeed, and readiness stays 200 while they run.
#[tokio::test]
async fn concurrent_refreshes_do_not_exhaust_a_small_pool() {
    let app = Arc::new(
        spawn_app_with(|c| {
            c.database.max_connections = 2;
            c.database.acquire_timeout = Duration::from_secs(2);
        })
        .await,
    );
    let session = app.register("pool@example.com").await;
    let mut tokens = vec![session.refresh.clone()];
    for _ in 0..7 {
        let resp = app.login("pool@example.com", PASSWORD).await;
        tokens.push(Session::from_auth(resp.expect(200)).refresh);
    }
    let refreshes: Vec<_> = tokens
        .iter()
        .map(|token| {
            let (app, token) = (app.clone(), token.clone());
            tokio::spawn(async move { app.refresh(&token).await })
        })
        .collect();
    let ready = {
        let app = app.clone();
        tokio::spawn(async move { app.get("/health/ready", None).await })
    };
    for refresh in refreshes {
        refresh.await.unwrap().expect(200);
    }
    ready.await.unwrap().expect(200);

    // One token presented eight times at once: exactly one rotation, the rest are re-use.
    let token =
        Session::from_auth(app.login("pool@example.com", PASSWORD).await.expect(200)).refresh;
    let same: Vec<_> = (0..8)
        .map(|_| {
            let (app, token) = (app.clone(), token.clone());
            tokio::spawn(async move { app.refresh(&token).await })
        })
        .collect();
    let mut ok = 0;
    for resp in same {
        let resp = resp.await.unwrap();
        match resp.status.as_u16() {
            200 => ok += 1,
            _ => {
                assert_problem(&resp, 401);
            }
        }
    }
    assert_eq!(
        ok, 1,
        "exactly one of eight concurrent uses rotates the token"
    );
    app.get("/health/ready", None).await.expect(200);
}

/// The failed-login limit is reserved before argon2 runs: of 20 concurrent wrong passwords for
/// one email at most `login_attempts` (5) are checked, the rest are refused with 429, and so is
/// the right password afterwards.
#[tokio::test]
async fn concurrent_wrong_passwords_cannot_outrun_the_login_limit() {
    let app = Arc::new(spawn_app().await);
    app.register("race@example.com").await;
    let guesses: Vec<_> = (0..20)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                app.login("race@example.com", &format!("wrong guess {i}"))
                    .await
            })
        })
        .collect();
    let (mut checked, mut limited) = (0, 0);
    for guess in guesses {
        let resp = guess.await.unwrap();
        match resp.status.as_u16() {
            401 => checked += 1,
            429 => limited += 1,
            other => panic!("unexpected {other}: {}", resp.text),
        }
    }
    assert!(
        checked <= 5,
        "{checked} of 20 concurrent guesses were checked (limit 5)"
    );
    assert_eq!(checked + limited, 20);
    assert_problem(&app.login("race@example.com", PASSWORD).await, 429);
}

/// `currentPassword` on `PATCH /me` is limited like a login: a stolen access token cannot be
/// used to guess the password behind it.
#[tokio::test]
async fn current_password_guesses_are_limited() {
    let app = spawn_app().await;
    let ada = app.register("guess@example.com").await;
    let guess =
        |i: usize| json!({"password": "a new password 1", "currentPassword": format!("guess {i}")});
    for i in 0..5 {
        let resp = app.patch("/api/v1/me", ada.token(), &guess(i)).await;
        assert_problem(&resp, 422);
        assert!(resp.text.contains("currentPassword"), "{}", resp.text);
    }
    let resp = app.patch("/api/v1/me", ada.token(), &guess(5)).await;
    assert_problem(&resp, 429);
    assert!(resp.header("retry-after").is_some());
    // Even the right one waits: nothing is checked while the limit holds.
    let right = json!({"password": "a new password 1", "currentPassword": PASSWORD});
    assert_problem(&app.patch("/api/v1/me", ada.token(), &right).await, 429);
    app.login("guess@example.com", PASSWORD).await.expect(200);
}

/// Deletes `user`'s published token version from Redis, as eviction or a restart without
/// persistence would.
async fn forget_token_version(app: &TestApp, user: Uuid) {
    let key = app.state.redis.key(&format!("tokver:{{{user}}}"));
    app.state.redis.del(&key).await.unwrap();
    assert_eq!(app.state.redis.get_i64(&key).await.unwrap(), None);
}

/// A revocation holds without its Redis key: after a password change and the loss of the
/// user's key, the old access token is still refused (the version is read from PostgreSQL and
/// cached again), while the new one works.
#[tokio::test]
async fn revocation_survives_the_loss_of_its_redis_key() {
    let app = spawn_app().await;
    let ada = app.register("revoke@example.com").await;
    app.get("/api/v1/me", ada.token()).await.expect(200);
    let change = json!({"password": "a new password 1", "currentPassword": PASSWORD});
    app.patch("/api/v1/me", ada.token(), &change)
        .await
        .expect(200);
    forget_token_version(&app, ada.id).await;
    for path in ["/api/v1/me", "/api/v1/tasks", "/api/v1/categories"] {
        assert_problem(&app.get(path, ada.token()).await, 401);
    }
    // Filled again from PostgreSQL.
    let key = app.state.redis.key(&format!("tokver:{{{}}}", ada.id));
    assert!(app.state.redis.get_i64(&key).await.unwrap().is_some());
    let fresh = Session::from_auth(
        app.login("revoke@example.com", "a new password 1")
            .await
            .expect(200),
    );
    app.get("/api/v1/tasks", fresh.token()).await.expect(200);
}

/// An account deleted while its access token lives, with the revocation gone from Redis:
/// every route answers 401, never a 5xx from the missing owner.
#[tokio::test]
async fn a_deleted_owner_is_401_everywhere() {
    let app = spawn_app().await;
    let ada = app.register("gone@example.com").await;
    app.delete("/api/v1/me", ada.token()).await.expect(204);
    forget_token_version(&app, ada.id).await;
    let task = json!({"title": "orphan"});
    assert_problem(&app.post("/api/v1/tasks", ada.token(), &task).await, 401);
    forget_token_version(&app, ada.id).await;
    let category = json!({"name": "orphan"});
    assert_problem(
        &app.post("/api/v1/categories", ada.token(), &category).await,
        401,
    );
    forget_token_version(&app, ada.id).await;
    assert_problem(&app.get("/api/v1/tasks", ada.token()).await, 401);
    assert_problem(&app.get("/api/v1/me", ada.token()).await, 401);
}

/// Every value under this app's Redis prefix, as text.
async fn redis_values(app: &TestApp) -> Vec<(String, String)> {
    use fred::prelude::*;
    let redis = Builder::from_config(Config::from_url(&app.state.config.redis.url).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    let pattern = format!("{}*", app.redis_prefix);
    let (mut cursor, mut keys) = ("0".to_owned(), Vec::<String>::new());
    loop {
        let (next, page): (String, Vec<String>) = redis
            .scan_page(cursor, pattern.clone(), Some(1_000), None)
            .await
            .unwrap();
        keys.extend(page);
        if next == "0" {
            break;
        }
        cursor = next;
    }
    let mut values = Vec::new();
    for key in keys {
        let kind: String = redis.r#type(&key).await.unwrap();
        if kind == "string" {
            let value: Option<Vec<u8>> = redis.get(&key).await.unwrap();
            values.push((
                key,
                String::from_utf8_lossy(&value.unwrap_or_default()).into_owned(),
            ));
        }
    }
    values
}

/// Auth routes ignore `Idempotency-Key`: a keyed refresh sent twice is a re-use (401, and the
/// family is revoked), and no credential is kept in Redis.
#[tokio::test]
async fn keyed_auth_requests_are_not_stored_or_replayed() {
    let app = spawn_app().await;
    let keyed = |path: &str, body: Value| {
        app.request(Method::POST, path, None)
            .header("idempotency-key", "auth-key-1")
            .json(&body)
    };
    let registered = app
        .send(keyed(
            "/api/v1/auth/register",
            json!({"email": "keyed@example.com", "password": PASSWORD, "name": "K"}),
        ))
        .await;
    let session = Session::from_auth(registered.expect(201));
    let login = app
        .send(keyed(
            "/api/v1/auth/login",
            json!({"email": "keyed@example.com", "password": PASSWORD}),
        ))
        .await;
    let login = Session::from_auth(login.expect(200));
    let body = json!({"refreshToken": login.refresh});
    let first = app.send(keyed("/api/v1/auth/refresh", body.clone())).await;
    let rotated = Session::from_auth(first.expect(200));
    let second = app.send(keyed("/api/v1/auth/refresh", body)).await;
    assert_problem(&second, 401);
    assert!(second.header("idempotent-replayed").is_none());
    // Re-use revoked the family: the pair the first refresh handed out is dead too.
    assert_problem(&app.refresh(&rotated.refresh).await, 401);

    let secrets = [
        &session.access,
        &session.refresh,
        &login.access,
        &login.refresh,
        &rotated.access,
        &rotated.refresh,
    ];
    for (key, value) in redis_values(&app).await {
        for secret in secrets {
            assert!(!value.contains(secret.as_str()), "{key} holds a token");
        }
    }
}

/// Timestamps outside years 0001–9999 are refused naming the field (422 in a body, 400 in a
/// query); every accepted one round-trips through the server's own cursors.
#[tokio::test]
async fn timestamps_out_of_range_are_422_and_cursors_round_trip() {
    let app = spawn_app().await;
    let ada = app.register("dates@example.com").await;
    for due in [
        "-4714-11-24T00:00:00Z",
        "-200000-01-01T00:00:00Z",
        "+200000-01-01T00:00:00Z",
        "10000-01-01T00:00:00Z",
    ] {
        let resp = app
            .post(
                "/api/v1/tasks",
                ada.token(),
                &json!({"title": "t", "dueAt": due}),
            )
            .await;
        assert_problem(&resp, 422);
        assert!(resp.text.contains("dueAt"), "{due}: {}", resp.text);
        for param in ["dueBefore", "dueAfter"] {
            let resp = app
                .get(
                    &format!("/api/v1/tasks?{param}={}", due.replace('+', "%2B")),
                    ada.token(),
                )
                .await;
            // A malformed query parameter is a 400 (docs/contract.md §4), a bad body field a 422.
            assert_problem(&resp, 400);
            assert!(resp.text.contains(param), "{}", resp.text);
        }
    }
    // The extremes that are allowed, sorted by due date across pages.
    for due in [
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999Z",
        "2026-01-01T00:00:00Z",
    ] {
        app.post(
            "/api/v1/tasks",
            ada.token(),
            &json!({"title": due, "dueAt": due}),
        )
        .await
        .expect(201);
    }
    for sort in ["dueAt", "-dueAt"] {
        let mut seen = Vec::new();
        let mut cursor = String::new();
        loop {
            let path = format!("/api/v1/tasks?sort={sort}&limit=1&cursor={cursor}");
            let resp: Resp = app.get(&path, ada.token()).await;
            let page = resp.expect(200).clone();
            for task in page["data"].as_array().unwrap() {
                seen.push(task["title"].as_str().unwrap().to_owned());
            }
            match page["pagination"]["nextCursor"].as_str() {
                Some(next) => cursor = next.to_owned(),
                None => break,
            }
            assert!(seen.len() <= 3, "{sort}: the walk does not end: {seen:?}");
        }
        assert_eq!(seen.len(), 3, "{sort}: {seen:?}");
    }
}

/// Reads `stream` to its end; panics if it is still open after `most`. How long it took.
async fn closed_within(mut stream: impl tokio::io::AsyncRead + Unpin, most: Duration) -> Duration {
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let read = tokio::time::timeout(most, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "connection still open after {most:?}");
    started.elapsed()
}

/// The worker's own server closes a connection that never finishes its headers within
/// `worker.header_read_timeout`, and one left idle past `worker.idle_timeout`.
#[tokio::test]
async fn worker_connections_have_timers() {
    let app = spawn_app_with(|c| {
        c.worker.header_read_timeout = Duration::from_secs(1);
        c.worker.idle_timeout = Duration::from_secs(2);
    })
    .await;
    // Headers trickled a byte every 200 ms, never finished: never idle, yet closed.
    let slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (reader, mut writer) = slow.into_split();
    let trickle = tokio::spawn(async move {
        for byte in b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
            .take(60)
        {
            if writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let took = closed_within(reader, Duration::from_secs(8)).await;
    trickle.abort();
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");

    // A finished request, then silence.
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let took = closed_within(idle, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");

    // Connected and never a byte.
    let silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    closed_within(silent, Duration::from_secs(10)).await;
}
