//! HTTPS (docs/contract.md §8.2, `[proxy.tls]`): h2 and HTTP/1.1 by ALPN, TLS 1.2 and 1.3,
//! `X-Forwarded-Proto: https`, certificates replaced under load without a failed request, a
//! pair that does not load kept out, the handshake timeout, the HTTP → HTTPS redirect, clear
//! start-up errors, and SIGHUP to the binary. The clients are rustls clients trusting CAs made
//! by the test ([`common::tls::TestCa`]).

use super::*;

use std::{path::Path, sync::Mutex};

use common::tls::TestCa;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    binary::{BIN, output_of, proxy_command},
    upgrade::UpgradeUpstream,
};

const ALL: &[&rustls::SupportedProtocolVersion] = rustls::DEFAULT_VERSIONS;
const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// [`config`] with HTTPS on, serving `cert` and `key`.
fn tls_config(upstream: &str, cert: &Path, key: &Path) -> ProxyConfig {
    let mut config = config(&[upstream]);
    config.tls.cert = Some(cert.to_owned());
    config.tls.key = Some(key.to_owned());
    config
}

/// A rustls client trusting `cas`, offering `alpn`, speaking `versions`.
fn connector(
    cas: &[&TestCa],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_file(&ca.ca).unwrap())
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` for the name `localhost`.
async fn handshake(addr: SocketAddr, connector: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    within("the TLS handshake", connector.connect(name, tcp))
        .await
        .unwrap()
}

/// The certificate the server presented on `stream`.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

fn cert_of(ca: &TestCa) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(&ca.cert).unwrap()
}

/// A reqwest client trusting `cas`; without `keep_alive`, every request makes a new connection
/// (and so a new handshake).
fn https_client(cas: &[&TestCa], keep_alive: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().no_proxy().timeout(WAIT);
    for ca in cas {
        let pem = std::fs::read(&ca.ca).unwrap();
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    if !keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().unwrap()
}

/// Replaces `to` with a copy of `from` the way deployment tools do: a new file renamed over it.
fn replace(from: &Path, to: &Path) {
    let staged = to.with_extension("new");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, to).unwrap();
}

async fn echo_of(response: Response<Incoming>) -> Value {
    assert_eq!(response.status(), 200);
    serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

fn empty_get(uri: String) -> Request<http_body_util::Empty<Bytes>> {
    Request::get(uri)
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_speaks_h2_and_http1_by_alpn_over_tls_12_and_13() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "a");
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(tls_config(&up.url, &ca.cert, &ca.key)).await;
    let tls_addr = proxy.tls_addr.unwrap();

    let stream = handshake(tls_addr, &connector(&[&ca], &[b"h2", b"http/1.1"], ALL)).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = h2
        .send_request(empty_get(proxy.https_url("/echo")))
        .await
        .unwrap();
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    let echo = echo_of(response).await;
    assert_eq!(echo["version"], "HTTP/1.1", "upstreams get HTTP/1.1");
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(
        seen(&echo, "host"),
        [format!("localhost:{}", tls_addr.port())]
    );

    let stream = handshake(tls_addr, &connector(&[&ca], &[b"http/1.1"], TLS12)).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (mut h1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = empty_get("/echo".into());
    request
        .headers_mut()
        .insert("host", "localhost".parse().unwrap());
    let response = h1.send_request(request).await.unwrap();
    assert_eq!(response.version(), hyper::Version::HTTP_11);
    assert_eq!(
        seen(&echo_of(response).await, "x-forwarded-proto"),
        ["https"]
    );

    // A client of the plain listener is still told `http`, whatever it claims.
    let echo = json_of(
        client()
            .get(proxy.url("/echo"))
            .header("x-forwarded-proto", "https"),
    )
    .await;
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"]);
}

/// The certificate and key are replaced (new CA, new serial) under a load of HTTPS requests,
/// half of them on new connections: no request fails, a connection opened before is still
/// served, and new handshakes get the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        TestCa::new(dir.path(), "old"),
        TestCa::new(dir.path(), "new"),
    );
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(tls_config(&up.url, &cert, &key)).await;
    let tls_addr = proxy.tls_addr.unwrap();
    let both = connector(&[&old, &new], &[b"http/1.1"], ALL);
    let serial_before = proxy.proxy.tls().unwrap().serial;

    // A keep-alive connection made before the rotation.
    let stream = handshake(tls_addr, &both).await;
    assert_eq!(presented(&stream), cert_of(&old));
    let (mut held, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let held_get = || {
        let mut request = empty_get("/echo".into());
        request
            .headers_mut()
            .insert("host", "localhost".parse().unwrap());
        request
    };
    echo_of(held.send_request(held_get()).await.unwrap()).await;

    let stop = CancellationToken::new();
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for i in 0..4 {
        let client = https_client(&[&old, &new], i % 2 == 0);
        let (url, stop, ok, failures) = (
            proxy.https_url("/echo"),
            stop.clone(),
            ok.clone(),
            failures.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match client.get(&url).send().await {
                    Ok(response) if response.status() == 200 => {
                        ok.fetch_add(1, SeqCst);
                    }
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    eventually("the load runs", || ok.load(SeqCst) >= 20).await;

    // Certificate first, the key a moment later, as a careless deploy script would.
    replace(&new.cert, &cert);
    tokio::time::sleep(Duration::from_millis(50)).await;
    replace(&new.key, &key);
    let deadline = Instant::now() + WAIT;
    while presented(&handshake(tls_addr, &both).await) != cert_of(&new) {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_rotation = ok.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for task in load {
        within("the load to stop", task).await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(
        ok.load(SeqCst) > at_rotation + 10,
        "too few requests after the rotation: {} then {}",
        at_rotation,
        ok.load(SeqCst)
    );
    // The connection made before is still open and served.
    echo_of(held.send_request(held_get()).await.unwrap()).await;
    let status = proxy.proxy.tls().unwrap();
    assert_ne!(status.serial, serial_before);
    assert_eq!((status.reloads, status.reload_failures), (1, 0));
}

/// A new pair that does not load (a key of another certificate) is refused and the current one
/// kept; [`Proxy::reload`] (what SIGHUP calls) reads the files at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_that_does_not_load_keeps_the_current_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        TestCa::new(dir.path(), "old"),
        TestCa::new(dir.path(), "new"),
    );
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(tls_config(&up.url, &cert, &key)).await;
    let tls_addr = proxy.tls_addr.unwrap();
    let both = connector(&[&old, &new], &[b"http/1.1"], ALL);

    replace(&new.key, &key);
    assert!(
        !proxy.proxy.reload("test", None),
        "a mismatched pair was loaded"
    );
    assert_eq!(presented(&handshake(tls_addr, &both).await), cert_of(&old));
    let response = https_client(&[&old], true)
        .get(proxy.https_url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics = proxy.proxy.render_metrics();
    assert_eq!(
        sample(&metrics, "taskd_proxy_tls_reloads_total{result=\"failed\"}"),
        Some(1.0),
        "{metrics}"
    );

    replace(&new.cert, &cert);
    assert!(proxy.proxy.reload("test", None));
    assert_eq!(presented(&handshake(tls_addr, &both).await), cert_of(&new));
    let status = proxy.proxy.tls().unwrap();
    assert_eq!((status.reloads, status.reload_failures), (1, 1));
}

/// A client that opens a TCP connection and sends nothing holds its connection slot only for
/// `proxy.tls.handshake_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_cut_off_at_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "a");
    let up = TestUpstream::start("a").await;
    let mut config = tls_config(&up.url, &ca.cert, &ca.key);
    config.max_connections = 1;
    config.tls.handshake_timeout = Duration::from_millis(500);
    let proxy = TestProxy::start(config).await;

    let mut silent = TcpStream::connect(proxy.tls_addr.unwrap()).await.unwrap();
    let started = Instant::now();
    eventually("the silent connection takes the slot", || {
        proxy.proxy.connections().open == 1
    })
    .await;
    // The only slot is taken: this request waits, and is served once the silent one is cut.
    let response = https_client(&[&ca], true)
        .get(proxy.https_url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut byte = [0u8; 1];
    let read = within("the silent connection to be closed", silent.read(&mut byte)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_took(started.elapsed(), 500);
    let metrics = proxy.proxy.render_metrics();
    assert_eq!(
        sample(
            &metrics,
            "taskd_proxy_tls_handshake_failures_total{reason=\"timeout\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(sample(&metrics, "taskd_proxy_accept_paused_total").unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_sends_plain_requests_to_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "a");
    let up = TestUpstream::start("a").await;
    let mut config = tls_config(&up.url, &ca.cert, &ca.key);
    config.tls.redirect_http = true;
    let proxy = TestProxy::start(config).await;
    let port = proxy.tls_addr.unwrap().port();

    let not_following = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (host, location) in [
        ("api.example.com:8080", "api.example.com"),
        ("[::1]:8080", "[::1]"),
        ("localhost", "localhost"),
    ] {
        let response = not_following
            .post(proxy.url("/api/v1/tasks?page=2"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 308, "{host}");
        assert_eq!(
            response.headers()["location"],
            format!("https://{location}:{port}/api/v1/tasks?page=2")
        );
    }
    assert_eq!(up.hits(), 0, "a plain request reached an upstream");

    // A client that follows it lands on HTTPS (the certificate names 127.0.0.1 too).
    let echo = json_of(https_client(&[&ca], true).get(proxy.url("/echo"))).await;
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "a");
    let up = UpgradeUpstream::start().await;
    let proxy = TestProxy::start(tls_config(&up.url, &ca.cert, &ca.key)).await;
    let stream = handshake(
        proxy.tls_addr.unwrap(),
        &connector(&[&ca], &[b"h2", b"http/1.1"], ALL),
    )
    .await;
    // Browsers open WebSockets on HTTP/1.1 connections; h2 is offered too, and not taken.
    let stream = if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        handshake(
            proxy.tls_addr.unwrap(),
            &connector(&[&ca], &[b"http/1.1"], ALL),
        )
        .await
    } else {
        stream
    };
    let (mut ws, response) =
        tokio_tungstenite::client_async(proxy.https_url("/ws").replace("https", "wss"), stream)
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("secure"))
        .await
        .unwrap();
    let answer = within("the echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(answer.into_text().unwrap().as_str(), "secure");
    assert_eq!(up.last_request()["x-forwarded-proto"], "https");
}

/// Wrong, missing, mismatched or expired certificate files stop `taskd proxy` at start-up, and
/// fail `taskd config`, with a message naming the key and the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_are_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let good = TestCa::new(path, "good");
    let other = TestCa::new(path, "other");
    let expired = TestCa::new_with(path, "expired", |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let garbage = path.join("garbage.pem");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let missing = path.join("missing.pem");
    let show = |p: &Path| p.display().to_string();
    let cases: [(&Path, &Path, Vec<String>); 5] = [
        (
            &missing,
            &good.key,
            vec![
                "proxy.tls.cert".into(),
                show(&missing),
                "cannot read".into(),
            ],
        ),
        (
            &good.key,
            &good.key,
            vec![
                "proxy.tls.cert".into(),
                show(&good.key),
                "no PEM certificate".into(),
            ],
        ),
        (
            &good.cert,
            &garbage,
            vec![
                "proxy.tls.key".into(),
                show(&garbage),
                "no PEM private key".into(),
            ],
        ),
        (
            &good.cert,
            &other.key,
            vec![
                "proxy.tls.key".into(),
                show(&other.key),
                "is not the key of the certificate".into(),
                show(&good.cert),
            ],
        ),
        (
            &expired.cert,
            &expired.key,
            vec![
                "proxy.tls.cert".into(),
                show(&expired.cert),
                "expired at 2021-01-01".into(),
            ],
        ),
    ];
    for (cert, key, needles) in cases {
        let (listen, admin, https) = (free_addr(), free_addr(), free_addr());
        let (listen, admin, https) = (listen.to_string(), admin.to_string(), https.to_string());
        let mut child = proxy_command(
            path,
            &[
                "--listen",
                &listen,
                "--admin-listen",
                &admin,
                "--upstream",
                "http://127.0.0.1:9",
                "--tls-cert",
                &show(cert),
                "--tls-key",
                &show(key),
                "--tls-listen",
                &https,
            ],
        )
        .spawn()
        .unwrap();
        let status = within("the proxy to exit", child.wait()).await.unwrap();
        let output = output_of(path);
        assert!(!status.success(), "started with {needles:?}: {output}");
        for needle in &needles {
            assert!(
                output.contains(needle.as_str()),
                "{needle:?} not in {output}"
            );
        }
        let config = std::process::Command::new(BIN)
            .arg("config")
            .env_clear()
            .env("TASKD_PROXY__TLS__CERT", cert)
            .env("TASKD_PROXY__TLS__KEY", key)
            .current_dir(path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&config.stderr);
        assert_eq!(config.status.code(), Some(2), "taskd config: {stderr}");
        assert!(stderr.contains(&needles[0]), "{stderr}");
    }

    // A certificate without its key is a configuration error.
    let config = std::process::Command::new(BIN)
        .args(["proxy", "--upstream", "http://127.0.0.1:9"])
        .env_clear()
        .env("TASKD_PROXY__TLS__CERT", &good.cert)
        .current_dir(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&config.stderr);
    assert_eq!(config.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("proxy.tls.key"), "{stderr}");
}

/// `taskd proxy` serves HTTPS, and on SIGHUP reads the certificate files again (without
/// exiting: SIGHUP's default action would end it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_https_and_reads_the_files_again_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        TestCa::new(dir.path(), "old"),
        TestCa::new(dir.path(), "new"),
    );
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let up = TestUpstream::start("e2e").await;
    let (listen, admin, https) = (free_addr(), free_addr(), free_addr());
    let (listen, admin, https) = (listen.to_string(), admin.to_string(), https.to_string());
    let mut child = proxy_command(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--upstream",
            &up.url,
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
            "--tls-listen",
            &https,
        ],
    )
    .spawn()
    .unwrap();
    let client = https_client(&[&old, &new], false);
    let url = format!(
        "https://localhost:{}/echo",
        https.rsplit(':').next().unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let response = loop {
        match client.get(&url).send().await {
            Ok(response) => break response,
            Err(error) => {
                assert!(
                    Instant::now() < deadline && child.try_wait().unwrap().is_none(),
                    "no HTTPS answer ({error}); {}",
                    output_of(dir.path())
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let echo: Value = response.json().await.unwrap();
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"]);

    replace(&new.cert, &cert);
    replace(&new.key, &key);
    let pid = child.id().unwrap() as libc::pid_t;
    // SAFETY: kill(2) on the child this test spawned and still holds.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let https_addr: SocketAddr = https.parse().unwrap();
    let both = connector(&[&old, &new], &[b"http/1.1"], ALL);
    eventually_async("the new certificate is served", || async {
        presented(&handshake(https_addr, &both).await) == cert_of(&new)
    })
    .await;
    eventually("SIGHUP is logged as the reload's reason", || {
        output_of(dir.path())
            .lines()
            .any(|line| line.contains("TLS certificate reloaded") && line.contains("SIGHUP"))
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the proxy"
    );
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    let status: Value = reqwest::get(format!("http://{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(status["tls"]["reloads"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(status["connections"]["max"], 10000, "{status}");

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let exit = within("the proxy to exit", child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}; {}", output_of(dir.path()));
}

/// Polls the async `condition` every 50 ms until it holds; panics after `WAIT`.
async fn eventually_async<F: Future<Output = bool>>(what: &str, condition: impl Fn() -> F) {
    let deadline = Instant::now() + WAIT;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
