//! Bodies and protocols.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_is_streamed_not_buffered() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let (tx, body) = channel_body();
    let request = Request::post("/upload").body(body).unwrap();
    let response = tokio::spawn(send_h1(proxy.addr, request));

    tx.send(pattern_at(0, 1000)).await.unwrap();
    // The rest is sent only once the upstream has the first piece: a proxy that waited for the
    // whole body would never get it.
    eventually("the upstream receives the first chunk", || {
        up.state.received.load(SeqCst) == 1000
    })
    .await;
    tx.send(pattern_at(1000, 3000)).await.unwrap();
    drop(tx);

    let response = within("the upload answer", response).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc, json!({"upstream": "a", "bytes": 4000, "intact": true}));
}

/// An upstream that answers before it has read the request body: its connection is still busy
/// with that body, so it must not go back to the pool (the next request would wait behind the
/// body, for ever here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_returns_to_the_pool_only_when_both_directions_are_done() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    // One serving thread, one idle pool: the next request would check out that connection.
    // Found busy, it would cost the next request a `connect_timeout` wait.
    config.threads = 1;
    config.connect_timeout = Duration::from_secs(3);
    let proxy = TestProxy::start(config).await;
    let (tx, body) = channel_body();
    let request = Request::post("/early").body(body).unwrap();
    let early = within("the early answer", send_h1(proxy.addr, request)).await;
    assert_eq!(early.status(), 200);
    tx.send(pattern_at(0, 1000)).await.unwrap();
    let text = within("the early body", early.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(text, "early");
    // The upload is still open (`tx` alive). The next requests get their own connection.
    let client = client();
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a request waited {:?} behind an unfinished upload",
            started.elapsed()
        );
    }
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_is_streamed_not_buffered() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let total = 4 * CHUNK as u64;
    // The upstream sends one chunk, then waits for `release`: the client must get that chunk
    // before the upstream has finished.
    let mut response = within(
        "the response headers",
        proxy.get(&client(), &format!("/gated/{total}")),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut got = 0u64;
    while got < CHUNK as u64 {
        let chunk = within("the first chunk", response.chunk())
            .await
            .unwrap()
            .expect("the body ended early");
        assert!(is_pattern(got, &chunk));
        got += chunk.len() as u64;
    }
    up.release();
    while let Some(chunk) = within("the rest", response.chunk()).await.unwrap() {
        assert!(is_pattern(got, &chunk));
        got += chunk.len() as u64;
    }
    assert_eq!(got, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_through_intact() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let total = 64 * MIB;
    let request = Request::post("/upload")
        .header("content-length", total)
        .body(StreamBody::new(pattern_stream(total, None)))
        .unwrap();
    let response = within("the 64 MiB upload", send_h1(proxy.addr, request)).await;
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        doc,
        json!({"upstream": "a", "bytes": total, "intact": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_through_intact() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let total = 64 * MIB;
    let mut response = proxy.get(&client(), &format!("/download/{total}")).await;
    assert_eq!(response.status(), 200);
    let (mut got, mut intact) = (0u64, true);
    while let Some(chunk) = response.chunk().await.unwrap() {
        intact &= is_pattern(got, &chunk);
        got += chunk.len() as u64;
    }
    assert_eq!(got, total);
    assert!(
        intact,
        "the downloaded bytes differ from what the upstream sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upload_is_not_cut_by_the_response_timeout() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.response_timeout = Duration::from_millis(500);
    let proxy = TestProxy::start(config).await;
    let (tx, body) = channel_body();
    let response = tokio::spawn(send_h1(
        proxy.addr,
        Request::post("/upload").body(body).unwrap(),
    ));
    // A client on a slow link: 6 pieces 200 ms apart, each reaching the upstream as it is sent.
    // The upstream is busy reading the whole time; it has not been slow to answer.
    let mut sent = 0u64;
    for _ in 0..6 {
        if tx.send(pattern_at(sent, 1000)).await.is_err() {
            break; // the proxy gave up on the body
        }
        sent += 1000;
        eventually("the upstream receives the piece", || {
            up.state.received.load(SeqCst) == sent || response.is_finished()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(tx);
    let response = within("the upload answer", response).await.unwrap();
    assert_eq!(response.status(), 200, "a progressing upload was cut off");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc, json!({"upstream": "a", "bytes": 6000, "intact": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_upload_is_served() {
    // curl sends `Expect: 100-continue` for bodies over 1 KiB and waits for the interim answer.
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: api.example.com\r\ncontent-length: 5000\r\n\
              expect: 100-continue\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        within("the interim answer", stream.read_exact(&mut byte))
            .await
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    stream.write_all(&[b'x'; 5000]).await.unwrap();
    let mut raw = Vec::new();
    within("the answer", stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    let echo: Value = serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(echo["bodyLen"], 5000, "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_client_is_served() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let h2 = h2_client();

    let response = h2
        .post(proxy.url("/echo?via=h2"))
        .body("hello over h2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["target"], "/echo?via=h2");
    assert_eq!(echo["version"], "HTTP/1.1", "upstreams get HTTP/1.1");
    assert_eq!(echo["bodyLen"], 13);
    // `:authority` becomes Host.
    assert_eq!(seen(&echo, "host"), [proxy.addr.to_string()], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-host"), [proxy.addr.to_string()]);
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);

    // Multiplexed requests on the one connection.
    let responses = join_all((0..16).map(|_| h2.get(proxy.url("/echo")).send())).await;
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
    }
    assert_eq!(up.hits(), 17);
}
