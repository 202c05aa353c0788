//! SQL, one module per resource. Handlers call these functions and never write SQL themselves.

pub mod categories;
pub mod refresh_tokens;
pub mod settings;
pub mod tasks;
pub mod users;

use sqlx::{FromRow, PgConnection, Postgres, QueryBuilder, postgres::PgRow};

use super::{
    error::ApiError,
    listing::{self, Mode, OrderKey, PageRequest},
};

/// What an insert with an id derived from an `Idempotency-Key` did: inserted `row`, or found it
/// already inserted (`existed`) by an earlier run of the same request — one on a worker that
/// died before answering, or whose lease lapsed.
pub struct Created<T> {
    pub row: T,
    pub existed: bool,
}

impl<T> Created<T> {
    fn new(row: T) -> Self {
        Self {
            row,
            existed: false,
        }
    }
}

/// Appends ` AND <column> ILIKE '%word%'`-style filters, one per word, escaping LIKE wildcards,
/// so that every word must appear somewhere in `expr`.
pub(crate) fn push_words_ilike(qb: &mut QueryBuilder<'_, Postgres>, expr: &str, words: &[String]) {
    for word in words {
        let escaped = word
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        qb.push(" AND ")
            .push(expr)
            .push(" ILIKE ")
            .push_bind(format!("%{escaped}%"));
    }
}

/// Runs a listing: `SELECT <columns> FROM <from>` + `filter` (which starts with ` WHERE`) in the
/// order of `order`, paged by `page`; in page mode also counts the matching rows. Both
/// statements run on `conn`, one pool checkout: giving a connection back to the pool costs a
/// round trip (sqlx checks it on release), so a page costs three round trips instead of four.
pub(crate) async fn fetch_page<T>(
    conn: &mut PgConnection,
    columns: &str,
    from: &str,
    filter: impl Fn(&mut QueryBuilder<'_, Postgres>),
    order: &[OrderKey],
    page: &PageRequest,
) -> Result<(Vec<T>, Option<i64>), ApiError>
where
    T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
{
    let mut qb = QueryBuilder::new(format!("SELECT {columns} FROM {from}"));
    filter(&mut qb);
    if let Mode::Cursor(Some(position)) = &page.mode {
        listing::push_after(&mut qb, order, "id", position);
    }
    listing::push_order_by(&mut qb, order, "id");
    qb.push(" LIMIT ").push_bind(page.fetch());
    if let Mode::Page(n) = page.mode {
        qb.push(" OFFSET ").push_bind((n - 1) * page.limit);
    }
    let rows = qb.build_query_as().fetch_all(&mut *conn).await?;
    let total = match page.mode {
        Mode::Page(_) => {
            let mut qb = QueryBuilder::new(format!("SELECT count(*) FROM {from}"));
            filter(&mut qb);
            Some(qb.build_query_scalar().fetch_one(&mut *conn).await?)
        }
        Mode::Cursor(_) => None,
    };
    Ok((rows, total))
}
