//! Sorts, filters and their validation.

use super::*;

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
