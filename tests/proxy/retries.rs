//! Retries.

use super::*;

/// POSTs `/echo` `n` times through `proxy`, checking that each is answered 200 and reaches
/// `good` exactly once; returns the longest a POST took.
async fn posts_each_reach_once(proxy: &TestProxy, good: &TestUpstream, n: usize) -> Duration {
    let client = client();
    let before = good.hits();
    let mut slowest = Duration::ZERO;
    for i in 1..=n {
        let started = Instant::now();
        let response = client
            .post(proxy.url("/echo"))
            .body("{}")
            .send()
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        assert_eq!(response.status(), 200);
        assert_eq!(
            good.hits() - before,
            i,
            "each POST reaches the live upstream once"
        );
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_retried_elsewhere_even_for_post() {
    let dead = closed_port_url();
    let good = TestUpstream::start("good").await;
    let proxy = TestProxy::start(probed_once(&[&dead, &good.url])).await;
    posts_each_reach_once(&proxy, &good, 4).await;
    assert!(
        proxy.upstream(&dead).failures >= 1,
        "the dead upstream was never tried"
    );
    let retries = sample(&proxy.proxy.render_metrics(), "taskd_proxy_retries_total").unwrap();
    assert!(retries >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_given_by_host_name_is_resolved() {
    let up = TestUpstream::start("named").await;
    let port = up.url.rsplit(':').next().unwrap();
    // The upstream listens on 127.0.0.1 only; where `localhost` also resolves to `::1` (often
    // first), the proxy must go on to the next address.
    let named = format!("http://localhost:{port}");
    let proxy = TestProxy::start(config(&[&named])).await;
    assert_eq!(proxy.served_by(&client()).await, "named");
    assert_eq!(proxy.state(&named), UpstreamState::Healthy);
}

/// A listening socket that never completes a connection: its accept queue (backlog 0) is full,
/// so Linux drops further SYNs and a `connect` to it hangs until the connecting side gives up.
/// Keep the returned value alive for as long as the address is used.
async fn unanswered_listener() -> (String, socket2::Socket, std::net::TcpStream) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr))
            .await
            .is_err(),
        "this kernel completes connections beyond the accept queue; the test cannot run here"
    );
    (format!("http://{addr}"), socket, filler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_accepts_costs_only_the_connect_timeout() {
    let (silent, _socket, _filler) = unanswered_listener().await;
    let good = TestUpstream::start("good").await;
    let mut config = probed_once(&[&silent, &good.url]);
    config.connect_timeout = Duration::from_millis(300);
    config.health.timeout = Duration::from_millis(100);
    let proxy = TestProxy::start(config).await;
    // Each POST goes to the silent upstream or straight to the good one; when it tries the
    // silent one first, the connect timeout sends it on (never sent, so any method may go).
    let slowest = posts_each_reach_once(&proxy, &good, 4).await;
    assert!(proxy.upstream(&silent).failures >= 1, "never tried");
    assert_took(slowest, 300);

    // With nothing else to try: a 503 once the connect timeout passes.
    let (silent, _socket, _filler) = unanswered_listener().await;
    let mut config = self::config(&[&silent]);
    config.connect_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start(config).await;
    let started = Instant::now();
    let response = proxy.get(&client(), "/echo").await;
    let took = started.elapsed();
    assert_problem(response, 503).await;
    assert_took(took, 300);
}

/// Sends requests built by `request` through a proxy in front of `dropper` (reads the request,
/// then drops the connection) and `good`; returns, per request, its status and how many times
/// each upstream saw it.
async fn through_dropper(
    request: impl Fn(&reqwest::Client, String) -> reqwest::RequestBuilder,
) -> Vec<(u16, usize, usize)> {
    let dropper = TestUpstream::start("dropper").await;
    dropper.set_broken(true);
    let good = TestUpstream::start("good").await;
    let mut config = config(&[&dropper.url, &good.url]);
    config.passive.max_fails = 0; // no ejection: every request may start on the dropper
    let proxy = TestProxy::start(config).await;
    let client = client();
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let (d, g) = (dropper.hits(), good.hits());
        let response = request(&client, proxy.url("/echo")).send().await.unwrap();
        let status = response.status().as_u16();
        if status == 502 {
            assert_problem(response, 502).await;
        }
        outcomes.push((status, dropper.hits() - d, good.hits() - g));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_get_is_retried_on_another_upstream() {
    let outcomes = through_dropper(|c, url| c.get(url)).await;
    for &(status, to_dropper, to_good) in &outcomes {
        assert_eq!((status, to_good), (200, 1), "{outcomes:?}");
        assert!(to_dropper <= 1, "{outcomes:?}");
    }
    assert!(
        outcomes.iter().any(|o| o.1 == 1),
        "no GET started on the dropping upstream: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_post_without_idempotency_key_is_not_retried() {
    let outcomes = through_dropper(|c, url| c.post(url).body(r#"{"title":"x"}"#)).await;
    for &outcome in &outcomes {
        assert!(
            outcome == (200, 0, 1) || outcome == (502, 1, 0),
            "a POST was sent twice or lost: {outcomes:?}"
        );
    }
    assert!(
        outcomes.iter().any(|o| o.0 == 502),
        "no POST started on the dropping upstream: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_post_with_idempotency_key_is_retried() {
    let outcomes = through_dropper(|c, url| {
        c.post(url)
            .header("idempotency-key", "k-1")
            .body(r#"{"title":"x"}"#)
    })
    .await;
    for &(status, to_dropper, to_good) in &outcomes {
        assert_eq!((status, to_good), (200, 1), "{outcomes:?}");
        assert!(to_dropper <= 1, "{outcomes:?}");
    }
    assert!(
        outcomes.iter().any(|o| o.1 == 1),
        "no POST started on the dropping upstream: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_by_the_configured_count() {
    let mut droppers = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let dropper = TestUpstream::start(name).await;
        dropper.set_broken(true);
        droppers.push(dropper);
    }
    let urls: Vec<&str> = droppers.iter().map(|u| u.url.as_str()).collect();
    let mut config = config(&urls);
    config.retries = 1;
    config.passive.max_fails = 0;
    let proxy = TestProxy::start(config).await;
    let response = proxy.get(&client(), "/echo").await;
    assert!(response.headers().contains_key("x-request-id"));
    assert_problem(response, 502).await;
    let tries: usize = droppers.iter().map(|d| d.hits()).sum();
    assert_eq!(tries, 2, "one try plus `retries` = 1 extra");
    let retries = sample(&proxy.proxy.render_metrics(), "taskd_proxy_retries_total");
    assert_eq!(retries, Some(1.0));
}

/// `proxy.retry_after_ejection`: requests waiting for an answer from an upstream that is then
/// ejected (here by failing its health checks) are given up on `retry_after_ejection` later and
/// sent to another upstream when that is safe (GET, keyed POST); a POST without a key keeps
/// waiting for the upstream it reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_an_ejected_upstream_move_to_another_when_safe() {
    let (stuck, good) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    good.state.release.cancel();
    let mut config = config(&[&stuck.url, &good.url]);
    config.retry_after_ejection = Duration::from_millis(300);
    let proxy = Arc::new(TestProxy::start(config).await);
    let client = client();
    let send = |kind: &'static str, i: usize| {
        let (client, url) = (client.clone(), proxy.url("/hold"));
        tokio::spawn(async move {
            let request = match kind {
                "GET" => client.get(&url),
                "keyed POST" => client
                    .post(&url)
                    .header("idempotency-key", format!("k-{i}")),
                _ => client.post(&url),
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (kind, status, response.text().await.unwrap(), Instant::now())
        })
    };
    let mut requests = Vec::new();
    for i in 0..4 {
        for kind in ["GET", "keyed POST", "POST"] {
            requests.push(send(kind, i));
        }
    }
    // Round robin sends about half to the upstream that holds them.
    let deadline = Instant::now() + WAIT;
    while stuck.state.active.load(SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "nothing reached the holding upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let held = stuck.state.active.load(SeqCst);

    stuck.state.not_ready.store(true, SeqCst);
    let ejected = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut pending = 0;
    let mut slowest = Duration::ZERO;
    for request in requests {
        if !request.is_finished() {
            pending += 1;
            continue;
        }
        let (kind, status, body, done) = request.await.unwrap();
        assert_eq!(status, 200, "{kind}: {body}");
        if kind == "POST" {
            assert_eq!(body, "b", "a POST without a key moved upstreams");
        }
        slowest = slowest.max(done.saturating_duration_since(ejected));
    }
    // Only POSTs without a key are still waiting on the ejected upstream, and all of those are.
    assert_eq!(stuck.state.active.load(SeqCst), pending, "held {held}");
    assert!(pending > 0, "no plain POST reached the holding upstream");
    assert!(
        held > pending,
        "GETs or keyed POSTs still wait on the ejected upstream ({pending} of {held} held)"
    );
    // Two failed probes (100 ms apart) to eject, then 300 ms of grace.
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    stuck.state.release.cancel();
}
