//! `/api/v1/admin/*`: deployment operations for admins.

use axum::{extract::State, http::StatusCode};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    error::{ApiError, Problems},
    tokens::AuthUser,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(clear_cache))
}

/// Empty this deployment's response cache (admin). Only this deployment's entries are retired
/// (a new cache generation); nothing else in Redis is touched.
#[utoipa::path(post, path = "/admin/cache/clear", tag = "admin", security(("bearer" = [])),
    responses((status = 204, description = "Cache cleared"), Problems))]
async fn clear_cache(State(state): State<AppState>, me: AuthUser) -> Result<StatusCode, ApiError> {
    me.require_admin()?;
    state.cache.clear().await?;
    tracing::info!(admin = %me.id, "response cache cleared");
    Ok(StatusCode::NO_CONTENT)
}
