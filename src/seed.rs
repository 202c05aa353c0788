//! `taskd seed`: realistic bulk data for demos and benchmarks.
//!
//! Each user `seed-<n>@example.com` gets five categories and `--tasks-per-user` tasks with
//! varied titles, descriptions, statuses, priorities, due dates and creation times spread over
//! the past year (ids are UUID v7 of those times). Data is deterministic: every user draws from
//! a random stream of its own, so benchmark runs are comparable, and existing seed users are
//! skipped without changing anyone else's data.
//!
//! Tasks go in in creation-time order across all users, the way a live system writes them: a
//! user's tasks end up spread over the whole table rather than packed together, so a benchmark
//! sees the heap locality production would (packing each user's rows into a few hundred pages
//! flatters every plan that reads the heap). Rows are sent as multi-row `UNNEST` inserts.
//!
//! Into an empty `tasks` table and from [`BULK`] rows on, the load is one transaction that drops
//! the table's secondary indexes, inserts, and builds them again: building an index once is
//! several times cheaper than maintaining ten of them row by row, and a failure rolls it all
//! back, indexes included (the table is locked meanwhile, so nothing sees it without them).
//! Otherwise two batches are in flight at once, so PostgreSQL can use two cores. The tables are
//! vacuumed and analysed at the end: statistics for the planner, the visibility map for
//! index-only scans, and the GIN pending list merged.

use std::{cmp::Reverse, collections::BinaryHeap};

use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use futures_util::{StreamExt, TryStreamExt, stream};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use sqlx::{Executor, PgExecutor};
use uuid::{Timestamp, Uuid};

use crate::{config::Config, worker::tokens::Passwords};

/// The flags of `taskd seed`.
#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// Users to create (`seed-<n>@example.com`).
    #[arg(long, default_value_t = 10)]
    pub users: u32,
    /// Tasks per user.
    #[arg(long, default_value_t = 100)]
    pub tasks_per_user: u32,
    /// Password of every seeded user.
    #[arg(long, default_value = "seed-password")]
    pub password: String,
}

const WORDS: &[&str] = &[
    "report",
    "invoice",
    "deploy",
    "review",
    "budget",
    "meeting",
    "design",
    "release",
    "migrate",
    "database",
    "customer",
    "contract",
    "backup",
    "security",
    "audit",
    "roadmap",
    "interview",
    "onboarding",
    "newsletter",
    "feedback",
    "dashboard",
    "metrics",
    "server",
    "cluster",
    "cache",
    "proxy",
    "refactor",
    "testing",
    "documentation",
    "quarterly",
    "weekly",
    "urgent",
    "follow",
    "call",
    "email",
    "draft",
    "plan",
    "prepare",
    "update",
    "fix",
    "bug",
    "feature",
    "payment",
    "vendor",
    "hiring",
    "training",
    "workshop",
    "presentation",
    "slides",
    "analysis",
    "research",
    "garden",
    "groceries",
    "dentist",
    "flight",
    "hotel",
    "birthday",
    "gift",
    "renew",
    "insurance",
];
const CATEGORIES: &[(&str, &str)] = &[
    ("Work", "#1e90ff"),
    ("Personal", "#2e8b57"),
    ("Errands", "#daa520"),
    ("Health", "#dc143c"),
    ("Learning", "#8a2be2"),
];
const STATUSES: &[&str] = &["pending", "in_progress", "completed"];
/// Rows per `INSERT`.
const BATCH: usize = 5_000;
/// `INSERT`s in flight at once.
const PARALLEL: usize = 2;
/// Tasks from which seeding an empty table rebuilds its indexes afterwards.
const BULK: u64 = 100_000;

fn v7_at(at: DateTime<Utc>, rng: &mut StdRng) -> Uuid {
    let ts = Timestamp::from_unix(
        uuid::NoContext,
        at.timestamp() as u64,
        at.timestamp_subsec_nanos(),
    );
    // Random low bits: the v7 counter is per process, not per past instant.
    let mut bytes = *Uuid::new_v7(ts).as_bytes();
    rng.fill(&mut bytes[8..]);
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

fn sentence(rng: &mut StdRng, words: std::ops::RangeInclusive<usize>) -> String {
    let n = rng.random_range(words);
    (0..n)
        .map(|_| *WORDS.choose(rng).expect("non-empty"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A seed user whose tasks are still being generated.
struct Owner {
    id: Uuid,
    categories: Vec<Uuid>,
    rng: StdRng,
    /// Creation times of the tasks still to come, latest first (so `pop` gives the next one).
    times: Vec<DateTime<Utc>>,
}

/// One `INSERT` worth of tasks, as the columns `UNNEST` takes.
#[derive(Default)]
struct Batch {
    ids: Vec<Uuid>,
    owners: Vec<Uuid>,
    titles: Vec<String>,
    descriptions: Vec<Option<String>>,
    statuses: Vec<&'static str>,
    priorities: Vec<i16>,
    dues: Vec<Option<DateTime<Utc>>>,
    categories: Vec<Option<Uuid>>,
    completed: Vec<Option<DateTime<Utc>>>,
    created: Vec<DateTime<Utc>>,
}

impl Batch {
    fn push(&mut self, owner: &mut Owner, at: DateTime<Utc>) {
        let rng = &mut owner.rng;
        let status = *STATUSES.choose(rng).expect("non-empty");
        self.ids.push(v7_at(at, rng));
        self.owners.push(owner.id);
        let mut title = sentence(rng, 2..=6);
        title[..1].make_ascii_uppercase();
        self.titles.push(title);
        self.descriptions
            .push(rng.random_bool(0.6).then(|| sentence(rng, 5..=30)));
        self.statuses.push(status);
        self.priorities.push(rng.random_range(0..4i16));
        self.dues.push(
            rng.random_bool(0.7)
                .then(|| at + Duration::seconds(rng.random_range(3_600..90 * 86_400))),
        );
        self.categories.push(
            rng.random_bool(0.8)
                .then(|| *owner.categories.choose(rng).expect("five categories")),
        );
        self.completed
            .push((status == "completed").then(|| at + Duration::hours(1)));
        self.created.push(at);
    }

    async fn insert<'e>(self, db: impl PgExecutor<'e>) -> anyhow::Result<u64> {
        let rows = sqlx::query(
            "INSERT INTO tasks (id, owner_id, title, description, status, priority, due_at,
                                category_id, completed_at, created_at, updated_at)
             SELECT id, owner_id, title, description, status, priority, due_at, category_id,
                    completed_at, created_at, created_at
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                         $6::smallint[], $7::timestamptz[], $8::uuid[], $9::timestamptz[],
                         $10::timestamptz[])
                  AS t(id, owner_id, title, description, status, priority, due_at, category_id,
                       completed_at, created_at)",
        )
        .bind(&self.ids)
        .bind(&self.owners)
        .bind(&self.titles)
        .bind(&self.descriptions)
        .bind(&self.statuses)
        .bind(&self.priorities)
        .bind(&self.dues)
        .bind(&self.categories)
        .bind(&self.completed)
        .bind(&self.created)
        .execute(db)
        .await
        .context("inserting tasks")?
        .rows_affected();
        Ok(rows)
    }
}

/// Yields batches of every owner's tasks, merged in creation-time order.
struct Merge {
    owners: Vec<Owner>,
    /// (next creation time, owner index), earliest on top.
    next: BinaryHeap<Reverse<(DateTime<Utc>, usize)>>,
}

impl Merge {
    fn new(owners: Vec<Owner>) -> Self {
        let next = owners
            .iter()
            .enumerate()
            .filter_map(|(i, owner)| owner.times.last().map(|at| Reverse((*at, i))))
            .collect();
        Self { owners, next }
    }
}

impl Iterator for Merge {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let mut batch = Batch::default();
        while batch.ids.len() < BATCH {
            let Some(Reverse((_, i))) = self.next.pop() else {
                break;
            };
            let owner = &mut self.owners[i];
            let at = owner.times.pop().expect("a time was queued");
            batch.push(owner, at);
            if let Some(next) = owner.times.last() {
                self.next.push(Reverse((*next, i)));
            }
        }
        (!batch.ids.is_empty()).then_some(batch)
    }
}

pub async fn run(config: &Config, args: &SeedArgs) -> anyhow::Result<()> {
    // Index builds and large batches outlast the API's statement timeout.
    let mut database = config.database.clone();
    database.statement_timeout = std::time::Duration::ZERO;
    let db = crate::db::migrate(&database).await?;
    let hash = Passwords::new(&config.auth)?
        .hash(&args.password)
        .await
        .map_err(|e| anyhow::anyhow!("hashing the seed password: {e}"))?;
    let now = Utc::now();
    let started = std::time::Instant::now();
    let mut owners = Vec::new();
    for n in 0..args.users {
        // Each user has its own stream, so skipping one does not change the others.
        let mut rng = StdRng::seed_from_u64(42 + u64::from(n));
        let email = format!("seed-{n}@example.com");
        let user_id = v7_at(now - Duration::days(400), &mut rng);
        let inserted = sqlx::query(
            "INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, $3, $4)
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(user_id)
        .bind(&email)
        .bind(format!("Seed User {n}"))
        .bind(&hash)
        .execute(&db)
        .await?
        .rows_affected();
        if inserted == 0 {
            tracing::info!(%email, "exists; skipped");
            continue;
        }
        let mut categories = Vec::new();
        for (name, color) in CATEGORIES {
            let id = v7_at(now - Duration::days(399), &mut rng);
            sqlx::query(
                "INSERT INTO categories (id, owner_id, name, color) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(user_id)
            .bind(name)
            .bind(color)
            .execute(&db)
            .await?;
            categories.push(id);
        }
        let mut times: Vec<_> = (0..args.tasks_per_user)
            .map(|_| now - Duration::seconds(rng.random_range(0..365 * 86_400)))
            .collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        owners.push(Owner {
            id: user_id,
            categories,
            rng,
            times,
        });
    }
    let users = owners.len();
    let total = users as u64 * u64::from(args.tasks_per_user);
    let mut batches = Merge::new(owners);
    let mut created = 0u64;
    let mut reported = 0u64;
    let mut progress = |rows: u64| {
        created += rows;
        if created - reported >= 100_000 {
            reported = created;
            tracing::info!(tasks = created, of = total, "seeding");
        }
    };
    let mut tx = db.begin().await?;
    tx.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        .await?;
    let empty: bool = sqlx::query_scalar("SELECT NOT EXISTS (SELECT FROM tasks)")
        .fetch_one(&mut *tx)
        .await?;
    if total >= BULK && empty {
        // Every index but the primary key's, as the catalog defines it.
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = 'tasks'::regclass
               AND NOT EXISTS (SELECT FROM pg_constraint WHERE conindid = i.indexrelid)",
        )
        .fetch_all(&mut *tx)
        .await?;
        for (name, _) in &indexes {
            let drop = format!("DROP INDEX \"{}\"", name.replace('"', "\"\""));
            tx.execute(drop.as_str()).await?;
        }
        for batch in batches.by_ref() {
            progress(batch.insert(&mut *tx).await?);
        }
        tracing::info!(indexes = indexes.len(), "building indexes");
        tx.execute("SET LOCAL maintenance_work_mem = '256MB'")
            .await?;
        for (_, definition) in &indexes {
            tx.execute(definition.as_str())
                .await
                .with_context(|| format!("rebuilding {definition}"))?;
        }
        tx.commit().await?;
    } else {
        tx.rollback().await?;
        let mut inserts = stream::iter(batches)
            .map(|batch| {
                let db = db.clone();
                async move { batch.insert(&db).await }
            })
            .buffer_unordered(PARALLEL);
        while let Some(rows) = inserts.try_next().await? {
            progress(rows);
        }
    }
    // Statistics for the planner, the visibility map for index-only scans, and the GIN pending
    // list merged into the index. `&str` runs over the simple protocol, as VACUUM requires.
    db.execute("VACUUM (ANALYZE) users, categories, tasks, task_terms")
        .await
        .context("vacuuming")?;
    tracing::info!(
        users,
        tasks = created,
        seconds = started.elapsed().as_secs(),
        "seed complete"
    );
    Ok(())
}
