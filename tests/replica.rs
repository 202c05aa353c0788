//! `database.read_url` against a real streaming replica whose WAL is applied 1.5 s late
//! (a private primary and replica, [`PgReplicaSet`]): every read after a write sees it, on any
//! worker and through the cache; the replica serves the reads that are safe on it; a lost Redis
//! key or a dead replica costs no correctness, and readiness reports the replica.

mod common;

use std::time::{Duration, Instant};

use common::{Resp, TestApp, postgres::PgReplicaSet, serve_app, test_config};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const DELAY: Duration = Duration::from_millis(1500);
const LIST: &str = "/api/v1/tasks?limit=100";

/// A worker with `read_url` on the replica, over a fresh database; waits until the replica
/// has the database and readiness reports it `ok`.
async fn replica_app(set: &PgReplicaSet) -> TestApp {
    let name = format!("taskd_test_{}", Uuid::new_v4().simple());
    let mut config = test_config(&set.primary.url(&name));
    config.database.read_url = Some(set.replica.url(&name));
    let app = serve_app(config, None, true).await;
    wait_for_replica(&app, "ok").await;
    app
}

async fn readiness(app: &TestApp) -> Value {
    app.get("/health/ready", None).await.body
}

async fn wait_for_replica(app: &TestApp, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = readiness(app).await;
        if ready["checks"]["replica"]["status"] == status {
            return ready;
        }
        assert!(Instant::now() < deadline, "replica never {status}: {ready}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `db_reads_total{target=…}` of a worker.
async fn reads(app: &TestApp, target: &str) -> u64 {
    let text = app.get("/metrics", None).await.text;
    let series = format!("db_reads_total{{target=\"{target}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn total(resp: &Resp) -> i64 {
    resp.expect(200)["pagination"]["total"]
        .as_i64()
        .unwrap_or_else(|| panic!("no total in {}", resp.text))
}

fn x_cache(resp: &Resp) -> &str {
    resp.header("x-cache").unwrap_or("-")
}

/// Tasks of the database as the replica sees them now.
async fn replica_count(app: &TestApp) -> i64 {
    let url = app.state.config.database.read_url.clone().unwrap();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_read_after_a_write_sees_it_though_the_replica_lags() {
    let set = PgReplicaSet::spawn(DELAY).await;
    let app = replica_app(&set).await;
    let peer = app.spawn_peer().await;
    let ada = app.register("ada@example.com").await;
    let token = ada.token();

    let mut last = Value::Null;
    for i in 0..60 {
        last = app
            .create_task(token, &json!({"title": format!("task {i}")}))
            .await;
    }
    // The replica really is behind: what a plain replica read would answer.
    let seen = replica_count(&app).await;
    assert!(seen < 60, "the replica already had {seen} of 60 tasks");

    // On the other worker, at once: the listing, a cursor walk, the single task, the categories.
    let listed = peer.get(LIST, token).await;
    assert_eq!(total(&listed), 60, "listing right after the writes");
    assert_eq!(x_cache(&listed), "MISS");
    let walked = peer.walk_cursor("/api/v1/tasks?limit=25", token).await;
    assert_eq!(walked, 60, "cursor walk right after the writes");
    let id = last["id"].as_str().unwrap();
    peer.get(&format!("/api/v1/tasks/{id}"), token)
        .await
        .expect(200);
    app.create_category(token, "home").await;
    let categories = peer.get("/api/v1/categories", token).await;
    assert_eq!(total(&categories), 1, "categories right after a create");
    // The category bumped the cache version: the page is loaded (and cached) again.
    let again = peer.get(LIST, token).await;
    assert_eq!((x_cache(&again), total(&again)), ("MISS", 60));

    // Once the replica has caught up, the cached page is still the right one...
    let deadline = Instant::now() + Duration::from_secs(10);
    while replica_count(&app).await < 60 {
        assert!(Instant::now() < deadline, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hit = peer.get(LIST, token).await;
    assert_eq!((x_cache(&hit), total(&hit)), ("HIT", 60));

    // ...and a read the cache has not seen is served by the replica, with every task.
    tokio::time::sleep(DELAY).await;
    let before = reads(&peer, "replica").await;
    let fresh = peer.get("/api/v1/tasks?limit=7", token).await;
    assert_eq!((x_cache(&fresh), total(&fresh)), ("MISS", 60));
    assert_eq!(
        reads(&peer, "replica").await,
        before + 1,
        "the caught-up replica was not used"
    );

    // A write later: the next reads, anywhere, have it; the page cached after the replica
    // caught up again is not the stale one.
    let extra = app.create_task(token, &json!({"title": "one more"})).await;
    let after = peer.get(LIST, token).await;
    assert_eq!((x_cache(&after), total(&after)), ("MISS", 61));
    peer.patch(
        &format!("/api/v1/tasks/{}", extra["id"].as_str().unwrap()),
        token,
        &json!({"status": "completed"}),
    )
    .await
    .expect(200);
    let completed = app.get("/api/v1/tasks?status=completed", token).await;
    assert_eq!(total(&completed), 1, "filter right after an update");
    let reloaded = peer.get(LIST, token).await;
    assert_eq!((x_cache(&reloaded), total(&reloaded)), ("MISS", 61));
    tokio::time::sleep(DELAY + Duration::from_millis(500)).await;
    let later = peer.get(LIST, token).await;
    assert_eq!((x_cache(&later), total(&later)), ("HIT", 61));

    // A keyed create replays on the other worker, and is listed there at once; a password
    // change ends the old token everywhere.
    let keyed = json!({"title": "keyed"});
    let first = app
        .post_keyed("/api/v1/tasks", token, "replica-key", &keyed)
        .await;
    first.expect(201);
    let replayed = peer
        .post_keyed("/api/v1/tasks", token, "replica-key", &keyed)
        .await;
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    assert_eq!(total(&peer.get(LIST, token).await), 62);
    app.change_password(token).await;
    common::assert_problem(&peer.get(LIST, token).await, 401);
}

#[tokio::test]
async fn a_lost_position_key_does_not_expose_the_lag() {
    let set = PgReplicaSet::spawn(DELAY).await;
    let app = replica_app(&set).await;
    let peer = app.spawn_peer().await;
    let ada = app.register("ada@example.com").await;
    tokio::time::sleep(DELAY + Duration::from_millis(500)).await;
    app.create_task(ada.token(), &json!({"title": "fresh"}))
        .await;
    // Redis loses the key that says how far the replica must have replayed (eviction, a
    // restart without persistence).
    let key = format!("{}db:{{{}}}:lsn", app.redis_prefix, ada.id);
    let deleted = std::process::Command::new("redis-cli")
        .args(["-u", &app.state.config.redis.url, "DEL", &key])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&deleted.stdout).trim(), "1");
    assert!(
        replica_count(&app).await < 1,
        "the replica caught up too soon"
    );
    let listed = peer.get(LIST, ada.token()).await;
    assert_eq!(total(&listed), 1, "{}", listed.text);
}

#[tokio::test]
async fn a_dead_replica_degrades_readiness_and_reads_go_on() {
    let mut set = PgReplicaSet::spawn(DELAY).await;
    let app = replica_app(&set).await;
    let ready = readiness(&app).await;
    assert_eq!(ready["status"], "ok", "{ready}");
    let replica = &ready["checks"]["replica"];
    assert!(
        replica["latencyMs"].is_number() && replica["lagMs"].is_number(),
        "{ready}"
    );
    let ada = app.register("ada@example.com").await;
    let token = ada.token();

    set.replica.kill();
    let ready = wait_for_replica(&app, "down").await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(app.get("/health/ready", None).await.status, 200);
    for i in 0..3 {
        app.create_task(token, &json!({"title": format!("while down {i}")}))
            .await;
        let listed = app
            .get(&format!("/api/v1/tasks?limit={}", 10 + i), token)
            .await;
        assert_eq!(total(&listed), i + 1);
    }
    assert_eq!(total(&app.get("/api/v1/categories", token).await), 0);

    set.replica.start().await;
    let ready = wait_for_replica(&app, "ok").await;
    assert_eq!(ready["status"], "ok", "{ready}");
    tokio::time::sleep(DELAY + Duration::from_millis(500)).await;
    let before = reads(&app, "replica").await;
    assert_eq!(total(&app.get("/api/v1/tasks?limit=3", token).await), 3);
    assert_eq!(
        reads(&app, "replica").await,
        before + 1,
        "replica not used again"
    );
}
