//! PostgreSQL connection pools and schema migrations, shared by every role that touches the
//! database (`migrate`, `user create`, `worker`, and `serve` before it starts workers).

use std::{str::FromStr, sync::Arc};

use anyhow::Context;
use futures_util::{FutureExt, StreamExt, TryStreamExt, future::BoxFuture, stream::BoxStream};
use sqlx::{
    ConnectOptions, Connection, Either, Execute, Executor, PgPool, Postgres,
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow, PgStatement, PgTypeInfo},
};

use crate::config::{DatabaseConfig, redact_url as redacted};

/// A pooled connection idle for longer than this is pinged before it is handed out, so one that
/// PostgreSQL or the network closed meanwhile is replaced instead of failing a query. One in
/// steady use is not: sqlx's default pings on every acquire, an extra round trip per statement
/// (README, *Benchmarks*: the worker's CPU per listing fell 10–30 % without it).
const PING_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Connection options for `url` with the session's application name. Only startup parameters
/// a stock PgBouncer accepts: no `options` (the statement timeout is set after connecting, or per
/// transaction behind a pooler) and no `extra_float_digits` (PostgreSQL 12+ prints floats
/// exactly without it, and statements return binary values anyway).
fn session_options(url: &str, application: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .with_context(|| format!("database URL {}", redacted(url)))?
        .application_name(application)
        .extra_float_digits(None))
}

/// `SET statement_timeout` for a session of our own (milliseconds, 0 for none).
fn set_timeout(millis: u128) -> String {
    format!("SET statement_timeout = {millis}")
}

/// Opens a pool on `url` with the limits of `config`, for sessions of our own (PostgreSQL itself
/// or a session-mode pooler): each new connection sets `statement_timeout` once. Connections are
/// opened lazily, so a worker starts (and reports itself not ready) while PostgreSQL is down.
pub fn pool(config: &DatabaseConfig, url: &str) -> anyhow::Result<PgPool> {
    pool_with(config, url, true)
}

/// [`pool`]; with `session` false (behind a transaction pooler, [`Db`]), nothing is set on the
/// session and statements are not cached: every transaction sets what it needs.
fn pool_with(config: &DatabaseConfig, url: &str, session: bool) -> anyhow::Result<PgPool> {
    let mut options = session_options(url, "taskd")?
        .log_slow_statements(
            tracing::log::LevelFilter::Warn,
            std::time::Duration::from_secs(1),
        )
        .log_statements(tracing::log::LevelFilter::Trace);
    if !session {
        options = options.statement_cache_capacity(0);
    }
    let timeout: Arc<str> = set_timeout(config.statement_timeout.as_millis()).into();
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(0)
        .acquire_timeout(config.acquire_timeout)
        .idle_timeout(std::time::Duration::from_secs(300))
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            let timeout = timeout.clone();
            Box::pin(async move {
                if session {
                    conn.execute(&*timeout).await?;
                }
                Ok(())
            })
        })
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

/// The pool the API's statements run on, as an [`Executor`]: the pool itself, or, with
/// `database.prepared_statements = false` (a transaction-mode pooler such as PgBouncer before
/// 1.21, which may hand each transaction a different server connection), every statement in a
/// transaction of its own that begins with
/// `BEGIN; SET LOCAL statement_timeout = …; DEALLOCATE ALL` (one round trip).
///
/// Why each part: sqlx prepares a statement (Parse, Sync) before it binds and runs it (Bind,
/// Execute, Sync); outside a transaction a pooler may send the second half to another server,
/// where the statement is missing or, worse, is another client's. Inside one, the server is
/// ours until `COMMIT`. Statements are not cached (they are parsed afresh in each transaction)
/// and `DEALLOCATE ALL` drops whatever an earlier transaction left on that server, so no name
/// can collide. `SET LOCAL` holds for the transaction only, so the timeout applies behind any
/// pooler and never leaks to another client's transaction.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
    /// Behind a transaction pooler: the statement every transaction begins with.
    begin: Option<Arc<str>>,
}

impl Db {
    /// The primary's (or a replica's) [`Db`] on `url`, by `config.prepared_statements`.
    pub fn new(config: &DatabaseConfig, url: &str) -> anyhow::Result<Self> {
        if config.prepared_statements {
            return Ok(Self {
                pool: pool(config, url)?,
                begin: None,
            });
        }
        let millis = config.statement_timeout.as_millis();
        Ok(Self {
            pool: pool_with(config, url, false)?,
            begin: Some(
                format!("BEGIN; SET LOCAL statement_timeout = {millis}; DEALLOCATE ALL").into(),
            ),
        })
    }

    /// A pool of sessions of our own ([`migrate`]'s) as a [`Db`].
    pub fn session(pool: PgPool) -> Self {
        Self { pool, begin: None }
    }

    /// The underlying pool (for checks that need nothing else, and for tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection for several statements in a row. Behind a pooler it is a transaction (so
    /// that they all reach one server): call [`Conn::finish`] to keep what they wrote; dropped,
    /// it rolls back.
    pub async fn acquire(&self) -> sqlx::Result<Conn> {
        match &self.begin {
            None => Ok(Conn::Session(self.pool.acquire().await?)),
            Some(_) => Ok(Conn::Pooled(self.begin().await?)),
        }
    }

    /// A transaction; behind a pooler, begun as every statement's is.
    pub async fn begin(&self) -> sqlx::Result<sqlx::Transaction<'static, Postgres>> {
        match &self.begin {
            None => self.pool.begin().await,
            Some(begin) => self.pool.begin_with(begin.to_string()).await,
        }
    }
}

/// A connection from [`Db::acquire`].
pub enum Conn {
    /// A session of our own.
    Session(sqlx::pool::PoolConnection<Postgres>),
    /// A transaction through a transaction pooler.
    Pooled(sqlx::Transaction<'static, Postgres>),
}

impl Conn {
    /// Commits, behind a pooler, what the statements wrote.
    pub async fn finish(self) -> sqlx::Result<()> {
        match self {
            Self::Session(_) => Ok(()),
            Self::Pooled(tx) => tx.commit().await,
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = sqlx::PgConnection;

    fn deref(&self) -> &sqlx::PgConnection {
        match self {
            Self::Session(conn) => conn,
            Self::Pooled(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        match self {
            Self::Session(conn) => conn,
            Self::Pooled(tx) => tx,
        }
    }
}

impl<'c> Executor<'c> for &'c Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if self.begin.is_none() {
            return (&self.pool).fetch_many(query);
        }
        // Collected inside the transaction, then handed out: the results of one statement.
        let db = self.clone();
        async move {
            let mut tx = db.begin().await?;
            let results: Vec<_> = tx.fetch_many(query).try_collect().await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(futures_util::stream::iter(results.into_iter().map(Ok)))
        }
        .into_stream()
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if self.begin.is_none() {
            return (&self.pool).fetch_optional(query);
        }
        let db = self.clone();
        async move {
            let mut tx = db.begin().await?;
            let row = tx.fetch_optional(query).await?;
            tx.commit().await?;
            Ok(row)
        }
        .boxed()
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        (&self.pool).prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        (&self.pool).describe(sql)
    }
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
/// Migrations run on a connection of their own without `database.statement_timeout` (none is
/// set on it): one may
/// backfill a table of millions of rows, and a worker waiting for another's migration waits on
/// the lock rather than giving up.
///
/// Migrations newer than this binary's, applied by a newer release, are not an error: during a
/// rolling deploy the previous release's workers still start (migrations are additive; an
/// applied one is never edited).
///
/// All of it runs on `database.direct_url` when set (a session of its own, which the migrator's
/// advisory lock needs and a transaction pooler cannot keep). The pool returned is on the same
/// URL, with sessions of its own: for the CLI's administrative work.
pub async fn migrate(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let url = config.direct_url.as_deref().unwrap_or(&config.url);
    create_if_missing(url).await?;
    let mut conn = session_options(url, "taskd migrate")?
        .log_slow_statements(tracing::log::LevelFilter::Off, std::time::Duration::ZERO)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", redacted(url)))?;
    // Whatever default the role or database has: none here.
    conn.execute("SET statement_timeout = 0")
        .await
        .with_context(|| format!("preparing the migration session on {}", redacted(url)))?;
    // The migrations in `migrations/`, embedded in the binary.
    let mut migrator: Migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
        .run_direct(&mut conn)
        .await
        .context("applying database migrations")?;
    let _ = conn.close().await;
    pool(config, url)
}
