//! Keeping workers alive: a killed worker, a hung one, one that cannot start.

use super::*;

#[tokio::test]
async fn a_worker_killed_under_get_load_is_replaced_without_failed_gets() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let token = cluster.register().await;
    let victim = cluster.worker(1).await;
    let old_pid = victim["pid"].as_u64().unwrap() as u32;

    let load = Load::start(&cluster.api, &token, 8, 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(old_pid, libc::SIGKILL);
    let killed = Instant::now();
    let status = cluster
        .wait_status("worker-2 back with a new pid", REACT_TIMEOUT, |s| {
            let w = &s["workers"][1];
            w["state"] == "ready" && w["pid"].as_u64().is_some_and(|p| p as u32 != old_pid)
        })
        .await;
    let recovered = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = load.finish().await;

    let worker = &status["workers"][1];
    assert_eq!(worker["restarts"], 1, "{worker}");
    assert!(
        worker["lastExit"].as_str().unwrap().contains("SIGKILL"),
        "{worker}"
    );
    assert!(
        report.gets_ok > 50,
        "too little load to mean anything: {report:?}"
    );
    assert!(
        report.failures.is_empty(),
        "{} failed GETs of {}: {:?}",
        report.failures.len(),
        report.gets_ok,
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.served_by.contains("worker-2"), "{report:?}");
    eprintln!(
        "killed worker back and ready in {recovered:?}; {} GETs, 0 failed",
        report.gets_ok
    );
}

#[tokio::test]
async fn a_stopped_worker_is_detected_as_hung_and_replaced() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let old_pid = cluster.worker(0).await["pid"].as_u64().unwrap() as u32;

    signal(old_pid, libc::SIGSTOP);
    let stopped = Instant::now();
    let status = cluster
        .wait_status("worker-1 replaced", REACT_TIMEOUT, |s| {
            let w = &s["workers"][0];
            w["state"] == "ready" && w["pid"].as_u64().is_some_and(|p| p as u32 != old_pid)
        })
        .await;
    let worker = &status["workers"][0];
    let last_exit = worker["lastExit"].as_str().unwrap();
    assert!(last_exit.contains("liveness"), "{worker}");
    assert_eq!(worker["restarts"], 1, "{worker}");
    assert!(
        wait_gone(&[old_pid], Duration::from_secs(5)).await.is_ok(),
        "the hung worker {old_pid} is still running"
    );
    let stderr = cluster.stderr();
    assert!(stderr.contains("worker unhealthy"), "{stderr}");
    eprintln!(
        "hung worker replaced after {:?} ({last_exit})",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn a_worker_that_cannot_start_backs_off_and_recovers_when_its_port_is_free() {
    let _turn = TURN.lock().await;
    let h = Harness::new(2);
    let mut cluster = h.start(2).await;
    let port = h.base + 1;
    let old_pid = cluster.worker(1).await["pid"].as_u64().unwrap() as u32;

    // Kill worker-2 and take its port before its replacement can.
    signal(old_pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    let squatter = loop {
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            break listener;
        }
        assert!(Instant::now() < deadline, "port {port} never came free");
        std::thread::sleep(Duration::from_millis(1));
    };

    // It keeps failing; the waits between tries grow and /status shows them.
    let mut backoffs = BTreeSet::new();
    let status = cluster
        .wait_status("worker-2 backing off at least 800ms", REACT_TIMEOUT, |s| {
            let w = &s["workers"][1];
            if w["state"] == "backoff" {
                backoffs.insert(w["backoffMs"].as_u64().unwrap_or_default());
            }
            w["state"] == "backoff" && w["backoffMs"].as_u64() >= Some(800)
        })
        .await;
    let worker = &status["workers"][1];
    assert!(worker["restarts"].as_u64().unwrap() >= 3, "{worker}");
    assert!(
        worker["lastExit"].as_str().unwrap().contains("code"),
        "{worker}"
    );
    assert!(backoffs.len() >= 2, "backoff did not grow: {backoffs:?}");
    let stderr = cluster.stderr();
    assert!(stderr.contains("worker backoff"), "{stderr}");
    assert!(
        stderr.contains(&format!("{port}")) && stderr.contains("worker-2 | "),
        "{stderr}"
    );
    // Worker-1 keeps serving meanwhile.
    assert_eq!(status["workers"][0]["state"], "ready");

    drop(squatter);
    cluster
        .wait_status("worker-2 ready again", REACT_TIMEOUT, |s| {
            s["workers"][1]["state"] == "ready"
        })
        .await;
    eprintln!("backoffs seen: {backoffs:?}");
}
