//! Header rules.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peer_headers_are_replaced_and_hop_by_hop_removed() {
    let up = TestUpstream::start("a").await;
    // Default config: no trusted proxies, so 127.0.0.1 is an ordinary client.
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let client = client();
    let spoofing = |url: String| {
        client
            .get(url)
            .header("host", "api.example.com")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-for", "7.7.7.7")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "hop-only")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("te", "trailers")
            .header("x-kept", "yes")
    };

    // Sanity: sent straight to the upstream, every one of these headers arrives.
    let direct = json_of(spoofing(format!("{}/echo?page=2", up.url))).await;
    for name in [
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "connection",
    ] {
        assert!(!seen(&direct, name).is_empty(), "{name} not sent: {direct}");
    }

    let echo = json_of(spoofing(proxy.url("/echo?page=2"))).await;
    assert_eq!(echo["target"], "/echo?page=2", "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        ["api.example.com"],
        "{echo}"
    );
    assert_eq!(seen(&echo, "host"), ["api.example.com"], "{echo}");
    assert_eq!(seen(&echo, "x-kept"), ["yes"], "{echo}");
    for gone in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
    ] {
        assert!(seen(&echo, gone).is_empty(), "{gone} was forwarded: {echo}");
    }
    let ids = seen(&echo, "x-request-id");
    assert_eq!(ids.len(), 1, "{echo}");
    assert!(
        ids[0].len() >= 16
            && ids[0]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-'),
        "{echo}"
    );

    // A second request gets a different id; one the client sent is kept.
    let again: Value = proxy.get(&client, "/echo").await.json().await.unwrap();
    assert_ne!(seen(&again, "x-request-id"), ids);
    let kept = json_of(
        client
            .get(proxy.url("/echo"))
            .header("x-request-id", "client-chosen-42"),
    )
    .await;
    assert_eq!(seen(&kept, "x-request-id"), ["client-chosen-42"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_peer_gets_its_address_appended() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let proxy = TestProxy::start(config).await;
    let client = client();

    let echo = json_of(
        client
            .get(proxy.url("/echo"))
            .header("host", "api.example.com")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-for", "5.6.7.8")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "public.example"),
    )
    .await;
    assert_eq!(
        seen(&echo, "x-forwarded-for"),
        ["1.2.3.4, 5.6.7.8, 127.0.0.1"],
        "{echo}"
    );
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"], "{echo}");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        ["public.example"],
        "{echo}"
    );
    assert_eq!(seen(&echo, "host"), ["api.example.com"], "{echo}");

    // Without forwarding headers, the trusted peer is the first hop.
    let echo: Value = proxy.get(&client, "/echo").await.json().await.unwrap();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        [proxy.addr.to_string()],
        "{echo}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_forwarded_host_is_replaced_even_without_a_host_header() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    // HTTP/1.0 allows a request without Host; the client still must not choose the
    // X-Forwarded-Host the upstream sees.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /echo HTTP/1.0\r\nx-forwarded-host: evil.example\r\n\
              x-forwarded-proto: https\r\n\r\n",
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    within("the HTTP/1.0 answer", stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{raw}");
    let echo: Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    // Forwarded as HTTP/1.1, which requires a Host header (RFC 9112 §3.2).
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(
        seen(&echo, "host").len(),
        1,
        "HTTP/1.1 without Host: {echo}"
    );
    assert!(
        !seen(&echo, "x-forwarded-host").contains(&"evil.example".to_owned()),
        "an untrusted client chose X-Forwarded-Host: {echo}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_hop_by_hop_headers_are_removed() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let client = client();

    // Sanity: the upstream does send them.
    let direct = client.get(format!("{}/hop", up.url)).send().await.unwrap();
    for name in ["connection", "x-private", "keep-alive", "proxy-connection"] {
        assert!(direct.headers().contains_key(name), "{name} not sent");
    }

    let response = proxy.get(&client, "/hop").await;
    assert_eq!(response.status(), 200);
    for gone in ["connection", "x-private", "keep-alive", "proxy-connection"] {
        assert!(
            !response.headers().contains_key(gone),
            "{gone} reached the client: {:?}",
            response.headers()
        );
    }
    assert_eq!(response.headers()["x-kept"], "yes");
    assert_eq!(response.text().await.unwrap(), "hop");
}
