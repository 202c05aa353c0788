//! Full-text search: word prefixes, case, edits.

use super::*;

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
