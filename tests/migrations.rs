//! `taskd::db::migrate`: creates a missing database, applies every migration once, and is safe to
//! re-run and to run concurrently.

mod common;

use common::{TestDb, serve_app, test_config};
use sqlx::PgPool;
use taskd::config::DatabaseConfig;

fn config(url: &str) -> DatabaseConfig {
    DatabaseConfig {
        url: url.to_owned(),
        max_connections: 2,
        ..DatabaseConfig::default()
    }
}

/// The number of migration files shipped in `migrations/`.
fn shipped() -> i64 {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "sql")
        })
        .count() as i64
}

async fn applied(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn creates_a_missing_database_and_reruns_cleanly() {
    let database = TestDb::reserve();
    assert!(!database.exists().await);

    let pool = taskd::db::migrate(&config(&database.url)).await.unwrap();
    assert!(database.exists().await);
    assert_eq!(applied(&pool).await, shipped());
    assert_eq!(
        tables(&pool).await,
        [
            "categories",
            "refresh_tokens",
            "settings",
            "task_terms",
            "tasks",
            "users"
        ]
    );
    pool.close().await;

    // Again, on the migrated database: nothing to do, nothing broken.
    let pool = taskd::db::migrate(&config(&database.url)).await.unwrap();
    assert_eq!(applied(&pool).await, shipped());
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, shipped(), "each migration recorded once");
    pool.close().await;
}

#[tokio::test]
async fn migrates_an_existing_empty_database() {
    let database = TestDb::create().await;
    let pool = taskd::db::migrate(&config(&database.url)).await.unwrap();
    assert_eq!(applied(&pool).await, shipped());
    assert_eq!(tables(&pool).await.len(), 6);
    pool.close().await;
}

/// Migrations may backfill large tables: they are not bound by `database.statement_timeout`,
/// which every pooled session has.
#[tokio::test]
async fn migrations_are_not_cut_short_by_the_statement_timeout() {
    let database = TestDb::reserve();
    let config = DatabaseConfig {
        statement_timeout: std::time::Duration::from_millis(1),
        ..config(&database.url)
    };
    let pool = taskd::db::migrate(&config).await.unwrap();
    // Counted on a session without the 1 ms limit: on a busy machine even this count can take
    // longer than that.
    let unlimited = PgPool::connect(&database.url).await.unwrap();
    assert_eq!(applied(&unlimited).await, shipped());
    unlimited.close().await;
    // The pool's sessions keep the limit. Even `SHOW` is subject to it, so a stalled machine
    // can cancel it: asked again then (the answer must still be exactly the limit).
    let mut attempts = 0;
    let limit: String = loop {
        match sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&pool)
            .await
        {
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("57014") && attempts < 50 =>
            {
                attempts += 1;
            }
            answer => break answer.unwrap(),
        }
    };
    assert_eq!(limit, "1ms");
    pool.close().await;
}

/// A database that a newer release migrated further still starts this release's workers (a
/// rolling deploy has both at once); this release's migrations are all there.
#[tokio::test]
async fn a_database_migrated_by_a_newer_release_is_accepted() {
    let database = TestDb::reserve();
    let pool = taskd::db::migrate(&config(&database.url)).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000000, 'from a newer release', true, '\\x00', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let pool = taskd::db::migrate(&config(&database.url)).await.unwrap();
    assert_eq!(applied(&pool).await, shipped() + 1);
    pool.close().await;
    let app = serve_app(test_config(&database.url), Some(database), true).await;
    let session = app.register("ada@example.com").await;
    app.get("/api/v1/me", session.token()).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrators_agree() {
    let database = TestDb::reserve();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let config = config(&database.url);
            tokio::spawn(async move { taskd::db::migrate(&config).await.map(|_| ()) })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    let pool = taskd::db::migrate(&config(&database.url)).await.unwrap();
    assert_eq!(applied(&pool).await, shipped());
    pool.close().await;
}

#[tokio::test]
async fn a_worker_serves_a_database_migrated_beforehand() {
    let database = TestDb::reserve();
    taskd::db::migrate(&config(&database.url))
        .await
        .unwrap()
        .close()
        .await;
    let app = serve_app(test_config(&database.url), Some(database), false).await;
    let session = app.register("ada@example.com").await;
    app.get("/api/v1/me", session.token()).await.expect(200);
}
