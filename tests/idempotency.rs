//! `Idempotency-Key` on POST: replays, conflicts, concurrent duplicates across workers, key
//! validation, keys per identity, and replayed client errors.

mod common;

use common::{Resp, Session, TestApp, assert_field_error, assert_problem, spawn_app, uuid};
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

const TASKS: &str = "/api/v1/tasks";

/// `POST /api/v1/tasks` with `Idempotency-Key: key`.
async fn create(app: &TestApp, session: &Session, key: &str, body: &Value) -> Resp {
    app.send(
        app.request(Method::POST, TASKS, session.token())
            .header("idempotency-key", key)
            .json(body),
    )
    .await
}

fn replayed(resp: &Resp) -> bool {
    match resp.header("idempotent-replayed") {
        None => false,
        Some("true") => true,
        Some(other) => panic!("Idempotent-Replayed: {other}"),
    }
}

async fn tasks_of(app: &TestApp, session: &Session) -> i64 {
    app.count("SELECT count(*) FROM tasks WHERE owner_id = $1", session.id)
        .await
}

#[tokio::test]
async fn a_repeated_post_is_replayed_and_acts_once() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let body = json!({"title": "pay the rent", "priority": "high"});

    let first = create(&app, &ada, "rent-2026-11", &body).await;
    first.expect(201);
    assert!(!replayed(&first));
    let second = create(&app, &ada, "rent-2026-11", &body).await;
    second.expect(201);
    assert!(replayed(&second), "the repeat says it is a replay");
    assert_eq!(second.text, first.text);
    assert_eq!(second.body["id"], first.body["id"]);
    assert!(
        second
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(tasks_of(&app, &ada).await, 1);

    // Without a key, POST is not deduplicated.
    app.post(TASKS, ada.token(), &body).await.expect(201);
    app.post(TASKS, ada.token(), &body).await.expect(201);
    assert_eq!(tasks_of(&app, &ada).await, 3);
}

#[tokio::test]
async fn the_same_key_with_another_body_is_422_on_any_worker() {
    let a = spawn_app().await;
    let b = a.spawn_peer().await;
    let ada = a.register("ada@example.com").await;
    let body = json!({"title": "first"});
    let created = create(&a, &ada, "k1", &body).await;
    created.expect(201);

    for worker in [&a, &b] {
        let other = create(worker, &ada, "k1", &json!({"title": "second"})).await;
        assert_field_error(&other, 422, "Idempotency-Key");
        assert!(!replayed(&other));
    }
    // The other worker replays the original for the original body.
    let replay = create(&b, &ada, "k1", &body).await;
    replay.expect(201);
    assert!(replayed(&replay));
    assert_eq!(replay.body["id"], created.body["id"]);
    assert_eq!(tasks_of(&a, &ada).await, 1);
}

/// Ten identical POSTs at once, through two workers: one task. Every other answer is a replay of
/// it or a 409 (the first is still running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_create_one_task() {
    let a = spawn_app().await;
    let b = a.spawn_peer().await;
    let ada = a.register("ada@example.com").await;
    let body = json!({"title": "only once"});

    let responses = join_all((0..10).map(|i| {
        let worker = if i % 2 == 0 { &a } else { &b };
        create(worker, &ada, "once", &body)
    }))
    .await;

    let mut originals = Vec::new();
    let mut replays = 0;
    for resp in &responses {
        match resp.status.as_u16() {
            201 if replayed(resp) => replays += 1,
            201 => originals.push(uuid(&resp.body["id"])),
            409 => {
                assert_problem(resp, 409);
            }
            other => panic!("status {other}: {}", resp.text),
        }
    }
    assert_eq!(originals.len(), 1, "exactly one request acted");
    for resp in responses.iter().filter(|r| replayed(r)) {
        assert_eq!(uuid(&resp.body["id"]), originals[0]);
    }
    assert_eq!(tasks_of(&a, &ada).await, 1);
    // Once it has finished, every retry is a replay.
    let later = create(&b, &ada, "once", &body).await;
    later.expect(201);
    assert!(replayed(&later), "{replays} replays during the burst");
    assert_eq!(uuid(&later.body["id"]), originals[0]);
}

#[tokio::test]
async fn keys_are_at_most_255_characters_and_belong_to_one_identity() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let body = json!({"title": "same"});

    let too_long = "k".repeat(256);
    assert_problem(&create(&app, &ada, &too_long, &body).await, 400);
    assert_eq!(tasks_of(&app, &ada).await, 0);
    let longest = "k".repeat(255);
    create(&app, &ada, &longest, &body).await.expect(201);

    // Bob's request with Ada's key and body is his own.
    let adas = create(&app, &ada, "shared", &body).await;
    adas.expect(201);
    let bobs = create(&app, &bob, "shared", &body).await;
    bobs.expect(201);
    assert!(!replayed(&bobs));
    assert_ne!(bobs.body["id"], adas.body["id"]);
    assert_eq!(bobs.body["ownerId"], bob.id.to_string());
    assert_eq!(tasks_of(&app, &ada).await, 2);
    assert_eq!(tasks_of(&app, &bob).await, 1);
}

#[tokio::test]
async fn a_client_error_is_replayed_as_the_same_error() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let invalid = json!({"title": "   "});

    let first = create(&app, &ada, "bad", &invalid).await;
    assert_field_error(&first, 422, "title");
    let again = create(&app, &ada, "bad", &invalid).await;
    assert_eq!(again.status, 422);
    assert!(replayed(&again));
    // The first answer, byte for byte (its requestId names the request that produced it).
    assert_eq!(again.text, first.text);
    assert!(
        again
            .header("content-type")
            .unwrap()
            .starts_with("application/problem+json")
    );
    assert_eq!(tasks_of(&app, &ada).await, 0);
    // A corrected request needs a new key.
    create(&app, &ada, "good", &json!({"title": "fixed"}))
        .await
        .expect(201);
}

/// The Redis records of this test's idempotency keys.
async fn idempotency_keys(app: &TestApp) -> (fred::clients::Client, Vec<String>) {
    use fred::prelude::*;
    let redis = Builder::from_config(Config::from_url(&app.state.config.redis.url).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    // SCAN to the end: one page covers only part of a keyspace that other tests and scripts
    // share.
    let pattern = format!("{}idem:*", app.redis_prefix);
    let (mut cursor, mut keys) = ("0".to_owned(), Vec::new());
    loop {
        let (next, page): (String, Vec<String>) = redis
            .scan_page(cursor, pattern.clone(), Some(1_000), None)
            .await
            .unwrap();
        keys.extend(page);
        if next == "0" {
            break (redis, keys);
        }
        cursor = next;
    }
}

/// A worker killed after its insert committed but before it stored the answer: the retry (the
/// proxy sends it to another worker) finds no record, runs again, and gets the same task back
/// instead of a second one — marked `Idempotent-Replayed`, since nothing was created now.
#[tokio::test]
async fn a_retry_after_the_answer_was_lost_does_not_act_twice() {
    use fred::prelude::*;
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let body = json!({"title": "exactly once"});
    let first = create(&app, &ada, "lost-answer", &body).await;
    first.expect(201);

    let (redis, keys) = idempotency_keys(&app).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: i64 = redis.del(&keys[0]).await.unwrap();

    assert!(!replayed(&first));
    let retry = create(&app, &ada, "lost-answer", &body).await;
    retry.expect(201);
    assert_eq!(retry.body["id"], first.body["id"]);
    assert!(replayed(&retry), "the task existed: a replay");
    assert_eq!(tasks_of(&app, &ada).await, 1);

    // The same for categories, whose names are unique per owner.
    let category = json!({"name": "Errands"});
    let send = || {
        app.send(
            app.request(Method::POST, "/api/v1/categories", ada.token())
                .header("idempotency-key", "lost-category")
                .json(&category),
        )
    };
    let first = send().await;
    first.expect(201);
    let (redis, keys) = idempotency_keys(&app).await;
    for key in &keys {
        let _: i64 = redis.del(key).await.unwrap();
    }
    assert!(!replayed(&first));
    let retry = send().await;
    retry.expect(201);
    assert_eq!(retry.body["id"], first.body["id"]);
    assert!(replayed(&retry), "the category existed: a replay");
}

/// A worker killed mid-request (after its insert committed) leaves a `running` lease that
/// nobody renews: a retry waits for it to lapse (seconds, not the request timeout), runs, and
/// gets the committed task back (a replay: nothing new was created) instead of a 409 or a
/// second task.
#[tokio::test]
async fn a_retry_takes_over_the_lease_of_a_dead_worker() {
    use fred::prelude::*;
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let body = json!({"title": "after the crash"});
    let first = create(&app, &ada, "crash", &body).await;
    first.expect(201);
    // Turn the finished record back into the lease of a worker that died.
    let (redis, keys) = idempotency_keys(&app).await;
    let record: String = redis.get(&keys[0]).await.unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    let dead = json!({
        "state": "running",
        "fingerprint": record["fingerprint"],
        "attempt": "dead-worker",
    });
    let _: () = redis
        .set(
            &keys[0],
            dead.to_string(),
            Some(Expiration::PX(800)),
            None,
            false,
        )
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let retry = create(&app, &ada, "crash", &body).await;
    let waited = started.elapsed();
    retry.expect(201);
    assert_eq!(retry.body["id"], first.body["id"]);
    assert!(replayed(&retry), "the task existed: a replay");
    assert_eq!(tasks_of(&app, &ada).await, 1);
    assert!(
        waited >= std::time::Duration::from_millis(600),
        "it waited for the lease: {waited:?}"
    );
    assert!(waited < std::time::Duration::from_secs(5), "{waited:?}");
}
