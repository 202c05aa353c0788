//! Refresh tokens: stored as SHA-256 hashes, single use, grouped in families so that re-use of a
//! rotated token (a sign it was stolen) revokes every token descending from the same login.

use crate::db::Db;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// What presenting a refresh token did.
#[derive(Debug, PartialEq, Eq)]
pub enum Consumed {
    /// The token was valid and is now used; issue its successor in `family_id`.
    Valid { user_id: Uuid, family_id: Uuid },
    /// The token had already been used or revoked: its family is now revoked.
    Reused,
    /// Unknown or expired.
    Invalid,
}

pub async fn insert(
    db: &mut PgConnection,
    user_id: Uuid,
    family_id: Uuid,
    token_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (id, user_id, family_id, token_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(user_id)
    .bind(family_id)
    .bind(token_hash)
    .bind(expires_at)
    .execute(db)
    .await?;
    Ok(())
}

/// Marks the token used, atomically: of two concurrent uses exactly one is `Valid`.
pub async fn consume(db: &mut PgConnection, token_hash: &[u8]) -> sqlx::Result<Consumed> {
    let row: Option<(Uuid, Uuid)> = sqlx::query_as(
        "UPDATE refresh_tokens SET used_at = now()
         WHERE token_hash = $1 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > now()
         RETURNING user_id, family_id",
    )
    .bind(token_hash)
    .fetch_optional(&mut *db)
    .await?;
    if let Some((user_id, family_id)) = row {
        return Ok(Consumed::Valid { user_id, family_id });
    }
    let family: Option<Uuid> = sqlx::query_scalar(
        "SELECT family_id FROM refresh_tokens
         WHERE token_hash = $1 AND (used_at IS NOT NULL OR revoked_at IS NOT NULL)",
    )
    .bind(token_hash)
    .fetch_optional(&mut *db)
    .await?;
    match family {
        Some(family_id) => {
            revoke_family(db, family_id).await?;
            Ok(Consumed::Reused)
        }
        None => Ok(Consumed::Invalid),
    }
}

pub async fn revoke_family(db: &mut PgConnection, family_id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
    )
    .bind(family_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Revokes the family of the token with this hash, if any (logout).
pub async fn revoke_by_hash(db: &Db, token_hash: &[u8]) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now()
         WHERE revoked_at IS NULL
           AND family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $1)",
    )
    .bind(token_hash)
    .execute(db)
    .await?;
    Ok(())
}

/// Revokes every refresh token of a user (password change) and drops their expired ones.
pub async fn revoke_user(db: &mut PgConnection, user_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM refresh_tokens WHERE user_id = $1 AND expires_at < now()")
        .bind(user_id)
        .execute(&mut *db)
        .await?;
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user_id)
    .execute(db)
    .await?;
    Ok(())
}
