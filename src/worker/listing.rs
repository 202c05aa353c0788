//! Pagination shared by every listing: `limit` with either `page` (offset, with totals) or
//! `cursor` (keyset: stable while rows are inserted, fast at any depth), and the SQL for both.
//!
//! A cursor is opaque to clients: base64url of the sort it belongs to, the sort-key values of the
//! last row returned and that row's id (the tie-breaker). An empty `cursor=` starts a walk.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::FieldError;

pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;
/// Deep offsets are slow and never what a client wants; cursors serve deep walks.
pub const MAX_PAGE: i64 = 100_000;

/// How a listing is paged.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 1-based page number.
    Page(i64),
    /// Rows after this position; `None` for the first page of a walk.
    Cursor(Option<Position>),
}

/// A parsed `limit` + `page`/`cursor`.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRequest {
    pub limit: i64,
    pub mode: Mode,
}

/// The last row of the previous page, in terms of the listing's sort keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub values: Vec<KeyValue>,
    pub id: Uuid,
}

/// One sort-key value, typed for binding.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyValue {
    Time(DateTime<Utc>),
    /// A nullable timestamp; `None` sorts as +infinity.
    OptionalTime(Option<DateTime<Utc>>),
    Int(i16),
    Text(String),
}

/// What a sort key's values are, for decoding cursors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Time,
    OptionalTime,
    Int,
    Text,
}

/// One ORDER BY term: the SQL expression and how to compare a bound value with it.
#[derive(Debug, Clone, Copy)]
pub struct OrderKey {
    /// SQL expression over the row, e.g. `lower(title) COLLATE "C"`.
    pub expr: &'static str,
    /// Text around the bound parameter so it is compared the same way, e.g. (`lower(`, `) COLLATE "C"`).
    pub wrap: (&'static str, &'static str),
    pub kind: KeyKind,
    pub desc: bool,
}

/// The wire form of a cursor.
#[derive(Serialize, Deserialize)]
struct CursorToken {
    /// The canonical sort the cursor belongs to.
    s: String,
    /// Sort-key values of the last row.
    v: Vec<serde_json::Value>,
    /// Id of the last row.
    i: Uuid,
}

impl PageRequest {
    /// Parses the raw parameters. `sort_tag` is the canonical sort of this listing: a cursor made
    /// for another sort is rejected rather than silently producing a wrong page.
    pub fn parse(
        limit: Option<&str>,
        page: Option<&str>,
        cursor: Option<&str>,
        sort_tag: &str,
        kinds: &[KeyKind],
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(raw) => match raw.parse::<i64>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    errors.push(FieldError::new(
                        "limit",
                        format!("must be an integer from 1 to {MAX_LIMIT}"),
                    ));
                    DEFAULT_LIMIT
                }
            },
        };
        let mode = match (page, cursor) {
            (Some(_), Some(_)) => {
                errors.push(FieldError::new(
                    "cursor",
                    "give either page or cursor, not both",
                ));
                Mode::Page(1)
            }
            (None, None) => Mode::Page(1),
            (Some(raw), None) => match raw.parse::<i64>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => Mode::Page(n),
                _ => {
                    errors.push(FieldError::new(
                        "page",
                        format!("must be an integer from 1 to {MAX_PAGE}"),
                    ));
                    Mode::Page(1)
                }
            },
            (None, Some("")) => Mode::Cursor(None),
            (None, Some(raw)) => match decode_cursor(raw, sort_tag, kinds) {
                Some(position) => Mode::Cursor(Some(position)),
                None => {
                    errors.push(FieldError::new(
                        "cursor",
                        "is not a cursor returned by this listing with the same sort",
                    ));
                    Mode::Cursor(None)
                }
            },
        };
        if errors.is_empty() {
            Ok(Self { limit, mode })
        } else {
            Err(errors)
        }
    }

    /// Rows to fetch: one more than `limit` in cursor mode, to know whether more follow.
    pub fn fetch(&self) -> i64 {
        match self.mode {
            Mode::Page(_) => self.limit,
            Mode::Cursor(_) => self.limit + 1,
        }
    }
}

fn decode_cursor(raw: &str, sort_tag: &str, kinds: &[KeyKind]) -> Option<Position> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    let token: CursorToken = serde_json::from_slice(&bytes).ok()?;
    if token.s != sort_tag || token.v.len() != kinds.len() {
        return None;
    }
    let values = token
        .v
        .into_iter()
        .zip(kinds)
        .map(|(value, kind)| {
            // The relaxed parser too: it reads back what `encode_cursor` wrote for a year
            // past 9999 (`+200000-…`), which rows stored before such years were refused hold.
            let time = |v: &serde_json::Value| {
                let s = v.as_str()?;
                DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .or_else(|_| s.parse::<DateTime<Utc>>())
                    .ok()
            };
            match kind {
                KeyKind::Time => time(&value).map(KeyValue::Time),
                KeyKind::OptionalTime if value.is_null() => Some(KeyValue::OptionalTime(None)),
                KeyKind::OptionalTime => time(&value).map(|t| KeyValue::OptionalTime(Some(t))),
                KeyKind::Int => value
                    .as_i64()
                    .and_then(|n| i16::try_from(n).ok())
                    .map(KeyValue::Int),
                KeyKind::Text => value.as_str().map(|s| KeyValue::Text(s.to_owned())),
            }
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Position {
        values,
        id: token.i,
    })
}

/// Encodes the position of a row as a cursor for `sort_tag`.
pub fn encode_cursor(sort_tag: &str, position: &Position) -> String {
    let values = position
        .values
        .iter()
        .map(|value| match value {
            KeyValue::Time(t) | KeyValue::OptionalTime(Some(t)) => {
                serde_json::Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            }
            KeyValue::OptionalTime(None) => serde_json::Value::Null,
            KeyValue::Int(n) => serde_json::Value::from(*n),
            KeyValue::Text(s) => serde_json::Value::String(s.clone()),
        })
        .collect();
    let token = CursorToken {
        s: sort_tag.to_owned(),
        v: values,
        i: position.id,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("cursor serialises"))
}

/// Appends ` ORDER BY k1, k2, ..., id` (the id takes the last key's direction).
pub fn push_order_by(qb: &mut QueryBuilder<'_, Postgres>, keys: &[OrderKey], id_column: &str) {
    qb.push(" ORDER BY ");
    for key in keys {
        qb.push(key.expr)
            .push(if key.desc { " DESC, " } else { " ASC, " });
    }
    let id_desc = keys.last().is_some_and(|k| k.desc);
    qb.push(id_column)
        .push(if id_desc { " DESC" } else { " ASC" });
}

/// Appends ` AND (<row is after position>)` for the keyset walk.
pub fn push_after(
    qb: &mut QueryBuilder<'_, Postgres>,
    keys: &[OrderKey],
    id_column: &str,
    position: &Position,
) {
    let id_desc = keys.last().is_some_and(|k| k.desc);
    let uniform = keys.iter().all(|k| k.desc == id_desc);
    qb.push(" AND ");
    if uniform {
        // (k1, k2, id) > ($1, $2, $3): one row comparison the index can seek to.
        qb.push("(");
        for key in keys {
            qb.push(key.expr).push(", ");
        }
        qb.push(id_column)
            .push(") ")
            .push(if id_desc { "<" } else { ">" })
            .push(" (");
        for (key, value) in keys.iter().zip(&position.values) {
            push_value(qb, key, value);
            qb.push(", ");
        }
        qb.push_bind(position.id).push(")");
        return;
    }
    // Mixed directions: (k1 > v1) OR (k1 = v1 AND k2 < v2) OR ... OR (all equal AND id > v).
    qb.push("(");
    for i in 0..=keys.len() {
        if i > 0 {
            qb.push(" OR ");
        }
        qb.push("(");
        for (key, value) in keys[..i].iter().zip(&position.values) {
            qb.push(key.expr).push(" = ");
            push_value(qb, key, value);
            qb.push(" AND ");
        }
        if let Some(key) = keys.get(i) {
            qb.push(key.expr).push(if key.desc { " < " } else { " > " });
            push_value(qb, key, &position.values[i]);
        } else {
            qb.push(id_column).push(if id_desc { " < " } else { " > " });
            qb.push_bind(position.id);
        }
        qb.push(")");
    }
    qb.push(")");
}

fn push_value(qb: &mut QueryBuilder<'_, Postgres>, key: &OrderKey, value: &KeyValue) {
    qb.push(key.wrap.0);
    match value {
        KeyValue::Time(t) => qb.push_bind(*t),
        KeyValue::OptionalTime(t) => qb.push_bind(*t),
        KeyValue::Int(n) => qb.push_bind(*n),
        KeyValue::Text(s) => qb.push_bind(s.clone()),
    };
    qb.push(key.wrap.1);
}

/// The `pagination` object of a listing response.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Pagination {
    Page(PagePagination),
    Cursor(CursorPagination),
}

/// Page mode: where this page is among all matching rows.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PagePagination {
    pub limit: i64,
    pub page: i64,
    /// Rows matching the filters, on all pages.
    pub total: i64,
    pub total_pages: i64,
}

/// Cursor mode: how to get the next page.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CursorPagination {
    pub limit: i64,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

/// A page of `T` and where it is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Listing<T> {
    pub data: Vec<T>,
    pub pagination: Pagination,
}

impl<T> Listing<T> {
    /// Builds the response from the fetched rows. In cursor mode `rows` may hold one extra row
    /// (see [`PageRequest::fetch`]); `position` gives a row's cursor position.
    pub fn new(
        request: &PageRequest,
        mut rows: Vec<T>,
        total: Option<i64>,
        sort_tag: &str,
        position: impl Fn(&T) -> Position,
    ) -> Self {
        let pagination = match request.mode {
            Mode::Page(page) => {
                let total = total.unwrap_or(0);
                Pagination::Page(PagePagination {
                    limit: request.limit,
                    page,
                    total,
                    total_pages: (total + request.limit - 1) / request.limit,
                })
            }
            Mode::Cursor(_) => {
                let has_more = rows.len() as i64 > request.limit;
                rows.truncate(request.limit as usize);
                let next_cursor = has_more
                    .then(|| rows.last())
                    .flatten()
                    .map(|last| encode_cursor(sort_tag, &position(last)));
                Pagination::Cursor(CursorPagination {
                    limit: request.limit,
                    next_cursor,
                    has_more,
                })
            }
        };
        Self {
            data: rows,
            pagination,
        }
    }
}

/// Splits a search string into lower-cased words (letters and digits), at most 16 of 64 chars.
pub fn search_words(search: &str) -> Vec<String> {
    search
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(16)
        .map(|w| w.chars().take(64).collect::<String>().to_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: &[KeyKind] = &[KeyKind::OptionalTime, KeyKind::Int, KeyKind::Text];

    #[test]
    fn cursor_round_trips_and_is_bound_to_its_sort() {
        let position = Position {
            values: vec![
                KeyValue::OptionalTime(None),
                KeyValue::Int(3),
                KeyValue::Text("Ünïcode title".into()),
            ],
            id: Uuid::now_v7(),
        };
        let raw = encode_cursor("dueAt,-priority,title", &position);
        let parsed =
            PageRequest::parse(Some("5"), None, Some(&raw), "dueAt,-priority,title", KINDS)
                .unwrap();
        assert_eq!(parsed.mode, Mode::Cursor(Some(position)));
        assert_eq!(parsed.fetch(), 6);
        let other = PageRequest::parse(None, None, Some(&raw), "title", KINDS).unwrap_err();
        assert_eq!(other[0].field, "cursor");
    }

    #[test]
    fn cursors_over_extreme_timestamps_round_trip() {
        let kinds = &[KeyKind::Time];
        for raw in [
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "+200000-01-01T00:00:00Z",
        ] {
            let time: DateTime<Utc> = raw.parse().unwrap();
            let position = Position {
                values: vec![KeyValue::Time(time)],
                id: Uuid::now_v7(),
            };
            let cursor = encode_cursor("createdAt", &position);
            let parsed = PageRequest::parse(None, None, Some(&cursor), "createdAt", kinds)
                .unwrap_or_else(|e| panic!("{raw}: {e:?}"));
            assert_eq!(parsed.mode, Mode::Cursor(Some(position)), "{raw}");
        }
    }

    #[test]
    fn garbage_cursors_and_bad_numbers_are_field_errors() {
        for raw in [
            "x",
            "!!!",
            "eyJ9",
            &URL_SAFE_NO_PAD.encode(b"{\"s\":\"t\",\"v\":[1],\"i\":\"x\"}"),
        ] {
            assert!(PageRequest::parse(None, None, Some(raw), "t", &[KeyKind::Int]).is_err());
        }
        let errors = PageRequest::parse(Some("0"), Some("-1"), None, "t", &[]).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["limit", "page"]);
        assert!(PageRequest::parse(Some("101"), None, None, "t", &[]).is_err());
        assert!(PageRequest::parse(None, Some("1"), Some(""), "t", &[]).is_err());
        assert_eq!(
            PageRequest::parse(None, None, None, "t", &[]).unwrap(),
            PageRequest {
                limit: 20,
                mode: Mode::Page(1)
            }
        );
    }

    #[test]
    fn search_words_split_on_punctuation() {
        assert_eq!(
            search_words("  Fix the-BUG, now!"),
            ["fix", "the", "bug", "now"]
        );
        assert!(search_words("!!! ---").is_empty());
    }
}
