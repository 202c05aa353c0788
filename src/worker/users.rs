//! `/api/v1/me` (the caller) and `/api/v1/users` (admins only).

use axum::{extract::State, http::StatusCode};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    error::{ApiError, FieldError, Problems},
    extract::{Json, PathId, Query, non_null},
    listing::{Listing, PageRequest, search_words},
    model::{Role, Tier, check_name, check_password, normalize_email},
    ratelimit::LoginGuard,
    store::{
        self,
        users::{User, UserChanges},
    },
    tokens::{self, AuthUser},
};

/// `taskd user create` (how the first admin is made): validates like the API does, applies
/// pending migrations (on `database.direct_url`), hashes the password and inserts the user.
pub async fn create_offline(
    config: &crate::config::Config,
    email: &str,
    name: Option<&str>,
    password: &str,
    role: Role,
    tier: Tier,
) -> anyhow::Result<User> {
    let email = normalize_email(email).map_err(|e| anyhow::anyhow!("--email {}", e.message))?;
    check_password("password", password)
        .map_err(|e| anyhow::anyhow!("the password {}", e.message))?;
    let name = name.map_or_else(
        || email.split('@').next().unwrap_or("user").to_owned(),
        str::to_owned,
    );
    let name = check_name(&name).map_err(|e| anyhow::anyhow!("--name {}", e.message))?;
    let pool = crate::db::migrate(&config.database).await?;
    let hash = tokens::Passwords::new(&config.auth)?
        .hash(password)
        .await
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
    let db = crate::db::Db::session(pool);
    store::users::create(&db, &email, &name, &hash, role, tier)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_me, update_me, delete_me))
        .routes(routes!(list_users))
        .routes(routes!(get_user, update_user, delete_user))
}

/// Changes to the caller's own account.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateMe {
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, min_length = 1, max_length = 100, pattern = r"\S")]
    name: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, min_length = 3, max_length = 254, pattern = r"^[^@\s]+@[^@\s]+$")]
    email: Option<String>,
    /// New password (at least 8 characters); needs `currentPassword`. Signs out every session.
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, min_length = 8, max_length = 256)]
    password: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String)]
    current_password: Option<String>,
}

/// Changes an admin may make to any user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, min_length = 1, max_length = 100, pattern = r"\S")]
    name: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, min_length = 3, max_length = 254, pattern = r"^[^@\s]+@[^@\s]+$")]
    email: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Role)]
    role: Option<Role>,
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Tier)]
    tier: Option<Tier>,
}

/// Query of `GET /users`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListUsersQuery {
    /// Words that must all appear in the email or name (case-insensitive).
    search: Option<String>,
    /// 1–100, default 20.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// Page number (≥ 1, default 1); not with `cursor`.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100000)]
    page: Option<String>,
    /// `nextCursor` of the previous page; empty to start a cursor walk.
    cursor: Option<String>,
}

const NO_USER: ApiError = ApiError::NotFound("no such user");

/// Validates name and email changes shared by both PATCH routes.
fn name_and_email(
    name: Option<&str>,
    email: Option<&str>,
    errors: &mut Vec<FieldError>,
) -> UserChanges {
    let mut changes = UserChanges::default();
    match name.map(check_name) {
        Some(Ok(name)) => changes.name = Some(name),
        Some(Err(e)) => errors.push(e),
        None => {}
    }
    match email.map(normalize_email) {
        Some(Ok(email)) => changes.email = Some(email),
        Some(Err(e)) => errors.push(e),
        None => {}
    }
    changes
}

/// Applies changes, then publishes the (possibly bumped) token version so that older access
/// tokens stop working on every worker; a password change also signs out every session.
async fn apply(state: &AppState, id: uuid::Uuid, changes: &UserChanges) -> Result<User, ApiError> {
    let mut tx = state.db.begin().await?;
    let (user, version) = store::users::update(&mut tx, id, changes)
        .await?
        .ok_or(NO_USER)?;
    if changes.password_hash.is_some() {
        store::refresh_tokens::revoke_user(&mut tx, id).await?;
    }
    tx.commit().await?;
    tokens::publish_version(state, id, Some(version)).await;
    Ok(user)
}

async fn delete(state: &AppState, id: uuid::Uuid) -> Result<StatusCode, ApiError> {
    if !store::users::delete(&state.db, id).await? {
        return Err(NO_USER);
    }
    tokens::publish_version(state, id, None).await;
    state.wrote(id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's account.
#[utoipa::path(get, path = "/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, body = User), Problems))]
async fn get_me(State(state): State<AppState>, me: AuthUser) -> Result<axum::Json<User>, ApiError> {
    let user = store::users::find(&state.db, me.id)
        .await?
        .ok_or(ApiError::Unauthorized("the account no longer exists"))?;
    Ok(axum::Json(user))
}

/// Change the caller's name, email or password. A password change needs `currentPassword` and
/// revokes every existing token: sign in again afterwards.
#[utoipa::path(patch, path = "/me", tag = "users", security(("bearer" = [])), request_body = UpdateMe,
    responses((status = 200, body = User), Problems))]
async fn update_me(
    State(state): State<AppState>,
    me: AuthUser,
    Json(body): Json<UpdateMe>,
) -> Result<axum::Json<User>, ApiError> {
    let mut errors = Vec::new();
    let mut changes = name_and_email(body.name.as_deref(), body.email.as_deref(), &mut errors);
    if let Some(password) = &body.password {
        if let Err(e) = check_password("password", password) {
            errors.push(e);
        }
        match &body.current_password {
            None => errors.push(FieldError::new(
                "currentPassword",
                "is required to change the password",
            )),
            Some(current) => {
                let guard = LoginGuard::for_user(&state, me.id);
                guard.reserve(&state).await?;
                let credentials = store::users::credentials(&state.db, me.id).await?;
                let hash = credentials.as_ref().map(|c| c.password_hash.as_str());
                if state.passwords.verify(current, hash).await? {
                    guard.succeeded(&state).await;
                } else {
                    errors.push(FieldError::new("currentPassword", "is incorrect"));
                }
            }
        }
        if errors.is_empty() {
            changes.password_hash = Some(state.passwords.hash(password).await?);
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    Ok(axum::Json(apply(&state, me.id, &changes).await?))
}

/// Delete the caller's account with all its categories and tasks.
#[utoipa::path(delete, path = "/me", tag = "users", security(("bearer" = [])),
    responses((status = 204, description = "Deleted"), Problems))]
async fn delete_me(State(state): State<AppState>, me: AuthUser) -> Result<StatusCode, ApiError> {
    delete(&state, me.id).await
}

/// List users, oldest first (admin).
#[utoipa::path(get, path = "/users", tag = "users", security(("bearer" = [])), params(ListUsersQuery),
    responses((status = 200, body = Listing<User>), Problems))]
async fn list_users(
    State(state): State<AppState>,
    me: AuthUser,
    Query(query): Query<ListUsersQuery>,
) -> Result<axum::Json<Listing<User>>, ApiError> {
    me.require_admin()?;
    let page = PageRequest::parse(
        query.limit.as_deref(),
        query.page.as_deref(),
        query.cursor.as_deref(),
        store::users::SORT_TAG,
        store::users::SORT_KINDS,
    )
    .map_err(ApiError::invalid_query)?;
    let words = search_words(query.search.as_deref().unwrap_or(""));
    let (rows, total) = store::users::list(&state.db, &words, &page).await?;
    Ok(axum::Json(Listing::new(
        &page,
        rows,
        total,
        store::users::SORT_TAG,
        store::users::position,
    )))
}

/// One user (admin).
#[utoipa::path(get, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), responses((status = 200, body = User), Problems))]
async fn get_user(
    State(state): State<AppState>,
    me: AuthUser,
    PathId(id): PathId,
) -> Result<axum::Json<User>, ApiError> {
    me.require_admin()?;
    Ok(axum::Json(
        store::users::find(&state.db, id).await?.ok_or(NO_USER)?,
    ))
}

/// Change a user's name, email, role or tier (admin). Their existing access tokens stop
/// working; they refresh to get the new role or tier.
#[utoipa::path(patch, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), request_body = UpdateUser,
    responses((status = 200, body = User), Problems))]
async fn update_user(
    State(state): State<AppState>,
    me: AuthUser,
    PathId(id): PathId,
    Json(body): Json<UpdateUser>,
) -> Result<axum::Json<User>, ApiError> {
    me.require_admin()?;
    let mut errors = Vec::new();
    let mut changes = name_and_email(body.name.as_deref(), body.email.as_deref(), &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    changes.role = body.role;
    changes.tier = body.tier;
    Ok(axum::Json(apply(&state, id, &changes).await?))
}

/// Delete a user with all their categories and tasks (admin).
#[utoipa::path(delete, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), responses((status = 204, description = "Deleted"), Problems))]
async fn delete_user(
    State(state): State<AppState>,
    me: AuthUser,
    PathId(id): PathId,
) -> Result<StatusCode, ApiError> {
    me.require_admin()?;
    delete(&state, id).await
}
