//! `/api/v1/tasks` CRUD: defaults, `completedAt`, PATCH semantics, validation, isolation.

mod common;

use std::{collections::HashSet, sync::Arc};

use common::{assert_field_error, assert_problem, keys, spawn_app, uuid};
use serde_json::{Value, json};
use uuid::Uuid;

fn task_path(task: &Value) -> String {
    format!("/api/v1/tasks/{}", uuid(&task["id"]))
}

#[tokio::test]
async fn create_applies_defaults_and_reads_back() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let resp = app
        .post(
            "/api/v1/tasks",
            session.token(),
            &json!({"title": "  Write report  "}),
        )
        .await;
    let task = resp.expect(201).clone();
    assert_eq!(
        keys(&task),
        [
            "categoryId",
            "completedAt",
            "createdAt",
            "description",
            "dueAt",
            "id",
            "ownerId",
            "priority",
            "status",
            "title",
            "updatedAt"
        ]
    );
    assert_eq!(task["title"], "Write report");
    assert_eq!(task["status"], "pending");
    assert_eq!(task["priority"], "medium");
    for field in ["description", "dueAt", "categoryId", "completedAt"] {
        assert_eq!(task[field], Value::Null, "{field}");
    }
    assert_eq!(task["ownerId"], session.user["id"]);
    let id = uuid(&task["id"]);
    assert_eq!(id.get_version_num(), 7);
    assert!(task["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        app.get(&task_path(&task), session.token())
            .await
            .expect(200),
        &task
    );

    let category = app.create_category(session.token(), "Work").await;
    let full = app
        .create_task(
            session.token(),
            &json!({
                "title": "Everything",
                "description": "all the fields",
                "status": "in_progress",
                "priority": "urgent",
                "dueAt": "2030-01-02T03:04:05+02:00",
                "categoryId": category["id"],
            }),
        )
        .await;
    assert_eq!(full["description"], "all the fields");
    assert_eq!(full["status"], "in_progress");
    assert_eq!(full["priority"], "urgent");
    assert_eq!(full["dueAt"], "2030-01-02T01:04:05Z");
    assert_eq!(full["categoryId"], category["id"]);
    assert_eq!(full["completedAt"], Value::Null);
}

#[tokio::test]
async fn completed_at_follows_the_status() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();

    let done = app
        .create_task(token, &json!({"title": "done", "status": "completed"}))
        .await;
    assert!(done["completedAt"].is_string(), "{done}");

    let task = app.create_task(token, &json!({"title": "t"})).await;
    let path = task_path(&task);
    let completed = app
        .patch(&path, token, &json!({"status": "completed"}))
        .await
        .expect(200)
        .clone();
    let completed_at = completed["completedAt"].clone();
    assert!(completed_at.is_string(), "{completed}");

    // Other changes, and completing again, keep the first completion time.
    let again = app
        .patch(&path, token, &json!({"status": "completed", "title": "t2"}))
        .await;
    assert_eq!(again.expect(200)["completedAt"], completed_at);
    let renamed = app.patch(&path, token, &json!({"priority": "low"})).await;
    assert_eq!(renamed.expect(200)["completedAt"], completed_at);

    for status in ["in_progress", "pending"] {
        app.patch(&path, token, &json!({"status": "completed"}))
            .await
            .expect(200);
        let reopened = app.patch(&path, token, &json!({"status": status})).await;
        let reopened = reopened.expect(200);
        assert_eq!(reopened["status"], status);
        assert_eq!(reopened["completedAt"], Value::Null);
    }
    let read = app.get(&path, token).await;
    assert_eq!(read.expect(200)["completedAt"], Value::Null);
}

#[tokio::test]
async fn patch_is_partial_and_null_clears() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();
    let category = app.create_category(token, "Work").await;
    let other_category = app.create_category(token, "Home").await;
    let task = app
        .create_task(
            token,
            &json!({
                "title": "t",
                "description": "d",
                "priority": "high",
                "dueAt": "2030-01-01T00:00:00Z",
                "categoryId": category["id"],
            }),
        )
        .await;
    let path = task_path(&task);

    // Absent fields are kept.
    let resp = app.patch(&path, token, &json!({"title": "renamed"})).await;
    let renamed = resp.expect(200).clone();
    assert_eq!(renamed["title"], "renamed");
    for field in [
        "description",
        "priority",
        "dueAt",
        "categoryId",
        "status",
        "createdAt",
    ] {
        assert_eq!(renamed[field], task[field], "{field}");
    }
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert!(time(&renamed["updatedAt"]) > time(&task["updatedAt"]));

    // An empty patch changes nothing.
    let same = app.patch(&path, token, &json!({})).await;
    assert_eq!(same.expect(200), &renamed);

    let resp = app
        .patch(
            &path,
            token,
            &json!({"dueAt": "2031-06-01T12:00:00Z", "categoryId": other_category["id"]}),
        )
        .await;
    let moved = resp.expect(200).clone();
    assert_eq!(moved["dueAt"], "2031-06-01T12:00:00Z");
    assert_eq!(moved["categoryId"], other_category["id"]);
    assert_eq!(moved["description"], "d");

    // `null` clears each nullable field, and only that one.
    let resp = app.patch(&path, token, &json!({"description": null})).await;
    let cleared = resp.expect(200).clone();
    assert_eq!(cleared["description"], Value::Null);
    assert_eq!(cleared["dueAt"], moved["dueAt"]);
    let resp = app.patch(&path, token, &json!({"dueAt": null})).await;
    let cleared = resp.expect(200).clone();
    assert_eq!(cleared["dueAt"], Value::Null);
    assert_eq!(cleared["categoryId"], other_category["id"]);
    let resp = app.patch(&path, token, &json!({"categoryId": null})).await;
    let cleared = resp.expect(200).clone();
    assert_eq!(cleared["categoryId"], Value::Null);
    assert_eq!(cleared["title"], "renamed");
    assert_eq!(cleared["priority"], "high");

    assert_eq!(app.get(&path, token).await.expect(200), &cleared);
}

#[tokio::test]
async fn delete_is_204_then_404() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let task = app
        .create_task(session.token(), &json!({"title": "t"}))
        .await;
    let path = task_path(&task);
    let resp = app.delete(&path, session.token()).await;
    assert_eq!(resp.status, 204);
    assert!(resp.text.is_empty());
    assert_problem(&app.get(&path, session.token()).await, 404);
    assert_problem(&app.delete(&path, session.token()).await, 404);
    assert_problem(
        &app.patch(&path, session.token(), &json!({"title": "x"}))
            .await,
        404,
    );
    let list = app.get("/api/v1/tasks", session.token()).await;
    assert_eq!(list.expect(200)["pagination"]["total"], 0);
}

#[tokio::test]
async fn create_validates_fields() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();
    let cases = [
        (json!({}), "title"),
        (json!({"title": ""}), "title"),
        (json!({"title": "   "}), "title"),
        (json!({"title": "x".repeat(201)}), "title"),
        (json!({"title": 42}), "title"),
        (
            json!({"title": "t", "description": "x".repeat(10_001)}),
            "description",
        ),
        (json!({"title": "t", "status": "done"}), "status"),
        (json!({"title": "t", "status": "Pending"}), "status"),
        (json!({"title": "t", "priority": "critical"}), "priority"),
        (json!({"title": "t", "priority": 2}), "priority"),
        (json!({"title": "t", "dueAt": "tomorrow"}), "dueAt"),
        (json!({"title": "t", "dueAt": "2030-01-01"}), "dueAt"),
        (
            json!({"title": "t", "categoryId": "not-a-uuid"}),
            "categoryId",
        ),
        (
            json!({"title": "t", "categoryId": Uuid::now_v7()}),
            "categoryId",
        ),
        (json!({"title": "t", "ownerId": Uuid::now_v7()}), "ownerId"),
        (json!({"title": "t", "colour": "red"}), "colour"),
        (
            json!({"title": "t", "completedAt": "2030-01-01T00:00:00Z"}),
            "completedAt",
        ),
    ];
    for (body, field) in &cases {
        let resp = app.post("/api/v1/tasks", token, body).await;
        assert_field_error(&resp, 422, field);
    }
    let resp = app.post("/api/v1/tasks", token, &json!(["title"])).await;
    assert_problem(&resp, 422);
    let list = app.get("/api/v1/tasks", token).await;
    assert_eq!(
        list.expect(200)["pagination"]["total"],
        0,
        "nothing was created"
    );

    // The limits themselves are allowed, counted in characters.
    app.create_task(token, &json!({"title": "x".repeat(200)}))
        .await;
    app.create_task(token, &json!({"title": "é".repeat(200)}))
        .await;
    app.create_task(
        token,
        &json!({"title": "t", "description": "ü".repeat(10_000)}),
    )
    .await;
    app.create_task(token, &json!({"title": "t", "description": ""}))
        .await;
}

#[tokio::test]
async fn patch_validates_fields() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let token = session.token();
    let task = app.create_task(token, &json!({"title": "t"})).await;
    let path = task_path(&task);
    let cases = [
        (json!({"title": ""}), "title"),
        (json!({"title": "x".repeat(201)}), "title"),
        (json!({"description": "x".repeat(10_001)}), "description"),
        (json!({"status": "archived"}), "status"),
        (json!({"priority": "none"}), "priority"),
        (json!({"dueAt": "soon"}), "dueAt"),
        (json!({"categoryId": Uuid::now_v7()}), "categoryId"),
        (json!({"id": Uuid::now_v7()}), "id"),
        // `null` clears only nullable fields; for the others it is an error, not a no-op.
        (json!({"title": null}), "title"),
        (json!({"status": null}), "status"),
        (json!({"priority": null}), "priority"),
    ];
    for (body, field) in &cases {
        let resp = app.patch(&path, token, body).await;
        assert_field_error(&resp, 422, field);
    }
    assert_eq!(app.get(&path, token).await.expect(200), &task);
}

#[tokio::test]
async fn another_users_tasks_are_invisible() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let category = app.create_category(ada.token(), "Private").await;
    let task = app
        .create_task(
            ada.token(),
            &json!({"title": "secret plan", "categoryId": category["id"]}),
        )
        .await;
    let path = task_path(&task);
    let bobs = app
        .create_task(bob.token(), &json!({"title": "bob's"}))
        .await;

    let missing = app
        .get(&format!("/api/v1/tasks/{}", Uuid::now_v7()), bob.token())
        .await;
    let missing = assert_problem(&missing, 404).clone();
    let resp = app.get(&path, bob.token()).await;
    assert_eq!(assert_problem(&resp, 404)["detail"], missing["detail"]);
    assert_problem(
        &app.patch(&path, bob.token(), &json!({"title": "mine now"}))
            .await,
        404,
    );
    assert_problem(&app.delete(&path, bob.token()).await, 404);

    // Bob's listings never show Ada's task, whatever the filters.
    for query in [
        "",
        "?search=secret",
        &format!("?categoryId={}", uuid(&category["id"])),
        "?limit=100&sort=title",
        "?cursor=",
    ] {
        let resp = app.get(&format!("/api/v1/tasks{query}"), bob.token()).await;
        let body = resp.expect(200);
        let ids: Vec<&Value> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["id"])
            .collect();
        assert!(!ids.contains(&&task["id"]), "{query}: {}", resp.text);
    }

    // Bob cannot file his task, new or existing, under Ada's category.
    let resp = app
        .post(
            "/api/v1/tasks",
            bob.token(),
            &json!({"title": "x", "categoryId": category["id"]}),
        )
        .await;
    assert_field_error(&resp, 422, "categoryId");
    let resp = app
        .patch(
            &task_path(&bobs),
            bob.token(),
            &json!({"categoryId": category["id"]}),
        )
        .await;
    assert_field_error(&resp, 422, "categoryId");

    // Ada's task is untouched.
    assert_eq!(app.get(&path, ada.token()).await.expect(200), &task);
}

#[tokio::test]
async fn owner_id_is_for_admins_only() {
    let app = spawn_app().await;
    let admin = app.register_admin("root@example.com").await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let adas = app
        .create_task(ada.token(), &json!({"title": "ada's"}))
        .await;
    app.create_task(admin.token(), &json!({"title": "admin's"}))
        .await;

    let query = format!("/api/v1/tasks?ownerId={}", ada.id);
    assert_problem(&app.get(&query, bob.token()).await, 403);
    assert_problem(&app.get(&query, ada.token()).await, 403);

    let resp = app.get(&query, admin.token()).await;
    let body = resp.expect(200);
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["id"], adas["id"]);
    assert_eq!(body["pagination"]["total"], 1);

    let own = app.get("/api/v1/tasks", admin.token()).await;
    assert_eq!(own.expect(200)["data"][0]["title"], "admin's");
    assert_field_error(
        &app.get("/api/v1/tasks?ownerId=nobody", admin.token()).await,
        400,
        "ownerId",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_all_succeed() {
    let app = Arc::new(spawn_app().await);
    let session = app.register("ada@example.com").await;
    let creates: Vec<_> = (0..50)
        .map(|i| {
            let app = app.clone();
            let token = session.access.clone();
            tokio::spawn(async move {
                app.post(
                    "/api/v1/tasks",
                    token.as_str(),
                    &json!({"title": format!("task {i}")}),
                )
                .await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for create in creates {
        let resp = create.await.unwrap();
        ids.insert(uuid(&resp.expect(201)["id"]));
    }
    assert_eq!(ids.len(), 50);

    let resp = app.get("/api/v1/tasks?limit=100", session.token()).await;
    let body = resp.expect(200);
    assert_eq!(body["pagination"]["total"], 50);
    let listed: HashSet<Uuid> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| uuid(&t["id"]))
        .collect();
    assert_eq!(listed, ids);
}
