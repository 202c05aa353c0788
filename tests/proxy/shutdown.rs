//! Shutdown and runtime changes.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.shutdown_timeout = Duration::from_secs(8);
    let mut proxy = TestProxy::start(config).await;
    let client = client();
    // This client keeps an idle keep-alive connection open through the shutdown.
    let idle_client = self::client();
    assert_eq!(proxy.get(&idle_client, "/echo").await.status(), 200);

    let slow = tokio::spawn(client.get(proxy.url("/slow/3000")).send());
    eventually("the slow request reaches the upstream", || up.active() == 1).await;
    proxy.shutdown.cancel();

    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(proxy.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let serve = proxy.serve.take().unwrap();
    assert_eq!(up.active(), 1, "the slow request should still be running");
    assert!(
        !serve.is_finished(),
        "serve returned with a request in flight"
    );

    let response = within("the slow request", slow).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "a");
    // Done once nothing is in flight: idle connections do not hold it for the grace period.
    let finished = Instant::now();
    within("serve to return", serve).await.unwrap().unwrap();
    assert!(
        finished.elapsed() < Duration::from_secs(3),
        "{:?}",
        finished.elapsed()
    );
    drop(idle_client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_requests_after_the_grace_period() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.shutdown_timeout = Duration::from_millis(300);
    let mut proxy = TestProxy::start(config).await;
    let held = tokio::spawn(client().get(proxy.url("/hold")).send());
    eventually("the request reaches the upstream", || up.active() == 1).await;
    let cancelled = Instant::now();
    proxy.shutdown.cancel();
    within("serve to return", proxy.serve.take().unwrap())
        .await
        .unwrap()
        .unwrap();
    let took = cancelled.elapsed();
    assert_took(took, 300);
    let held = within("the cut request", held).await.unwrap();
    assert!(held.is_err(), "{held:?}");
    up.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_can_be_added_and_removed_at_runtime() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let proxy = TestProxy::start(config(&[&a.url])).await;
    let client = client();
    for _ in 0..2 {
        assert_eq!(proxy.served_by(&client).await, "a");
    }

    proxy.proxy.add_upstream(&b.url, true).unwrap();
    assert!(
        proxy.proxy.add_upstream(&b.url, true).is_err(),
        "added twice"
    );
    let served = proxy.served_by_each(&client, 4).await;
    assert_eq!(served.iter().filter(|s| *s == "b").count(), 2, "{served:?}");

    assert!(proxy.proxy.remove_upstream(&a.url));
    assert!(!proxy.proxy.remove_upstream(&a.url), "removed twice");
    let hits = a.hits();
    for _ in 0..4 {
        assert_eq!(proxy.served_by(&client).await, "b");
    }
    assert_eq!(a.hits(), hits, "a removed upstream got requests");
    let urls: Vec<String> = proxy.proxy.upstreams().into_iter().map(|u| u.url).collect();
    assert_eq!(urls, std::slice::from_ref(&b.url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_the_request_in_flight_and_sends_no_new_ones() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let proxy = TestProxy::start(config(&[&a.url, &b.url])).await;
    let client = client();

    let held = tokio::spawn(client.get(proxy.url("/hold")).send());
    eventually("one upstream holds the slow request", || {
        a.active() + b.active() == 1
    })
    .await;
    let (busy, idle) = if a.active() == 1 { (&a, &b) } else { (&b, &a) };
    let drain = tokio::spawn({
        let (proxy, url) = (proxy.proxy.clone(), busy.url.clone());
        async move { proxy.drain_upstream(&url).await }
    });
    eventually("the upstream is draining", || {
        proxy.state(&busy.url) == UpstreamState::Draining
    })
    .await;

    let hits = busy.hits();
    for _ in 0..6 {
        assert_eq!(proxy.served_by(&client).await, idle.name());
    }
    assert_eq!(busy.hits(), hits, "a draining upstream got new requests");
    assert!(
        !drain.is_finished(),
        "drain returned with a request in flight"
    );
    assert_eq!(proxy.upstream(&busy.url).in_flight, 1);

    busy.release();
    let held = within("the held request", held).await.unwrap().unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(held.text().await.unwrap(), busy.name());
    assert!(within("the drain", drain).await.unwrap());
    let status = proxy.upstream(&busy.url);
    assert_eq!(
        (status.state, status.in_flight),
        (UpstreamState::Draining, 0)
    );
    assert!(!proxy.proxy.drain_upstream("http://127.0.0.1:1").await);
}
