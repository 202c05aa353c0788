//! Admin listener.

use super::*;

async fn start_admin(proxy: &TestProxy) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin::serve(
        listener,
        admin::router(proxy.proxy.clone(), None),
        proxy.shutdown.clone(),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_and_metrics_report_upstreams_retries_and_ejections() {
    let dead = closed_port_url();
    let good = TestUpstream::start("good").await;
    let mut config = probed_once(&[&dead, &good.url]);
    config.passive.max_fails = 1;
    let proxy = TestProxy::start(config).await;
    let admin = start_admin(&proxy).await;
    let client = client();
    eventually("both upstreams are probed", || {
        proxy
            .proxy
            .upstreams()
            .iter()
            .all(|u| u.last_probe_ms.is_some())
    })
    .await;
    for _ in 0..2 {
        assert_eq!(proxy.served_by(&client).await, "good");
    }

    let status = json_of(client.get(format!("http://{admin}/status"))).await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"), "{status}");
    assert!(status["uptimeSeconds"].is_u64(), "{status}");
    assert_eq!(status["strategy"], "round_robin", "{status}");
    let upstreams = status["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 2, "{status}");
    for upstream in upstreams {
        let mut keys: Vec<&str> = upstream
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "failures",
                "inFlight",
                "lastProbeMs",
                "origin",
                "requests",
                "state",
                "url",
                "weight"
            ],
            "{status}"
        );
        assert!(upstream["lastProbeMs"].is_u64(), "{status}");
        assert_eq!(upstream["weight"], 1, "{status}");
        assert_eq!(upstream["origin"], json!({"kind": "config"}), "{status}");
        assert_eq!(upstream["inFlight"], 0, "{status}");
    }
    assert_eq!(upstreams[0]["url"], dead.as_str());
    assert_eq!(upstreams[0]["state"], "ejected", "{status}");
    assert_eq!(upstreams[0]["failures"], 1, "{status}");
    assert_eq!(upstreams[1]["url"], good.url.as_str());
    assert_eq!(upstreams[1]["state"], "healthy", "{status}");
    assert_eq!(upstreams[1]["requests"], 2, "{status}");
    assert_eq!(upstreams[1]["failures"], 0, "{status}");

    // With only the ejected, refusing upstream left, the proxy answers 503 itself.
    assert!(proxy.proxy.remove_upstream(&good.url));
    assert_problem(proxy.get(&client, "/echo").await, 503).await;

    let response = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let metrics = response.text().await.unwrap();
    let expect = |series: String, value: f64| {
        assert_eq!(
            sample(&metrics, &series),
            Some(value),
            "{series}\n{metrics}"
        );
    };
    // `good` was removed, so only the proxy's own answers and `dead` remain listed.
    expect(
        "taskd_proxy_requests_total{upstream=\"proxy\",status=\"503\"}".into(),
        1.0,
    );
    expect("taskd_proxy_request_duration_seconds_count".into(), 3.0);
    expect(
        "taskd_proxy_request_duration_seconds_bucket{le=\"+Inf\"}".into(),
        3.0,
    );
    expect("taskd_proxy_retries_total".into(), 1.0);
    expect(
        format!("taskd_proxy_ejections_total{{upstream=\"{dead}\"}}"),
        1.0,
    );
    expect("taskd_proxy_in_flight".into(), 0.0);
    assert!(metrics.contains("# TYPE taskd_proxy_request_duration_seconds histogram"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_upstream_and_status() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let admin = start_admin(&proxy).await;
    let client = client();
    for _ in 0..3 {
        assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
    }
    // The upstream's own 503 (its readiness endpoint) is an upstream answer, not the proxy's.
    up.set_ready(false);
    assert_eq!(proxy.get(&client, "/health/ready").await.status(), 503);
    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = |status: u16| {
        format!(
            "taskd_proxy_requests_total{{upstream=\"{}\",status=\"{status}\"}}",
            up.url
        )
    };
    assert_eq!(sample(&metrics, &series(200)), Some(3.0), "{metrics}");
    assert_eq!(sample(&metrics, &series(503)), Some(1.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "taskd_proxy_request_duration_seconds_count"),
        Some(4.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_gauge_returns_to_zero_when_a_client_gives_up() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = impatient
        .get(proxy.url("/slow/600"))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    // The upstream finishes its work; nothing is in flight any more.
    eventually("the upstream finished the abandoned request", || {
        up.active() == 0
    })
    .await;
    eventually("the upstream's in-flight count is back to zero", || {
        proxy.upstream(&up.url).in_flight == 0
    })
    .await;
    eventually("taskd_proxy_in_flight is back to zero", || {
        sample(&proxy.proxy.render_metrics(), "taskd_proxy_in_flight") == Some(0.0)
    })
    .await;
}
