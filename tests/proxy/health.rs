//! Health.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstream_is_ejected_then_returns_after_passing_checks() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let mut config = config(&[&a.url, &b.url]);
    config.passive = PassiveHealthConfig {
        max_fails: 2,
        // Long: only the active checks can end this ejection within the test.
        fail_timeout: Duration::from_secs(60),
    };
    config.health.interval = Duration::from_millis(300);
    config.health.rise = 3;
    let proxy = TestProxy::start(config).await;
    let client = client();

    a.set_broken(true);
    let mut sent = 0;
    while proxy.state(&a.url) != UpstreamState::Ejected {
        assert!(sent < 10, "never ejected: {:?}", proxy.upstream(&a.url));
        let failures = proxy.upstream(&a.url).failures;
        assert!(failures < 2, "{failures} failures and still not ejected");
        // Each GET that lands on `a` fails there and is retried on `b`.
        assert_eq!(proxy.served_by(&client).await, "b");
        sent += 1;
    }
    assert_eq!(
        proxy.upstream(&a.url).failures,
        2,
        "ejected after max_fails"
    );
    let probes_at_ejection = a.probes();

    // Ejected: no traffic (the active checks need 3 × 300 ms to bring it back).
    let hits = a.hits();
    for _ in 0..6 {
        assert_eq!(proxy.served_by(&client).await, "b");
    }
    assert_eq!(a.hits(), hits, "an ejected upstream got requests");
    assert_eq!(proxy.state(&a.url), UpstreamState::Ejected);

    a.set_broken(false);
    eventually("the recovered upstream is healthy again", || {
        proxy.state(&a.url) == UpstreamState::Healthy
    })
    .await;
    assert!(
        a.probes() - probes_at_ejection >= 3,
        "back before `rise` probes"
    );
    let served = proxy.served_by_each(&client, 4).await;
    assert_eq!(served.iter().filter(|s| *s == "a").count(), 2, "{served:?}");
    let metrics = proxy.proxy.render_metrics();
    let series = format!("taskd_proxy_ejections_total{{upstream=\"{}\"}}", a.url);
    assert_eq!(sample(&metrics, &series), Some(1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_an_upstream_out_after_fall_and_back_after_rise() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let proxy = TestProxy::start(config(&[&a.url, &b.url])).await; // rise 2, fall 2, 100 ms
    let client = client();
    eventually("both upstreams are probed", || {
        proxy
            .proxy
            .upstreams()
            .iter()
            .all(|u| u.last_probe_ms.is_some() && u.state == UpstreamState::Healthy)
    })
    .await;

    let before = a.probes();
    a.set_ready(false);
    eventually("a is unhealthy", || {
        proxy.state(&a.url) == UpstreamState::Unhealthy
    })
    .await;
    assert!(
        a.probes() - before >= 2,
        "unhealthy before `fall` failed probes"
    );
    let hits = a.hits();
    for _ in 0..6 {
        assert_eq!(proxy.served_by(&client).await, "b");
    }
    assert_eq!(a.hits(), hits, "an unhealthy upstream got requests");

    let before = a.probes();
    a.set_ready(true);
    eventually("a is healthy again", || {
        proxy.state(&a.url) == UpstreamState::Healthy
    })
    .await;
    assert!(
        a.probes() - before >= 2,
        "healthy before `rise` passing probes"
    );
    let served = proxy.served_by_each(&client, 4).await;
    assert_eq!(served.iter().filter(|s| *s == "a").count(), 2, "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_upstreams_are_still_tried_before_a_503() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    a.set_ready(false);
    b.set_ready(false);
    let proxy = TestProxy::start(config(&[&a.url, &b.url])).await;
    eventually("both upstreams are unhealthy", || {
        proxy
            .proxy
            .upstreams()
            .iter()
            .all(|u| u.state == UpstreamState::Unhealthy)
    })
    .await;
    let response = proxy.get(&client(), "/echo").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_down_gives_503_with_retry_after() {
    let proxy = TestProxy::start(config(&[&closed_port_url(), &closed_port_url()])).await;
    let client = client();
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let started = Instant::now();
        let response = client
            .request(method, proxy.url("/echo"))
            .send()
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After in seconds");
        assert!(retry_after >= 1);
        let doc = assert_problem(response, 503).await;
        assert!(
            !doc.to_string().contains("127.0.0.1"),
            "leaks addresses: {doc}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_beyond_response_timeout_gives_504() {
    let up = TestUpstream::start("slow").await;
    let mut config = config(&[&up.url]);
    config.response_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start(config).await;
    // HTTP/1 waits are timed by the thread's sweeper, HTTP/2 ones by a timer each.
    for client in [client(), h2_client()] {
        let started = Instant::now();
        let response = proxy.get(&client, "/slow/5000").await;
        let took = started.elapsed();
        assert_problem(response, 504).await;
        assert_took(took, 300);
        // A fast answer within the timeout is still fine, on the same connection.
        assert_eq!(proxy.get(&client, "/slow/10").await.status(), 200);
    }
}

/// One upstream behind a proxy whose `idle_timeout` is `idle`.
async fn behind_proxy_with_idle_timeout(idle: Duration) -> (TestUpstream, TestProxy) {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.idle_timeout = idle;
    let proxy = TestProxy::start(config).await;
    (up, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connection_is_closed_after_the_idle_timeout() {
    let (_up, proxy) = behind_proxy_with_idle_timeout(Duration::from_millis(500)).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let closed = tokio::spawn(connection);
    let get = || {
        Request::get("/echo")
            .header("host", proxy.addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let mut last_used = Instant::now();
    for _ in 0..2 {
        let response = sender.send_request(get()).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        last_used = Instant::now();
        // Well inside the idle timeout: the keep-alive connection must still be usable.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    within("the proxy to close the idle connection", closed)
        .await
        .unwrap()
        .unwrap();
    // The proxy's clock starts as it finishes the response, a moment before the client has it.
    let idle = last_used.elapsed();
    assert_took(idle, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let (up, proxy) = behind_proxy_with_idle_timeout(Duration::from_millis(500)).await;
    let client = client();
    assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
    let used = Instant::now();
    // The pooled connection stays open (probes come and go on connections of their own) until
    // it has been idle for `idle_timeout`; the health checker closes it within one interval.
    eventually("the idle pooled connection to be closed", || {
        up.connections() == 0
    })
    .await;
    let idle = used.elapsed();
    assert_took(idle, 400);
    // A request after that opens a new connection and is served as usual.
    assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trickling_its_headers_is_cut_off_after_the_idle_timeout() {
    let (up, proxy) = behind_proxy_with_idle_timeout(Duration::from_millis(500)).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nhost: trickle\r\n")
        .await
        .unwrap();
    // One more header line every 100 ms, never the blank line that ends them: activity does not
    // keep a connection whose request never arrives.
    let mut buf = [0u8; 1024];
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still open after {:?}",
            started.elapsed()
        );
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => panic!(
                "expected the connection closed, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => {
                if stream.write_all(b"x-trickle: 1\r\n").await.is_err() {
                    break;
                }
            }
        }
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "cut off after {took:?}");
    assert_eq!(
        up.hits(),
        0,
        "the incomplete request must not reach the upstream"
    );
}
