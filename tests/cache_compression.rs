//! Compressed variants of cached reads (`cache.compression`, docs/proxy.md#compression): the
//! worker answers a cached listing in the coding the client's `Accept-Encoding` picks, from a
//! variant stored in Redis next to the plain entry, with an `ETag` of its own per coding and
//! `If-None-Match` answered per coding.

mod common;

use common::{TestApp, codings::decode, spawn_app, spawn_app_with};
use fred::{
    prelude::{Builder, ClientLike, KeysInterface},
    types::{Expiration, config::Config as RedisClientConfig, scan::Scanner},
};
use futures_util::TryStreamExt;
use reqwest::{Method, header::HeaderMap};
use serde_json::json;
use taskd::compression::{Effort, Encoding, compress};

const LIST: &str = "/api/v1/tasks";

/// A response with its body as bytes (compressed bodies are not text).
struct Raw {
    status: u16,
    headers: HeaderMap,
    bytes: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as the client reads it: decoded from its `Content-Encoding`.
    fn decoded(&self) -> Vec<u8> {
        match self.header("content-encoding") {
            Some(coding) => decode(coding, &self.bytes),
            None => self.bytes.clone(),
        }
    }

    fn varies_on_encoding(&self) -> bool {
        self.headers.get_all("vary").iter().any(|v| {
            v.to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("accept-encoding")
        })
    }
}

/// GET `path` with `headers` (name, value).
async fn get(app: &TestApp, path: &str, token: &str, headers: &[(&str, &str)]) -> Raw {
    let mut request = app.request(Method::GET, path, token);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    Raw {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        bytes: response.bytes().await.unwrap().to_vec(),
    }
}

/// A user with 12 tasks: a first page of about 5 KB of JSON.
async fn user_with_tasks(app: &TestApp) -> String {
    let ada = app.register("ada@example.com").await;
    for i in 0..12 {
        app.create_task(
            ada.token(),
            &json!({"title": format!("Quarterly report, part {i}"), "description": "figures and charts"}),
        )
        .await;
    }
    ada.token().to_owned()
}

/// The plain entry's tag with `-<coding>` inside the quotes.
fn tag_for(plain: &str, coding: &str) -> String {
    format!("{}-{coding}\"", plain.strip_suffix('"').unwrap())
}

#[tokio::test]
async fn cached_reads_are_sent_in_the_accepted_coding_from_a_stored_variant() {
    let app = spawn_app().await;
    let token = user_with_tasks(&app).await;
    let plain = get(&app, LIST, &token, &[]).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("x-cache"), Some("MISS"));
    assert_eq!(plain.header("content-encoding"), None);
    assert!(plain.varies_on_encoding(), "{:?}", plain.headers);
    assert!(plain.bytes.len() > 2048, "{} bytes", plain.bytes.len());
    let plain_tag = plain.header("etag").unwrap().to_owned();

    for (coding, encoding) in [
        ("br", Encoding::Br),
        ("zstd", Encoding::Zstd),
        ("gzip", Encoding::Gzip),
    ] {
        let accept = [("accept-encoding", coding)];
        let first = get(&app, LIST, &token, &accept).await;
        assert_eq!(first.status, 200);
        // Made from the plain entry: no query ran.
        assert_eq!(first.header("x-cache"), Some("HIT"), "{coding}");
        assert_eq!(first.header("content-encoding"), Some(coding));
        assert_eq!(
            first.header("etag").unwrap(),
            tag_for(&plain_tag, coding),
            "{coding}"
        );
        assert!(first.varies_on_encoding());
        assert_eq!(first.decoded(), plain.bytes, "{coding}");
        assert!(
            first.bytes.len() * 3 < plain.bytes.len(),
            "{coding}: {}",
            first.bytes.len()
        );
        // Exactly the bytes of compressing the plain body, sent again as stored.
        let expected = compress(encoding, Effort::Stored, &plain.bytes).unwrap();
        assert_eq!(first.bytes, expected.to_vec(), "{coding}");
        let again = get(&app, LIST, &token, &accept).await;
        assert_eq!(again.header("x-cache"), Some("HIT"));
        assert_eq!(again.bytes, first.bytes, "{coding}");
    }

    // A hit sends what Redis holds, compressing nothing: replace the stored brotli variant's
    // body and that is what comes back.
    let redis =
        Builder::from_config(RedisClientConfig::from_url(&app.state.config.redis.url).unwrap())
            .build()
            .unwrap();
    redis.init().await.unwrap();
    let pattern = format!("{}cache:*:br", app.redis_prefix);
    let keys: Vec<String> = redis
        .scan(&pattern, Some(1000), None)
        .map_ok(|mut page| {
            page.take_results()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|k| k.into_string())
                .collect::<Vec<_>>()
        })
        .try_concat()
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let stored: Vec<u8> = redis.get(&keys[0]).await.unwrap();
    let head = stored.iter().position(|&b| b == b'\n').unwrap();
    let mut forged = stored[..=head].to_vec();
    let marker = compress(
        Encoding::Br,
        Effort::Stored,
        &b"[\"stored bytes\"]".repeat(80),
    )
    .unwrap();
    forged.extend_from_slice(&marker);
    let _: () = redis
        .set(&keys[0], forged, Some(Expiration::EX(60)), None, false)
        .await
        .unwrap();
    let hit = get(&app, LIST, &token, &[("accept-encoding", "br")]).await;
    assert_eq!(hit.bytes, marker.to_vec());
}

#[tokio::test]
async fn a_miss_stores_the_variant_it_sends_and_writes_retire_it() {
    let app = spawn_app().await;
    let token = user_with_tasks(&app).await;
    let accept = [("accept-encoding", "gzip;q=0.5, br;q=0.9, zstd;q=0.1")];
    let miss = get(&app, LIST, &token, &accept).await;
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    assert_eq!(miss.header("content-encoding"), Some("br"));
    let hit = get(&app, LIST, &token, &accept).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.bytes, miss.bytes);

    app.create_task(&token, &json!({"title": "A new one"}))
        .await;
    let after = get(&app, LIST, &token, &accept).await;
    assert_eq!(after.header("x-cache"), Some("MISS"));
    assert_ne!(after.header("etag"), miss.header("etag"));
    let listing: serde_json::Value = serde_json::from_slice(&after.decoded()).unwrap();
    assert_eq!(listing["data"][0]["title"], "A new one");
}

#[tokio::test]
async fn the_coding_follows_accept_encoding_quality_values() {
    let app = spawn_app().await;
    let token = user_with_tasks(&app).await;
    for (accept, expected) in [
        ("gzip, deflate, br, zstd", Some("br")),
        ("gzip;q=0.8, zstd;q=0.9", Some("zstd")),
        ("br;q=0.2, gzip;q=0.7", Some("gzip")),
        ("*", Some("br")),
        ("*;q=0.5, br;q=0, zstd;q=0", Some("gzip")),
        ("br;q=0", None),
        ("identity", None),
        ("deflate", None),
    ] {
        let resp = get(&app, LIST, &token, &[("accept-encoding", accept)]).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-encoding"), expected, "{accept}");
        assert!(resp.varies_on_encoding(), "{accept}");
        let listing: serde_json::Value = serde_json::from_slice(&resp.decoded()).unwrap();
        assert_eq!(listing["pagination"]["total"], 12, "{accept}");
    }
}

#[tokio::test]
async fn if_none_match_is_answered_per_coding() {
    let app = spawn_app().await;
    let token = user_with_tasks(&app).await;
    let plain = get(&app, LIST, &token, &[]).await;
    let plain_tag = plain.header("etag").unwrap().to_owned();
    let br = get(&app, LIST, &token, &[("accept-encoding", "br")]).await;
    let br_tag = br.header("etag").unwrap().to_owned();
    assert_eq!(br_tag, tag_for(&plain_tag, "br"));

    let conditional = |tag: &str, accept: Option<&str>| {
        let mut headers = vec![("if-none-match", tag.to_owned())];
        if let Some(accept) = accept {
            headers.push(("accept-encoding", accept.to_owned()));
        }
        let app = &app;
        let token = &token;
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            get(app, LIST, token, &headers).await
        }
    };
    let not_modified = conditional(&br_tag, Some("br")).await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.bytes.is_empty());
    assert_eq!(not_modified.header("etag"), Some(br_tag.as_str()));
    assert_eq!(not_modified.header("content-encoding"), None);
    assert!(not_modified.varies_on_encoding());
    // Weak comparison, as RFC 9110 says for If-None-Match.
    assert_eq!(
        conditional(&format!("W/{br_tag}"), Some("br")).await.status,
        304
    );
    assert_eq!(conditional(&plain_tag, None).await.status, 304);

    // The brotli tag does not validate the gzip or the plain representation, nor the reverse.
    let gzip = conditional(&br_tag, Some("gzip")).await;
    assert_eq!(gzip.status, 200);
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    assert_eq!(gzip.header("etag").unwrap(), tag_for(&plain_tag, "gzip"));
    assert_eq!(gzip.decoded(), plain.bytes);
    let identity = conditional(&br_tag, None).await;
    assert_eq!(identity.status, 200);
    assert_eq!(identity.bytes, plain.bytes);
    let plain_tag_br = conditional(&plain_tag, Some("br")).await;
    assert_eq!(plain_tag_br.status, 200);
    assert_eq!(plain_tag_br.bytes, br.bytes);
}

#[tokio::test]
async fn small_bodies_are_sent_plain() {
    let app = spawn_app().await;
    let ada = app.register("ada@example.com").await;
    app.create_task(ada.token(), &json!({"title": "one"})).await;
    for _ in 0..2 {
        let resp = get(&app, LIST, ada.token(), &[("accept-encoding", "br")]).await;
        assert_eq!(resp.status, 200);
        assert!(resp.bytes.len() < 1024);
        assert_eq!(resp.header("content-encoding"), None);
        assert!(resp.varies_on_encoding());
        assert!(!resp.header("etag").unwrap().contains("-br"));
    }
}

#[tokio::test]
async fn with_variants_off_the_worker_sends_plain_and_does_not_vary() {
    let app = spawn_app_with(|c| c.cache.compression = false).await;
    let token = user_with_tasks(&app).await;
    for _ in 0..2 {
        let resp = get(&app, LIST, &token, &[("accept-encoding", "br, gzip")]).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-encoding"), None);
        assert!(!resp.varies_on_encoding());
    }
}
