//! Balancing.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_four_upstreams_even_shares() {
    let mut upstreams = Vec::new();
    for name in ["a", "b", "c", "d"] {
        upstreams.push(TestUpstream::start(name).await);
    }
    let urls: Vec<&str> = upstreams.iter().map(|u| u.url.as_str()).collect();
    let proxy = TestProxy::start(config(&urls)).await;
    let client = client();
    for _ in 0..400 {
        let response = proxy.get(&client, "/echo").await;
        assert_eq!(response.status(), 200);
    }
    for upstream in &upstreams {
        let share = upstream.hits() as f64 / 400.0;
        assert!(
            (share - 0.25).abs() <= 0.01,
            "{} got {} of 400 requests",
            upstream.name(),
            upstream.hits()
        );
        assert_eq!(
            proxy.upstream(&upstream.url).requests,
            upstream.hits() as u64
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_shares_stay_even_when_an_upstream_is_out() {
    shares_stay_even_when_an_upstream_is_out(Strategy::RoundRobin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_shares_stay_even_when_an_upstream_is_out() {
    // Sequential requests: every upstream has 0 in flight, so the tie-break decides.
    shares_stay_even_when_an_upstream_is_out(Strategy::LeastConn).await;
}

async fn shares_stay_even_when_an_upstream_is_out(strategy: Strategy) {
    let mut upstreams = Vec::new();
    for name in ["a", "b", "c", "d"] {
        upstreams.push(TestUpstream::start(name).await);
    }
    let urls: Vec<&str> = upstreams.iter().map(|u| u.url.as_str()).collect();
    let mut config = config(&urls);
    config.strategy = strategy;
    let proxy = TestProxy::start(config).await;
    // `a` fails its checks: the three others should share the load evenly, not hand `a`'s
    // turn to its neighbour every time.
    upstreams[0].set_ready(false);
    eventually("a is unhealthy", || {
        proxy.state(&upstreams[0].url) == UpstreamState::Unhealthy
    })
    .await;
    let client = client();
    for _ in 0..300 {
        assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
    }
    let hits: Vec<usize> = upstreams.iter().map(|u| u.hits()).collect();
    assert_eq!(hits[0], 0, "{hits:?}");
    for (upstream, n) in upstreams.iter().zip(&hits).skip(1) {
        let share = *n as f64 / 300.0;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.01,
            "{} got {n} of 300 requests (a, b, c, d: {hits:?})",
            upstream.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_prefers_the_idle_upstream() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let mut config = config(&[&a.url, &b.url]);
    config.strategy = Strategy::LeastConn;
    let proxy = TestProxy::start(config).await;
    let client = client();

    let held = tokio::spawn(client.get(proxy.url("/hold")).send());
    eventually("one upstream holds the slow request", || {
        a.active() + b.active() == 1
    })
    .await;
    let (busy, idle) = if a.active() == 1 { (&a, &b) } else { (&b, &a) };
    assert_eq!(proxy.upstream(&busy.url).in_flight, 1);
    let busy_hits = busy.hits();
    for _ in 0..10 {
        assert_eq!(proxy.served_by(&client).await, idle.name());
    }
    assert_eq!(
        busy.hits(),
        busy_hits,
        "least_conn sent work to the busy upstream"
    );

    busy.release();
    let held = within("the held request", held).await.unwrap().unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(held.text().await.unwrap(), busy.name());
}
