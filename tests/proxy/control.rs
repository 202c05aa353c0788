//! Changing a running proxy: the admin listener's write routes (behind `admin.token`), weights
//! and slow start, and a reload of `[proxy]`.

use super::*;

const TOKEN: &str = "s3cret-admin-token";

async fn start_admin(proxy: &TestProxy, token: &str) -> String {
    proxy.proxy.set_admin_token(token);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin::serve(
        listener,
        admin::router(proxy.proxy.clone(), None),
        proxy.shutdown.clone(),
    ));
    format!("http://{addr}")
}

/// `method /upstreams{path}` with `body`, and the bearer token when given.
async fn call(
    admin: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut request = client()
        .request(method, format!("{admin}/upstreams{path}"))
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_routes_are_off_without_a_token_and_refuse_a_wrong_one() {
    let a = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&a.url])).await;
    let off = start_admin(&proxy, "").await;
    let body = json!({"url": "http://127.0.0.1:9"});
    let (status, problem) = call(
        &off,
        reqwest::Method::POST,
        "",
        Some("anything"),
        body.clone(),
    )
    .await;
    assert_eq!(status, 403, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("admin.token"),
        "{problem}"
    );

    proxy.proxy.set_admin_token(TOKEN);
    for token in [None, Some("wrong"), Some("s3cret-admin-toke")] {
        let response = client().post(format!("{off}/upstreams")).json(&body);
        let response = match token {
            Some(t) => response.bearer_auth(t),
            None => response,
        }
        .send()
        .await
        .unwrap();
        assert_eq!(response.status(), 401, "{token:?}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer realm=\"taskd-admin\""
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(proxy.proxy.upstreams().len(), 1, "nothing was added");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_added_drained_and_removed_through_the_admin_listener() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let mut config = config(&[&a.url]);
    config.slow_start = Duration::ZERO;
    let proxy = TestProxy::start(config).await;
    let admin = start_admin(&proxy, TOKEN).await;
    let post = reqwest::Method::POST;

    let (status, added) = call(
        &admin,
        post.clone(),
        "",
        Some(TOKEN),
        json!({"url": b.url, "weight": 2}),
    )
    .await;
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["url"], b.url);
    assert_eq!(added["weight"], 2);
    assert_eq!(added["origin"], json!({"kind": "admin"}));
    let (status, _) = call(&admin, post.clone(), "", Some(TOKEN), json!({"url": b.url})).await;
    assert_eq!(status, 409, "added twice");
    for bad in [
        json!({"url": "ftp://x"}),
        json!({"url": b.url, "weight": 0}),
        json!({"uri": b.url}),
    ] {
        let (status, problem) = call(&admin, post.clone(), "", Some(TOKEN), bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {problem}");
    }
    // Once its checks pass it takes requests: two in three, by its weight.
    eventually("b is healthy", || {
        proxy.state(&b.url) == UpstreamState::Healthy
    })
    .await;
    let served = proxy.served_by_each(&client(), 300).await;
    let to_b = served.iter().filter(|s| *s == "b").count();
    assert!(
        (185..=215).contains(&to_b),
        "{to_b} of 300 to b (weight 2 of 3)"
    );

    // Draining waits for a request in flight on b, then removes b.
    let client = client();
    let mut held = Vec::new();
    while b.state.active.load(SeqCst) == 0 {
        let (client, url) = (client.clone(), proxy.url("/hold"));
        held.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap().text().await.unwrap()
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, draining) = call(
        &admin,
        post.clone(),
        "/drain",
        Some(TOKEN),
        json!({"url": b.url}),
    )
    .await;
    assert_eq!(status, 202, "{draining}");
    assert_eq!(draining["state"], "draining");
    assert!(draining["drainingForMs"].is_u64(), "{draining}");
    for _ in 0..20 {
        assert_eq!(
            proxy.served_by(&client).await,
            "a",
            "a draining upstream got a request"
        );
    }
    assert_eq!(proxy.state(&b.url), UpstreamState::Draining);
    b.state.release.cancel();
    a.state.release.cancel();
    for request in held {
        let body = request.await.unwrap();
        assert!(body == "a" || body == "b", "{body}");
    }
    eventually("b removed after its drain", || {
        proxy.proxy.upstreams().iter().all(|u| u.url != b.url)
    })
    .await;

    let (status, _) = call(
        &admin,
        reqwest::Method::DELETE,
        "",
        Some(TOKEN),
        json!({"url": b.url}),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &admin,
        reqwest::Method::DELETE,
        "",
        Some(TOKEN),
        json!({"url": a.url}),
    )
    .await;
    assert_eq!(status, 204);
    assert!(proxy.proxy.upstreams().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_from_the_configuration_share_requests_in_proportion() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let heavy = format!("{} weight=3", a.url);
    let proxy = TestProxy::start(config(&[&heavy, &b.url])).await;
    let served = proxy.served_by_each(&client(), 400).await;
    let to_a = served.iter().filter(|s| *s == "a").count();
    assert!(
        (285..=315).contains(&to_a),
        "{to_a} of 400 to a (weight 3 of 4)"
    );
    // Interleaved, not in runs.
    let longest_b_run = served
        .split(|s| s == "a")
        .map(<[String]>::len)
        .max()
        .unwrap();
    assert!(longest_b_run <= 2, "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_joining_a_running_proxy_starts_with_a_small_share() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let mut config = config(&[&a.url]);
    config.slow_start = Duration::from_secs(3);
    let proxy = TestProxy::start(config).await;
    let admin = start_admin(&proxy, TOKEN).await;
    let (status, _) = call(
        &admin,
        reqwest::Method::POST,
        "",
        Some(TOKEN),
        json!({"url": b.url}),
    )
    .await;
    assert_eq!(status, 201);
    eventually("b is healthy", || {
        proxy.state(&b.url) == UpstreamState::Healthy
    })
    .await;
    let early = proxy.served_by_each(&client(), 200).await;
    let early_b = early.iter().filter(|s| *s == "b").count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = proxy.served_by_each(&client(), 200).await;
    let late_b = late.iter().filter(|s| *s == "b").count();
    // Well under half while ramping (it started at a tenth of its weight); half once done.
    assert!(early_b < 70, "{early_b} of 200 during the slow start");
    assert!((90..=110).contains(&late_b), "{late_b} of 200 after it");
}
