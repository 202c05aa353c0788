//! `/api/v1/me` and the admin-only `/api/v1/users`.

mod common;

use common::{PASSWORD, Session, TestApp, assert_field_error, assert_problem, spawn_app, uuid};
use serde_json::json;
use uuid::Uuid;

/// Gives `session` a category and two tasks (one in the category); returns the category id.
async fn give_data(app: &TestApp, session: &Session) -> Uuid {
    let category = app.create_category(session.token(), "Work").await;
    app.create_task(
        session.token(),
        &json!({"title": "a", "categoryId": category["id"]}),
    )
    .await;
    app.create_task(session.token(), &json!({"title": "b"}))
        .await;
    uuid(&category["id"])
}

/// The user's tasks, categories and search vocabulary (the words of its tasks: "a" and "b").
async fn owned_rows(app: &TestApp, user: Uuid) -> (i64, i64, i64) {
    (
        app.count("SELECT count(*) FROM tasks WHERE owner_id = $1", user)
            .await,
        app.count("SELECT count(*) FROM categories WHERE owner_id = $1", user)
            .await,
        app.count("SELECT count(*) FROM task_terms WHERE owner_id = $1", user)
            .await,
    )
}

#[tokio::test]
async fn me_can_be_read_and_renamed() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let me = app.get("/api/v1/me", session.token()).await;
    assert_eq!(me.expect(200), &session.user);

    let resp = app
        .patch(
            "/api/v1/me",
            session.token(),
            &json!({"name": "  Ada King ", "email": "Countess@Example.com"}),
        )
        .await;
    let updated = resp.expect(200);
    assert_eq!(updated["name"], "Ada King");
    assert_eq!(updated["email"], "countess@example.com");
    assert_eq!(updated["id"], session.user["id"]);
    // Neither is a credential change: the token keeps working, and the new email signs in.
    assert_eq!(
        app.get("/api/v1/me", session.token()).await.expect(200)["name"],
        "Ada King"
    );
    app.login("countess@example.com", PASSWORD)
        .await
        .expect(200);
}

#[tokio::test]
async fn me_patch_validates_and_conflicts() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    app.register("taken@example.com").await;
    let resp = app
        .patch(
            "/api/v1/me",
            session.token(),
            &json!({"email": "TAKEN@example.com"}),
        )
        .await;
    assert_problem(&resp, 409);
    let resp = app
        .patch("/api/v1/me", session.token(), &json!({"name": ""}))
        .await;
    assert_field_error(&resp, 422, "name");
    let resp = app
        .patch("/api/v1/me", session.token(), &json!({"email": "nope"}))
        .await;
    assert_field_error(&resp, 422, "email");
    let resp = app
        .patch("/api/v1/me", session.token(), &json!({"role": "admin"}))
        .await;
    assert_field_error(&resp, 422, "role");
    let resp = app
        .patch("/api/v1/me", session.token(), &json!({"name": null}))
        .await;
    assert_field_error(&resp, 422, "name");
    assert_eq!(
        app.get("/api/v1/me", session.token()).await.expect(200)["role"],
        "user"
    );
}

#[tokio::test]
async fn password_change_needs_the_current_password_and_revokes_old_tokens() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let other_sign_in =
        Session::from_auth(app.login("ada@example.com", PASSWORD).await.expect(200));
    let new_password = "a brand new password";

    let resp = app
        .patch(
            "/api/v1/me",
            session.token(),
            &json!({"password": new_password}),
        )
        .await;
    assert_field_error(&resp, 422, "currentPassword");
    let resp = app
        .patch(
            "/api/v1/me",
            session.token(),
            &json!({"password": new_password, "currentPassword": "not it at all"}),
        )
        .await;
    assert_field_error(&resp, 422, "currentPassword");
    let resp = app
        .patch(
            "/api/v1/me",
            session.token(),
            &json!({"password": "short", "currentPassword": PASSWORD}),
        )
        .await;
    assert_field_error(&resp, 422, "password");
    // None of that changed anything.
    app.get("/api/v1/me", session.token()).await.expect(200);
    app.login("ada@example.com", PASSWORD).await.expect(200);

    let resp = app
        .patch(
            "/api/v1/me",
            session.token(),
            &json!({"password": new_password, "currentPassword": PASSWORD}),
        )
        .await;
    resp.expect(200);
    assert!(!resp.text.contains(new_password));

    // Every access token issued before the change is refused from the next request on ...
    assert_problem(&app.get("/api/v1/me", session.token()).await, 401);
    assert_problem(&app.get("/api/v1/tasks", other_sign_in.token()).await, 401);
    // ... and so is every refresh token.
    assert_problem(&app.refresh(&session.refresh).await, 401);
    assert_problem(&app.refresh(&other_sign_in.refresh).await, 401);
    // The old password no longer signs in; the new one does, and its tokens work.
    assert_problem(&app.login("ada@example.com", PASSWORD).await, 401);
    let fresh = Session::from_auth(app.login("ada@example.com", new_password).await.expect(200));
    app.get("/api/v1/me", fresh.token()).await.expect(200);
    app.refresh(&fresh.refresh).await.expect(200);
}

#[tokio::test]
async fn delete_me_removes_the_account_its_data_and_its_tokens() {
    let app = spawn_app().await;
    let session = app.register("ada@example.com").await;
    let bystander = app.register("bob@example.com").await;
    give_data(&app, &session).await;
    give_data(&app, &bystander).await;
    assert_eq!(owned_rows(&app, session.id).await, (2, 1, 2));

    let resp = app.delete("/api/v1/me", session.token()).await;
    assert_eq!(resp.status, 204, "{}", resp.text);
    assert_eq!(owned_rows(&app, session.id).await, (0, 0, 0));
    assert_eq!(
        app.count("SELECT count(*) FROM users WHERE id = $1", session.id)
            .await,
        0
    );
    assert_problem(&app.get("/api/v1/me", session.token()).await, 401);
    assert_problem(&app.get("/api/v1/tasks", session.token()).await, 401);
    assert_problem(&app.refresh(&session.refresh).await, 401);
    assert_problem(&app.login("ada@example.com", PASSWORD).await, 401);
    // Other users keep theirs.
    assert_eq!(owned_rows(&app, bystander.id).await, (2, 1, 2));
    app.get("/api/v1/tasks", bystander.token())
        .await
        .expect(200);
    // The email is free again.
    app.register("ada@example.com").await;
}

#[tokio::test]
async fn user_routes_are_admin_only() {
    let app = spawn_app().await;
    let user = app.register("ada@example.com").await;
    let other = app.register("bob@example.com").await;
    let target = format!("/api/v1/users/{}", other.id);
    assert_problem(&app.get("/api/v1/users", user.token()).await, 403);
    assert_problem(&app.get(&target, user.token()).await, 403);
    assert_problem(
        &app.patch(&target, user.token(), &json!({"role": "admin"}))
            .await,
        403,
    );
    assert_problem(&app.delete(&target, user.token()).await, 403);
    // Nothing happened to the target.
    let me = app.get("/api/v1/me", other.token()).await;
    assert_eq!(me.expect(200)["role"], "user");
}

#[tokio::test]
async fn admins_list_and_read_users() {
    let app = spawn_app().await;
    let admin = app.register_admin("root@example.com").await;
    let mut ids = vec![admin.id];
    for i in 0..4 {
        ids.push(app.register(&format!("user{i}@example.com")).await.id);
    }
    let resp = app.get("/api/v1/users?limit=100", admin.token()).await;
    let body = resp.expect(200);
    let listed: Vec<Uuid> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| uuid(&u["id"]))
        .collect();
    assert_eq!(listed, ids, "oldest first");
    assert_eq!(body["pagination"]["total"], 5);
    assert!(!resp.text.contains("password"));

    let page = app.get("/api/v1/users?limit=2&page=3", admin.token()).await;
    let page = page.expect(200);
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["pagination"]["totalPages"], 3);

    // A cursor walk visits every user once.
    let mut walked = Vec::new();
    let mut cursor = String::new();
    loop {
        let resp = app
            .get(
                &format!("/api/v1/users?limit=2&cursor={cursor}"),
                admin.token(),
            )
            .await;
        let body = resp.expect(200).clone();
        walked.extend(
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| uuid(&u["id"])),
        );
        if body["pagination"]["hasMore"] == false {
            break;
        }
        cursor = body["pagination"]["nextCursor"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    assert_eq!(walked, ids);

    let search = app.get("/api/v1/users?search=USER2", admin.token()).await;
    let found = search.expect(200)["data"].as_array().unwrap().clone();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["email"], "user2@example.com");

    let one = app
        .get(&format!("/api/v1/users/{}", ids[1]), admin.token())
        .await;
    assert_eq!(one.expect(200)["email"], "user0@example.com");
    let missing = format!("/api/v1/users/{}", Uuid::now_v7());
    assert_problem(&app.get(&missing, admin.token()).await, 404);
    assert_problem(&app.delete(&missing, admin.token()).await, 404);
    assert_problem(
        &app.patch(&missing, admin.token(), &json!({"tier": "pro"}))
            .await,
        404,
    );
    assert_problem(&app.get("/api/v1/users?bogus=1", admin.token()).await, 400);
    assert_problem(&app.get("/api/v1/users?limit=0", admin.token()).await, 400);
}

#[tokio::test]
async fn admin_changes_of_role_and_tier_revoke_the_targets_tokens() {
    let app = spawn_app().await;
    let admin = app.register_admin("root@example.com").await;
    let target = app.register("ada@example.com").await;
    let path = format!("/api/v1/users/{}", target.id);

    // A name change is not a credential change: the target's token keeps working.
    let resp = app
        .patch(&path, admin.token(), &json!({"name": "Renamed"}))
        .await;
    assert_eq!(resp.expect(200)["name"], "Renamed");
    app.get("/api/v1/me", target.token()).await.expect(200);

    let resp = app
        .patch(
            &path,
            admin.token(),
            &json!({"role": "admin", "tier": "pro"}),
        )
        .await;
    let updated = resp.expect(200);
    assert_eq!(updated["role"], "admin");
    assert_eq!(updated["tier"], "pro");
    assert_problem(&app.get("/api/v1/me", target.token()).await, 401);

    // A refresh gives a token with the new role, which admin routes accept.
    let refreshed = Session::from_auth(app.refresh(&target.refresh).await.expect(200));
    assert_eq!(refreshed.user["role"], "admin");
    assert_eq!(refreshed.user["tier"], "pro");
    app.get("/api/v1/users", refreshed.token())
        .await
        .expect(200);

    let resp = app
        .patch(&path, admin.token(), &json!({"tier": "enterprise"}))
        .await;
    assert_eq!(resp.expect(200)["tier"], "enterprise");
    assert_problem(&app.get("/api/v1/me", refreshed.token()).await, 401);

    for (body, field) in [
        (json!({"role": "root"}), "role"),
        (json!({"tier": "gold"}), "tier"),
        (json!({"email": "x"}), "email"),
        (json!({"password": "whatever123"}), "password"),
    ] {
        let resp = app.patch(&path, admin.token(), &body).await;
        assert_field_error(&resp, 422, field);
    }
}

#[tokio::test]
async fn admin_delete_removes_the_user_their_data_and_tokens() {
    let app = spawn_app().await;
    let admin = app.register_admin("root@example.com").await;
    let target = app.register("ada@example.com").await;
    give_data(&app, &target).await;
    give_data(&app, &admin).await;
    assert_eq!(owned_rows(&app, target.id).await, (2, 1, 2));

    let path = format!("/api/v1/users/{}", target.id);
    let resp = app.delete(&path, admin.token()).await;
    assert_eq!(resp.status, 204, "{}", resp.text);
    assert_eq!(owned_rows(&app, target.id).await, (0, 0, 0));
    assert_problem(&app.get("/api/v1/me", target.token()).await, 401);
    assert_problem(&app.refresh(&target.refresh).await, 401);
    assert_problem(&app.get(&path, admin.token()).await, 404);
    assert_problem(&app.delete(&path, admin.token()).await, 404);
    assert_eq!(owned_rows(&app, admin.id).await, (2, 1, 2));
}
