//! Redis going away under running workers (a private `redis-server`, killed or frozen mid-test):
//! the API keeps answering from PostgreSQL, fast once the circuit breaker is open, and returns
//! to normal by itself when Redis is back, without serving anything stale.

mod common;

use std::time::{Duration, Instant};

use common::{PASSWORD, RedisServer, Resp, Session, TestApp, assert_problem, spawn_app_with, uuid};
use reqwest::Method;
use serde_json::{Value, json};
use taskd::config::Config;

const LIST: &str = "/api/v1/tasks";
/// `redis.command_timeout` of these tests.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
/// How long any request may take while Redis is down: normal latency (generously) plus the
/// Redis timeouts paid before the breaker opens.
const OUTAGE_LATENCY: Duration = Duration::from_secs(1);
/// How soon after Redis is back everything must be normal again.
const RECOVERY: Duration = Duration::from_secs(5);

fn outage_config(redis: &RedisServer) -> impl FnOnce(&mut Config) {
    let url = redis.url();
    move |config| {
        config.redis.url = url;
        config.redis.command_timeout = COMMAND_TIMEOUT;
        config.redis.breaker_cooldown = Duration::from_millis(300);
    }
}

/// Sends a request during an outage and checks what every answer then must be: not a 5xx, and
/// quick.
async fn during_outage(request: impl Future<Output = Resp>) -> Resp {
    let started = Instant::now();
    let resp = request.await;
    let elapsed = started.elapsed();
    assert!(
        resp.status.as_u16() < 500,
        "{} during the outage: {}",
        resp.status,
        resp.text
    );
    assert!(elapsed < OUTAGE_LATENCY, "answered in {elapsed:?}");
    resp
}

fn x_cache(resp: &Resp) -> &str {
    resp.header("x-cache").unwrap_or("-")
}

fn titles(body: &Value) -> Vec<&str> {
    let mut titles: Vec<&str> = body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data in {body}"))
        .iter()
        .map(|t| t["title"].as_str().unwrap())
        .collect();
    titles.sort();
    titles
}

fn has_rate_limit_headers(resp: &Resp) -> bool {
    resp.header("ratelimit-limit").is_some()
}

async fn readiness(app: &TestApp) -> String {
    let resp = app.get("/health/ready", None).await;
    let body = resp.expect(200);
    assert_eq!(body["checks"]["database"]["status"], "ok");
    body["status"].as_str().unwrap().to_owned()
}

/// Polls until readiness says `ok`, within [`RECOVERY`] of `since`.
async fn until_ready(app: &TestApp, since: Instant) {
    while readiness(app).await != "ok" {
        assert!(
            since.elapsed() < RECOVERY,
            "readiness not ok {RECOVERY:?} after recovery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the listing through `app` until it is a cache HIT again (within [`RECOVERY`] of
/// `since`); returns the outcomes seen and the first listing that came through the cache (MISS
/// or HIT) rather than around it (BYPASS).
async fn until_cached(app: &TestApp, session: &Session, since: Instant) -> (Vec<String>, Resp) {
    let mut outcomes = Vec::new();
    let mut first_cached = None;
    loop {
        let resp = app.get(LIST, session.token()).await;
        resp.expect(200);
        let outcome = x_cache(&resp).to_owned();
        outcomes.push(outcome.clone());
        let hit = outcome == "HIT";
        if outcome != "BYPASS" && first_cached.is_none() {
            first_cached = Some(resp);
        }
        if hit {
            return (outcomes, first_cached.unwrap());
        }
        assert!(
            since.elapsed() < RECOVERY,
            "no cache HIT {RECOVERY:?} after Redis came back: {outcomes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_api_keeps_answering_without_redis_and_recovers_by_itself() {
    let mut redis = RedisServer::spawn().await;
    let a = spawn_app_with(outage_config(&redis)).await;
    let b = a.spawn_peer().await;
    let ada = a.register("ada@example.com").await;
    let before = a
        .create_task(ada.token(), &json!({"title": "before"}))
        .await;
    a.get(LIST, ada.token()).await;
    let cached = b.get(LIST, ada.token()).await;
    assert_eq!(x_cache(&cached), "HIT");
    assert!(has_rate_limit_headers(&cached));
    assert_eq!(readiness(&a).await, "ok");

    redis.kill();

    // Reads come from PostgreSQL, around the cache, without rate-limit headers (fail open).
    let list = during_outage(a.get(LIST, ada.token())).await;
    assert_eq!(x_cache(&list), "BYPASS");
    assert!(!has_rate_limit_headers(&list), "{:?}", list.headers);
    assert_eq!(titles(&list.body), ["before"]);
    // Writes work and are visible at once, on every worker.
    let during = during_outage(a.post(LIST, ada.token(), &json!({"title": "during"}))).await;
    during.expect(201);
    let renamed = during_outage(a.patch(
        &format!("{LIST}/{}", uuid(&before["id"])),
        ada.token(),
        &json!({"title": "before, renamed"}),
    ))
    .await;
    renamed.expect(200);
    let keyed = during_outage(
        a.send(
            a.request(Method::POST, LIST, ada.token())
                .header("idempotency-key", "during-the-outage")
                .json(&json!({"title": "keyed"})),
        ),
    )
    .await;
    keyed.expect(201);
    for worker in [&a, &b] {
        let list = during_outage(worker.get(LIST, ada.token())).await;
        assert_eq!(x_cache(&list), "BYPASS");
        assert_eq!(titles(&list.body), ["before, renamed", "during", "keyed"]);
        let one =
            during_outage(worker.get(&format!("{LIST}/{}", uuid(&during.body["id"])), ada.token()))
                .await;
        assert_eq!(x_cache(&one), "BYPASS");
        assert_eq!(one.body["title"], "during");
        // Probes answer too: Redis down only degrades readiness.
        let ready = during_outage(worker.get("/health/ready", None)).await;
        assert_eq!(ready.body["status"], "degraded");
        assert_eq!(ready.body["checks"]["redis"]["status"], "down");
        during_outage(worker.get("/health/live", None))
            .await
            .expect(200);
    }

    // Revocation still works: without Redis the token version comes from PostgreSQL.
    let bob = a.register("bob@example.com").await;
    b.get(LIST, bob.token()).await.expect(200);
    during_outage(a.patch(
        "/api/v1/me",
        bob.token(),
        &json!({"password": "a brand new password", "currentPassword": PASSWORD}),
    ))
    .await
    .expect(200);
    for worker in [&a, &b] {
        assert_problem(&during_outage(worker.get(LIST, bob.token())).await, 401);
    }

    // With the breaker open, requests do not wait for Redis: only an occasional probe does.
    let batch = 20;
    let mut fast = 0;
    let started = Instant::now();
    for _ in 0..batch {
        let requested = Instant::now();
        let list = during_outage(a.get(LIST, ada.token())).await;
        assert_eq!(x_cache(&list), "BYPASS");
        if requested.elapsed() < COMMAND_TIMEOUT {
            fast += 1;
        }
    }
    let elapsed = started.elapsed();
    assert!(
        fast >= batch - 5,
        "{fast} of {batch} requests answered within the Redis timeout ({elapsed:?} in all)"
    );
    assert!(
        elapsed < COMMAND_TIMEOUT * batch / 2,
        "{batch} requests took {elapsed:?}"
    );

    // Redis comes back on the same port: each worker finds it by itself.
    redis.start().await;
    let back = Instant::now();
    for (i, worker) in [&a, &b].into_iter().enumerate() {
        let (outcomes, first) = until_cached(worker, &ada, back).await;
        // The writes of the outage, whose invalidations never reached Redis, are there.
        assert_eq!(
            titles(&first.body),
            ["before, renamed", "during", "keyed"],
            "{outcomes:?}"
        );
        if i == 0 {
            // The first worker back filled the cache again: a miss, then the hit.
            assert!(outcomes.iter().any(|o| o == "MISS"), "{outcomes:?}");
        }
        until_ready(worker, back).await;
        let limited = worker.get(LIST, ada.token()).await;
        assert!(has_rate_limit_headers(&limited), "rate limits are back");
    }
    // And the keys of idempotent requests are kept again.
    let keyed = |key: &'static str| {
        a.send(
            a.request(Method::POST, LIST, ada.token())
                .header("idempotency-key", key)
                .json(&json!({"title": "after"})),
        )
    };
    keyed("after-the-outage").await.expect(201);
    let replay = keyed("after-the-outage").await;
    replay.expect(201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
}

/// When Redis dies its connections drop, and that alone opens the breaker: no request pays
/// a command timeout, not even the first ones (here the timeout is long enough to tell), and
/// the recovery probe runs in the background, never in a request.
#[tokio::test]
async fn a_dead_redis_costs_no_request_a_timeout() {
    let mut redis = RedisServer::spawn().await;
    let long = Duration::from_secs(3);
    let app = spawn_app_with(|config| {
        outage_config(&redis)(config);
        config.redis.command_timeout = long;
    })
    .await;
    let ada = app.register("ada@example.com").await;
    app.get(LIST, ada.token()).await.expect(200);
    assert_eq!(x_cache(&app.get(LIST, ada.token()).await), "HIT");

    redis.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    // Long enough for several probes (breaker_cooldown is 300 ms here).
    while started.elapsed() < Duration::from_millis(1500) {
        let sent = Instant::now();
        let resp = app.get(LIST, ada.token()).await;
        resp.expect(200);
        assert_eq!(x_cache(&resp), "BYPASS");
        slowest = slowest.max(sent.elapsed());
    }
    assert!(
        slowest < long / 3,
        "a request waited {slowest:?} on a dead Redis"
    );
}

/// Redis freezes (its data survives) while a worker writes: the invalidation cannot reach it.
/// When Redis answers again, no worker may serve the entry cached before the write.
#[tokio::test]
async fn an_invalidation_missed_during_an_outage_serves_nothing_stale_afterwards() {
    let redis = RedisServer::spawn().await;
    let a = spawn_app_with(|config| {
        outage_config(&redis)(config);
        // No probe while frozen: the write's invalidation is skipped, not just delayed (a
        // command sent to a frozen Redis still runs when it wakes up). Readiness checks probe
        // regardless, and close the breaker when Redis answers again.
        config.redis.breaker_cooldown = Duration::from_secs(30);
    })
    .await;
    let b = a.spawn_peer().await;
    let ada = a.register("ada@example.com").await;
    let task = a.create_task(ada.token(), &json!({"title": "old"})).await;
    for worker in [&a, &b] {
        worker.get(LIST, ada.token()).await;
        assert_eq!(x_cache(&worker.get(LIST, ada.token()).await), "HIT");
    }

    redis.pause();
    // Both workers serve reads around Redis until their breakers open.
    for worker in [&a, &b] {
        while !worker.state.redis.is_open() {
            let list = during_outage(worker.get(LIST, ada.token())).await;
            assert_eq!(titles(&list.body), ["old"]);
        }
    }
    let patched = during_outage(a.patch(
        &format!("{LIST}/{}", uuid(&task["id"])),
        ada.token(),
        &json!({"title": "new"}),
    ))
    .await;
    patched.expect(200);
    for worker in [&a, &b] {
        let list = during_outage(worker.get(LIST, ada.token())).await;
        assert_eq!(x_cache(&list), "BYPASS");
        assert_eq!(titles(&list.body), ["new"]);
    }

    redis.resume();
    let back = Instant::now();
    // The worker that did not write, first.
    for worker in [&b, &a] {
        until_ready(worker, back).await;
        let (outcomes, first) = until_cached(worker, &ada, back).await;
        assert_eq!(titles(&first.body), ["new"], "{outcomes:?}");
        let hit = worker.get(LIST, ada.token()).await;
        assert_eq!(titles(&hit.body), ["new"]);
    }
}

#[tokio::test]
async fn without_fail_open_redis_down_is_503_for_the_api() {
    let mut redis = RedisServer::spawn().await;
    let strict = spawn_app_with(|config| {
        outage_config(&redis)(config);
        config.rate_limit.fail_open = false;
    })
    .await;
    // Only the idempotency guarantee is strict here.
    let keys_only = strict
        .spawn_peer_with(|config| {
            config.rate_limit.enabled = false;
            config.rate_limit.fail_open = true;
            config.idempotency.fail_open = false;
        })
        .await;
    let ada = strict.register("ada@example.com").await;
    strict.get(LIST, ada.token()).await.expect(200);

    redis.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let resp = strict.get(LIST, ada.token()).await;
        assert!(started.elapsed() < OUTAGE_LATENCY);
        assert_problem(&resp, 503);
        assert!(resp.header("retry-after").is_some());
        assert_problem(&strict.get(LIST, None).await, 503);
        assert_problem(
            &strict
                .register_with("bob@example.com", "password123", "Bob")
                .await,
            503,
        );
    }
    strict.get("/health/live", None).await.expect(200);
    assert_eq!(readiness(&strict).await, "degraded");

    let keyed = keys_only
        .send(
            keys_only
                .request(Method::POST, LIST, ada.token())
                .header("idempotency-key", "k")
                .json(&json!({"title": "keyed"})),
        )
        .await;
    assert_problem(&keyed, 503);
    keys_only
        .post(LIST, ada.token(), &json!({"title": "unkeyed"}))
        .await
        .expect(201);

    redis.start().await;
    let back = Instant::now();
    loop {
        let resp = strict.get(LIST, ada.token()).await;
        if resp.status == 200 {
            assert!(has_rate_limit_headers(&resp));
            assert_eq!(titles(&resp.body), ["unkeyed"]);
            break;
        }
        assert_problem(&resp, 503);
        assert!(
            back.elapsed() < RECOVERY,
            "still 503 {RECOVERY:?} after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
