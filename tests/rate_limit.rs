//! Rate limits shared by every worker through Redis: the `RateLimit-*` headers, exact limits under
//! concurrency across two workers, per-IP limits with `X-Forwarded-For`, tiers, the failed-login
//! limit, and switching limits off.

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{PASSWORD, Resp, TestApp, assert_problem, spawn_app, spawn_app_with};
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::json;

const LIST: &str = "/api/v1/tasks";
const HOUR: Duration = Duration::from_secs(3600);

fn number(resp: &Resp, name: &str) -> Option<u64> {
    resp.header(name).map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: {v:?} is not an integer"))
    })
}

/// `RateLimit-Limit` and `RateLimit-Remaining`.
#[track_caller]
fn limit_and_remaining(resp: &Resp) -> (u64, u64) {
    let limit = number(resp, "ratelimit-limit").expect("RateLimit-Limit");
    let remaining = number(resp, "ratelimit-remaining").expect("RateLimit-Remaining");
    (limit, remaining)
}

/// Asserts a 429 problem with `Retry-After` (whole seconds, at least 1, within `most`) and
/// returns it.
#[track_caller]
fn assert_limited(resp: &Resp, most: Duration) -> u64 {
    assert_problem(resp, 429);
    let retry = number(resp, "retry-after").expect("Retry-After on a 429");
    assert!(
        (1..=most.as_secs()).contains(&retry),
        "Retry-After {retry} not within 1..={}",
        most.as_secs()
    );
    retry
}

/// The limiter's windows are aligned to the Unix epoch: when less than `margin` is left of the
/// current one, waits for the next, so that a test's requests all count in one window.
async fn within_one_window(window: Duration, margin: Duration) {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let left = window.as_millis() - since_epoch.as_millis() % window.as_millis();
    if left < margin.as_millis() {
        tokio::time::sleep(Duration::from_millis(left as u64 + 50)).await;
    }
}

/// An anonymous `GET /api/v1/tasks` (401, but counted) with `X-Forwarded-For` when given.
async fn anonymous(app: &TestApp, forwarded_for: Option<&str>) -> Resp {
    let mut request = app.request(Method::GET, LIST, None);
    if let Some(xff) = forwarded_for {
        request = request.header("x-forwarded-for", xff);
    }
    app.send(request).await
}

#[tokio::test]
async fn api_responses_carry_rate_limit_headers_and_probes_do_not() {
    let app = spawn_app().await;
    within_one_window(Duration::from_secs(60), Duration::from_secs(3)).await;
    let registered = app.register_with("ada@example.com", PASSWORD, "Ada").await;
    registered.expect(201);
    // Anonymous: counted against the client address, default 100 a minute.
    assert_eq!(limit_and_remaining(&registered).0, 100);
    let token = registered.body["accessToken"].as_str().unwrap();

    let mut previous = None;
    for _ in 0..3 {
        let resp = app.get(LIST, token).await;
        resp.expect(200);
        let (limit, remaining) = limit_and_remaining(&resp);
        assert_eq!(limit, 1000, "free tier default");
        if let Some(previous) = previous {
            assert_eq!(remaining, previous - 1, "RateLimit-Remaining counts down");
        }
        previous = Some(remaining);
        let reset = number(&resp, "ratelimit-reset").expect("RateLimit-Reset");
        assert!((1..=60).contains(&reset), "RateLimit-Reset {reset}");
        assert!(resp.header("retry-after").is_none());
    }
    // Errors from the API count and say so too.
    let not_found = app
        .get(&format!("{LIST}/{}", uuid::Uuid::nil()), token)
        .await;
    assert_problem(&not_found, 404);
    assert_eq!(limit_and_remaining(&not_found).1, previous.unwrap() - 1);

    for path in ["/health/live", "/health/ready", "/metrics", "/openapi.json"] {
        let resp = app.get(path, None).await;
        resp.expect(200);
        for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
            assert!(resp.header(name).is_none(), "{name} on {path}");
        }
    }
}

/// 500 concurrent requests of one user, spread over two workers: exactly the limit is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_through_two_workers_admit_exactly_the_limit() {
    let a = spawn_app_with(|config| {
        config.rate_limit.free = 100;
        config.rate_limit.window = HOUR;
        // This checks the counting, not the timeout: with the client in the same process, two
        // debug-build workers on two cores take longer than the default 250ms to get to some
        // replies of a 500-request burst, and the limiter would (by design) fail open for them.
        config.redis.command_timeout = Duration::from_secs(5);
    })
    .await;
    let b = a.spawn_peer().await;
    let ada = a.register("ada@example.com").await;
    within_one_window(HOUR, Duration::from_secs(30)).await;

    let responses = join_all((0..500).map(|i| {
        let worker = if i % 2 == 0 { &a } else { &b };
        worker.get(LIST, ada.token())
    }))
    .await;

    let mut remaining = BTreeSet::new();
    let mut refused = 0;
    for resp in &responses {
        match resp.status.as_u16() {
            200 => {
                let (limit, left) = limit_and_remaining(resp);
                assert_eq!(limit, 100);
                assert!(remaining.insert(left), "RateLimit-Remaining {left} twice");
            }
            429 => {
                refused += 1;
                assert_limited(resp, 2 * HOUR);
                assert_eq!(limit_and_remaining(resp), (100, 0));
            }
            other => panic!("status {other}: {}", resp.text),
        }
    }
    assert_eq!(remaining.len(), 100, "admitted");
    assert_eq!(refused, 400);
    // Each admitted request took the next unit of the budget, whichever worker counted it.
    assert_eq!(remaining, (0..100).collect());
    // Both workers now refuse this user.
    assert_limited(&a.get(LIST, ada.token()).await, 2 * HOUR);
    assert_limited(&b.get(LIST, ada.token()).await, 2 * HOUR);
}

#[tokio::test]
async fn anonymous_requests_are_limited_per_client_ip() {
    let app = spawn_app_with(|config| {
        config.rate_limit.anonymous = 3;
        config.rate_limit.window = HOUR;
    })
    .await;
    within_one_window(HOUR, Duration::from_secs(10)).await;

    // The test client connects from loopback, a trusted proxy by default: the client is the
    // right-most X-Forwarded-For entry that is not itself a trusted proxy.
    for _ in 0..3 {
        let resp = anonymous(&app, Some("203.0.113.1")).await;
        assert_problem(&resp, 401);
        assert_eq!(limit_and_remaining(&resp).0, 3);
    }
    assert_limited(&anonymous(&app, Some("203.0.113.1")).await, 2 * HOUR);

    // Another client has its own budget.
    let other = anonymous(&app, Some("203.0.113.2")).await;
    assert_problem(&other, 401);
    assert_eq!(limit_and_remaining(&other), (3, 2));

    // Entries a client prepends do not make it someone else, nor do trusted hops after it.
    for spoofed in [
        "198.51.100.1, 203.0.113.1",
        "10.9.8.7, 198.51.100.2, 203.0.113.1",
        "203.0.113.1, 127.0.0.1",
    ] {
        assert_limited(&anonymous(&app, Some(spoofed)).await, 2 * HOUR);
    }
    // Without the header, the loopback peer itself is the client, with a fresh budget.
    assert_problem(&anonymous(&app, None).await, 401);
}

#[tokio::test]
async fn without_trusted_proxies_forwarded_for_is_ignored() {
    let app = spawn_app_with(|config| {
        config.rate_limit.anonymous = 3;
        config.rate_limit.window = HOUR;
        config.worker.trusted_proxies = Vec::new();
    })
    .await;
    within_one_window(HOUR, Duration::from_secs(10)).await;
    for i in 1..=3 {
        let xff = format!("203.0.113.{i}");
        assert_problem(&anonymous(&app, Some(&xff)).await, 401);
    }
    // Every request counted against 127.0.0.1, whatever it claimed.
    assert_limited(&anonymous(&app, Some("203.0.113.4")).await, 2 * HOUR);
    assert_limited(&anonymous(&app, None).await, 2 * HOUR);
}

#[tokio::test]
async fn each_tier_gets_its_own_limit() {
    let app = spawn_app_with(|config| {
        config.rate_limit.free = 3;
        config.rate_limit.pro = 5;
        config.rate_limit.enterprise = 7;
        config.rate_limit.window = HOUR;
    })
    .await;
    within_one_window(HOUR, Duration::from_secs(10)).await;
    let ada = app.register("ada@example.com").await;
    let first = app.get(LIST, ada.token()).await;
    first.expect(200);
    assert_eq!(limit_and_remaining(&first), (3, 2));

    // Pro in the database; the next sign-in carries the tier.
    sqlx::query("UPDATE users SET tier = 'pro' WHERE id = $1")
        .bind(ada.id)
        .execute(&app.db)
        .await
        .unwrap();
    let login = app.login(&ada.email, PASSWORD).await;
    let pro = login.expect(200)["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(login.body["user"]["tier"], "pro");
    let resp = app.get(LIST, pro.as_str()).await;
    resp.expect(200);
    // The same user's budget: one request already counted.
    assert_eq!(limit_and_remaining(&resp), (5, 3));
    for _ in 0..3 {
        app.get(LIST, pro.as_str()).await.expect(200);
    }
    assert_limited(&app.get(LIST, pro.as_str()).await, 2 * HOUR);
    // Past the free limit, the old free-tier token is refused too.
    assert_limited(&app.get(LIST, ada.token()).await, 2 * HOUR);

    // Enterprise through the admin API, picked up by a token refresh.
    let admin = app.register_admin("root@example.com").await;
    let bob = app.register("bob@example.com").await;
    let patched = app
        .patch(
            &format!("/api/v1/users/{}", bob.id),
            admin.token(),
            &json!({"tier": "enterprise"}),
        )
        .await;
    assert_eq!(patched.expect(200)["tier"], "enterprise");
    let refreshed = app.refresh(&bob.refresh).await;
    let enterprise = refreshed.expect(200)["accessToken"].as_str().unwrap();
    let resp = app.get(LIST, enterprise).await;
    resp.expect(200);
    assert_eq!(limit_and_remaining(&resp), (7, 6));
}

#[tokio::test]
async fn failed_logins_are_limited_per_client_ip_and_email() {
    let app = spawn_app().await;
    for email in ["ada@example.com", "bob@example.com", "cy@example.com"] {
        app.register(email).await;
    }
    let app = &app;
    let fail = |email: &'static str| async move {
        let resp = app.login(email, "wrong password").await;
        assert_problem(&resp, 401);
    };

    for _ in 0..5 {
        fail("ada@example.com").await;
    }
    // Even the right password is refused now, for the whole window (15 minutes by default).
    let refused = app.login("ada@example.com", PASSWORD).await;
    let retry = assert_limited(&refused, Duration::from_secs(15 * 60));
    assert!(
        retry > 60,
        "Retry-After {retry} is the rest of the 15 minute window"
    );
    assert_limited(
        &app.login("ADA@example.com", PASSWORD).await,
        Duration::from_secs(900),
    );

    // Another email from the same address is unaffected.
    fail("bob@example.com").await;
    app.login("bob@example.com", PASSWORD).await.expect(200);
    // So is the same email from another client address.
    let elsewhere = app
        .send(
            app.request(Method::POST, "/api/v1/auth/login", None)
                .header("x-forwarded-for", "203.0.113.7")
                .json(&json!({"email": "ada@example.com", "password": PASSWORD})),
        )
        .await;
    elsewhere.expect(200);

    // A successful sign-in before the limit starts the count again.
    for _ in 0..4 {
        fail("cy@example.com").await;
    }
    app.login("cy@example.com", PASSWORD).await.expect(200);
    for _ in 0..5 {
        fail("cy@example.com").await;
    }
    assert_limited(
        &app.login("cy@example.com", PASSWORD).await,
        Duration::from_secs(900),
    );
}

#[tokio::test]
async fn disabled_limits_admit_everything_without_headers() {
    let app = spawn_app_with(|config| {
        config.rate_limit.enabled = false;
        config.rate_limit.anonymous = 2;
        config.rate_limit.free = 2;
        config.rate_limit.login_attempts = 1;
    })
    .await;
    let ada = app.register("ada@example.com").await;
    for _ in 0..6 {
        let resp = app.get(LIST, ada.token()).await;
        resp.expect(200);
        assert!(resp.header("ratelimit-limit").is_none());
        assert!(resp.header("ratelimit-remaining").is_none());
        assert_problem(&anonymous(&app, None).await, 401);
    }
    for _ in 0..3 {
        assert_problem(&app.login(&ada.email, "wrong password").await, 401);
    }
    app.login(&ada.email, PASSWORD).await.expect(200);
}
