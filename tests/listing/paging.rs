//! Page and cursor modes: the pages add up to the listing, cursors survive inserts and belong to their sort.

use super::*;

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
