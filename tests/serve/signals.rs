//! Signals to the supervisor: SIGHUP's rolling restart, SIGTERM, SIGKILL.

use super::*;

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
