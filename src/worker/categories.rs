//! `/api/v1/categories`: the caller's categories.

use axum::{extract::State, http::StatusCode, response::Response};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    error::{ApiError, FieldError, FieldErrors, Problems},
    extract::{Json, PathId, Query, double_option, non_null},
    idempotency::{self, IdempotentId},
    listing::{Listing, PageRequest, search_words},
    store::{self, categories::Category},
    tokens::AuthUser,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_categories, create_category))
        .routes(routes!(get_category, update_category, delete_category))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCategory {
    /// 1–64 characters, unique among the caller's categories regardless of case.
    #[schema(example = "Work", min_length = 1, max_length = 64, pattern = r"\S")]
    name: String,
    /// `#rrggbb`.
    #[schema(example = "#1e90ff", pattern = "^#[0-9a-fA-F]{6}$")]
    color: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCategory {
    #[serde(default, deserialize_with = "non_null")]
    #[schema(value_type = String, min_length = 1, max_length = 64, pattern = r"\S")]
    name: Option<String>,
    /// `#rrggbb`, or null to clear.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, pattern = "^#[0-9a-fA-F]{6}$")]
    color: Option<Option<String>>,
}

/// Query of `GET /categories`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListCategoriesQuery {
    /// Words that must all appear in the name (case-insensitive).
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

const NO_CATEGORY: ApiError = ApiError::NotFound("no such category");

fn check_name(name: &str) -> Result<String, FieldError> {
    let name = name.trim();
    if (1..=64).contains(&name.chars().count()) {
        Ok(name.to_owned())
    } else {
        Err(FieldError::new("name", "must be 1 to 64 characters"))
    }
}

/// `#RRGGBB` in either case, stored lower-case.
fn check_color(color: &str) -> Result<String, FieldError> {
    let valid = color.len() == 7
        && color.starts_with('#')
        && color[1..].bytes().all(|b| b.is_ascii_hexdigit());
    if valid {
        Ok(color.to_ascii_lowercase())
    } else {
        Err(FieldError::new("color", "must be a color like #1e90ff"))
    }
}

/// The caller's categories by name.
#[utoipa::path(get, path = "/categories", tag = "categories", security(("bearer" = [])),
    params(ListCategoriesQuery), responses((status = 200, body = Listing<Category>), Problems))]
async fn list_categories(
    State(state): State<AppState>,
    me: AuthUser,
    Query(query): Query<ListCategoriesQuery>,
) -> Result<axum::Json<Listing<Category>>, ApiError> {
    use store::categories::{SORT_KINDS, SORT_TAG, list, position};
    let page = PageRequest::parse(
        query.limit.as_deref(),
        query.page.as_deref(),
        query.cursor.as_deref(),
        SORT_TAG,
        SORT_KINDS,
    )
    .map_err(ApiError::invalid_query)?;
    let words = search_words(query.search.as_deref().unwrap_or(""));
    let needed = state.needed(me.id).await;
    let (words, page) = (&words, &page);
    let (rows, total) = state
        .read(
            needed,
            |db| async move { list(&db, me.id, words, page).await },
        )
        .await?;
    Ok(axum::Json(Listing::new(
        page, rows, total, SORT_TAG, position,
    )))
}

/// Create a category.
#[utoipa::path(post, path = "/categories", tag = "categories", security(("bearer" = [])),
    request_body = CreateCategory, responses((status = 201, body = Category), Problems))]
async fn create_category(
    State(state): State<AppState>,
    me: AuthUser,
    keyed: Option<axum::Extension<IdempotentId>>,
    Json(body): Json<CreateCategory>,
) -> Result<Response, ApiError> {
    let mut errors = FieldErrors::default();
    let name = errors.take(check_name(&body.name));
    let color = errors
        .take(body.color.as_deref().map(check_color).transpose())
        .flatten();
    errors.into_validation()?;
    let name = name.unwrap_or_default();
    let id = keyed.map(|axum::Extension(IdempotentId(id))| id);
    let created = store::categories::create(&state.db, me.id, id, &name, color.as_deref()).await?;
    state.wrote(me.id).await;
    Ok(idempotency::created(created))
}

/// One of the caller's categories.
#[utoipa::path(get, path = "/categories/{id}", tag = "categories", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), responses((status = 200, body = Category), Problems))]
async fn get_category(
    State(state): State<AppState>,
    me: AuthUser,
    PathId(id): PathId,
) -> Result<axum::Json<Category>, ApiError> {
    let category = store::categories::get(&state.db, me.id, id)
        .await?
        .ok_or(NO_CATEGORY)?;
    Ok(axum::Json(category))
}

/// Rename or recolor a category.
#[utoipa::path(patch, path = "/categories/{id}", tag = "categories", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), request_body = UpdateCategory,
    responses((status = 200, body = Category), Problems))]
async fn update_category(
    State(state): State<AppState>,
    me: AuthUser,
    PathId(id): PathId,
    Json(body): Json<UpdateCategory>,
) -> Result<axum::Json<Category>, ApiError> {
    let mut errors = FieldErrors::default();
    let name = errors
        .take(body.name.as_deref().map(check_name).transpose())
        .flatten();
    let color = match body.color {
        Some(Some(color)) => errors
            .take(check_color(&color))
            .map(|c| Some(Some(c)))
            .unwrap_or(None),
        Some(None) => Some(None),
        None => None,
    };
    errors.into_validation()?;
    let category = store::categories::update(
        &state.db,
        me.id,
        id,
        name.as_deref(),
        color.as_ref().map(|c| c.as_deref()),
    )
    .await?
    .ok_or(NO_CATEGORY)?;
    state.wrote(me.id).await;
    Ok(axum::Json(category))
}

/// Delete a category. Its tasks are kept, with `categoryId` set to null.
#[utoipa::path(delete, path = "/categories/{id}", tag = "categories", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path)), responses((status = 204, description = "Deleted"), Problems))]
async fn delete_category(
    State(state): State<AppState>,
    me: AuthUser,
    PathId(id): PathId,
) -> Result<StatusCode, ApiError> {
    if !store::categories::delete(&state.db, me.id, id).await? {
        return Err(NO_CATEGORY);
    }
    // Its tasks lost their category.
    state.wrote(me.id).await;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colors() {
        assert_eq!(check_color("#1E90ff").unwrap(), "#1e90ff");
        for bad in ["1e90ff", "#1e90f", "#1e90fg", "#1e90ff0", "#ééé"] {
            assert!(check_color(bad).is_err(), "{bad}");
        }
    }
}
