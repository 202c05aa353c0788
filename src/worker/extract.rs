//! Request extractors whose every rejection is an [`ApiError`], so malformed input always gets
//! problem+json with the right status: 400 syntax, 413 size, 415 media type, 422 field errors.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Request},
    http::{header, request::Parts},
};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::{ApiError, FieldError};

/// A JSON body. Unlike `axum::Json` it reports the failing field by its path.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::bad_request(format!("could not read the request body: {rejection}"))
            }
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// `application/json` or any `application/*+json`, parameters (charset) allowed.
fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Deserialises `bytes`: syntax errors are 400; a body that is not an object, a string holding
/// NUL (which PostgreSQL cannot store) or a field of the wrong shape is 422, naming the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid_field("body", "must be a JSON object"));
    }
    if let Some(path) = find_nul(&value, String::new()) {
        return Err(ApiError::invalid_field(
            &path,
            "must not contain NUL characters",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let message = error.into_inner().to_string();
        ApiError::Validation(vec![FieldError::new(field_name(&path, &message), message)])
    })
}

/// The path of the first string (or key) containing U+0000.
fn find_nul(value: &serde_json::Value, path: String) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        serde_json::Value::String(s) if s.contains('\0') => {
            Some(if path.is_empty() { "body".into() } else { path })
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_nul(item, format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                Some(join("(key)"))
            } else {
                find_nul(item, join(key))
            }
        }),
        _ => None,
    }
}

/// The field a shape error is about: its path, or for "missing field `x`" at some level, that
/// level's path plus `x`. (The path of an unknown field already ends with its name.)
fn field_name(path: &str, message: &str) -> String {
    let named = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
    };
    match (path, named("missing field `"), named("unknown field `")) {
        (".", Some(name), _) | (".", None, Some(name)) => name.to_owned(),
        (".", None, None) => "body".to_owned(),
        (path, Some(name), _) => format!("{path}.{name}"),
        (path, None, _) => path.to_owned(),
    }
}

/// A UUID path parameter; anything else is a 400, not a 404.
pub struct PathId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))?;
        Uuid::parse_str(&raw)
            .map(PathId)
            .map_err(|_| ApiError::BadRequest {
                detail: format!("{raw:?} is not a valid id"),
                errors: vec![FieldError::new("id", "must be a UUID")],
            })
    }
}

/// A query string decoded into `T` (a struct with `deny_unknown_fields` and text fields that the
/// handler validates). Unknown, repeated or undecodable parameters are a 400.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
            .map(Query)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
    }
}

/// Deserialises a PATCH field that may be absent (`None`) but not `null`: `null` clears only
/// nullable fields, and a non-nullable one gets a 422 naming it instead of being ignored.
pub fn non_null<'de, T, D>(deserializer: D) -> Result<Option<T>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    let value: Option<T> = serde::Deserialize::deserialize(deserializer)?;
    value
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom("must not be null"))
}

/// Deserialises a field that may be absent (outer `None`), `null` (`Some(None)`) or a value, so
/// PATCH can tell "leave as is" from "clear".
pub fn double_option<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    serde::Deserialize::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Body {
        title: String,
        count: Option<u32>,
        #[serde(default, deserialize_with = "double_option")]
        due_at: Option<Option<String>>,
    }

    fn field_of(error: ApiError) -> (u16, String) {
        match error {
            ApiError::Validation(errors) => (422, errors[0].field.clone()),
            other => (other.status().as_u16(), String::new()),
        }
    }

    #[test]
    fn syntax_errors_are_400_and_shape_errors_name_the_field() {
        assert_eq!(field_of(parse_json::<Body>(b"{").unwrap_err()).0, 400);
        assert_eq!(field_of(parse_json::<Body>(b"").unwrap_err()).0, 400);
        assert_eq!(
            field_of(parse_json::<Body>(b"{\"title\":\"a\"} x").unwrap_err()).0,
            400
        );
        assert_eq!(
            field_of(parse_json::<Body>(b"{}").unwrap_err()),
            (422, "title".into())
        );
        assert_eq!(
            field_of(parse_json::<Body>(b"{\"title\":\"a\",\"count\":-1}").unwrap_err()),
            (422, "count".into())
        );
        assert_eq!(
            field_of(parse_json::<Body>(b"{\"title\":\"a\",\"bogus\":1}").unwrap_err()),
            (422, "bogus".into())
        );
        assert_eq!(
            field_of(parse_json::<Body>(b"[]").unwrap_err()),
            (422, "body".into())
        );
        // serde accepts a struct in sequence form; a body must be an object all the same.
        assert_eq!(
            field_of(parse_json::<Body>(b"[\"a\", 1]").unwrap_err()),
            (422, "body".into())
        );
        // PostgreSQL cannot store NUL in text.
        assert_eq!(
            field_of(parse_json::<Body>(br#"{"title":"a\u0000b"}"#).unwrap_err()),
            (422, "title".into())
        );
    }

    #[test]
    fn double_option_tells_absent_from_null() {
        let absent: Body = parse_json(b"{\"title\":\"a\"}").unwrap();
        assert_eq!(absent.due_at, None);
        let null: Body = parse_json(b"{\"title\":\"a\",\"dueAt\":null}").unwrap();
        assert_eq!(null.due_at, Some(None));
        let set: Body = parse_json(b"{\"title\":\"a\",\"dueAt\":\"x\"}").unwrap();
        assert_eq!(set.due_at, Some(Some("x".into())));
    }

    #[test]
    fn json_media_types() {
        let v = |s: &'static str| header::HeaderValue::from_static(s);
        assert!(is_json(Some(&v("application/json"))));
        assert!(is_json(Some(&v("Application/JSON; charset=utf-8"))));
        assert!(is_json(Some(&v("application/merge-patch+json"))));
        assert!(!is_json(Some(&v("text/plain"))));
        assert!(!is_json(None));
    }
}
