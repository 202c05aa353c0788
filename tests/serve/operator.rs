//! What an operator scrapes from the admin listener: every worker's own series, labelled with
//! the worker, across a `kill -9` and a rolling restart (new pids, new ports); and each
//! worker's memory and CPU in `/status`.

use super::*;

/// The admin `/metrics`, checked to be one valid exposition: no family declared twice, and the
/// samples of each family in one group after its comments.
async fn scrape(cluster: &Cluster) -> String {
    let text = cluster
        .client
        .get(format!("{}/metrics", cluster.admin))
        .send()
        .await
        .expect("admin /metrics")
        .text()
        .await
        .unwrap();
    let mut declared = HashSet::new();
    let mut closed = HashSet::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap().to_owned();
            assert!(
                declared.insert(name.clone()),
                "{name} declared twice:\n{text}"
            );
            closed.insert(std::mem::replace(&mut current, name));
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                .unwrap_or(name);
            assert!(
                !closed.contains(family),
                "a sample of {family} after its group ended:\n{text}"
            );
        }
    }
    text
}

/// `http_requests_total` samples of `worker` for `GET /openapi.json`.
fn docs_requests(text: &str, worker: &str) -> f64 {
    let prefix = format!("http_requests_total{{worker=\"{worker}\",");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains("route=\"/openapi.json\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn admin_metrics_carry_every_workers_series_by_worker_through_restarts() {
    let _turn = TURN.lock().await;
    let h = Harness::new(2);
    let mut cluster = h.start(2).await;
    for _ in 0..10 {
        let response = cluster
            .client
            .get(format!("{}/openapi.json", cluster.api))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    let text = scrape(&cluster).await;
    for worker in ["worker-1", "worker-2"] {
        assert!(
            text.contains(&format!("taskd_worker_metrics_up{{worker=\"{worker}\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "http_request_duration_seconds_bucket{{worker=\"{worker}\","
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "taskd_worker_resident_memory_bytes{{worker=\"{worker}\"}}"
            )),
            "{text}"
        );
    }
    // Round-robin: the ten requests went five to each worker (nothing else asks for the
    // document; probes use /health/*).
    assert_eq!(docs_requests(&text, "worker-1"), 5.0, "{text}");
    assert_eq!(docs_requests(&text, "worker-2"), 5.0, "{text}");

    let status = cluster.status().await.unwrap();
    for worker in status["workers"].as_array().unwrap() {
        let rss = worker["rssBytes"].as_u64().expect("rssBytes");
        assert!(rss > 4 << 20 && rss < 1 << 30, "{worker}");
        assert!(worker["cpuSeconds"].as_f64().is_some(), "{worker}");
    }

    // kill -9 worker-1: its replacement's series are worker-1's again.
    let old = cluster.worker(0).await;
    signal(old["pid"].as_u64().unwrap() as u32, libc::SIGKILL);
    cluster
        .wait_status("worker-1 back", REACT_TIMEOUT, |s| {
            let w = &s["workers"][0];
            w["state"] == "ready" && w["pid"] != old["pid"]
        })
        .await;
    // A rolling restart moves every worker to another port.
    let ports: Vec<Value> = (0..2)
        .map(|i| status["workers"][i]["port"].clone())
        .collect();
    signal(cluster.pid(), libc::SIGHUP);
    cluster
        .wait_status("both workers on new ports", REACT_TIMEOUT * 2, |s| {
            s["workers"].as_array().is_some_and(|ws| {
                ws.iter()
                    .zip(&ports)
                    .all(|(w, port)| w["state"] == "ready" && w["port"] != *port)
            })
        })
        .await;
    let text = scrape(&cluster).await;
    for worker in ["worker-1", "worker-2"] {
        assert!(
            text.contains(&format!("taskd_worker_metrics_up{{worker=\"{worker}\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("http_requests_total{{worker=\"{worker}\",")),
            "{text}"
        );
    }
}
