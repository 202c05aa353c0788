//! `/api/v1/auth/*`: registration, login, refresh-token rotation and re-use detection, logout,
//! and how access tokens are checked.

mod common;

use std::sync::Arc;

use common::{PASSWORD, Session, assert_field_error, assert_problem, keys, spawn_app};
use serde_json::json;

const USER_KEYS: [&str; 7] = [
    "createdAt",
    "email",
    "id",
    "name",
    "role",
    "tier",
    "updatedAt",
];

#[tokio::test]
async fn register_returns_the_user_and_a_token_pair() {
    let app = spawn_app().await;
    let resp = app
        .register_with(" Ada@Example.COM ", "password123", "Ada Lovelace")
        .await;
    let body = resp.expect(201);
    assert_eq!(
        keys(body),
        [
            "accessToken",
            "expiresIn",
            "refreshToken",
            "tokenType",
            "user"
        ]
    );
    assert_eq!(body["tokenType"], "Bearer");
    assert_eq!(body["expiresIn"], 900);
    let user = &body["user"];
    assert_eq!(keys(user), USER_KEYS);
    assert_eq!(user["email"], "ada@example.com");
    assert_eq!(user["name"], "Ada Lovelace");
    assert_eq!(user["role"], "user");
    assert_eq!(user["tier"], "free");
    assert!(!resp.text.contains("password"), "{}", resp.text);
    assert!(!resp.text.contains("$argon2"), "{}", resp.text);

    let session = Session::from_auth(body);
    let me = app.get("/api/v1/me", session.token()).await;
    assert_eq!(me.expect(200), user);
}

#[tokio::test]
async fn duplicate_emails_conflict_regardless_of_case() {
    let app = spawn_app().await;
    app.register("ada@example.com").await;
    let resp = app
        .register_with("ADA@example.com", "password123", "Other")
        .await;
    assert_problem(&resp, 409);
}

#[tokio::test]
async fn register_validates_every_field_at_once() {
    let app = spawn_app().await;
    let resp = app.register_with("not-an-email", "short", "").await;
    let body = assert_problem(&resp, 422);
    let mut fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    fields.sort();
    assert_eq!(fields, ["email", "name", "password"]);

    let resp = app
        .post(
            "/api/v1/auth/register",
            None,
            &json!({"email": "a@b.c", "password": "password123"}),
        )
        .await;
    assert_field_error(&resp, 422, "name");
    let resp = app
        .post(
            "/api/v1/auth/register",
            None,
            &json!({"email": "a@b.c", "password": "password123", "name": "A", "role": "admin"}),
        )
        .await;
    assert_field_error(&resp, 422, "role");
    let resp = app
        .post(
            "/api/v1/auth/register",
            None,
            &json!({"email": 42, "password": "password123", "name": "A"}),
        )
        .await;
    assert_field_error(&resp, 422, "email");
}

#[tokio::test]
async fn login_works_and_bad_credentials_get_one_generic_answer() {
    let app = spawn_app().await;
    let registered = app.register("ada@example.com").await;
    let resp = app.login("ADA@example.com", PASSWORD).await;
    let session = Session::from_auth(resp.expect(200));
    assert_eq!(session.id, registered.id);
    assert_eq!(resp.body["tokenType"], "Bearer");
    app.get("/api/v1/me", session.token()).await.expect(200);

    let wrong_password = app.login("ada@example.com", "wrong password").await;
    let unknown_email = app.login("nobody@example.com", PASSWORD).await;
    let invalid_email = app.login("not an email", PASSWORD).await;
    let a = assert_problem(&wrong_password, 401);
    let b = assert_problem(&unknown_email, 401);
    let c = assert_problem(&invalid_email, 401);
    for field in ["type", "title", "detail"] {
        assert_eq!(a[field], b[field], "{field}");
        assert_eq!(a[field], c[field], "{field}");
    }
    let resp = app
        .post("/api/v1/auth/login", None, &json!({"email": "a@b.c"}))
        .await;
    assert_field_error(&resp, 422, "password");
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_whole_family() {
    let app = spawn_app().await;
    let first = app.register("ada@example.com").await;

    let resp = app.refresh(&first.refresh).await;
    let second = Session::from_auth(resp.expect(200));
    assert_eq!(second.id, first.id);
    assert_ne!(second.refresh, first.refresh);
    app.get("/api/v1/me", second.token()).await.expect(200);

    let resp = app.refresh(&second.refresh).await;
    let third = Session::from_auth(resp.expect(200));

    // The rotated token is refused, and presenting it revokes the newest token of its family.
    let reused = app.refresh(&first.refresh).await;
    assert_problem(&reused, 401);
    assert_problem(&app.refresh(&third.refresh).await, 401);
    assert_problem(&app.refresh(&second.refresh).await, 401);

    // Another sign-in of the same user is another family and keeps working.
    let other = Session::from_auth(app.login("ada@example.com", PASSWORD).await.expect(200));
    app.refresh(&other.refresh).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_use_of_one_refresh_token_succeeds_at_most_once() {
    let app = Arc::new(spawn_app().await);
    let session = app.register("ada@example.com").await;
    let attempts = (0..5).map(|_| {
        let app = app.clone();
        let token = session.refresh.clone();
        tokio::spawn(async move { app.refresh(&token).await.status.as_u16() })
    });
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 401),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn unknown_and_malformed_refresh_tokens_are_401_or_422() {
    let app = spawn_app().await;
    assert_problem(&app.refresh("no-such-token").await, 401);
    assert_problem(&app.refresh("").await, 401);
    let resp = app.post("/api/v1/auth/refresh", None, &json!({})).await;
    assert_field_error(&resp, 422, "refreshToken");
}

#[tokio::test]
async fn expired_refresh_tokens_are_refused() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    sqlx::query(
        "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE user_id = $1",
    )
    .bind(session.id)
    .execute(&app.db)
    .await
    .unwrap();
    assert_problem(&app.refresh(&session.refresh).await, 401);
}

#[tokio::test]
async fn logout_ends_the_refresh_token_family() {
    let app = spawn_app().await;
    let first = app.register("ada@example.com").await;
    let second = Session::from_auth(app.refresh(&first.refresh).await.expect(200));
    let resp = app
        .post(
            "/api/v1/auth/logout",
            None,
            &json!({"refreshToken": second.refresh}),
        )
        .await;
    assert_eq!(resp.status, 204, "{}", resp.text);
    assert!(resp.text.is_empty());
    assert_problem(&app.refresh(&second.refresh).await, 401);

    let resp = app.post("/api/v1/auth/logout", None, &json!({})).await;
    assert_field_error(&resp, 422, "refreshToken");
    // Logging out with an unknown token says nothing about it.
    let resp = app
        .post(
            "/api/v1/auth/logout",
            None,
            &json!({"refreshToken": "whatever"}),
        )
        .await;
    assert_eq!(resp.status, 204);
}

/// Signs claims with the deployment's JWT secret, as only the server should.
fn sign(secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A worker remembers tokens it has verified (their signature is not checked again on every
/// request); one it has accepted must still stop working the moment it expires.
#[tokio::test]
async fn an_accepted_access_token_is_refused_once_it_expires() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let secret: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = 'jwt_secret'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    // Past its `exp` by 3 s, inside the 5 s leeway for clock skew: accepted, for now.
    let exp = now - 3;
    let claims = json!({"sub": session.id, "ver": 0, "role": "user", "tier": "free", "iat": now - 60, "exp": exp});
    let token = sign(secret.as_bytes(), claims);
    app.get("/api/v1/me", token.as_str()).await.expect(200);
    app.get("/api/v1/me", token.as_str()).await.expect(200);
    // Once the leeway is over too, the same token is refused.
    while chrono::Utc::now().timestamp() <= exp + 5 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let body = assert_problem(&app.get("/api/v1/me", token.as_str()).await, 401).clone();
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
}

#[tokio::test]
async fn expired_forged_and_malformed_access_tokens_are_401() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let secret: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = 'jwt_secret'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    let claims = |iat: i64, exp: i64| json!({"sub": session.id, "ver": 0, "role": "admin", "tier": "free", "iat": iat, "exp": exp});

    // A token signed like the server's is accepted (the check below is not vacuous) ...
    let valid = sign(secret.as_bytes(), claims(now, now + 60));
    app.get("/api/v1/me", valid.as_str()).await.expect(200);
    // ... but not once expired, nor signed with another key.
    let expired = sign(secret.as_bytes(), claims(now - 7200, now - 3600));
    let body = assert_problem(&app.get("/api/v1/me", expired.as_str()).await, 401).clone();
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    let forged = sign(
        b"some other secret that is long enough",
        claims(now, now + 60),
    );
    assert_problem(&app.get("/api/v1/me", forged.as_str()).await, 401);

    // One character of the signature changed.
    let mut tampered: Vec<char> = session.access.chars().collect();
    let at = tampered.len() - 10;
    tampered[at] = if tampered[at] == 'x' { 'y' } else { 'x' };
    let tampered: String = tampered.into_iter().collect();
    for header in [
        format!("Bearer {tampered}"),
        format!("Basic {}", session.access),
        session.access.clone(),
        "Bearer".to_owned(),
    ] {
        let resp = app
            .send(
                app.client
                    .get(app.url("/api/v1/me"))
                    .header("Authorization", header),
            )
            .await;
        assert_problem(&resp, 401);
    }
    // The scheme is case-insensitive.
    let resp = app
        .send(
            app.client
                .get(app.url("/api/v1/me"))
                .header("Authorization", format!("bearer {}", session.access)),
        )
        .await;
    resp.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_of_one_email_create_one_user() {
    let app = Arc::new(spawn_app().await);
    let attempts: Vec<_> = (0..20)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                app.register_with("race@example.com", "password123", &format!("Racer {i}"))
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for attempt in attempts {
        let resp = attempt.await.unwrap();
        match resp.status.as_u16() {
            201 => created += 1,
            _ => {
                assert_problem(&resp, 409);
            }
        }
    }
    assert_eq!(created, 1);
    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM users WHERE email = 'race@example.com'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(users, 1);
}
