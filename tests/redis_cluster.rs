//! The worker against a Redis Cluster (`redis-cluster://`, three private nodes): the cache,
//! revocation, rate limits and idempotency keys work as against a single server. A cache read
//! spans hash slots (the deployment's epoch and the user's keys), so the client splits it by slot.

mod common;

use common::{PASSWORD, RedisCluster, Session, assert_problem, spawn_app_with, uuid};
use reqwest::Method;
use serde_json::json;

const LIST: &str = "/api/v1/tasks";

#[tokio::test]
async fn cache_revocation_rate_limits_and_idempotency_work_on_a_cluster() {
    let cluster = RedisCluster::spawn().await;
    let url = cluster.url();
    let a = spawn_app_with(|config| config.redis.url = url).await;
    let b = a.spawn_peer().await;
    let ada = a.register("ada@example.com").await;
    let token = ada.token();
    let x_cache = |resp: &common::Resp| resp.header("x-cache").unwrap_or("-").to_owned();

    // Cache: a miss, then hits; a write through one worker is seen by the next read on another.
    let task = a.create_task(token, &json!({"title": "one"})).await;
    assert_eq!(x_cache(&b.get(LIST, token).await), "MISS");
    let hit = b.get(LIST, token).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(hit.body["pagination"]["total"], 1);
    let one = format!("{LIST}/{}", uuid(&task["id"]));
    b.get(&one, token).await.expect(200);
    assert_eq!(x_cache(&b.get(&one, token).await), "HIT");
    a.create_task(token, &json!({"title": "two"})).await;
    let after = b.get(LIST, token).await;
    assert_eq!(x_cache(&after), "MISS");
    assert_eq!(after.body["pagination"]["total"], 2);

    // Rate limits count in the cluster.
    let first: u64 = hit.header("ratelimit-remaining").unwrap().parse().unwrap();
    let later: u64 = b
        .get(LIST, token)
        .await
        .header("ratelimit-remaining")
        .unwrap()
        .parse()
        .unwrap();
    assert!(later < first, "{later} after {first}");

    // Idempotency keys: a repeat is a replay, one task.
    let keyed = || {
        a.send(
            a.request(Method::POST, LIST, token)
                .header("idempotency-key", "cluster-key")
                .json(&json!({"title": "keyed"})),
        )
    };
    let created = keyed().await;
    created.expect(201);
    let replay = keyed().await;
    replay.expect(201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body["id"], created.body["id"]);
    assert_eq!(b.get(LIST, token).await.body["pagination"]["total"], 3);

    // Revocation reaches a cached read.
    let other = Session::from_auth(a.login("ada@example.com", PASSWORD).await.expect(200));
    expect_cached(&b, other.token()).await;
    a.patch(
        "/api/v1/me",
        token,
        &json!({"password": "a brand new password", "currentPassword": PASSWORD}),
    )
    .await
    .expect(200);
    assert_problem(&b.get(LIST, other.token()).await, 401);

    // Nothing of that tripped the breaker.
    for worker in [&a, &b] {
        let ready = worker.get("/health/ready", None).await;
        assert_eq!(ready.body["status"], "ok", "{}", ready.text);
    }
}

async fn expect_cached(app: &common::TestApp, token: &str) {
    app.get(LIST, token).await.expect(200);
    let resp = app.get(LIST, token).await;
    assert_eq!(resp.header("x-cache"), Some("HIT"), "{}", resp.text);
}
