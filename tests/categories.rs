//! `/api/v1/categories`: CRUD, per-owner case-insensitive names, listing, isolation.

mod common;

use common::{assert_field_error, assert_problem, keys, spawn_app, uuid};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn create_read_update_delete() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();

    let resp = app
        .post(
            "/api/v1/categories",
            token,
            &json!({"name": " Work ", "color": "#1E90FF"}),
        )
        .await;
    let created = resp.expect(201).clone();
    assert_eq!(
        keys(&created),
        ["color", "createdAt", "id", "name", "updatedAt"]
    );
    assert_eq!(created["name"], "Work");
    assert_eq!(created["color"], "#1e90ff");
    let path = format!("/api/v1/categories/{}", uuid(&created["id"]));
    assert_eq!(app.get(&path, token).await.expect(200), &created);

    let resp = app.patch(&path, token, &json!({"name": "Office"})).await;
    let renamed = resp.expect(200).clone();
    assert_eq!(renamed["name"], "Office");
    assert_eq!(renamed["color"], "#1e90ff", "absent color is kept");
    assert_eq!(renamed["createdAt"], created["createdAt"]);
    assert_ne!(renamed["updatedAt"], created["updatedAt"]);

    let resp = app.patch(&path, token, &json!({"color": null})).await;
    let cleared = resp.expect(200);
    assert_eq!(cleared["color"], serde_json::Value::Null);
    assert_eq!(cleared["name"], "Office");

    let resp = app.delete(&path, token).await;
    assert_eq!(resp.status, 204, "{}", resp.text);
    assert_problem(&app.get(&path, token).await, 404);
    assert_problem(&app.delete(&path, token).await, 404);
    assert_problem(&app.patch(&path, token, &json!({"name": "x"})).await, 404);

    // A category without a color.
    let plain = app.create_category(token, "Home").await;
    assert_eq!(plain["color"], serde_json::Value::Null);
}

#[tokio::test]
async fn names_are_unique_per_owner_regardless_of_case() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    app.create_category(ada.token(), "Work").await;
    let home = app.create_category(ada.token(), "Home").await;

    for name in ["Work", "work", "WORK", " work "] {
        let resp = app
            .post("/api/v1/categories", ada.token(), &json!({"name": name}))
            .await;
        assert_problem(&resp, 409);
    }
    let path = format!("/api/v1/categories/{}", uuid(&home["id"]));
    assert_problem(
        &app.patch(&path, ada.token(), &json!({"name": "wORK"}))
            .await,
        409,
    );
    // Renaming to a different case of its own name is fine.
    let resp = app
        .patch(&path, ada.token(), &json!({"name": "HOME"}))
        .await;
    assert_eq!(resp.expect(200)["name"], "HOME");
    // Another user may use the same name.
    app.create_category(bob.token(), "work").await;
}

#[tokio::test]
async fn fields_are_validated() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();
    let cases = [
        (json!({"name": ""}), "name"),
        (json!({"name": "   "}), "name"),
        (json!({"name": "x".repeat(65)}), "name"),
        (json!({"name": "ok", "color": "blue"}), "color"),
        (json!({"name": "ok", "color": "#12345"}), "color"),
        (json!({"name": "ok", "color": "#12345g"}), "color"),
        (json!({"color": "#123456"}), "name"),
        (json!({"name": "ok", "icon": "x"}), "icon"),
        (json!({"name": 5}), "name"),
    ];
    for (body, field) in &cases {
        let resp = app.post("/api/v1/categories", token, body).await;
        assert_field_error(&resp, 422, field);
    }
    app.create_category(token, &"é".repeat(64)).await;

    let category = app.create_category(token, "Work").await;
    let path = format!("/api/v1/categories/{}", uuid(&category["id"]));
    for (body, field) in [
        (json!({"name": ""}), "name"),
        (json!({"color": "red"}), "color"),
        (json!({"owner": "x"}), "owner"),
    ] {
        let resp = app.patch(&path, token, &body).await;
        assert_field_error(&resp, 422, field);
    }
    assert_eq!(app.get(&path, token).await.expect(200), &category);
}

#[tokio::test]
async fn listing_is_by_name_with_search_and_both_paging_modes() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();
    let names = [
        "work",
        "Home",
        "errands",
        "Garden",
        "books",
        "Work Travel",
        "health",
        "Admin",
        "zoo",
        "Finance",
    ];
    for name in names {
        app.create_category(token, name).await;
    }
    let mut expected: Vec<&str> = names.to_vec();
    expected.sort_by_key(|n| n.to_lowercase());

    let resp = app.get("/api/v1/categories?limit=100", token).await;
    let body = resp.expect(200);
    let listed: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(
        body["pagination"],
        json!({"limit": 100, "page": 1, "total": 10, "totalPages": 1})
    );

    let mut paged = Vec::new();
    for page in 1..=4 {
        let resp = app
            .get(&format!("/api/v1/categories?limit=3&page={page}"), token)
            .await;
        let body = resp.expect(200).clone();
        assert_eq!(body["pagination"]["totalPages"], 4);
        paged.extend(
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(paged, expected);

    let mut walked = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10 {
        let resp = app
            .get(
                &format!("/api/v1/categories?limit=3&cursor={cursor}"),
                token,
            )
            .await;
        let body = resp.expect(200).clone();
        walked.extend(
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_owned()),
        );
        if body["pagination"]["hasMore"] == false {
            assert_eq!(body["pagination"]["nextCursor"], serde_json::Value::Null);
            break;
        }
        cursor = body["pagination"]["nextCursor"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    assert_eq!(walked, expected);

    let resp = app.get("/api/v1/categories?search=WORK", token).await;
    let found: Vec<&str> = resp.expect(200)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(found, ["work", "Work Travel"]);

    for query in [
        "bogus=1",
        "limit=0",
        "limit=101",
        "page=0",
        "page=1&cursor=",
        "cursor=xyz",
    ] {
        let resp = app.get(&format!("/api/v1/categories?{query}"), token).await;
        assert_problem(&resp, 400);
    }
}

#[tokio::test]
async fn another_users_category_is_not_found() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let category = app.create_category(ada.token(), "Secret").await;
    let path = format!("/api/v1/categories/{}", uuid(&category["id"]));

    let missing = app
        .get(
            &format!("/api/v1/categories/{}", Uuid::now_v7()),
            bob.token(),
        )
        .await;
    let missing = assert_problem(&missing, 404).clone();
    let resp = app.get(&path, bob.token()).await;
    assert_eq!(assert_problem(&resp, 404)["detail"], missing["detail"]);
    assert_problem(
        &app.patch(&path, bob.token(), &json!({"name": "Mine"}))
            .await,
        404,
    );
    assert_problem(&app.delete(&path, bob.token()).await, 404);
    let listed = app.get("/api/v1/categories", bob.token()).await;
    assert_eq!(listed.expect(200)["data"], json!([]));

    // Untouched for its owner.
    assert_eq!(app.get(&path, ada.token()).await.expect(200), &category);
}

#[tokio::test]
async fn deleting_a_category_keeps_its_tasks() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();
    let work = app.create_category(token, "Work").await;
    let home = app.create_category(token, "Home").await;
    let in_work = app
        .create_task(token, &json!({"title": "report", "categoryId": work["id"]}))
        .await;
    let in_home = app
        .create_task(token, &json!({"title": "dishes", "categoryId": home["id"]}))
        .await;
    assert_eq!(in_work["categoryId"], work["id"]);

    let resp = app
        .delete(&format!("/api/v1/categories/{}", uuid(&work["id"])), token)
        .await;
    assert_eq!(resp.status, 204);

    let task = app
        .get(&format!("/api/v1/tasks/{}", uuid(&in_work["id"])), token)
        .await;
    let task = task.expect(200);
    assert_eq!(task["categoryId"], serde_json::Value::Null);
    assert_eq!(task["title"], "report");
    let other = app
        .get(&format!("/api/v1/tasks/{}", uuid(&in_home["id"])), token)
        .await;
    assert_eq!(other.expect(200)["categoryId"], home["id"]);
    let none = app.get("/api/v1/tasks?categoryId=none", token).await;
    let ids: Vec<&serde_json::Value> = none.expect(200)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["id"])
        .collect();
    assert_eq!(ids, [&in_work["id"]]);
}
