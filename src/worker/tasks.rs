//! `/api/v1/tasks`: the caller's tasks, and the listing with filters, search, sort and paging.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::Response,
};
use bytes::Bytes;
use chrono::{DateTime, Datelike, Utc};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    cache::{Read, canonical_query},
    error::{ApiError, FieldError, FieldErrors, Problems},
    extract::{Json, PathId, Query, double_option, non_null},
    idempotency::{self, IdempotentId},
    listing::{Listing, PageRequest, search_words},
    model::{Priority, Status},
    store::{
        self,
        tasks::{CategoryFilter, NewTask, Task, TaskChanges, TaskFilter, TaskSort},
    },
    tokens::{AuthUser, Bearer},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tasks, create_task))
        .routes(routes!(get_task, update_task, delete_task))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateTask {
    /// 1–200 characters.
    #[schema(
        example = "Write the quarterly report",
        min_length = 1,
        max_length = 200,
        pattern = r"\S"
    )]
    title: String,
    /// Up to 10 000 characters.
    #[schema(max_length = 10000)]
    description: Option<String>,
    /// Default `pending`.
    status: Option<Status>,
    /// Default `medium`.
    priority: Option<Priority>,
    /// RFC 3339.
    due_at: Option<DateTime<Utc>>,
    /// One of the caller's categories.
    category_id: Option<Uuid>,
}

/// Partial update: absent fields are kept, `null` clears a nullable field.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateTask {
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, min_length = 1, max_length = 200, pattern = r"\S")]
    title: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, max_length = 10000)]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Status)]
    status: Option<Status>,
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = Priority)]
    priority: Option<Priority>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    due_at: Option<Option<DateTime<Utc>>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Uuid>)]
    category_id: Option<Option<Uuid>>,
}

/// Query of `GET /tasks`. Unknown or malformed parameters are a 400.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ListTasksQuery {
    /// Comma-separated statuses, e.g. `pending,in_progress`.
    #[param(pattern = "^(pending|in_progress|completed)(,(pending|in_progress|completed))*$")]
    status: Option<String>,
    /// Comma-separated priorities, e.g. `high,urgent`.
    #[param(pattern = "^(low|medium|high|urgent)(,(low|medium|high|urgent))*$")]
    priority: Option<String>,
    /// A category id, or `none` for tasks without a category.
    #[param(
        pattern = "^(none|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
    )]
    category_id: Option<String>,
    /// Only tasks due before this instant (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    due_before: Option<String>,
    /// Only tasks due after this instant (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    due_after: Option<String>,
    /// Words (case-insensitive) that must each begin a word of the title or description.
    search: Option<String>,
    /// Comma-separated keys among `createdAt`, `updatedAt`, `dueAt`, `priority`, `title`, each
    /// optionally prefixed with `-` for descending. Default `-createdAt`. Tasks without a due
    /// date sort last by `dueAt`. A repeated key adds nothing and is ignored.
    #[param(
        pattern = "^-?(createdAt|updatedAt|dueAt|priority|title)(,-?(createdAt|updatedAt|dueAt|priority|title))*$"
    )]
    sort: Option<String>,
    /// 1–100, default 20.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// Page number (≥ 1, default 1); not with `cursor`.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100000)]
    page: Option<String>,
    /// `nextCursor` of the previous page (same sort); empty to start a cursor walk.
    cursor: Option<String>,
    /// Admins only: list this user's tasks instead of their own.
    #[param(value_type = Option<Uuid>)]
    owner_id: Option<String>,
}

const NO_TASK: ApiError = ApiError::NotFound("no such task");

fn check_title(title: &str) -> Result<String, FieldError> {
    let trimmed = title.trim();
    if (1..=200).contains(&trimmed.chars().count()) {
        Ok(trimmed.to_owned())
    } else {
        Err(FieldError::new("title", "must be 1 to 200 characters"))
    }
}

fn check_description(description: &str) -> Result<(), FieldError> {
    if description.chars().count() <= 10_000 {
        Ok(())
    } else {
        Err(FieldError::new(
            "description",
            "must be at most 10000 characters",
        ))
    }
}

/// Parses a comma-separated list of enum values.
fn parse_list<T>(
    field: &str,
    raw: &str,
    parse: fn(&str) -> Option<T>,
    expected: String,
) -> Result<Vec<T>, FieldError> {
    raw.split(',')
        .map(|part| {
            parse(part.trim()).ok_or_else(|| {
                FieldError::new(
                    field,
                    format!("unknown value {part:?}; expected {expected}"),
                )
            })
        })
        .collect()
}

fn parse_time(field: &str, raw: &str) -> Result<DateTime<Utc>, FieldError> {
    let time = DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            FieldError::new(
                field,
                "must be an RFC 3339 timestamp, e.g. 2026-01-31T17:00:00Z",
            )
        })?;
    check_time(field, time)
}

/// Timestamps the API accepts: years 0001 to 9999, what RFC 3339 can write. Outside that
/// range PostgreSQL refuses some (before 4713 BC) and stores others that no RFC 3339 parser
/// reads back, so a cursor over them could not be followed.
fn check_time(field: &str, time: DateTime<Utc>) -> Result<DateTime<Utc>, FieldError> {
    if (1..=9999).contains(&time.year()) {
        Ok(time)
    } else {
        Err(FieldError::new(
            field,
            "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        ))
    }
}

/// Turns the raw query into filter, sort, paging and the owner to list; all errors at once.
fn parse_listing(
    query: &ListTasksQuery,
    me: &AuthUser,
) -> Result<(Uuid, TaskFilter, TaskSort, PageRequest), ApiError> {
    let mut errors = FieldErrors::default();
    let status = query
        .status
        .as_deref()
        .map(|raw| parse_list("status", raw, Status::parse, Status::expected()));
    let priority = query
        .priority
        .as_deref()
        .map(|raw| parse_list("priority", raw, Priority::parse, Priority::expected()));
    let category = query.category_id.as_deref().map(|raw| match raw {
        "none" => Ok(CategoryFilter::None),
        raw => Uuid::parse_str(raw)
            .map(CategoryFilter::Is)
            .map_err(|_| FieldError::new("categoryId", "must be a category id or `none`")),
    });
    let due_before = query
        .due_before
        .as_deref()
        .map(|raw| parse_time("dueBefore", raw));
    let due_after = query
        .due_after
        .as_deref()
        .map(|raw| parse_time("dueAfter", raw));
    let sort = query.sort.as_deref().map(TaskSort::parse);
    let owner = query.owner_id.as_deref().map(|raw| {
        Uuid::parse_str(raw).map_err(|_| FieldError::new("ownerId", "must be a user id"))
    });
    let filter = TaskFilter {
        status: status.and_then(|r| errors.take(r)).unwrap_or_default(),
        priority: priority.and_then(|r| errors.take(r)).unwrap_or_default(),
        category: category.and_then(|r| errors.take(r)).unwrap_or_default(),
        due_before: due_before.and_then(|r| errors.take(r)),
        due_after: due_after.and_then(|r| errors.take(r)),
        words: search_words(query.search.as_deref().unwrap_or("")),
    };
    let sort = sort.and_then(|r| errors.take(r)).unwrap_or_default();
    let owner = owner.and_then(|r| errors.take(r)).unwrap_or(me.id);
    let page = PageRequest::parse(
        query.limit.as_deref(),
        query.page.as_deref(),
        query.cursor.as_deref(),
        &sort.tag(),
        &sort.kinds(),
    );
    let page = match page {
        Ok(page) => Some(page),
        Err(more) => {
            errors.extend(more);
            None
        }
    };
    errors.into_bad_query()?;
    let page = page.expect("no errors means the page parsed");
    Ok((owner, filter, sort, page))
}

/// List the caller's tasks (or, for admins, another user's with `ownerId`).
/// Served from the shared cache when possible (`X-Cache: HIT|MISS|BYPASS`), with an `ETag`;
/// `If-None-Match` with the current ETag answers 304.
#[utoipa::path(get, path = "/tasks", tag = "tasks", security(("bearer" = [])),
    params(ListTasksQuery), responses(
        (status = 200, body = Listing<Task>, headers(("ETag" = String), ("X-Cache" = String))),
        (status = 304, description = "Not modified (the `If-None-Match` ETag is current)"),
        Problems))]
async fn list_tasks(
    State(state): State<AppState>,
    caller: Bearer,
    query: Result<Query<ListTasksQuery>, ApiError>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // The revocation check travels with the cache lookup; a request refused before it is
    // checked on its own first, so a revoked token gets its 401 whatever else is wrong.
    let parsed = query.and_then(|Query(query)| {
        let me = caller.claimed();
        if query.owner_id.is_some() {
            me.require_admin()?;
        }
        parse_listing(&query, &me)
    });
    let (owner, filter, sort, page) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return Err(caller.refuse(&state, error).await),
    };
    let query = canonical_query(uri.query());
    let read = Read {
        owner,
        kind: "tasks",
        query: &query,
    };
    let shared = &state;
    state
        .cache
        .get_or_load(&caller, &state, read, &headers, |needed| async move {
            let (filter, sort, page) = (&filter, &sort, &page);
            let (rows, total) = shared
                .read(needed, |db| async move {
                    store::tasks::list(&db, owner, filter, sort, page).await
                })
                .await?;
            let tag = sort.tag();
            let listing = Listing::new(page, rows, total, &tag, |task| sort.position(task));
            Ok(Bytes::from(
                serde_json::to_vec(&listing).map_err(anyhow::Error::from)?,
            ))
        })
        .await
}

/// Create a task.
#[utoipa::path(post, path = "/tasks", tag = "tasks", security(("bearer" = [])),
    request_body = CreateTask, responses((status = 201, body = Task), Problems))]
async fn create_task(
    State(state): State<AppState>,
    me: AuthUser,
    keyed: Option<axum::Extension<IdempotentId>>,
    Json(body): Json<CreateTask>,
) -> Result<Response, ApiError> {
    let mut errors = FieldErrors::default();
    let title = errors.take(check_title(&body.title));
    errors.take(
        body.description
            .as_deref()
            .map(check_description)
            .transpose(),
    );
    errors.take(body.due_at.map(|t| check_time("dueAt", t)).transpose());
    errors.into_validation()?;
    let title = title.unwrap_or_default();
    let task = NewTask {
        title,
        description: body.description,
        status: body.status.unwrap_or(Status::Pending),
        priority: body.priority.unwrap_or(Priority::Medium),
        due_at: body.due_at,
        category_id: body.category_id,
    };
    let id = keyed.map(|axum::Extension(IdempotentId(id))| id);
    let created = store::tasks::create(&state.db, me.id, id, &task).await?;
    // Also when the task existed: the run that created it may have died before invalidating.
    state.wrote(me.id).await;
    Ok(idempotency::created(created))
}

/// One of the caller's tasks.
/// Cached like the listing (`X-Cache`, `ETag`, 304).
#[utoipa::path(get, path = "/tasks/{id}", tag = "tasks", security(("bearer" = [])),
    params(("id" = Uuid, Path)), responses(
        (status = 200, body = Task, headers(("ETag" = String), ("X-Cache" = String))),
        (status = 304, description = "Not modified (the `If-None-Match` ETag is current)"),
        Problems))]
async fn get_task(
    State(state): State<AppState>,
    caller: Bearer,
    id: Result<PathId, ApiError>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let PathId(id) = match id {
        Ok(id) => id,
        Err(error) => return Err(caller.refuse(&state, error).await),
    };
    let me = caller.claimed();
    let kind = format!("task:{id}");
    let read = Read {
        owner: me.id,
        kind: &kind,
        query: "",
    };
    let shared = &state;
    state
        .cache
        .get_or_load(&caller, &state, read, &headers, |needed| async move {
            let task = shared
                .read(needed, |db| async move {
                    store::tasks::get(&db, me.id, id).await
                })
                .await?
                .ok_or(NO_TASK)?;
            Ok(Bytes::from(
                serde_json::to_vec(&task).map_err(anyhow::Error::from)?,
            ))
        })
        .await
}

/// Change some fields of a task; `null` clears `description`, `dueAt` or `categoryId`.
#[utoipa::path(patch, path = "/tasks/{id}", tag = "tasks", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = UpdateTask,
    responses((status = 200, body = Task), Problems))]
async fn update_task(
    State(state): State<AppState>,
    me: AuthUser,
    PathId(id): PathId,
    Json(body): Json<UpdateTask>,
) -> Result<axum::Json<Task>, ApiError> {
    let mut errors = FieldErrors::default();
    let title = errors
        .take(body.title.as_deref().map(check_title).transpose())
        .flatten();
    if let Some(Some(text)) = &body.description {
        errors.take(check_description(text));
    }
    if let Some(Some(due_at)) = body.due_at {
        errors.take(check_time("dueAt", due_at));
    }
    errors.into_validation()?;
    let changes = TaskChanges {
        title,
        description: body.description,
        status: body.status,
        priority: body.priority,
        due_at: body.due_at,
        category_id: body.category_id,
    };
    let task = store::tasks::update(&state.db, me.id, id, &changes)
        .await?
        .ok_or(NO_TASK)?;
    state.wrote(me.id).await;
    Ok(axum::Json(task))
}

/// Delete a task.
#[utoipa::path(delete, path = "/tasks/{id}", tag = "tasks", security(("bearer" = [])),
    params(("id" = Uuid, Path)), responses((status = 204, description = "Deleted"), Problems))]
async fn delete_task(
    State(state): State<AppState>,
    me: AuthUser,
    PathId(id): PathId,
) -> Result<StatusCode, ApiError> {
    if !store::tasks::delete(&state.db, me.id, id).await? {
        return Err(NO_TASK);
    }
    state.wrote(me.id).await;
    Ok(StatusCode::NO_CONTENT)
}
