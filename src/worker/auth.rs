//! `/api/v1/auth/*`: register, login, refresh (with rotation and re-use detection), logout.

use axum::{extract::State, http::StatusCode};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    error::{ApiError, Problems},
    extract::Json,
    middleware::ClientIp,
    model::{Role, Tier, check_name, check_password, normalize_email},
    ratelimit::LoginGuard,
    store::{
        self,
        refresh_tokens::Consumed,
        users::{Credentials, User},
    },
    tokens,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Unique, case-insensitive; stored lower-cased.
    #[schema(
        example = "ada@example.com",
        min_length = 3,
        max_length = 254,
        pattern = r"^[^@\s]+@[^@\s]+$"
    )]
    email: String,
    /// At least 8 characters.
    #[schema(
        example = "correct horse battery staple",
        min_length = 8,
        max_length = 256
    )]
    password: String,
    /// 1–100 characters.
    #[schema(
        example = "Ada Lovelace",
        min_length = 1,
        max_length = 100,
        pattern = r"\S"
    )]
    name: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    email: String,
    password: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RefreshRequest {
    refresh_token: String,
}

/// A new session: the user and a token pair.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthResponse {
    user: User,
    /// JWT for `Authorization: Bearer`; short-lived.
    access_token: String,
    /// Single-use token for `/auth/refresh`.
    refresh_token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
}

/// Issues an access token and a refresh token in `family` (a new family for a new login).
async fn session(
    state: &AppState,
    user: User,
    version: i32,
    family: uuid::Uuid,
    db: &mut sqlx::PgConnection,
) -> Result<AuthResponse, ApiError> {
    let (refresh_token, hash) = tokens::new_refresh_token();
    let expires_at = Utc::now()
        + chrono::Duration::from_std(state.tokens.refresh_ttl).map_err(anyhow::Error::from)?;
    store::refresh_tokens::insert(db, user.id, family, &hash, expires_at).await?;
    Ok(AuthResponse {
        access_token: state
            .tokens
            .access_token(user.id, version, user.role, user.tier),
        refresh_token,
        token_type: "Bearer",
        expires_in: state.tokens.access_ttl.as_secs(),
        user,
    })
}

/// Create an account and sign in.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterRequest,
    responses((status = 201, description = "Registered and signed in", body = AuthResponse), Problems))]
async fn register(
    State(state): State<AppState>,
    Json(body): Json<RegisterRequest>,
) -> Result<(StatusCode, axum::Json<AuthResponse>), ApiError> {
    let email = normalize_email(&body.email);
    let name = check_name(&body.name);
    let password = check_password("password", &body.password);
    let (email, name) = match (email, name, password) {
        (Ok(email), Ok(name), Ok(())) => (email, name),
        (email, name, password) => {
            let errors = [email.err(), name.err(), password.err()]
                .into_iter()
                .flatten()
                .collect();
            return Err(ApiError::Validation(errors));
        }
    };
    let hash = state.passwords.hash(&body.password).await?;
    let user =
        store::users::create(&state.db, &email, &name, &hash, Role::User, Tier::Free).await?;
    let mut conn = state.db.acquire().await?;
    let response = session(&state, user, 0, uuid::Uuid::now_v7(), &mut conn).await?;
    conn.finish().await?;
    Ok((StatusCode::CREATED, axum::Json(response)))
}

const BAD_CREDENTIALS: ApiError = ApiError::Unauthorized("invalid email or password");

/// Sign in with email and password.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, description = "Signed in", body = AuthResponse), Problems))]
async fn login(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    Json(body): Json<LoginRequest>,
) -> Result<axum::Json<AuthResponse>, ApiError> {
    let email = normalize_email(&body.email);
    let guard = LoginGuard::new(
        &state,
        client,
        email.as_deref().unwrap_or(body.email.as_str()),
    );
    guard.reserve(&state).await?;
    let credentials = match &email {
        Ok(email) => store::users::credentials_by_email(&state.db, email).await?,
        Err(_) => None,
    };
    let hash = credentials.as_ref().map(|c| c.password_hash.as_str());
    if !state.passwords.verify(&body.password, hash).await? {
        return Err(BAD_CREDENTIALS);
    }
    guard.succeeded(&state).await;
    let Some(Credentials {
        user,
        token_version,
        ..
    }) = credentials
    else {
        return Err(BAD_CREDENTIALS);
    };
    let mut conn = state.db.acquire().await?;
    let response = session(&state, user, token_version, uuid::Uuid::now_v7(), &mut conn).await?;
    conn.finish().await?;
    Ok(axum::Json(response))
}

/// Exchange a refresh token for a new pair. The presented token stops working; presenting it
/// again revokes every token of that sign-in.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, description = "A new token pair", body = AuthResponse), Problems))]
async fn refresh(
    State(state): State<AppState>,
    Json(body): Json<RefreshRequest>,
) -> Result<axum::Json<AuthResponse>, ApiError> {
    let hash = tokens::hash_refresh_token(&body.refresh_token);
    let mut tx = state.db.begin().await?;
    let consumed = store::refresh_tokens::consume(&mut tx, &hash).await?;
    let (user_id, family) = match consumed {
        Consumed::Valid { user_id, family_id } => (user_id, family_id),
        Consumed::Reused => {
            // Commit the family revocation before refusing.
            tx.commit().await?;
            tracing::warn!("rotated refresh token re-used; its family is revoked");
            return Err(ApiError::Unauthorized(
                "the refresh token has already been used",
            ));
        }
        Consumed::Invalid => {
            return Err(ApiError::Unauthorized(
                "the refresh token is invalid or expired",
            ));
        }
    };
    let Credentials {
        user,
        token_version,
        ..
    } = store::users::credentials(&mut *tx, user_id)
        .await?
        .ok_or(ApiError::Unauthorized(
            "the refresh token is invalid or expired",
        ))?;
    let response = session(&state, user, token_version, family, &mut tx).await?;
    tx.commit().await?;
    Ok(axum::Json(response))
}

/// Sign out: revokes the refresh token and every token rotated from the same sign-in.
/// Unknown tokens are accepted too, so the answer says nothing about validity.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", request_body = RefreshRequest,
    responses((status = 204, description = "Signed out"), Problems))]
async fn logout(
    State(state): State<AppState>,
    Json(body): Json<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let hash = tokens::hash_refresh_token(&body.refresh_token);
    store::refresh_tokens::revoke_by_hash(&state.db, &hash).await?;
    Ok(StatusCode::NO_CONTENT)
}
