//! Users and their credentials.

use crate::db::Db;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgConnection, Postgres, QueryBuilder};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::worker::{
    error::{ApiError, on_constraint},
    listing::{KeyKind, KeyValue, OrderKey, PageRequest, Position},
    model::{Role, Tier},
};

const COLUMNS: &str = "id, email, name, role, tier, created_at, updated_at";

/// A user as the API shows it: never with a password or its hash.
#[derive(Debug, Clone, Serialize, FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    #[sqlx(try_from = "String")]
    pub tier: Tier,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A user with what login and token issuing need.
#[derive(Debug, Clone, FromRow)]
pub struct Credentials {
    #[sqlx(flatten)]
    pub user: User,
    pub password_hash: String,
    pub token_version: i32,
}

/// Changes to a user; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct UserChanges {
    pub email: Option<String>,
    pub name: Option<String>,
    pub password_hash: Option<String>,
    pub role: Option<Role>,
    pub tier: Option<Tier>,
}

fn email_taken() -> ApiError {
    ApiError::Conflict("a user with this email already exists".into())
}

pub async fn create(
    db: &Db,
    email: &str,
    name: &str,
    password_hash: &str,
    role: Role,
    tier: Tier,
) -> Result<User, ApiError> {
    sqlx::query_as(&format!(
        "INSERT INTO users (id, email, name, password_hash, role, tier)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(email)
    .bind(name)
    .bind(password_hash)
    .bind(role.as_str())
    .bind(tier.as_str())
    .fetch_one(db)
    .await
    .map_err(|e| on_constraint(e, "users_email_key", email_taken))
}

pub async fn find(db: &Db, id: Uuid) -> Result<Option<User>, ApiError> {
    Ok(
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

pub async fn credentials_by_email(db: &Db, email: &str) -> Result<Option<Credentials>, ApiError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS}, password_hash, token_version FROM users WHERE email = $1"
    ))
    .bind(email)
    .fetch_optional(db)
    .await?)
}

/// Takes any executor so that a caller inside a transaction reads on that transaction's
/// connection: holding one pooled connection while waiting for a second deadlocks a small pool
/// under concurrent requests.
pub async fn credentials(
    db: impl sqlx::PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<Credentials>, ApiError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS}, password_hash, token_version FROM users WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// The current token version, or `None` when the user no longer exists.
pub async fn token_version(db: &Db, id: Uuid) -> Result<Option<i32>, ApiError> {
    Ok(
        sqlx::query_scalar("SELECT token_version FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

/// Applies `changes`. A change of password, role or tier bumps the token version, which makes
/// every access token issued before it invalid. Returns the user and the new token version.
pub async fn update(
    db: &mut PgConnection,
    id: Uuid,
    changes: &UserChanges,
) -> Result<Option<(User, i32)>, ApiError> {
    let mut qb = QueryBuilder::<Postgres>::new("UPDATE users SET updated_at = now()");
    if let Some(email) = &changes.email {
        qb.push(", email = ").push_bind(email.clone());
    }
    if let Some(name) = &changes.name {
        qb.push(", name = ").push_bind(name.clone());
    }
    if let Some(hash) = &changes.password_hash {
        qb.push(", password_hash = ").push_bind(hash.clone());
    }
    if let Some(role) = changes.role {
        qb.push(", role = ").push_bind(role.as_str());
    }
    if let Some(tier) = changes.tier {
        qb.push(", tier = ").push_bind(tier.as_str());
    }
    // Bump when anything carried in access tokens (or the password) actually changes.
    qb.push(", token_version = token_version + CASE WHEN ")
        .push_bind(changes.password_hash.is_some())
        .push(" OR role IS DISTINCT FROM coalesce(")
        .push_bind(changes.role.map(Role::as_str))
        .push(", role) OR tier IS DISTINCT FROM coalesce(")
        .push_bind(changes.tier.map(Tier::as_str))
        .push(", tier) THEN 1 ELSE 0 END");
    qb.push(" WHERE id = ").push_bind(id);
    qb.push(format!(" RETURNING {COLUMNS}, token_version"));

    #[derive(FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: User,
        token_version: i32,
    }
    let row: Option<Row> = qb
        .build_query_as()
        .fetch_optional(db)
        .await
        .map_err(|e| on_constraint(e, "users_email_key", email_taken))?;
    Ok(row.map(|r| (r.user, r.token_version)))
}

/// Deletes the user; their categories, tasks and refresh tokens go with them (cascade).
pub async fn delete(db: &Db, id: Uuid) -> Result<bool, ApiError> {
    let result = sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(result.rows_affected() > 0)
}

/// Users oldest first, optionally filtered by words in email or name.
pub const SORT_TAG: &str = "createdAt";
pub const SORT_KINDS: &[KeyKind] = &[KeyKind::Time];
const ORDER: &[OrderKey] = &[OrderKey {
    expr: "created_at",
    wrap: ("", ""),
    kind: KeyKind::Time,
    desc: false,
}];

pub fn position(user: &User) -> Position {
    Position {
        values: vec![KeyValue::Time(user.created_at)],
        id: user.id,
    }
}

pub async fn list(
    db: &Db,
    words: &[String],
    page: &PageRequest,
) -> Result<(Vec<User>, Option<i64>), ApiError> {
    let filter = |qb: &mut QueryBuilder<'_, Postgres>| {
        qb.push(" WHERE true");
        super::push_words_ilike(qb, "(email || ' ' || name)", words);
    };
    let mut conn = db.acquire().await?;
    super::fetch_page(&mut conn, COLUMNS, "users", filter, ORDER, page).await
}
