//! Steps of the API's core flows that the data-tier tests (`tests/pgbouncer.rs`,
//! `tests/replica.rs`, `tests/tls.rs`) each walk through on their own servers.

use reqwest::Method;
use serde_json::{Value, json};

use super::{PASSWORD, Resp, TestApp};

impl TestApp {
    /// Follows `nextCursor` from the first page of `path` (a listing URL with its query, to
    /// which `&cursor=` is appended) to the last; the number of items seen.
    pub async fn walk_cursor(&self, path: &str, token: &str) -> usize {
        let (mut cursor, mut walked) = (String::new(), 0);
        loop {
            let page = self.get(&format!("{path}&cursor={cursor}"), token).await;
            let body = page.expect(200);
            walked += body["data"].as_array().expect("a listing").len();
            match body["pagination"]["nextCursor"].as_str() {
                Some(next) => cursor = next.to_owned(),
                None => return walked,
            }
        }
    }

    /// `POST path` with `Idempotency-Key: key`.
    pub async fn post_keyed(&self, path: &str, token: &str, key: &str, body: &Value) -> Resp {
        self.send(
            self.request(Method::POST, path, token)
                .header("idempotency-key", key)
                .json(body),
        )
        .await
    }

    /// Changes the password of the caller (registered with [`PASSWORD`]); panics unless 200.
    pub async fn change_password(&self, token: &str) {
        self.patch(
            "/api/v1/me",
            token,
            &json!({"currentPassword": PASSWORD, "password": "another good password"}),
        )
        .await
        .expect(200);
    }
}
