//! `taskd seed`: realistic bulk data for demos and benchmarks.
//!
//! Each user `seed-<n>@example.com` gets five categories and `--tasks-per-user` tasks with
//! varied titles, descriptions, statuses, priorities, due dates and creation times spread over
//! the past year (ids are UUID v7 of those times). Rows go in with multi-row `UNNEST` inserts.
//! Data is deterministic, so benchmark runs are comparable. Existing seed users are skipped.

use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use uuid::{Timestamp, Uuid};

use crate::{cli::SeedArgs, config::Config, worker::tokens::Passwords};

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
const BATCH: usize = 5_000;

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

pub async fn run(config: &Config, args: &SeedArgs) -> anyhow::Result<()> {
    let db = crate::db::migrate(&config.database).await?;
    let hash = Passwords::new(&config.auth)?
        .hash(&args.password)
        .await
        .map_err(|e| anyhow::anyhow!("hashing the seed password: {e}"))?;
    let mut rng = StdRng::seed_from_u64(42);
    let now = Utc::now();
    let started = std::time::Instant::now();
    let mut created = 0u64;
    for n in 0..args.users {
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
        let mut category_ids = Vec::new();
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
            category_ids.push(id);
        }
        let total = args.tasks_per_user as usize;
        let mut done = 0;
        while done < total {
            let size = BATCH.min(total - done);
            let mut ids = Vec::with_capacity(size);
            let mut titles = Vec::with_capacity(size);
            let mut descriptions: Vec<Option<String>> = Vec::with_capacity(size);
            let mut statuses = Vec::with_capacity(size);
            let mut priorities = Vec::with_capacity(size);
            let mut dues: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(size);
            let mut categories: Vec<Option<Uuid>> = Vec::with_capacity(size);
            let mut completed: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(size);
            let mut created_at = Vec::with_capacity(size);
            for _ in 0..size {
                let at = now - Duration::seconds(rng.random_range(0..365 * 86_400));
                let status = *STATUSES.choose(&mut rng).expect("non-empty");
                ids.push(v7_at(at, &mut rng));
                let mut title = sentence(&mut rng, 2..=6);
                title[..1].make_ascii_uppercase();
                titles.push(title);
                descriptions.push(rng.random_bool(0.6).then(|| sentence(&mut rng, 5..=30)));
                statuses.push(status);
                priorities.push(rng.random_range(0..4i16));
                dues.push(
                    rng.random_bool(0.7)
                        .then(|| at + Duration::seconds(rng.random_range(3_600..90 * 86_400))),
                );
                categories.push(
                    rng.random_bool(0.8)
                        .then(|| *category_ids.choose(&mut rng).expect("five categories")),
                );
                completed.push((status == "completed").then(|| at + Duration::hours(1)));
                created_at.push(at);
            }
            sqlx::query(
                "INSERT INTO tasks (id, owner_id, title, description, status, priority, due_at,
                                    category_id, completed_at, created_at, updated_at)
                 SELECT id, $1, title, description, status, priority, due_at, category_id,
                        completed_at, created_at, created_at
                 FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::text[], $6::smallint[],
                             $7::timestamptz[], $8::uuid[], $9::timestamptz[], $10::timestamptz[])
                      AS t(id, title, description, status, priority, due_at, category_id,
                           completed_at, created_at)",
            )
            .bind(user_id)
            .bind(&ids)
            .bind(&titles)
            .bind(&descriptions)
            .bind(&statuses)
            .bind(&priorities)
            .bind(&dues)
            .bind(&categories)
            .bind(&completed)
            .bind(&created_at)
            .execute(&db)
            .await
            .context("inserting tasks")?;
            done += size;
            created += size as u64;
        }
        tracing::info!(%email, tasks = total, "seeded");
    }
    sqlx::query("ANALYZE users, categories, tasks")
        .execute(&db)
        .await?;
    tracing::info!(
        users = args.users,
        tasks = created,
        seconds = started.elapsed().as_secs(),
        "seed complete"
    );
    Ok(())
}
