//! `taskd worker` on its own: serving, SIGTERM, a busy port, JSON logs.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
};

use super::*;

#[tokio::test]
async fn worker_serves_the_api_and_exits_cleanly_on_sigterm() {
    let h = Harness::new();
    let client = client();
    let mut worker = h.spawn_worker(&[], "e2e-1");
    worker.wait_ready(&client).await;

    // Every response says who served it and carries a request id: ours when we send one.
    let response = client.get(worker.url("/health/live")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-served-by"), Some("e2e-1"));
    assert!(
        header(&response, "x-request-id").is_some_and(|id| !id.is_empty()),
        "no generated X-Request-Id"
    );
    let response = client
        .get(worker.url("/health/ready"))
        .header("x-request-id", "e2e-trace-1")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "x-request-id"), Some("e2e-trace-1"));
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["instance"], "e2e-1");
    assert_eq!(ready["checks"]["database"]["status"], "ok");

    // Register, create a task, list it back, over real HTTP.
    let response = client
        .post(worker.url("/api/v1/auth/register"))
        .json(&json!({ "email": "ada@example.com", "password": PASSWORD, "name": "Ada" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(header(&response, "x-served-by"), Some("e2e-1"));
    let session: Value = response.json().await.unwrap();
    let token = session["accessToken"].as_str().expect("accessToken");

    let response = client
        .post(worker.url("/api/v1/tasks"))
        .bearer_auth(token)
        .json(&json!({ "title": "Ship the e2e tests", "priority": "high" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let task: Value = response.json().await.unwrap();
    assert_eq!(task["status"], "pending");

    let response = client
        .get(worker.url("/api/v1/tasks"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "x-request-id").is_some());
    let listing: Value = response.json().await.unwrap();
    let data = listing["data"].as_array().expect("data array");
    assert_eq!(data.len(), 1, "{listing}");
    assert_eq!(data[0]["id"], task["id"]);
    assert_eq!(data[0]["title"], "Ship the e2e tests");
    assert_eq!(listing["pagination"]["total"], 1);
    drop(client);

    worker.sigterm();
    let status = worker.wait_exit(EXIT_TIMEOUT).await;
    assert!(status.success(), "exit status {status}\n{}", worker.logs());
    assert!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, worker.port)).is_err(),
        "something still accepts on the port"
    );
    TcpListener::bind((Ipv4Addr::LOCALHOST, worker.port)).expect("the port is free again");
}

#[tokio::test]
async fn sigterm_stops_accepting_but_finishes_the_request_in_flight() {
    let h = Harness::new();
    let client = client();
    let mut worker = h.spawn_worker(&[], "e2e-drain");
    worker.wait_ready(&client).await;
    let addr = (Ipv4Addr::LOCALHOST, worker.port);

    // A request whose head has only partly arrived keeps its connection in flight.
    let mut in_flight = TcpStream::connect(addr).expect("connect");
    in_flight
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    in_flight
        .write_all(
            b"GET /health/ready HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: e2e-drain-1\r\n",
        )
        .unwrap();
    // The accept queue is FIFO: once a later connection is answered, the worker has accepted
    // (and is serving) the first one too.
    let response = client.get(worker.url("/health/live")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;

    worker.sigterm();

    // New connections are refused from now on while the old one is still being served.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        match TcpStream::connect(addr) {
            Err(_) => break,
            // Accepted just before the listener closed: hang up so it holds nothing open.
            Ok(stream) => drop(stream),
        }
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        worker.is_running(),
        "worker exited with a request in flight\n{}",
        worker.logs()
    );

    // Finish the request: it is answered (readiness now says 503) and the connection closed.
    in_flight.write_all(b"\r\n").unwrap();
    let mut raw = String::new();
    in_flight
        .read_to_string(&mut raw)
        .expect("read the in-flight response");
    let lower = raw.to_lowercase();
    assert!(
        lower.starts_with("http/1.1 503"),
        "in-flight response: {raw}"
    );
    assert!(lower.contains("x-request-id: e2e-drain-1"), "{raw}");
    assert!(lower.contains("connection: close"), "{raw}");
    assert!(raw.contains(r#""status":"unavailable""#), "{raw}");

    let status = worker.wait_exit(EXIT_TIMEOUT).await;
    assert!(status.success(), "exit status {status}\n{}", worker.logs());
    assert!(TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn worker_on_a_busy_port_fails_naming_the_address() {
    let h = Harness::new();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = taken.local_addr().unwrap().port();
    let port_arg = port.to_string();
    let command = h.command(&[
        "worker",
        "--port",
        &port_arg,
        "--host",
        "127.0.0.1",
        "--instance-id",
        "e2e-busy",
    ]);
    let mut worker = h.spawn_worker_with(command, port);
    let status = worker.wait_exit(READY_TIMEOUT).await;
    assert!(
        !status.success(),
        "worker started on a taken port\n{}",
        worker.logs()
    );
    let stderr = worker.stderr();
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "stderr does not name the address: {stderr}"
    );
    // One line says why, not a log line and a second copy of it.
    assert_eq!(
        stderr.matches(&format!("127.0.0.1:{port}")).count(),
        1,
        "the error is printed more than once: {stderr}"
    );
    drop(taken);
}

#[tokio::test]
async fn json_logs_have_one_line_per_request_with_its_fields() {
    let h = Harness::new();
    let client = client();
    let mut worker = h.spawn_worker(&["--log-format", "json"], "e2e-json");
    worker.wait_ready(&client).await;
    let response = client
        .get(worker.url("/health/live"))
        .header("x-request-id", "e2e-log-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(client);
    worker.sigterm();
    let status = worker.wait_exit(EXIT_TIMEOUT).await;
    assert!(status.success(), "exit status {status}\n{}", worker.logs());

    let output = format!("{}\n{}", worker.stdout(), worker.stderr());
    let lines: Vec<Value> = output
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
        })
        .collect();
    // A field of the event itself or of the request span it was logged in.
    let field = |line: &Value, name: &str| -> Option<Value> {
        line.get(name)
            .or_else(|| line.get("fields").and_then(|f| f.get(name)))
            .or_else(|| line.get("span").and_then(|s| s.get(name)))
            .cloned()
    };
    let request = lines
        .iter()
        .find(|line| field(line, "request_id") == Some(json!("e2e-log-1")))
        .unwrap_or_else(|| panic!("no log line for request e2e-log-1:\n{output}"));
    assert_eq!(field(request, "status"), Some(json!(200)), "{request}");
    assert!(
        field(request, "latency_ms").is_some_and(|v| v.is_number()),
        "{request}"
    );
    assert_eq!(
        field(request, "route"),
        Some(json!("/health/live")),
        "{request}"
    );
    assert_eq!(field(request, "method"), Some(json!("GET")), "{request}");
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "worker listening"),
        "{output}"
    );
}

/// `worker.drain_delay`: after SIGTERM the worker is a lame duck for the delay — readiness 503,
/// everything else served, new connections accepted — and only then stops accepting and exits 0.
#[tokio::test]
async fn sigterm_with_a_drain_delay_answers_not_ready_while_still_serving() {
    let h = Harness::new();
    let client = client();
    let port = free_port();
    let mut command = h.command(&["worker", "--port", &port.to_string(), "--host", "127.0.0.1"]);
    command.env("TASKD_WORKER__DRAIN_DELAY", "2s");
    let mut worker = h.spawn_worker_with(command, port);
    worker.wait_ready(&client).await;

    let signalled = Instant::now();
    worker.sigterm();
    let mut ready_503 = false;
    // Throughout the delay: readiness 503, liveness and the API still answered, each on a new
    // connection (a fresh client per round), so the port is still accepting.
    while signalled.elapsed() < Duration::from_millis(1500) {
        let fresh = client_without_pool();
        let ready = fresh.get(worker.url("/health/ready")).send().await.unwrap();
        ready_503 |= ready.status() == StatusCode::SERVICE_UNAVAILABLE;
        assert_ne!(ready.status(), StatusCode::OK, "still ready after SIGTERM");
        let live = fresh.get(worker.url("/health/live")).send().await.unwrap();
        assert_eq!(live.status(), StatusCode::OK, "{}", worker.logs());
        let docs = fresh.get(worker.url("/openapi.json")).send().await.unwrap();
        assert_eq!(docs.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready_503, "readiness never answered 503");
    let status = worker.wait_exit(EXIT_TIMEOUT).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}\n{}", worker.logs());
    assert!(
        took >= Duration::from_secs(2),
        "exited {took:?} after SIGTERM, before the 2 s drain delay"
    );
    assert!(
        worker.stderr().contains("draining: readiness answers 503"),
        "{}",
        worker.logs()
    );
}

/// A client that opens a new connection for every request.
fn client_without_pool() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client")
}
