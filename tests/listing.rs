//! `GET /api/v1/tasks`: filters, search, sorts and both paging modes, checked against an
//! independent model (`common::expect`) over a varied, seeded data set.

mod common;

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

#[tokio::test]
async fn every_sort_matches_the_model() {
    let f = fixture(90).await;
    for sort in SORTS {
        let expected = expected_ids(&f.tasks, |_| true, sort);
        let body = f.get(&format!("{}&limit=100", sort_param(sort))).await;
        assert_eq!(body["pagination"]["total"], 90);
        assert_eq!(ids_of(&body), expected, "sort {sort:?}");
    }
}

#[tokio::test]
async fn filters_match_the_model() {
    let f = fixture(90).await;
    let [work, home, _] = f.categories[..] else {
        unreachable!()
    };
    let before = base() + Duration::days(10);
    let after = base() + Duration::days(20) + Duration::hours(9);
    type Filter = Box<dyn Fn(&Task) -> bool>;
    let cases: Vec<(String, Filter)> = vec![
        ("status=pending".into(), Box::new(|t| t.status == "pending")),
        (
            "status=pending,completed".into(),
            Box::new(|t| t.status != "in_progress"),
        ),
        (
            "status=in_progress".into(),
            Box::new(|t| t.status == "in_progress"),
        ),
        (
            "priority=high,urgent".into(),
            Box::new(|t| priority_rank(&t.priority) >= 2),
        ),
        ("priority=low".into(), Box::new(|t| t.priority == "low")),
        (
            format!("categoryId={work}"),
            Box::new(move |t| t.category_id == Some(work)),
        ),
        (
            "categoryId=none".into(),
            Box::new(|t| t.category_id.is_none()),
        ),
        (
            format!("categoryId={}", Uuid::now_v7()),
            Box::new(|_| false),
        ),
        (
            format!("dueBefore={}", enc(&before.to_rfc3339())),
            Box::new(move |t| t.due_at.is_some_and(|d| d < before)),
        ),
        (
            format!("dueAfter={}", enc(&after.to_rfc3339())),
            Box::new(move |t| t.due_at.is_some_and(|d| d > after)),
        ),
        (
            // The same instant written with an offset.
            format!("dueAfter={}", enc("2030-01-21T11:00:00+02:00")),
            Box::new(move |t| t.due_at.is_some_and(|d| d > after)),
        ),
        (
            format!(
                "dueAfter={}&dueBefore={}",
                enc(&before.to_rfc3339()),
                enc(&after.to_rfc3339())
            ),
            Box::new(move |t| t.due_at.is_some_and(|d| d > before && d < after)),
        ),
        (
            format!("status=pending,in_progress&priority=medium,high,urgent&categoryId={home}"),
            Box::new(move |t| {
                t.status != "completed" && t.priority != "low" && t.category_id == Some(home)
            }),
        ),
        (
            format!(
                "categoryId=none&dueBefore={}&priority=low,urgent",
                enc(&after.to_rfc3339())
            ),
            Box::new(move |t| {
                t.category_id.is_none()
                    && t.due_at.is_some_and(|d| d < after)
                    && (t.priority == "low" || t.priority == "urgent")
            }),
        ),
    ];
    let mut non_trivial = 0;
    for (query, filter) in &cases {
        for sort in ["", "dueAt", "-priority,title"] {
            let expected = expected_ids(&f.tasks, filter, sort);
            let body = f
                .get(&format!("{query}&{}&limit=100", sort_param(sort)))
                .await;
            assert_eq!(
                body["pagination"]["total"],
                expected.len(),
                "{query} sort {sort:?}"
            );
            assert_eq!(ids_of(&body), expected, "{query} sort {sort:?}");
            if !expected.is_empty() && expected.len() < f.tasks.len() {
                non_trivial += 1;
            }
        }
    }
    assert!(non_trivial >= 30, "the data set exercises the filters");
}

#[tokio::test]
async fn search_matches_word_prefixes_case_insensitively() {
    let f = fixture(90).await;
    let queries = [
        "rep",
        "REPORT",
        "reports",
        "deploy",
        "deployment",
        "alp bra",
        "Alpha, bravo!",
        "follow-up",
        "up",
        "fol rev",
        "ü",
        "ÉCL",
        "x1",
        "y2",
        "q",
        "q3 data",
        "v",
        "zzz",
        "bugf",
        "bug fix",
        "  ,,  ",
    ];
    let mut non_trivial = 0;
    for query in queries {
        for filter in ["", "&status=pending,in_progress"] {
            let expected = expected_ids(
                &f.tasks,
                |t| matches_search(t, query) && (filter.is_empty() || t.status != "completed"),
                "title",
            );
            let body = f
                .get(&format!(
                    "search={}{filter}&sort=title&limit=100",
                    enc(query)
                ))
                .await;
            assert_eq!(ids_of(&body), expected, "search {query:?}{filter}");
            if !expected.is_empty() && expected.len() < f.tasks.len() {
                non_trivial += 1;
            }
        }
    }
    assert!(non_trivial >= 20, "the data set exercises search");
}

#[tokio::test]
async fn pages_concatenate_to_the_whole_listing() {
    let f = fixture(75).await;
    for (query, filter) in [
        ("", Box::new(|_: &Task| true) as Box<dyn Fn(&Task) -> bool>),
        (
            "status=pending,completed",
            Box::new(|t: &Task| t.status != "in_progress"),
        ),
    ] {
        for sort in ["", "title", "-dueAt,priority", "priority"] {
            for limit in [7, 25, 100] {
                let expected = expected_ids(&f.tasks, filter.as_ref(), sort);
                let ids = f
                    .all_pages(&format!("{query}&{}", sort_param(sort)), limit)
                    .await;
                assert_eq!(ids, expected, "{query} sort {sort:?} limit {limit}");
            }
        }
    }
    // Defaults: 20 per page, page 1.
    let body = f.get("").await;
    assert_eq!(
        body["pagination"],
        json!({"limit": 20, "page": 1, "total": 75, "totalPages": 4})
    );
    assert_eq!(ids_of(&body), expected_ids(&f.tasks, |_| true, "")[..20]);
    let far = f.get("page=1000").await;
    assert_eq!(far["data"], json!([]));
    assert_eq!(far["pagination"]["total"], 75);
}

#[tokio::test]
async fn cursor_walks_visit_every_row_once_in_order() {
    let f = fixture(75).await;
    for sort in SORTS {
        for limit in [1, 8, 75, 100] {
            if limit == 1 && sort.contains(',') {
                continue; // keep the run short; single keys cover limit 1
            }
            let expected = expected_ids(&f.tasks, |_| true, sort);
            let ids = f.walk(&sort_param(sort), limit).await;
            assert_eq!(ids, expected, "sort {sort:?} limit {limit}");
        }
    }
    let [work, ..] = f.categories[..] else {
        unreachable!()
    };
    let filtered = format!("categoryId={work}&search=a&status=pending,completed");
    for sort in ["dueAt", "-title", "priority,-dueAt"] {
        let expected = expected_ids(
            &f.tasks,
            |t| t.category_id == Some(work) && matches_search(t, "a") && t.status != "in_progress",
            sort,
        );
        let ids = f.walk(&format!("{filtered}&{}", sort_param(sort)), 3).await;
        assert_eq!(ids, expected, "{filtered} sort {sort:?}");
    }
    // Nothing matches: one empty, final page.
    let body = f.get("search=zzz&cursor=").await;
    assert_eq!(
        body,
        json!({"data": [], "pagination": {"limit": 20, "nextCursor": null, "hasMore": false}})
    );
}

#[tokio::test]
async fn cursor_walks_survive_inserts() {
    let mut f = fixture(40).await;
    let titles: Vec<String> = f.tasks.iter().map(|t| t.title.clone()).collect();
    for sort in [
        "",
        "title",
        "dueAt",
        "-dueAt",
        "-priority,title",
        "updatedAt",
    ] {
        let before: Vec<Uuid> = expected_ids(&f.tasks, |_| true, sort);
        let mut seen = Vec::new();
        let mut inserted = HashSet::new();
        let mut cursor = String::new();
        for _ in 0..1000 {
            let body = f
                .get(&format!("{}&limit=6&cursor={cursor}", sort_param(sort)))
                .await;
            seen.extend(ids_of(&body));
            // Rows land before, at and after the walk's position.
            for _ in 0..3 {
                let body = random_task(&mut f.rng, &f.categories, &titles);
                let task = Task::from_json(&f.app.create_task(f.token(), &body).await);
                inserted.insert(task.id);
                f.tasks.push(task);
            }
            if body["pagination"]["hasMore"] == false {
                break;
            }
            cursor = body["pagination"]["nextCursor"]
                .as_str()
                .unwrap()
                .to_owned();
        }
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        for id in &seen {
            *counts.entry(*id).or_default() += 1;
        }
        assert!(
            counts.values().all(|&n| n == 1),
            "sort {sort:?}: a row was returned twice"
        );
        assert!(
            seen.iter()
                .all(|id| inserted.contains(id) || before.contains(id)),
            "sort {sort:?}: an unknown row"
        );
        let old: Vec<Uuid> = seen
            .iter()
            .copied()
            .filter(|id| !inserted.contains(id))
            .collect();
        assert_eq!(
            old, before,
            "sort {sort:?}: every earlier row once, in order"
        );
    }
}

#[tokio::test]
async fn cursors_belong_to_their_sort() {
    let f = fixture(12).await;
    let body = f.get("sort=title&limit=5&cursor=").await;
    let cursor = body["pagination"]["nextCursor"]
        .as_str()
        .unwrap()
        .to_owned();
    // The same sort continues ...
    f.get(&format!("sort=title&limit=5&cursor={cursor}")).await;
    // ... another one is refused.
    for sort in ["-title", "title,createdAt", "createdAt"] {
        let resp = f
            .app
            .get(
                &format!("/api/v1/tasks?sort={}&cursor={cursor}", enc(sort)),
                f.token(),
            )
            .await;
        assert_field_error(&resp, 400, "cursor");
    }
    let resp = f
        .app
        .get(&format!("/api/v1/tasks?cursor={cursor}"), f.token())
        .await;
    assert_field_error(&resp, 400, "cursor");

    let forge = |token: Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap());
    let id = Uuid::now_v7();
    let bad_cursors = [
        "garbage".to_owned(),
        "!!!".to_owned(),
        URL_SAFE_NO_PAD.encode(b"not json"),
        forge(json!({"s": "title", "v": [], "i": id})),
        forge(json!({"s": "title", "v": [5], "i": id})),
        forge(json!({"s": "dueAt", "v": ["yesterday"], "i": id})),
        forge(json!({"s": "priority", "v": [100000], "i": id})),
        forge(json!({"s": "title", "v": ["a"], "i": "not-a-uuid"})),
        // Text PostgreSQL cannot hold: still the client's mistake, not a 5xx.
        forge(json!({"s": "title", "v": ["a\u{0}"], "i": id})),
    ];
    let sorts = [
        "title", "title", "title", "title", "title", "dueAt", "priority", "title", "title",
    ];
    for (cursor, sort) in bad_cursors.iter().zip(sorts) {
        let resp = f
            .app
            .get(
                &format!("/api/v1/tasks?sort={sort}&cursor={}", enc(cursor)),
                f.token(),
            )
            .await;
        assert_problem(&resp, 400);
    }
    // A well-formed forged cursor is just a position.
    let resp = f
        .app
        .get(
            &format!(
                "/api/v1/tasks?sort=dueAt&cursor={}",
                forge(json!({"s": "dueAt", "v": [null], "i": Uuid::nil()}))
            ),
            f.token(),
        )
        .await;
    resp.expect(200);
}

#[tokio::test]
async fn malformed_query_parameters_are_400() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let cases = [
        ("bogus=1", None),
        ("limit=0", Some("limit")),
        ("limit=101", Some("limit")),
        ("limit=-1", Some("limit")),
        ("limit=ten", Some("limit")),
        ("page=0", Some("page")),
        ("page=-3", Some("page")),
        ("page=x", Some("page")),
        ("page=1&cursor=", Some("cursor")),
        ("status=done", Some("status")),
        ("status=pending,", Some("status")),
        ("priority=extreme", Some("priority")),
        ("categoryId=abc", Some("categoryId")),
        ("dueBefore=yesterday", Some("dueBefore")),
        ("dueAfter=2030-01-01", Some("dueAfter")),
        ("sort=name", Some("sort")),
        ("sort=-", Some("sort")),
        ("sort=title,", Some("sort")),
        ("status=pending&status=completed", None),
    ];
    for (query, field) in cases {
        let resp = app
            .get(&format!("/api/v1/tasks?{query}"), session.token())
            .await;
        match field {
            Some(field) => {
                assert_eq!(resp.status, 400, "{query}: {}", resp.text);
                assert_field_error(&resp, 400, field);
            }
            None => {
                assert_eq!(resp.status, 400, "{query}: {}", resp.text);
                assert_problem(&resp, 400);
            }
        }
    }
    // Every mistake is reported at once.
    let resp = app
        .get("/api/v1/tasks?limit=0&status=x&sort=y", session.token())
        .await;
    let body = assert_problem(&resp, 400);
    assert_eq!(body["errors"].as_array().unwrap().len(), 3, "{}", resp.text);
    // The boundaries themselves are fine.
    for query in [
        "limit=1",
        "limit=100",
        "page=1",
        "cursor=",
        "status=pending,completed",
    ] {
        app.get(&format!("/api/v1/tasks?{query}"), session.token())
            .await
            .expect(200);
    }
}

/// Search asks the index for the owner's words that start with each prefix (the owner's
/// vocabulary, kept by triggers): words an edit adds are found at once, words it removes no longer
/// match, and a prefix shared by more words than are spelled out stays exact. Both paging modes
/// and the page total agree.
#[tokio::test]
async fn search_follows_edits_and_prefixes_of_many_words() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();
    let search = |query: &str| {
        let app = &app;
        let query = enc(query);
        async move {
            let page = app
                .get(
                    &format!("/api/v1/tasks?search={query}&sort=title&limit=100"),
                    token,
                )
                .await;
            let page = page.expect(200).clone();
            let cursor = app
                .get(
                    &format!("/api/v1/tasks?search={query}&sort=title&limit=100&cursor="),
                    token,
                )
                .await;
            let ids = ids_of(&page);
            assert_eq!(ids_of(cursor.expect(200)), ids, "cursor mode, {query}");
            assert_eq!(page["pagination"]["total"], ids.len(), "total, {query}");
            ids
        }
    };

    let report = uuid(
        &app.create_task(token, &json!({"title": "Alpha report"}))
            .await["id"],
    );
    // 70 words sharing the prefix "pfx" (more than the 64 spelled out), and one of them alone.
    let many: Vec<String> = (0..70).map(|i| format!("pfx{i}")).collect();
    let wide = uuid(
        &app.create_task(
            token,
            &json!({"title": "Wide", "description": many.join(" ")}),
        )
        .await["id"],
    );
    let narrow = uuid(
        &app.create_task(token, &json!({"title": "Narrow pfx5"}))
            .await["id"],
    );

    assert_eq!(search("repo").await, [report]);
    assert_eq!(search("pfx").await, [narrow, wide]);
    assert_eq!(search("pfx5").await, [narrow, wide]);
    assert_eq!(search("pfx69").await, [wide]);
    assert_eq!(search("pfx69 wid").await, [wide]);
    assert_eq!(search("pfx7 narrow").await, Vec::<Uuid>::new());
    assert_eq!(search("summ").await, Vec::<Uuid>::new());

    // An edit: "report" leaves the task, "summary" arrives.
    app.patch(
        &format!("/api/v1/tasks/{report}"),
        token,
        &json!({"title": "Alpha summary"}),
    )
    .await
    .expect(200);
    assert_eq!(search("repo").await, Vec::<Uuid>::new());
    assert_eq!(search("summ alp").await, [report]);
    // A word seen for the first time, in a new task.
    let zebra = uuid(
        &app.create_task(token, &json!({"title": "Zebra crossing"}))
            .await["id"],
    );
    assert_eq!(search("zeb").await, [zebra]);
    // Another owner's words are not this owner's.
    let other = app.register("bob@example.com").await;
    app.create_task(other.token(), &json!({"title": "Yak report"}))
        .await;
    assert_eq!(search("yak").await, Vec::<Uuid>::new());
    assert_eq!(search("repo").await, Vec::<Uuid>::new());
}
