//! Categories, always scoped to their owner: another user's category is indistinguishable from a
//! missing one.

use crate::db::Db;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, Postgres, QueryBuilder};
use utoipa::ToSchema;
use uuid::Uuid;

use super::Created;
use crate::worker::{
    error::{ApiError, on_constraint},
    listing::{KeyKind, KeyValue, OrderKey, PageRequest, Position},
};

const COLUMNS: &str = "id, name, color, created_at, updated_at";

/// A named, optionally coloured group of tasks.
#[derive(Debug, Clone, Serialize, FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Category {
    pub id: Uuid,
    /// 1–64 characters, unique per owner regardless of case.
    pub name: String,
    /// `#rrggbb`, or null.
    pub color: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn name_taken() -> ApiError {
    ApiError::Conflict("a category with this name already exists".into())
}

/// Inserts a category; with `id` (a POST with `Idempotency-Key`) an existing category with that
/// id is returned instead, as for tasks.
pub async fn create(
    db: &Db,
    owner: Uuid,
    id: Option<Uuid>,
    name: &str,
    color: Option<&str>,
) -> Result<Created<Category>, ApiError> {
    let inserted: Option<Category> = sqlx::query_as(&format!(
        "INSERT INTO categories (id, owner_id, name, color) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO NOTHING RETURNING {COLUMNS}"
    ))
    .bind(id.unwrap_or_else(Uuid::now_v7))
    .bind(owner)
    .bind(name)
    .bind(color)
    .fetch_optional(db)
    .await
    .map_err(|e| on_constraint(e, "categories_owner_name_key", name_taken))?;
    match (inserted, id) {
        (Some(category), _) => Ok(Created::new(category)),
        (None, Some(id)) => match get(db, owner, id).await? {
            Some(row) => Ok(Created { row, existed: true }),
            None => Err(ApiError::Internal(anyhow::anyhow!(
                "category id {id} is taken by another owner"
            ))),
        },
        (None, None) => Err(ApiError::Internal(anyhow::anyhow!(
            "category insert returned no row"
        ))),
    }
}

pub async fn get(db: &Db, owner: Uuid, id: Uuid) -> Result<Option<Category>, ApiError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM categories WHERE owner_id = $1 AND id = $2"
    ))
    .bind(owner)
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// Changes name and/or color (`Some(None)` clears the color).
pub async fn update(
    db: &Db,
    owner: Uuid,
    id: Uuid,
    name: Option<&str>,
    color: Option<Option<&str>>,
) -> Result<Option<Category>, ApiError> {
    let mut qb = QueryBuilder::<Postgres>::new("UPDATE categories SET updated_at = now()");
    if let Some(name) = name {
        qb.push(", name = ").push_bind(name.to_owned());
    }
    if let Some(color) = color {
        qb.push(", color = ").push_bind(color.map(str::to_owned));
    }
    qb.push(" WHERE owner_id = ")
        .push_bind(owner)
        .push(" AND id = ")
        .push_bind(id)
        .push(format!(" RETURNING {COLUMNS}"));
    qb.build_query_as()
        .fetch_optional(db)
        .await
        .map_err(|e| on_constraint(e, "categories_owner_name_key", name_taken))
}

/// Deletes the category; its tasks stay, with `category_id` cleared by the foreign key.
pub async fn delete(db: &Db, owner: Uuid, id: Uuid) -> Result<bool, ApiError> {
    let result = sqlx::query("DELETE FROM categories WHERE owner_id = $1 AND id = $2")
        .bind(owner)
        .bind(id)
        .execute(db)
        .await?;
    Ok(result.rows_affected() > 0)
}

/// Categories are listed by name (case-insensitive).
pub const SORT_TAG: &str = "name";
pub const SORT_KINDS: &[KeyKind] = &[KeyKind::Text];
const ORDER: &[OrderKey] = &[OrderKey {
    expr: "lower(name) COLLATE \"C\"",
    wrap: ("lower(", ") COLLATE \"C\""),
    kind: KeyKind::Text,
    desc: false,
}];

pub fn position(category: &Category) -> Position {
    Position {
        values: vec![KeyValue::Text(category.name.clone())],
        id: category.id,
    }
}

pub async fn list(
    db: &Db,
    owner: Uuid,
    words: &[String],
    page: &PageRequest,
) -> Result<(Vec<Category>, Option<i64>), ApiError> {
    let filter = |qb: &mut QueryBuilder<'_, Postgres>| {
        qb.push(" WHERE owner_id = ").push_bind(owner);
        super::push_words_ilike(qb, "name", words);
    };
    let mut conn = db.acquire().await?;
    super::fetch_page(&mut conn, COLUMNS, "categories", filter, ORDER, page).await
}
