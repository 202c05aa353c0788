//! The worker behind Redis Sentinel (`redis-sentinel://`: a private primary, replica and
//! Sentinel): it finds the primary through the Sentinel, and when the primary dies and the
//! Sentinel promotes the replica it follows by itself — reads never fail meanwhile, and the
//! cache and idempotency keys work again on the new primary, with the keys written before.

mod common;

use std::time::{Duration, Instant};

use common::{RedisSentinel, spawn_app_with};
use reqwest::Method;
use serde_json::json;

const LIST: &str = "/api/v1/tasks";

#[tokio::test]
async fn the_worker_follows_a_sentinel_failover() {
    let mut redis = RedisSentinel::spawn().await;
    let url = redis.url();
    let app = spawn_app_with(|config| config.redis.url = url).await;
    let ada = app.register("ada@example.com").await;
    let token = ada.token();
    let x_cache = |resp: &common::Resp| resp.header("x-cache").unwrap_or("-").to_owned();
    let keyed = || {
        app.send(
            app.request(Method::POST, LIST, token)
                .header("idempotency-key", "sentinel-key")
                .json(&json!({"title": "keyed"})),
        )
    };

    // Through the Sentinel: a miss, then a hit; a keyed create.
    assert_eq!(x_cache(&app.get(LIST, token).await), "MISS");
    assert_eq!(x_cache(&app.get(LIST, token).await), "HIT");
    let created = keyed().await;
    created.expect(201);
    let keys = redis.primary.keys();
    assert!(
        keys > 0,
        "nothing was written to the primary the sentinel names"
    );

    redis.fail_over().await;
    assert_eq!(
        redis.replica.keys(),
        keys,
        "the promoted replica lacks keys"
    );

    // Reads go on while the worker finds the new primary (bypassing the cache if they must),
    // and the cache serves hits again within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut hits = 0;
    while hits < 2 {
        let resp = app.get(LIST, token).await;
        resp.expect(200);
        hits = if x_cache(&resp) == "HIT" { hits + 1 } else { 0 };
        assert!(
            Instant::now() < deadline,
            "no cache hits after the failover (X-Cache {})",
            x_cache(&resp)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = app.get("/health/ready", None).await;
    assert_eq!(ready.body["status"], "ok", "{}", ready.text);

    // The key written before the failover is on the new primary: a repeat is a replay, and
    // there is still one task.
    let replay = keyed().await;
    replay.expect(201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body["id"], created.body["id"]);
    // A write invalidates the cache on the new primary: the next read sees it.
    app.create_task(token, &json!({"title": "after"})).await;
    let after = app.get(LIST, token).await;
    assert_eq!(x_cache(&after), "MISS");
    assert_eq!(after.body["pagination"]["total"], 2);
}
