//! The binary.

use super::*;

pub(super) const BIN: &str = env!("CARGO_BIN_EXE_taskd");

/// `taskd proxy <args>` with a clean environment, in an empty directory (no `config.toml`),
/// logging to `dir/stderr`.
pub(super) fn proxy_command(dir: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("proxy")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TASKD_PROXY__HEALTH__INTERVAL", "200ms")
        .env("TASKD_PROXY__THREADS", "2")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::fs::File::create(dir.join("stdout")).unwrap(),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("stderr")).unwrap(),
        ))
        .kill_on_drop(true);
    command
}

pub(super) fn output_of(dir: &std::path::Path) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!("stdout:\n{}\nstderr:\n{}", read("stdout"), read("stderr"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_proxies_reports_status_and_exits_zero_on_sigterm() {
    let up = TestUpstream::start("e2e").await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_addr().to_string(), free_addr().to_string());
    let mut child = proxy_command(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--upstream",
            &up.url,
        ],
    )
    .spawn()
    .unwrap();
    let client = client();

    let deadline = Instant::now() + Duration::from_secs(20);
    let response = loop {
        match client.get(format!("http://{listen}/echo")).send().await {
            Ok(response) => break response,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "proxy never answered ({error}); {}",
                    output_of(dir.path())
                );
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "proxy exited; {}",
                    output_of(dir.path())
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["upstream"], "e2e");
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);

    let status = json_of(client.get(format!("http://{admin}/status"))).await;
    assert_eq!(status["strategy"], "round_robin", "{status}");
    assert_eq!(status["upstreams"][0]["url"], up.url.as_str(), "{status}");
    assert_eq!(status["upstreams"][0]["state"], "healthy", "{status}");
    assert_eq!(status["upstreams"][0]["requests"], 1, "{status}");
    eventually("the proxy probes its upstream", || up.probes() >= 2).await;

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let exit = within("the proxy to exit after SIGTERM", child.wait())
        .await
        .unwrap();
    assert!(exit.success(), "{exit}; {}", output_of(dir.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_on_a_busy_port_fails_naming_the_address() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr().to_string();
    let mut child = proxy_command(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--upstream",
            "http://127.0.0.1:9",
        ],
    )
    .spawn()
    .unwrap();
    let exit = within("the proxy to give up", child.wait()).await.unwrap();
    let output = output_of(dir.path());
    assert!(!exit.success(), "{exit}; {output}");
    assert!(
        output.contains(&listen),
        "the error does not name {listen}: {output}"
    );
    drop(busy);
}

/// docs/contract.md §8: the public listener answers `/metrics` itself with a 404 problem; the upstream
/// never sees the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_listener_does_not_serve_worker_metrics() {
    let upstream = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&upstream.url])).await;
    let client = client();
    let response = client.get(proxy.url("/metrics")).send().await.unwrap();
    let body = assert_problem(response, 404).await;
    assert!(body["detail"].as_str().unwrap().contains("admin listener"));
    assert_eq!(upstream.hits(), 0);
    assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
    assert_eq!(upstream.hits(), 1);
}

/// `proxy.max_idle_per_upstream = 0` keeps no connection: every request still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_idle_pool_still_serves() {
    let upstream = TestUpstream::start("a").await;
    let mut config = config(&[&upstream.url]);
    config.max_idle_per_upstream = 0;
    let proxy = TestProxy::start(config).await;
    let client = client();
    for _ in 0..20 {
        assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
    }
    assert_eq!(upstream.hits(), 20);
}

/// Reads a raw HTTP/1 connection until the peer closes it or `most` passes; what was read.
async fn read_until_closed(stream: &mut TcpStream, most: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(most, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&got).into_owned())
}

/// `proxy.body_timeout`: a body held for retries (a PUT) that stops one byte short gets 408 and
/// the connection ends; so does a streamed upload (a POST), and neither reaches the upstream
/// as a request that hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_bodies_end_at_the_body_timeout() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.body_timeout = Duration::from_millis(800);
    let proxy = TestProxy::start(config).await;
    for (method, len) in [("PUT", 1000), ("POST", 4 * MIB as usize)] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!("{method} /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b'x'; 999]).await.unwrap();
        let started = Instant::now();
        let answer = read_until_closed(&mut stream, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{method}: the stalled upload still holds the proxy"));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(700),
            "{method}: cut after {took:?}"
        );
        assert!(answer.starts_with("HTTP/1.1 408"), "{method}: {answer:?}");
    }
    eventually("no request left in flight", || {
        proxy.upstream(&up.url).in_flight == 0
    })
    .await;
}

/// `proxy.max_connections`: past it new connections wait, and are served as soon as a slot
/// frees. Exactly two of three are answered whichever listening socket (`SO_REUSEPORT`) the
/// kernel hands each to; a slot taken before accepting once sat idle on a socket that got no
/// connection, and then only one was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_a_slot() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.max_connections = 2;
    config.threads = 1;
    let proxy = TestProxy::start(config).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut answered = Vec::new();
    let mut waiting = Vec::new();
    for mut stream in streams {
        let mut head = [0u8; 12];
        match tokio::time::timeout(Duration::from_millis(700), stream.read_exact(&mut head)).await {
            Ok(Ok(_)) => {
                assert_eq!(&head, b"HTTP/1.1 200");
                answered.push(stream);
            }
            Ok(Err(error)) => panic!("a connection failed instead of waiting: {error}"),
            Err(_) => waiting.push(stream),
        }
    }
    assert_eq!(
        (answered.len(), waiting.len()),
        (2, 1),
        "connections served at once with max_connections = 2"
    );
    // Operators see it: every slot taken, accepting paused.
    let status = admin::status_document(&proxy.proxy, None);
    assert_eq!(status["connections"]["open"], 2, "{status}");
    assert_eq!(status["connections"]["max"], 2, "{status}");
    let metrics = proxy.proxy.render_metrics();
    assert_eq!(sample(&metrics, "taskd_proxy_connections_open"), Some(2.0));
    assert_eq!(sample(&metrics, "taskd_proxy_connections_max"), Some(2.0));
    assert_eq!(
        sample(&metrics, "taskd_proxy_accept_paused_total"),
        Some(1.0)
    );
    // A slot frees: the waiting connection is served.
    drop(answered.pop());
    let mut head = [0u8; 12];
    within("a freed slot", waiting[0].read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop((answered, waiting));
    eventually("the closed connections are no longer counted", || {
        proxy.proxy.connections().open == 0
    })
    .await;
}

/// `proxy.write_timeout`: a client that asks for a large download and stops reading is cut
/// off, and the upstream request it held is freed, so that a drain can end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_at_the_write_timeout() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.write_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start(config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("GET /download/{} HTTP/1.1\r\nhost: x\r\n\r\n", 256 * MIB);
    stream.write_all(request.as_bytes()).await.unwrap();
    eventually("the download starts", || {
        proxy.upstream(&up.url).in_flight == 1
    })
    .await;
    // Never read: socket buffers fill, the proxy can write no more.
    let started = Instant::now();
    eventually("the stalled download is freed", || {
        proxy.upstream(&up.url).in_flight == 0
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(proxy.proxy.drain_upstream(&up.url).await);
}
