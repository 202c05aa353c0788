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
