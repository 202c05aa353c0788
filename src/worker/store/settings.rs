//! Deployment-wide settings that all workers must share.

use crate::db::Db;
use rand::RngCore;

/// The JWT signing secret: the configured one, else the one stored in PostgreSQL, generating and
/// storing it on first use. Concurrent first uses agree: the insert that loses is ignored and
/// everyone reads back the winner.
pub async fn jwt_secret(db: &Db, configured: &str) -> sqlx::Result<Vec<u8>> {
    if !configured.is_empty() {
        return Ok(configured.as_bytes().to_vec());
    }
    let mut candidate = [0u8; 64];
    rand::rng().fill_bytes(&mut candidate);
    let candidate = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, candidate);
    sqlx::query(
        "INSERT INTO settings (key, value) VALUES ('jwt_secret', $1) ON CONFLICT (key) DO NOTHING",
    )
    .bind(&candidate)
    .execute(db)
    .await?;
    let stored: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = 'jwt_secret'")
        .fetch_one(db)
        .await?;
    Ok(stored.into_bytes())
}
