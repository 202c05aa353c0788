//! One error type for every failure a client can see, rendered as RFC 9457 problem+json.
//!
//! Handlers return `Result<_, ApiError>`; extractor rejections and the router's own 404/405 are
//! converted into it too, so no response leaves the worker in another shape. A 5xx never carries
//! internal text: the cause travels to the request log line in a response extension instead.

use std::sync::Arc;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

tokio::task_local! {
    /// The id of the request being handled, so errors built deep inside can report it.
    pub static REQUEST_ID: Arc<str>;
}

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as a JSON path (`title`, `sort`, `tags[2]`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Collects field errors so a request learns about all its mistakes at once.
#[derive(Debug, Default)]
pub struct FieldErrors(Vec<FieldError>);

impl FieldErrors {
    /// The value when `result` is `Ok`; otherwise records the error.
    pub fn take<T>(&mut self, result: Result<T, FieldError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.0.push(error);
                None
            }
        }
    }

    pub fn extend(&mut self, errors: Vec<FieldError>) {
        self.0.extend(errors);
    }

    /// `Err(422)` when any error was recorded.
    pub fn into_validation(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }

    /// `Err(400)` when any error was recorded (query parameters).
    pub fn into_bad_query(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid_query(self.0))
        }
    }
}

/// The problem+json body (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// A URI reference naming the kind of problem, e.g. `/problems/validation`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The `X-Request-Id` of the request, for support and logs.
    pub request_id: String,
    /// Per-field failures (validation problems only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// Everything that can go wrong in a request, by what the client should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, query string or path id (400).
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// Missing, invalid, expired or revoked credentials (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Authenticated but not allowed (403).
    #[error("{0}")]
    Forbidden(&'static str),
    /// No such resource, or not the caller's (404).
    #[error("{0}")]
    NotFound(&'static str),
    /// The route exists but not with this method (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with existing state, e.g. a duplicate email (409).
    #[error("{0}")]
    Conflict(String),
    /// The body exceeds `worker.body_limit` (413).
    #[error("the request body is larger than this server accepts")]
    PayloadTooLarge,
    /// The body is not `application/json` (415).
    #[error("expected a body with Content-Type: application/json")]
    UnsupportedMediaType,
    /// Well-formed but invalid fields (422).
    #[error("{} invalid field(s)", .0.len())]
    Validation(Vec<FieldError>),
    /// Over a rate limit (429, with `Retry-After`).
    #[error("{detail}")]
    TooManyRequests {
        detail: String,
        retry_after: std::time::Duration,
    },
    /// A dependency (PostgreSQL) is unavailable or too slow (503).
    #[error("{0}")]
    Unavailable(&'static str),
    /// A bug or an unexpected failure (500). The text stays in the logs.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The cause of a 5xx, attached to the response for the request log line.
#[derive(Clone, Debug)]
pub struct ErrorCause(pub Arc<str>);

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::BadRequest {
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// A 400 for query parameters that failed to parse.
    pub fn invalid_query(errors: Vec<FieldError>) -> Self {
        Self::BadRequest {
            detail: "invalid query parameters; see `errors`".into(),
            errors,
        }
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad-request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge => "payload-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::Validation(_) => "validation",
            Self::TooManyRequests { .. } => "rate-limited",
            Self::Unavailable(_) => "service-unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

/// Renders a problem+json response. Also used by middleware for errors raised outside handlers.
pub fn problem_response(
    status: StatusCode,
    slug: &str,
    detail: String,
    errors: Option<Vec<FieldError>>,
) -> Response {
    let request_id = REQUEST_ID.try_with(|id| id.to_string()).unwrap_or_default();
    let body = Problem {
        kind: format!("/problems/{slug}"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail,
        request_id,
        errors,
    };
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let slug = self.slug();
        let (detail, errors) = match self {
            Self::BadRequest { detail, errors } => (detail, (!errors.is_empty()).then_some(errors)),
            Self::Validation(errors) => (
                "the request has invalid fields; see `errors`".to_owned(),
                Some(errors),
            ),
            Self::TooManyRequests {
                detail,
                retry_after,
            } => {
                let mut response = problem_response(status, slug, detail, None);
                let seconds = retry_after.as_millis().div_ceil(1000).max(1) as u64;
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                return response;
            }
            Self::Internal(ref cause) => {
                let mut response = problem_response(
                    status,
                    slug,
                    "an unexpected error occurred; it has been logged with this request id".into(),
                    None,
                );
                response
                    .extensions_mut()
                    .insert(ErrorCause(format!("{cause:#}").into()));
                return response;
            }
            other => (other.to_string(), None),
        };
        let mut response = problem_response(status, slug, detail, errors);
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"taskd\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Database failures: unreachable or slow PostgreSQL is a 503, anything else a 500.
/// Constraint violations a client can cause are mapped by the stores before reaching here.
impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable("the database is unavailable; retry shortly")
            }
            // 57014 query_canceled (statement_timeout), 57P01..03 shutdown / cannot connect now.
            sqlx::Error::Database(e)
                if matches!(
                    e.code().as_deref(),
                    Some("57014" | "57P01" | "57P02" | "57P03")
                ) =>
            {
                Self::Unavailable("the database is unavailable; retry shortly")
            }
            // 23503 foreign_key_violation on an owner: the caller's account was deleted after
            // its token was checked (every owned row references users (id)).
            sqlx::Error::Database(e)
                if e.code().as_deref() == Some("23503")
                    && e.constraint().is_some_and(|c| c.ends_with("owner_id_fkey")) =>
            {
                Self::Unauthorized("the account no longer exists")
            }
            // 22008 datetime_field_overflow: a timestamp PostgreSQL cannot hold. Inputs are
            // checked before they reach it; this keeps any that slip through a client error.
            sqlx::Error::Database(e) if e.code().as_deref() == Some("22008") => {
                Self::bad_request("a timestamp is out of range (years 0001 to 9999)")
            }
            // 22021 character_not_in_repertoire: text with a NUL character, which PostgreSQL
            // cannot store; it comes from the client, in a body field or a cursor.
            sqlx::Error::Database(e) if e.code().as_deref() == Some("22021") => {
                Self::bad_request("text must not contain NUL (U+0000) characters")
            }
            _ => Self::Internal(anyhow::Error::new(error).context("database query")),
        }
    }
}

/// Maps a unique or foreign-key violation of `constraint` to a client error; other errors pass
/// through unchanged. Keeps constraint names next to the SQL that can violate them.
pub fn on_constraint(
    error: sqlx::Error,
    constraint: &str,
    to: impl FnOnce() -> ApiError,
) -> ApiError {
    match &error {
        sqlx::Error::Database(e) if e.constraint() == Some(constraint) => to(),
        _ => error.into(),
    }
}

/// The problem+json responses any API route may give, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Problems {
    /// Malformed JSON, query string or path id.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// Missing, invalid, expired or revoked access token (with `WWW-Authenticate: Bearer`).
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The caller may not do this (admin routes, `ownerId`).
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No such resource, or it belongs to another user.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// Conflicts with existing data (duplicate email or category name).
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(Problem),
    /// The body is larger than `worker.body_limit`.
    #[response(status = 413, content_type = "application/problem+json")]
    PayloadTooLarge(Problem),
    /// The body is not JSON.
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Problem),
    /// Invalid fields, listed in `errors`.
    #[response(status = 422, content_type = "application/problem+json")]
    Validation(Problem),
    /// Over a rate limit (with `Retry-After`).
    #[response(status = 429, content_type = "application/problem+json")]
    TooManyRequests(Problem),
    /// PostgreSQL is unavailable (with `Retry-After`).
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}
