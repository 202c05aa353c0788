//! Signals to the supervisor: SIGHUP's rolling restart, SIGTERM, SIGKILL.

use super::{common::tls::TestCa, *};

#[tokio::test]
async fn sighup_rolls_every_worker_without_a_failed_get_or_post() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let token = cluster.register().await;
    let before = cluster.worker_pids().await;
    let tasks_before = h.count_tasks().await;

    let load = Load::start(&cluster.api, &token, 6, 4);
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(cluster.pid(), libc::SIGHUP);
    let status = cluster
        .wait_status("every worker replaced and ready", REACT_TIMEOUT * 2, |s| {
            s["workers"].as_array().is_some_and(|ws| {
                ws.iter().all(|w| {
                    w["state"] == "ready"
                        && w["pid"]
                            .as_u64()
                            .is_some_and(|p| !before.contains(&(p as u32)))
                })
            })
        })
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = load.finish().await;

    assert!(
        report.failures.is_empty(),
        "{} failed requests ({} GETs and {} POSTs ok): {:?}",
        report.failures.len(),
        report.gets_ok,
        report.posts_ok,
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.gets_ok > 30 && report.posts_ok > 10, "{report:?}");
    // Every accepted POST created exactly one task.
    assert_eq!(h.count_tasks().await - tasks_before, report.posts_ok as i64);
    for w in status["workers"].as_array().unwrap() {
        assert_eq!(w["restarts"], 0, "a rolling restart is not a crash: {w}");
    }
    assert!(
        wait_gone(&before, Duration::from_secs(5)).await.is_ok(),
        "old workers still running"
    );
    // Only the new workers are upstreams now.
    let upstreams = status["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 3, "{upstreams:?}");
    let stderr = cluster
        .log_with(true, "rolling restart finished", Duration::from_secs(5))
        .await;
    assert!(stderr.contains("rolling restart finished"), "{stderr}");
    eprintln!(
        "rolling restart under load: {} GETs and {} POSTs, 0 failed",
        report.gets_ok, report.posts_ok
    );
}

#[tokio::test]
async fn sigterm_stops_proxy_and_workers_and_exits_0() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let pids = cluster.worker_pids().await;

    signal(cluster.pid(), libc::SIGTERM);
    let status = cluster.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}\n{}", cluster.logs());
    // The supervisor stopped and waited for its children before exiting.
    let left = wait_gone(&pids, Duration::ZERO).await;
    assert!(
        left.is_ok(),
        "workers {left:?} still running after the supervisor exited"
    );
    for port in [h.listen, h.admin, h.base, h.base + 1, h.base + 2] {
        assert!(
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok(),
            "port {port} still held after exit"
        );
    }
    let stderr = cluster.stderr();
    assert!(stderr.contains("taskd serve stopped"), "{stderr}");
}

/// SIGTERM while the workers are still starting: the proxy and admin listener end because of
/// the signal, which is a clean stop (exit 0), not "the admin listener stopped unexpectedly".
#[tokio::test]
async fn sigterm_during_start_up_exits_0() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.spawn(h.command(3));
    let stderr = cluster
        .log_with(true, "worker started", Duration::from_secs(60))
        .await;
    assert!(stderr.contains("worker started"), "{}", cluster.logs());
    cluster.signal(libc::SIGTERM);
    let status = cluster.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}\n{}", cluster.logs());
    let stderr = cluster.stderr();
    assert!(!stderr.contains("unexpectedly"), "{stderr}");
    assert!(stderr.contains("taskd serve stopped"), "{stderr}");
}

#[tokio::test]
async fn workers_exit_by_themselves_when_the_supervisor_is_killed() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let pids = cluster.worker_pids().await;

    signal(cluster.pid(), libc::SIGKILL);
    cluster.wait_exit(Duration::from_secs(5)).await;
    let gone = wait_gone(&pids, Duration::from_secs(2)).await;
    assert!(
        gone.is_ok(),
        "workers {gone:?} outlived their supervisor by 2s"
    );
    for port in [h.base, h.base + 1, h.base + 2] {
        assert!(
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok(),
            "port {port} still held by an orphan"
        );
    }
    eprintln!("orphaned workers gone after {:?}", gone.unwrap());
}

/// `serve --tls-cert/--tls-key`: HTTPS in front of the workers, and SIGHUP reads the files again
/// before rolling the workers.
#[tokio::test]
async fn serve_terminates_https_and_reads_the_certificate_again_on_sighup() {
    let _turn = TURN.lock().await;
    let h = Harness::new(1);
    let (old, new) = (TestCa::new(&h.dir, "old"), TestCa::new(&h.dir, "new"));
    let (cert, key) = (h.dir.join("cert.pem"), h.dir.join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let https = free_port();
    let mut command = h.command(1);
    command
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .args(["--tls-listen", &format!("127.0.0.1:{https}")]);
    let mut cluster = h.spawn(command);
    cluster
        .wait_status("the worker ready", READY_TIMEOUT, |s| {
            s["workers"][0]["state"] == "ready"
        })
        .await;
    let trusting = |ca: &TestCa| {
        let pem = std::fs::read(&ca.ca).unwrap();
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    };
    let url = format!("https://localhost:{https}/health/live");
    let response = trusting(&old).get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-served-by"], "worker-1");
    let banner = cluster.log_with(false, "HTTPS", READY_TIMEOUT).await;
    assert!(
        banner.contains(&format!("https://127.0.0.1:{https}/api/v1")),
        "{banner}"
    );

    std::fs::copy(&new.cert, &cert).unwrap();
    std::fs::copy(&new.key, &key).unwrap();
    signal(cluster.pid(), libc::SIGHUP);
    let stderr = cluster
        .log_with(true, "rolling restart finished", REACT_TIMEOUT)
        .await;
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("TLS certificate reloaded") && l.contains("SIGHUP")),
        "{}",
        cluster.logs()
    );
    assert!(
        stderr.contains("rolling restart finished"),
        "{}",
        cluster.logs()
    );
    let response = trusting(&new).get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    signal(cluster.pid(), libc::SIGTERM);
    assert!(cluster.wait_exit(REACT_TIMEOUT).await.success());
}
