//! The Redis response cache of task reads: `X-Cache`, `ETag` / `If-None-Match`, invalidation by
//! writes on any worker, isolation between users, the admin clear, single flight, and switching
//! it off.

mod common;

use std::time::{Duration, Instant};

use common::{PASSWORD, Resp, Session, TestApp, assert_problem, spawn_app, spawn_app_with, uuid};
use fred::{
    prelude::{Builder, ClientLike, KeysInterface},
    types::{Expiration, config::Config as RedisClientConfig},
};
use futures_util::future::join_all;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const LIST: &str = "/api/v1/tasks";

/// `X-Cache` of a response (`-` when absent).
fn x_cache(resp: &Resp) -> &str {
    resp.header("x-cache").unwrap_or("-")
}

/// Asserts `X-Cache` and the status, and returns the body.
#[track_caller]
fn expect_cache<'a>(resp: &'a Resp, status: u16, outcome: &str) -> &'a Value {
    let body = resp.expect(status);
    assert_eq!(x_cache(resp), outcome, "X-Cache; body {}", resp.text);
    body
}

/// `(id, title)` of every task of a listing, sorted.
fn listed(body: &Value) -> Vec<(String, String)> {
    let mut tasks: Vec<(String, String)> = body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data in {body}"))
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_owned(),
                t["title"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    tasks.sort();
    tasks
}

fn task_path(task: &Value) -> String {
    format!("{LIST}/{}", uuid(&task["id"]))
}

#[tokio::test]
async fn a_listing_is_a_miss_then_a_hit_with_the_same_body_and_etag() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    for title in ["one", "two", "three"] {
        app.create_task(ada.token(), &json!({ "title": title }))
            .await;
    }

    let first = app.get(LIST, ada.token()).await;
    expect_cache(&first, 200, "MISS");
    let etag = first.header("etag").expect("ETag on a miss").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(first.body["pagination"]["total"], 3);

    let second = app.get(LIST, ada.token()).await;
    expect_cache(&second, 200, "HIT");
    assert_eq!(second.text, first.text);
    assert_eq!(second.header("etag"), Some(etag.as_str()));
    assert!(
        second
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );

    // The same query with its parameters in another order is the same entry.
    let sorted = app
        .get(&format!("{LIST}?limit=5&sort=title"), ada.token())
        .await;
    expect_cache(&sorted, 200, "MISS");
    let reordered = app
        .get(&format!("{LIST}?sort=title&limit=5"), ada.token())
        .await;
    expect_cache(&reordered, 200, "HIT");
    assert_eq!(reordered.text, sorted.text);
    assert_eq!(reordered.body["data"][0]["title"], "one");
    // Another query is another entry.
    let other = app
        .get(&format!("{LIST}?sort=title&limit=6"), ada.token())
        .await;
    expect_cache(&other, 200, "MISS");
}

#[tokio::test]
async fn if_none_match_with_the_current_etag_is_304_without_a_body() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let task = app.create_task(ada.token(), &json!({"title": "one"})).await;
    let first = app.get(LIST, ada.token()).await;
    let etag = first.header("etag").unwrap().to_owned();

    let conditional = |etag: &str| {
        app.request(reqwest::Method::GET, LIST, ada.token())
            .header("if-none-match", etag)
    };
    let not_modified = app.send(conditional(&etag)).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.text, "", "a 304 has no body");
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    // Weak comparison and lists of tags, as RFC 9110 says.
    let weak = app.send(conditional(&format!("\"nope\", W/{etag}"))).await;
    assert_eq!(weak.status, 304);

    let stale = app.send(conditional("\"0123456789abcdef\"")).await;
    assert_eq!(stale.text, first.text);
    stale.expect(200);

    // After a write, the old ETag is stale: the client gets the new listing.
    app.patch(&task_path(&task), ada.token(), &json!({"title": "uno"}))
        .await
        .expect(200);
    let changed = app.send(conditional(&etag)).await;
    assert_eq!(changed.expect(200)["data"][0]["title"], "uno");
    assert_ne!(changed.header("etag"), Some(etag.as_str()));
}

#[tokio::test]
async fn every_write_makes_the_next_read_a_miss_that_shows_it() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let token = ada.token();
    let warm = || async {
        app.get(LIST, token).await;
        let hit = app.get(LIST, token).await;
        expect_cache(&hit, 200, "HIT");
    };

    warm().await;
    let task = app.create_task(token, &json!({"title": "created"})).await;
    let after_create = app.get(LIST, token).await;
    let body = expect_cache(&after_create, 200, "MISS");
    assert_eq!(body["data"][0]["id"], task["id"]);

    warm().await;
    app.patch(&task_path(&task), token, &json!({"title": "patched"}))
        .await
        .expect(200);
    let after_patch = app.get(LIST, token).await;
    assert_eq!(
        expect_cache(&after_patch, 200, "MISS")["data"][0]["title"],
        "patched"
    );

    let category = app.create_category(token, "Work").await;
    let filed = app
        .create_task(
            token,
            &json!({"title": "filed", "categoryId": category["id"]}),
        )
        .await;
    warm().await;
    app.delete(
        &format!("/api/v1/categories/{}", uuid(&category["id"])),
        token,
    )
    .await
    .expect(204);
    let after_category_delete = app.get(LIST, token).await;
    let body = expect_cache(&after_category_delete, 200, "MISS");
    let filed_now = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == filed["id"])
        .unwrap();
    assert_eq!(filed_now["categoryId"], Value::Null);

    warm().await;
    app.delete(&task_path(&task), token).await.expect(204);
    let after_delete = app.get(LIST, token).await;
    let body = expect_cache(&after_delete, 200, "MISS");
    assert_eq!(listed(body).len(), 1);
    assert_eq!(body["data"][0]["id"], filed["id"]);
}

/// Two workers of one deployment: a write through either is visible to the very next read
/// through the other.
#[tokio::test]
async fn a_write_on_one_worker_is_visible_to_the_next_read_on_another() {
    let a = spawn_app().await;
    let b = a.spawn_peer().await;
    assert_ne!(a.addr, b.addr);
    let ada = a.register("ada@example.com").await;
    let token = ada.token();
    // What the listing must show: (id, title).
    let mut model: Vec<(String, String)> = Vec::new();

    for round in 0..20 {
        let (writer, reader) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        // The reader has the current listing cached.
        reader.get(LIST, token).await.expect(200);
        expect_cache(&reader.get(LIST, token).await, 200, "HIT");

        match round % 4 {
            // Patch the oldest task.
            2 => {
                let (id, title) = &mut model[0];
                *title = format!("renamed in round {round}");
                writer
                    .patch(&format!("{LIST}/{id}"), token, &json!({"title": title}))
                    .await
                    .expect(200);
            }
            // Delete the newest.
            3 => {
                let (id, _) = model.pop().unwrap();
                writer
                    .delete(&format!("{LIST}/{id}"), token)
                    .await
                    .expect(204);
            }
            _ => {
                let title = format!("created in round {round}");
                let task = writer.create_task(token, &json!({"title": title})).await;
                model.push((task["id"].as_str().unwrap().to_owned(), title));
            }
        }

        let next = reader.get(LIST, token).await;
        let body = expect_cache(&next, 200, "MISS");
        let mut expected = model.clone();
        expected.sort();
        assert_eq!(listed(body), expected, "round {round}");
    }
}

/// A cache hit checks the token's revocation in the same Redis round trip: a token revoked
/// through one worker gets nothing cached from another — no body, no 304, and no 400 for a bad
/// query either (the 401 comes first).
#[tokio::test]
async fn a_revoked_token_gets_nothing_from_the_cache_on_any_worker() {
    let a = spawn_app().await;
    let b = a.spawn_peer().await;
    let ada = a.register("ada@example.com").await;
    let other_sign_in = Session::from_auth(a.login("ada@example.com", PASSWORD).await.expect(200));
    let task = a.create_task(ada.token(), &json!({"title": "one"})).await;
    let one = task_path(&task);
    for path in [LIST, one.as_str()] {
        b.get(path, other_sign_in.token()).await.expect(200);
        expect_cache(&b.get(path, other_sign_in.token()).await, 200, "HIT");
    }
    let etag = b.get(LIST, other_sign_in.token()).await;
    let etag = etag.header("etag").unwrap().to_owned();

    a.patch(
        "/api/v1/me",
        ada.token(),
        &json!({"password": "a brand new password", "currentPassword": PASSWORD}),
    )
    .await
    .expect(200);

    let stale = other_sign_in.token();
    for path in [LIST, one.as_str()] {
        let resp = b.get(path, stale).await;
        assert_problem(&resp, 401);
        assert!(!resp.text.contains("\"one\""), "{}", resp.text);
        assert_eq!(resp.header("x-cache"), None);
    }
    let conditional = b
        .send(
            b.request(reqwest::Method::GET, LIST, stale)
                .header("if-none-match", &etag),
        )
        .await;
    assert_problem(&conditional, 401);
    for bad in [
        format!("{LIST}?limit=abc"),
        format!("{LIST}?nonsense=1"),
        format!("{LIST}?ownerId={}", uuid(&task["id"])),
        format!("{LIST}/not-a-uuid"),
    ] {
        assert_problem(&b.get(&bad, stale).await, 401);
    }

    // A token issued after the change reads as before (from the cache: nothing changed).
    let fresh = Session::from_auth(
        a.login("ada@example.com", "a brand new password")
            .await
            .expect(200),
    );
    let list = b.get(LIST, fresh.token()).await;
    assert_eq!(listed(list.expect(200)).len(), 1);
}

#[tokio::test]
async fn a_single_task_is_cached_and_invalidated_by_patch() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let token = ada.token();
    let task = app.create_task(token, &json!({"title": "one"})).await;
    let path = task_path(&task);

    let first = app.get(&path, token).await;
    assert_eq!(expect_cache(&first, 200, "MISS"), &task);
    let etag = first.header("etag").unwrap().to_owned();
    let second = app.get(&path, token).await;
    expect_cache(&second, 200, "HIT");
    assert_eq!(second.text, first.text);
    assert_eq!(second.header("etag"), Some(etag.as_str()));
    let not_modified = app
        .send(
            app.request(reqwest::Method::GET, &path, token)
                .header("if-none-match", &etag),
        )
        .await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.text, "");

    app.patch(&path, token, &json!({"status": "completed"}))
        .await
        .expect(200);
    let patched = app.get(&path, token).await;
    assert_eq!(expect_cache(&patched, 200, "MISS")["status"], "completed");
    assert_ne!(patched.header("etag"), Some(etag.as_str()));
    expect_cache(&app.get(&path, token).await, 200, "HIT");

    // A deleted task is gone at once, and a 404 is never cached.
    app.delete(&path, token).await.expect(204);
    assert_problem(&app.get(&path, token).await, 404);
    assert_problem(&app.get(&path, token).await, 404);
}

#[tokio::test]
async fn users_never_get_each_others_cached_results() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let adas = app
        .create_task(ada.token(), &json!({"title": "ada's"}))
        .await;
    app.create_task(bob.token(), &json!({"title": "bob's"}))
        .await;

    for query in ["", "?limit=5&sort=title"] {
        let path = format!("{LIST}{query}");
        app.get(&path, ada.token()).await;
        let ada_hit = app.get(&path, ada.token()).await;
        assert_eq!(
            expect_cache(&ada_hit, 200, "HIT")["data"][0]["title"],
            "ada's"
        );

        let bob_first = app.get(&path, bob.token()).await;
        let body = expect_cache(&bob_first, 200, "MISS");
        assert_eq!(listed(body).len(), 1, "{body}");
        assert_eq!(body["data"][0]["title"], "bob's");
        let bob_hit = app.get(&path, bob.token()).await;
        assert_eq!(
            expect_cache(&bob_hit, 200, "HIT")["data"][0]["title"],
            "bob's"
        );
        assert_ne!(bob_hit.header("etag"), ada_hit.header("etag"));
    }

    // Ada's task, cached for her, is still a 404 for Bob.
    let path = task_path(&adas);
    app.get(&path, ada.token()).await;
    expect_cache(&app.get(&path, ada.token()).await, 200, "HIT");
    assert_problem(&app.get(&path, bob.token()).await, 404);
    // And Bob's writes do not invalidate Ada's entries.
    app.create_task(bob.token(), &json!({"title": "bob's second"}))
        .await;
    expect_cache(&app.get(&path, ada.token()).await, 200, "HIT");
}

#[tokio::test]
async fn admins_clear_the_cache_without_touching_other_keys() {
    let app = spawn_app().await;
    let admin = app.register_admin("root@example.com").await;
    let ada = app.register("ada@example.com").await;
    app.create_task(ada.token(), &json!({"title": "one"})).await;

    // A key of someone else on the same Redis, outside this deployment's prefix.
    let redis =
        Builder::from_config(RedisClientConfig::from_url(&app.state.config.redis.url).unwrap())
            .build()
            .unwrap();
    redis.init().await.unwrap();
    let foreign = format!("not-taskd:{}", app.redis_prefix.trim_end_matches(':'));
    redis
        .set::<(), _, _>(&foreign, "keep me", Some(Expiration::EX(60)), None, false)
        .await
        .unwrap();

    app.get(LIST, ada.token()).await;
    let cached = app.get(LIST, ada.token()).await;
    expect_cache(&cached, 200, "HIT");

    let clear = "/api/v1/admin/cache/clear";
    assert_problem(&app.post(clear, ada.token(), &json!({})).await, 403);
    assert_problem(&app.post(clear, None, &json!({})).await, 401);
    expect_cache(&app.get(LIST, ada.token()).await, 200, "HIT");

    let cleared = app.post(clear, admin.token(), &json!({})).await;
    cleared.expect(204);
    assert_eq!(cleared.text, "");
    let after = app.get(LIST, ada.token()).await;
    expect_cache(&after, 200, "MISS");
    assert_eq!(after.text, cached.text);
    expect_cache(&app.get(LIST, ada.token()).await, 200, "HIT");

    let kept: Option<String> = redis.get(&foreign).await.unwrap();
    assert_eq!(kept.as_deref(), Some("keep me"));
    // Sessions (token versions in Redis) survive too: Ada is still signed in.
    app.get("/api/v1/me", ada.token()).await.expect(200);
    let _: () = redis.del(&foreign).await.unwrap();
}

/// Sequential and index scans of `tasks` so far. A PostgreSQL backend publishes its statistics
/// at the latest when it exits, so this first ends every worker connection to the test database
/// (callers close the pools; a connection the pool lets go of lazily is terminated) and waits
/// for them to be gone.
async fn task_scans(app: &TestApp) -> i64 {
    let mut conn = PgConnection::connect(&app.state.config.database.url)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'taskd'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker connections {open:?} stay open"
        );
        for pid in open {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query_scalar(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) \
         FROM pg_stat_user_tables WHERE relname = 'tasks'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

/// 50 concurrent identical reads of a cold entry in one worker: all get the same listing, and the
/// database answers the query once. The number of table scans one listing costs is measured
/// first, through a worker with the cache off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_entry_query_the_database_once() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    for i in 0..5 {
        app.create_task(ada.token(), &json!({ "title": format!("task {i}") }))
            .await;
    }
    app.db.close().await;
    let before = task_scans(&app).await;

    let uncached = app.spawn_peer_with(|c| c.cache.enabled = false).await;
    let reference = uncached.get(LIST, ada.token()).await;
    expect_cache(&reference, 200, "BYPASS");
    uncached.db.close().await;
    let one_listing = task_scans(&app).await - before;
    assert!(one_listing >= 1, "a listing scans tasks");

    let worker = app.spawn_peer().await;
    let responses = join_all((0..50).map(|_| worker.get(LIST, ada.token()))).await;
    let mut misses = 0;
    for resp in &responses {
        resp.expect(200);
        assert_eq!(resp.text, reference.text);
        assert_eq!(resp.header("etag"), reference.header("etag"));
        match x_cache(resp) {
            "MISS" => misses += 1,
            "HIT" => {}
            other => panic!("X-Cache {other}"),
        }
    }
    assert!(misses >= 1);
    worker.db.close().await;
    let scans = task_scans(&app).await - before - one_listing;
    assert_eq!(
        scans,
        one_listing,
        "50 concurrent reads ran the listing {} times ({misses} misses)",
        scans as f64 / one_listing as f64
    );
}

#[tokio::test]
async fn with_the_cache_off_every_read_is_a_bypass() {
    let app = spawn_app_with(|config| config.cache.enabled = false).await;
    let ada = app.register("ada@example.com").await;
    let task = app.create_task(ada.token(), &json!({"title": "one"})).await;
    for _ in 0..2 {
        let list = app.get(LIST, ada.token()).await;
        expect_cache(&list, 200, "BYPASS");
        assert!(list.header("etag").is_some());
        expect_cache(
            &app.get(&task_path(&task), ada.token()).await,
            200,
            "BYPASS",
        );
    }
    app.patch(&task_path(&task), ada.token(), &json!({"title": "uno"}))
        .await
        .expect(200);
    let list = app.get(LIST, ada.token()).await;
    assert_eq!(
        expect_cache(&list, 200, "BYPASS")["data"][0]["title"],
        "uno"
    );
}
