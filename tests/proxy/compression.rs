//! Response compression (`proxy.compression`, docs/contract.md §8.2): the coding by
//! `Accept-Encoding`, `Vary`, what is left alone, and bodies compressed as they stream.

use super::*;
use common::codings::{GzipStream, decode};

/// What a client sees of one response: status, headers, the body's bytes as sent.
struct Seen {
    status: u16,
    headers: reqwest::header::HeaderMap,
    bytes: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn varies_on_encoding(&self) -> bool {
        self.headers
            .get_all("vary")
            .iter()
            .any(|v| v.to_str().unwrap().eq_ignore_ascii_case("accept-encoding"))
    }
}

async fn fetch(
    proxy: &TestProxy,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Seen {
    let mut request = client().request(method, proxy.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    Seen {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        bytes: response.bytes().await.unwrap(),
    }
}

async fn get(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> Seen {
    fetch(proxy, reqwest::Method::GET, path, headers).await
}

const JSON: &str = "type=application/json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coding_follows_accept_encoding() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let path = format!("/typed/5000?{JSON}");
    for (accept, expected) in [
        (Some("br"), Some("br")),
        (Some("zstd"), Some("zstd")),
        (Some("gzip"), Some("gzip")),
        (Some("gzip, deflate, br, zstd"), Some("br")),
        (Some("gzip;q=0.5, br;q=0.4, zstd;q=0.45"), Some("gzip")),
        (Some("*;q=0.3, br;q=0"), Some("zstd")),
        (Some("br;q=0, gzip;q=0"), None),
        (Some("identity"), None),
        (Some("deflate"), None),
        (None, None),
    ] {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept-encoding", *a)).collect();
        let seen = get(&proxy, &path, &headers).await;
        assert_eq!(seen.status, 200);
        assert_eq!(seen.header("content-encoding"), expected, "{accept:?}");
        assert!(seen.varies_on_encoding(), "{accept:?}: {:?}", seen.headers);
        match expected {
            Some(coding) => {
                assert_eq!(decode(coding, &seen.bytes), text_body(5000), "{accept:?}");
                assert!(
                    seen.bytes.len() < 500,
                    "{coding}: {} bytes",
                    seen.bytes.len()
                );
                assert_eq!(seen.header("content-length"), None);
            }
            None => {
                assert_eq!(seen.bytes, text_body(5000));
                assert_eq!(seen.header("content-length"), Some("5000"));
            }
        }
    }
    // The upstream still sees what the client accepts (the worker's cache keeps variants).
    let echo = json_of(
        client()
            .get(proxy.url("/echo"))
            .header("accept-encoding", "br"),
    )
    .await;
    assert_eq!(seen(&echo, "accept-encoding"), ["br"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_encoded_ranged_and_binary_responses_are_left_alone() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let br = [("accept-encoding", "br, gzip, zstd")];

    // 1 KiB and less: not worth it.
    let small = get(&proxy, &format!("/typed/1024?{JSON}"), &br).await;
    assert_eq!(small.header("content-encoding"), None);
    assert_eq!(small.bytes, text_body(1024));
    let just_over = get(&proxy, &format!("/typed/1025?{JSON}"), &br).await;
    assert_eq!(just_over.header("content-encoding"), Some("br"));

    // Not a compressible type, or no type at all.
    for query in ["type=image/png", "type=application/octet-stream", ""] {
        let binary = get(&proxy, &format!("/typed/5000?{query}"), &br).await;
        assert_eq!(binary.header("content-encoding"), None, "{query}");
        assert!(!binary.varies_on_encoding(), "{query}");
        assert_eq!(binary.bytes, text_body(5000));
    }

    // Already encoded by the upstream (the worker's cached variants): passed through as sent.
    let encoded = get(&proxy, &format!("/typed/5000?{JSON}&encoding=zstd"), &br).await;
    assert_eq!(encoded.header("content-encoding"), Some("zstd"));
    assert_eq!(encoded.bytes, text_body(5000));

    // Range requests and HEAD get the identity representation.
    let ranged = get(
        &proxy,
        &format!("/typed/5000?{JSON}"),
        &[("accept-encoding", "br"), ("range", "bytes=0-99")],
    )
    .await;
    assert_eq!(ranged.header("content-encoding"), None);
    assert_eq!(ranged.bytes, text_body(5000));
    let head = fetch(
        &proxy,
        reqwest::Method::HEAD,
        &format!("/typed/5000?{JSON}"),
        &br,
    )
    .await;
    assert_eq!(head.header("content-encoding"), None);
    assert_eq!(head.header("content-length"), Some("5000"));

    // Cache-Control: no-transform forbids intermediaries to change the coding.
    let kept = get(
        &proxy,
        &format!("/typed/5000?{JSON}&cache=private,%20no-transform"),
        &br,
    )
    .await;
    assert_eq!(kept.header("content-encoding"), None);
    assert_eq!(kept.bytes, text_body(5000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_response_carries_a_weak_etag() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let path = format!("/typed/5000?{JSON}&etag=%22v1%22");
    let plain = get(&proxy, &path, &[]).await;
    assert_eq!(plain.header("etag"), Some("\"v1\""));
    let gzip = get(&proxy, &path, &[("accept-encoding", "gzip")]).await;
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    assert_eq!(gzip.header("etag"), Some("W/\"v1\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_compression_off_nothing_changes() {
    let up = TestUpstream::start("a").await;
    let mut off = config(&[&up.url]);
    off.compression = false;
    let proxy = TestProxy::start(off).await;
    let seen = get(
        &proxy,
        &format!("/typed/5000?{JSON}"),
        &[("accept-encoding", "br, gzip")],
    )
    .await;
    assert_eq!(seen.header("content-encoding"), None);
    assert!(!seen.varies_on_encoding());
    assert_eq!(seen.bytes, text_body(5000));
}

/// A streamed body is compressed as it arrives: what the upstream has sent so far reaches the
/// client, decodable, while the upstream waits; the rest follows when it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_is_compressed_as_it_streams() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let total = 4 * CHUNK as u64;
    let request = Request::get(format!("/gated/{total}?{JSON}"))
        .header("accept-encoding", "gzip")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = within("response headers", send_h1(proxy.addr, request)).await;
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let mut body = response.into_body();
    let mut stream = GzipStream::default();
    // The upstream stops after its first chunk until released.
    let first = within(
        "the first chunk, compressed, before the rest exists",
        async {
            loop {
                let frame = body.frame().await.unwrap().unwrap();
                if let Ok(data) = frame.into_data()
                    && stream.feed(&data).len() >= CHUNK
                {
                    break stream.feed(&[]).to_vec();
                }
            }
        },
    )
    .await;
    assert_eq!(first.len(), CHUNK);
    assert!(is_pattern(0, &first));
    up.release();
    let rest = within("the rest of the body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    let whole = stream.feed(&rest).to_vec();
    assert_eq!(whole.len() as u64, total);
    assert!(is_pattern(0, &whole));
}
