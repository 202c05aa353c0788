//! PostgreSQL connection pools and schema migrations, shared by every role that touches the
//! database (`migrate`, `user create`, `worker`, and `serve` before it starts workers).

use std::str::FromStr;

use anyhow::Context;
use sqlx::{
    ConnectOptions, Connection, PgPool,
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::{DatabaseConfig, redact_url as redacted};

/// A pooled connection idle for longer than this is pinged before it is handed out, so one that
/// PostgreSQL or the network closed meanwhile is replaced instead of failing a query. One in
/// steady use is not: sqlx's default pings on every acquire, an extra round trip per statement
/// (README, *Benchmarks*: the worker's CPU per listing fell 10–30 % without it).
const PING_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Connection options for `url`: the session's application name and `statement_timeout` (in
/// milliseconds, "0" for none).
fn session_options(
    url: &str,
    application: &str,
    statement_timeout: &str,
) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .with_context(|| format!("database URL {}", redacted(url)))?
        .application_name(application)
        .options([("statement_timeout", statement_timeout)]))
}

/// Opens a pool on `url` with the limits of `config`. Connections are opened lazily, so a worker
/// starts (and reports itself not ready) while PostgreSQL is down.
pub fn pool(config: &DatabaseConfig, url: &str) -> anyhow::Result<PgPool> {
    let statement_timeout = config.statement_timeout.as_millis().to_string();
    let options = session_options(url, "taskd", &statement_timeout)?
        .log_slow_statements(
            tracing::log::LevelFilter::Warn,
            std::time::Duration::from_secs(1),
        )
        .log_statements(tracing::log::LevelFilter::Trace);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(0)
        .acquire_timeout(config.acquire_timeout)
        .idle_timeout(std::time::Duration::from_secs(300))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Creates the database named in `url` when it does not exist yet. Safe when several processes
/// race to do it: losing the race is not an error.
pub async fn create_if_missing(url: &str) -> anyhow::Result<()> {
    let exists = sqlx::Postgres::database_exists(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redacted(url)))?;
    if exists {
        return Ok(());
    }
    match sqlx::Postgres::create_database(url).await {
        Ok(()) => {
            tracing::info!(database = %redacted(url), "created database");
            Ok(())
        }
        // 42P04 duplicate_database / 23505: another process created it first.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("creating database {}", redacted(url))),
    }
}

/// Creates the database when missing and applies pending migrations. sqlx serialises concurrent
/// migrators with an advisory lock, so workers starting together apply each migration once.
///
/// Migrations run on a connection of their own without `database.statement_timeout`: one may
/// backfill a table of millions of rows, and a worker waiting for another's migration waits on
/// the lock rather than giving up.
///
/// Migrations newer than this binary's, applied by a newer release, are not an error: during a
/// rolling deploy the previous release's workers still start (migrations are additive; an
/// applied one is never edited).
pub async fn migrate(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    create_if_missing(&config.url).await?;
    let mut conn = session_options(&config.url, "taskd migrate", "0")?
        .log_slow_statements(tracing::log::LevelFilter::Off, std::time::Duration::ZERO)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", redacted(&config.url)))?;
    // The migrations in `migrations/`, embedded in the binary.
    let mut migrator: Migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
        .run_direct(&mut conn)
        .await
        .context("applying database migrations")?;
    let _ = conn.close().await;
    pool(config, &config.url)
}
