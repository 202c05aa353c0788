//! Starting a cluster: every worker behind the proxy, the banner, busy ports, and the README
//! walkthrough run verbatim against it.

use super::{common::walkthrough, *};

#[tokio::test]
async fn serve_starts_every_worker_behind_the_proxy_and_shows_them() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let started = Instant::now();
    let cluster = h.start(3).await;
    let took = started.elapsed();

    let status = cluster.status().await.unwrap();
    let workers = status["workers"].as_array().unwrap();
    let ids: Vec<_> = workers.iter().map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["worker-1", "worker-2", "worker-3"]);
    for (i, w) in workers.iter().enumerate() {
        assert_eq!(w["port"], u64::from(h.base) + i as u64, "{w}");
        assert!(w["pid"].as_u64().is_some(), "{w}");
        assert_eq!(w["restarts"], 0, "{w}");
        assert!(
            w.get("uptimeSeconds").is_some() && w.get("lastExit").is_some(),
            "{w}"
        );
    }
    let upstreams: Vec<_> = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["url"].as_str().unwrap().to_owned(), u["state"].clone()))
        .collect();
    for i in 0..3 {
        let url = format!("http://127.0.0.1:{}", h.base + i);
        assert!(
            upstreams.iter().any(|(u, s)| *u == url && s == "healthy"),
            "{url} not a healthy upstream: {upstreams:?}"
        );
    }

    // Requests through the proxy reach every worker, each named by its id.
    let mut served_by = BTreeSet::new();
    for _ in 0..9 {
        let response = cluster
            .client
            .get(format!("{}/health/live", cluster.api))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        served_by.insert(
            response.headers()["x-served-by"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        served_by.into_iter().collect::<Vec<_>>(),
        ["worker-1", "worker-2", "worker-3"]
    );
    let docs = cluster
        .client
        .get(format!("{}/docs/", cluster.api))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), StatusCode::OK);

    // The banner says where everything is; the worker lines are tagged.
    for needle in [
        format!("http://127.0.0.1:{}/api/v1", h.listen),
        format!("http://127.0.0.1:{}/docs", h.listen),
        format!("http://127.0.0.1:{}/status", h.admin),
        format!("worker-3 127.0.0.1:{}", h.base + 2),
    ] {
        let stdout = cluster
            .log_with(false, &needle, Duration::from_secs(5))
            .await;
        assert!(stdout.contains(&needle), "banner lacks {needle}:\n{stdout}");
    }
    let stderr = cluster.stderr();
    assert!(
        stderr.contains("worker-2 | "),
        "untagged worker output:\n{stderr}"
    );
    assert!(stderr.contains("worker ready"), "{stderr}");

    // The dashboard and the worker metrics.
    let page = cluster
        .client
        .get(format!("{}/", cluster.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(
        page.contains("/status") && page.contains("<script"),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads something from elsewhere"
    );
    let metrics = cluster
        .client
        .get(format!("{}/metrics", cluster.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("taskd_worker_restarts_total{worker=\"worker-1\",reason=\"exited\"} 0"),
        "{metrics}"
    );
    eprintln!("3 workers ready in {took:?} (debug build)");
}

#[tokio::test]
async fn a_busy_port_is_a_clear_error_and_starts_no_worker() {
    let _turn = TURN.lock().await;
    let h = Harness::new(2);
    for (busy, flag) in [(h.listen, "--listen"), (h.base + 1, "--base-port")] {
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, busy)).unwrap();
        let mut cluster = h.spawn(h.command(2));
        let status = cluster.wait_exit(Duration::from_secs(30)).await;
        drop(squatter);
        assert!(
            !status.success(),
            "taskd serve started although {busy} is taken"
        );
        let stderr = cluster.stderr();
        assert!(
            stderr.contains(&format!("port {busy} is in use")) && stderr.contains(flag),
            "the error does not name port {busy} and {flag}:\n{stderr}"
        );
        assert!(!stderr.contains("worker started"), "{stderr}");
    }
}

/// The README's curl walkthrough ("The API in five minutes"), extracted from README.md and run
/// with bash against a real cluster exactly as written, except that its first line points at
/// this test's proxy port instead of 8080. Every value it prints is checked.
#[tokio::test]
async fn the_readme_walkthrough_runs_verbatim() {
    let _turn = TURN.lock().await;
    let h = Harness::new(2);
    let cluster = h.start(2).await;

    let script = walkthrough::script().replacen(
        walkthrough::FIRST_LINE,
        &format!("API={}/api/v1\n", cluster.api),
        1,
    );
    walkthrough::require_tools();
    // -e and pipefail: a failed curl or a jq that cannot parse its input fails the test.
    let output = tokio::process::Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(&h.dir)
        .output()
        .await
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "walkthrough failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
        output.status,
        cluster.logs()
    );

    walkthrough::check_output(&stdout);
}
