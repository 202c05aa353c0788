//! `GET /api/v1/tasks`: filters, search, sorts and both paging modes, checked against an
//! independent model (`common::expect`) over a varied, seeded data set. The data set and its
//! readers are here; the tests in `sorts_and_filters`, `paging` and `search`.

#[path = "../common/mod.rs"]
mod common;
mod paging;
mod search;
mod sorts_and_filters;

use std::collections::{HashMap, HashSet};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{
    Session, TestApp, assert_field_error, assert_problem,
    expect::{Task, expected_ids, matches_search, priority_rank},
    keys, spawn_app, spawn_app_with, uuid,
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::{Value, json};
use uuid::Uuid;

const WORDS: &[&str] = &[
    "alpha",
    "Alpine",
    "bravo",
    "Charlie",
    "delta",
    "deploy",
    "Deployment",
    "echo",
    "foxtrot",
    "report",
    "Reports",
    "review",
    "refactor",
    "bug",
    "bugfix",
    "follow-up",
    "q3",
    "v2",
    "x1y2",
    "meeting",
    "migration",
    "database",
    "Data",
    "Éclair",
    "über",
];
const SEPARATORS: &[&str] = &[" ", " ", " ", ", ", "! ", " - ", ": "];
const STATUSES: &[&str] = &["pending", "in_progress", "completed"];
const PRIORITIES: &[&str] = &["low", "medium", "high", "urgent"];

/// A user with a varied set of tasks, and the model of those tasks.
struct Fixture {
    app: TestApp,
    session: Session,
    tasks: Vec<Task>,
    categories: Vec<Uuid>,
    rng: StdRng,
}

/// The instant due dates are spread around.
fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn phrase(rng: &mut StdRng, min: usize, max: usize) -> String {
    let count = rng.random_range(min..=max);
    let mut text = String::new();
    for i in 0..count {
        if i > 0 {
            text.push_str(SEPARATORS.choose(rng).unwrap());
        }
        text.push_str(WORDS.choose(rng).unwrap());
    }
    text
}

/// A random new task body; `titles` lets some titles repeat others in another case.
fn random_task(rng: &mut StdRng, categories: &[Uuid], titles: &[String]) -> Value {
    let title = match titles.choose(rng) {
        Some(previous) if rng.random_bool(0.15) => {
            if rng.random_bool(0.5) {
                previous.to_uppercase()
            } else {
                previous.clone()
            }
        }
        _ => phrase(rng, 1, 4),
    };
    let mut body = json!({"title": title});
    if rng.random_bool(0.7) {
        body["description"] = json!(phrase(rng, 2, 8));
    }
    if rng.random_bool(0.8) {
        body["status"] = json!(STATUSES.choose(rng).unwrap());
    }
    if rng.random_bool(0.8) {
        body["priority"] = json!(PRIORITIES.choose(rng).unwrap());
    }
    if rng.random_bool(0.75) {
        // Few distinct instants, so ties on dueAt are common.
        let due = base()
            + Duration::days(rng.random_range(0..30))
            + Duration::hours(*[0, 9, 17].choose(rng).unwrap());
        body["dueAt"] = json!(due.to_rfc3339());
    }
    if let Some(category) = categories.choose(rng).filter(|_| rng.random_bool(0.75)) {
        body["categoryId"] = json!(category);
    }
    body
}

fn seed() -> u64 {
    std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_123)
}

async fn fixture(count: usize) -> Fixture {
    // A fixture and its walks send well over a free user's 1 000 requests a minute; limits are
    // tested in `rate_limit.rs`.
    let app = spawn_app_with(|config| config.rate_limit.enabled = false).await;
    let session = app.register("ada@example.com").await;
    let token = session.access.clone();
    let seed = seed();
    eprintln!("data set seed {seed} (set TEST_SEED to change it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut categories = Vec::new();
    for name in ["Work", "Home", "Errands"] {
        categories.push(uuid(&app.create_category(&token, name).await["id"]));
    }
    let mut tasks: Vec<Task> = Vec::new();
    let mut titles: Vec<String> = Vec::new();
    for _ in 0..count {
        let body = random_task(&mut rng, &categories, &titles);
        let task = Task::from_json(&app.create_task(&token, &body).await);
        titles.push(task.title.clone());
        tasks.push(task);
    }
    // Change some tasks afterwards, so updatedAt order differs from createdAt order.
    for _ in 0..count / 4 {
        let i = rng.random_range(0..tasks.len());
        let change = match rng.random_range(0..3) {
            0 => json!({"priority": PRIORITIES.choose(&mut rng).unwrap()}),
            1 => json!({"status": STATUSES.choose(&mut rng).unwrap()}),
            _ => json!({"description": phrase(&mut rng, 1, 3)}),
        };
        let path = format!("/api/v1/tasks/{}", tasks[i].id);
        tasks[i] = Task::from_json(app.patch(&path, token.as_str(), &change).await.expect(200));
    }
    // Another user's tasks must never show up.
    let other = app.register("bob@example.com").await;
    for _ in 0..5 {
        let body = random_task(&mut rng, &[], &titles);
        app.create_task(other.token(), &body).await;
    }
    Fixture {
        app,
        session,
        tasks,
        categories,
        rng,
    }
}

fn enc(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn ids_of(body: &Value) -> Vec<Uuid> {
    body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data in {body}"))
        .iter()
        .map(|t| uuid(&t["id"]))
        .collect()
}

impl Fixture {
    fn token(&self) -> &str {
        &self.session.access
    }

    async fn get(&self, query: &str) -> Value {
        let resp = self
            .app
            .get(&format!("/api/v1/tasks?{query}"), self.token())
            .await;
        assert_eq!(resp.status, 200, "{query}: {}", resp.text);
        resp.body
    }

    /// Every matching id in page mode, checking the page arithmetic on the way.
    async fn all_pages(&self, query: &str, limit: usize) -> Vec<Uuid> {
        let mut ids = Vec::new();
        let mut page = 1;
        loop {
            let body = self
                .get(&format!("{query}&limit={limit}&page={page}"))
                .await;
            let pagination = &body["pagination"];
            assert_eq!(
                keys(pagination),
                ["limit", "page", "total", "totalPages"],
                "{query}"
            );
            let total = pagination["total"].as_u64().unwrap() as usize;
            assert_eq!(pagination["limit"], limit);
            assert_eq!(pagination["page"], page);
            assert_eq!(pagination["totalPages"], total.div_ceil(limit), "{query}");
            let data = ids_of(&body);
            if page > total.div_ceil(limit) {
                assert!(data.is_empty(), "{query}: page {page} is past the end");
                assert_eq!(ids.len(), total, "{query}: pages add up to the total");
                return ids;
            }
            let expected_len = limit.min(total - (page - 1) * limit);
            assert_eq!(data.len(), expected_len, "{query}: page {page}");
            ids.extend(data);
            page += 1;
        }
    }

    /// Every matching id in cursor mode, checking the cursor fields on the way.
    async fn walk(&self, query: &str, limit: usize) -> Vec<Uuid> {
        let mut ids = Vec::new();
        let mut cursor = String::new();
        for _ in 0..1000 {
            let body = self
                .get(&format!("{query}&limit={limit}&cursor={cursor}"))
                .await;
            let pagination = &body["pagination"];
            assert_eq!(
                keys(pagination),
                ["hasMore", "limit", "nextCursor"],
                "{query}"
            );
            let data = ids_of(&body);
            if pagination["hasMore"] == false {
                assert_eq!(pagination["nextCursor"], Value::Null, "{query}");
                assert!(data.len() <= limit);
                ids.extend(data);
                return ids;
            }
            assert_eq!(data.len(), limit, "{query}: a page before the last is full");
            ids.extend(data);
            cursor = pagination["nextCursor"].as_str().unwrap().to_owned();
        }
        panic!("{query}: the walk does not end");
    }
}

/// Every sort key both ways, and multi-key sorts.
const SORTS: &[&str] = &[
    "",
    "createdAt",
    "-createdAt",
    "updatedAt",
    "-updatedAt",
    "dueAt",
    "-dueAt",
    "priority",
    "-priority",
    "title",
    "-title",
    "priority,-dueAt",
    "-priority,title",
    "dueAt,-priority,title",
    "-title,createdAt",
    "priority,updatedAt",
    "-dueAt,-priority,-updatedAt",
    "priority,dueAt,-title,-createdAt,updatedAt",
];

fn sort_param(sort: &str) -> String {
    if sort.is_empty() {
        String::new()
    } else {
        format!("sort={}", enc(sort))
    }
}
