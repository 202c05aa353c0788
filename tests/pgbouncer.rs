//! The worker behind a real PgBouncer in transaction mode with stock settings (Debian's 1.18:
//! no prepared-statement support, nothing in `ignore_startup_parameters`), as
//! `database.prepared_statements = false` and `database.direct_url` are documented for: two
//! workers share a two-connection server pool, so consecutive transactions of one client land on
//! different servers, and the API's core flows hold, the statement timeout included.

mod common;

use std::time::Duration;

use common::{Resp, TestApp, TestDb, postgres::PgBouncer, serve_app, test_config};
use futures_util::future::join_all;
use serde_json::json;
use sqlx::{Connection, Executor, Row};

/// A worker whose `url` goes through `bouncer` and whose `direct_url` does not.
async fn pooled_app(
    bouncer: &PgBouncer,
    tweak: impl FnOnce(&mut taskd::config::Config),
) -> TestApp {
    let database = TestDb::create().await;
    let mut config = test_config(&bouncer.url(&database.name));
    config.database.direct_url = Some(database.url.clone());
    config.database.prepared_statements = false;
    tweak(&mut config);
    serve_app(config, Some(database), true).await
}

async fn bouncer() -> PgBouncer {
    let admin = url::Url::parse(
        &std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
    )
    .unwrap();
    PgBouncer::spawn(admin.host_str().unwrap(), admin.port().unwrap_or(5432), 2).await
}

fn total(resp: &Resp) -> i64 {
    resp.expect(200)["pagination"]["total"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_flows_hold_through_pgbouncer_in_transaction_mode() {
    let bouncer = bouncer().await;
    let app = pooled_app(&bouncer, |_| {}).await;
    let peer = app.spawn_peer().await;
    assert_eq!(
        app.get("/health/ready", None).await.expect(200)["status"],
        "ok"
    );

    // Register and log in; concurrent creates from both workers over two server connections.
    let ada = app.register("ada@example.com").await;
    let token = ada.token();
    let login = peer.login("ada@example.com", common::PASSWORD).await;
    login.expect(200);
    let bodies: Vec<_> = (0..40)
        .map(|i| json!({"title": format!("task {i}"), "priority": "high"}))
        .collect();
    let creates = bodies.iter().enumerate().map(|(i, body)| {
        let worker = if i % 2 == 0 { &app } else { &peer };
        worker.post("/api/v1/tasks", token, body)
    });
    for created in join_all(creates).await {
        created.expect(201);
    }
    let category = app.create_category(token, "home").await;

    // Listings (filters, search, both pagination modes), the cache, single reads.
    let listed = peer.get("/api/v1/tasks?limit=100", token).await;
    assert_eq!(total(&listed), 40);
    assert_eq!(listed.header("x-cache"), Some("MISS"));
    assert_eq!(
        peer.get("/api/v1/tasks?limit=100", token)
            .await
            .header("x-cache"),
        Some("HIT")
    );
    assert_eq!(
        total(
            &app.get("/api/v1/tasks?search=task&priority=high", token)
                .await
        ),
        40
    );
    assert_eq!(app.walk_cursor("/api/v1/tasks?limit=7", token).await, 40);
    let first = listed.body["data"][0]["id"].as_str().unwrap().to_owned();
    app.get(&format!("/api/v1/tasks/{first}"), token)
        .await
        .expect(200);
    app.patch(
        &format!("/api/v1/tasks/{first}"),
        token,
        &json!({"status": "completed", "categoryId": category["id"]}),
    )
    .await
    .expect(200);
    assert_eq!(
        total(&peer.get("/api/v1/tasks?status=completed", token).await),
        1
    );

    // Idempotency: a keyed create replays.
    let keyed = json!({"title": "keyed"});
    let first = app
        .post_keyed("/api/v1/tasks", token, "bouncer-key", &keyed)
        .await;
    first.expect(201);
    let again = peer
        .post_keyed("/api/v1/tasks", token, "bouncer-key", &keyed)
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));

    // Refresh rotation and re-use, then revocation by a password change.
    let refreshed = peer.refresh(&ada.refresh).await;
    refreshed.expect(200);
    common::assert_problem(&app.refresh(&ada.refresh).await, 401);
    app.change_password(token).await;
    common::assert_problem(&peer.get("/api/v1/tasks", token).await, 401);
    app.delete(
        &format!("/api/v1/categories/{}", category["id"].as_str().unwrap()),
        login.body["accessToken"].as_str(),
    )
    .await;
}

/// `SET LOCAL` in each transaction: the statement timeout holds behind the pooler (a session
/// setting would land on whichever server connection ran it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_timeout_holds_behind_the_pooler() {
    let bouncer = bouncer().await;
    let app = pooled_app(&bouncer, |config| {
        config.database.statement_timeout = Duration::from_millis(300);
    })
    .await;
    let slow = sqlx::query("SELECT pg_sleep(2)")
        .execute(&app.state.db)
        .await;
    match slow {
        Err(sqlx::Error::Database(e)) => assert_eq!(e.code().as_deref(), Some("57014"), "{e}"),
        other => panic!("a 2 s statement was not cut at 300 ms: {other:?}"),
    }
    // Inside the API's transactions the limit is set...
    let shown: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&app.state.db)
        .await
        .unwrap();
    assert_eq!(shown, "300ms");
    // ...and it leaks to no one else: another client of the same PgBouncer sees the default.
    let options: sqlx::postgres::PgConnectOptions = app.state.config.database.url.parse().unwrap();
    let mut other = sqlx::PgConnection::connect_with(&options.extra_float_digits(None))
        .await
        .unwrap();
    for _ in 0..4 {
        let row = other.fetch_one("SHOW statement_timeout").await.unwrap();
        assert_eq!(row.get::<String, _>(0), "0");
    }
}
