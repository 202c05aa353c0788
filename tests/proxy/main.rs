//! Integration tests of the load balancer (docs/contract.md §5) over real sockets: the proxy runs in-process
//! on port 0 with its real serving threads, in front of small hyper upstreams spawned by each
//! test, and every assertion is about what a client (or an upstream, or an operator reading
//! `/status` and `/metrics`) would observe. The harness is here; the tests are in one file per
//! topic (`balancing`, `headers`, `bodies`, `retries`, `health`, `shutdown`, `admin_listener`,
//! `tls`, `upgrade`), and `binary` runs the built executable.
//!
//! Logs of the proxy go to the test output when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).

use std::{
    convert::Infallible,
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

mod admin_listener;
mod balancing;
mod binary;
mod bodies;
#[path = "../common/mod.rs"]
mod common;
mod compression;
mod control;
mod headers;
mod health;
mod reload;
mod retries;
mod shutdown;
mod tls;
mod upgrade;

use bytes::Bytes;
use common::init_tracing;
use futures_util::{Stream, future::join_all, stream};
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use taskd::{
    config::{HealthCheckConfig, PassiveHealthConfig, ProxyConfig, Strategy},
    proxy::{Listeners, Proxy, UpstreamStatus, admin, upstream::UpstreamState},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Upper bound for anything a test waits for; far above what each step needs.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Body pattern: byte `i` of every test body is `i % 251`, so a dropped, duplicated or reordered
// piece is detected by comparing slices (memcmp, fast even in a debug build).
// ---------------------------------------------------------------------------------------------

const PERIOD: usize = 251;
const CHUNK: usize = 64 * 1024;
const MIB: u64 = 1024 * 1024;

static PATTERN: LazyLock<Bytes> =
    LazyLock::new(|| (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect());

/// `len` (at most `CHUNK`) bytes of the pattern starting at stream offset `offset`.
fn pattern_at(offset: u64, len: usize) -> Bytes {
    let start = (offset % PERIOD as u64) as usize;
    PATTERN.slice(start..start + len)
}

/// Whether `data`, found at stream offset `offset`, is the pattern.
fn is_pattern(mut offset: u64, data: &[u8]) -> bool {
    data.chunks(CHUNK).all(|piece| {
        let ok = piece == &pattern_at(offset, piece.len())[..];
        offset += piece.len() as u64;
        ok
    })
}

/// `total` bytes of the pattern in `CHUNK`s; when `gate` is given, the stream stops at offset
/// `gate.0` until `gate.1` is cancelled.
fn pattern_stream(
    total: u64,
    gate: Option<(u64, CancellationToken)>,
) -> impl Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + 'static {
    stream::unfold(0u64, move |sent| {
        let gate = gate.clone();
        async move {
            if sent >= total {
                return None;
            }
            if let Some((at, open)) = gate
                && sent == at
            {
                open.cancelled().await;
            }
            let len = (total - sent).min(CHUNK as u64) as usize;
            Some((Ok(Frame::data(pattern_at(sent, len))), sent + len as u64))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// In-test upstream: a hyper HTTP/1.1 server on 127.0.0.1:0.
//
// - `/health/ready`: 200, or 503 while `not_ready`; counted in `probes`, not in `hits`.
// - anything else is counted in `hits`; while `broken`, the request is read whole and the
//   connection dropped without an answer. Otherwise:
// - `/slow/<ms>`: answers its name after `ms` milliseconds.
// - `/hold`: answers its name once `release` is cancelled.
// - `/upload`: reads the body as it arrives (progress in `received`) and answers
//   `{"bytes", "intact"}`.
// - `/download/<n>`: streams `n` pattern bytes; `/gated/<n>`: the same, pausing after the first
//   chunk until `release` is cancelled.
// - `/hop`: an answer carrying hop-by-hop headers.
// - `/typed/<n>`: [`text_body`] of `n` bytes with the headers the query names (`type` →
//   Content-Type, `encoding`, `etag`, `cache` → Cache-Control); `type` also sets the
//   Content-Type of `/download` and `/gated`.
// - anything else: echoes method, target, version, headers (name → [values]) and body length.
// ---------------------------------------------------------------------------------------------

type UpBody = UnsyncBoxBody<Bytes, std::io::Error>;

#[derive(Default)]
struct UpState {
    name: String,
    hits: AtomicUsize,
    probes: AtomicUsize,
    not_ready: AtomicBool,
    broken: AtomicBool,
    /// Requests inside a handler right now.
    active: AtomicUsize,
    /// Connections open right now (the proxy's pooled ones and its probes').
    connections: AtomicUsize,
    /// Upload bytes received so far.
    received: AtomicU64,
    release: CancellationToken,
}

struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

struct TestUpstream {
    state: Arc<UpState>,
    url: String,
    stop: CancellationToken,
}

impl TestUpstream {
    async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpState {
            name: name.into(),
            ..UpState::default()
        });
        let stop = CancellationToken::new();
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = accept_stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let state = accept_state.clone();
                tokio::spawn(async move {
                    state.connections.fetch_add(1, SeqCst);
                    let _open = Active(&state.connections);
                    let handler_state = state.clone();
                    let service =
                        service_fn(move |req| upstream_handle(handler_state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            state,
            url: format!("http://{addr}"),
            stop,
        }
    }

    fn name(&self) -> &str {
        &self.state.name
    }

    fn hits(&self) -> usize {
        self.state.hits.load(SeqCst)
    }

    fn probes(&self) -> usize {
        self.state.probes.load(SeqCst)
    }

    fn active(&self) -> usize {
        self.state.active.load(SeqCst)
    }

    fn connections(&self) -> usize {
        self.state.connections.load(SeqCst)
    }

    fn set_ready(&self, ready: bool) {
        self.state.not_ready.store(!ready, SeqCst);
    }

    fn set_broken(&self, broken: bool) {
        self.state.broken.store(broken, SeqCst);
    }

    fn release(&self) {
        self.state.release.cancel();
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn full(bytes: impl Into<Bytes>) -> UpBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn reply(status: u16, body: impl Into<Bytes>) -> Response<UpBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

fn json_reply(value: &Value) -> Response<UpBody> {
    let mut response = reply(200, value.to_string());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

async fn upstream_handle(
    state: Arc<UpState>,
    req: Request<Incoming>,
) -> Result<Response<UpBody>, std::io::Error> {
    let path = req.uri().path().to_owned();
    if path == "/health/ready" {
        state.probes.fetch_add(1, SeqCst);
        let status = if state.not_ready.load(SeqCst) {
            503
        } else {
            200
        };
        return Ok(reply(status, ""));
    }
    state.hits.fetch_add(1, SeqCst);
    if state.broken.load(SeqCst) {
        // The whole request was read: the upstream "processed" it, then died.
        let _ = req.into_body().collect().await;
        return Err(std::io::Error::other("dropping the connection on purpose"));
    }
    state.active.fetch_add(1, SeqCst);
    let _active = Active(&state.active);
    let mut segments = path.trim_start_matches('/').split('/');
    let response = match (segments.next(), segments.next()) {
        (Some("slow"), Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            reply(200, state.name.clone())
        }
        (Some("hold"), _) => {
            state.release.cancelled().await;
            reply(200, state.name.clone())
        }
        (Some("early"), _) => {
            // Answers at once and goes on reading the body in the background, keeping the
            // connection busy with it.
            let body = req.into_body();
            tokio::spawn(async move {
                let _ = body.collect().await;
            });
            reply(200, "early")
        }
        (Some("upload"), _) => {
            let mut body = req.into_body();
            let (mut bytes, mut intact) = (0u64, true);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(std::io::Error::other)?;
                if let Ok(data) = frame.into_data() {
                    intact &= is_pattern(bytes, &data);
                    bytes += data.len() as u64;
                    state.received.store(bytes, SeqCst);
                }
            }
            json_reply(&json!({"upstream": state.name, "bytes": bytes, "intact": intact}))
        }
        (Some(kind @ ("download" | "gated")), Some(n)) => {
            let total: u64 = n.parse().unwrap();
            let gate = (kind == "gated").then(|| (CHUNK as u64, state.release.clone()));
            let mut response =
                Response::new(StreamBody::new(pattern_stream(total, gate)).boxed_unsync());
            set_query_headers(&req, response.headers_mut());
            response
        }
        (Some("typed"), Some(n)) => {
            let mut response = reply(200, text_body(n.parse().unwrap()));
            set_query_headers(&req, response.headers_mut());
            response
        }
        (Some("hop"), _) => {
            let mut response = reply(200, "hop");
            let headers = response.headers_mut();
            for (name, value) in [
                ("connection", "keep-alive, x-private"),
                ("x-private", "upstream-secret"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("x-kept", "yes"),
            ] {
                headers.insert(name, value.parse().unwrap());
            }
            response
        }
        _ => {
            let method = req.method().to_string();
            let target = req.uri().to_string();
            let version = format!("{:?}", req.version());
            let mut headers = serde_json::Map::new();
            for (name, value) in req.headers() {
                let values = headers
                    .entry(name.as_str())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(values) = values {
                    values.push(json!(value.to_str().unwrap_or("<binary>")));
                }
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            json_reply(&json!({
                "upstream": state.name,
                "method": method,
                "target": target,
                "version": version,
                "headers": headers,
                "bodyLen": body.len(),
            }))
        }
    };
    Ok(response)
}

/// `n` bytes of JSON-like text.
fn text_body(n: usize) -> Bytes {
    let unit = b"{\"title\":\"Quarterly report\",\"status\":\"pending\"},";
    unit.iter().copied().cycle().take(n).collect()
}

/// The response headers named by the request's query (see the upstream's routes).
fn set_query_headers(req: &Request<Incoming>, headers: &mut hyper::HeaderMap) {
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(req.uri().query().unwrap_or_default()).unwrap();
    for (key, value) in query {
        let name = match key.as_str() {
            "type" => "content-type",
            "encoding" => "content-encoding",
            "etag" => "etag",
            "cache" => "cache-control",
            _ => continue,
        };
        headers.insert(name, value.parse().unwrap());
    }
}

/// Sends `request` and reads its answer as JSON (an echoing upstream's report, `/status`).
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// The values an echoing upstream saw for header `name`.
fn seen(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `http://127.0.0.1:<port>` where nothing listens.
fn closed_port_url() -> String {
    format!("http://{}", free_addr())
}

/// A free 127.0.0.1 address, from the range the binary tests use (below the ephemeral ports).
fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::ports::free_port()))
}

// ---------------------------------------------------------------------------------------------
// The proxy under test.
// ---------------------------------------------------------------------------------------------

/// Test defaults: two serving threads, probes every 100 ms, short timeouts.
fn config(upstreams: &[&str]) -> ProxyConfig {
    ProxyConfig {
        upstreams: upstreams.iter().map(|u| (*u).to_owned()).collect(),
        threads: 2,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(10),
        shutdown_timeout: Duration::from_secs(5),
        health: HealthCheckConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            ..HealthCheckConfig::default()
        },
        ..ProxyConfig::default()
    }
}

/// [`config`] with one health probe only (at start, then not for 600 s): an upstream that
/// passed it stays in rotation until requests to it fail.
fn probed_once(upstreams: &[&str]) -> ProxyConfig {
    let mut config = config(upstreams);
    config.health.interval = Duration::from_secs(600);
    config
}

struct TestProxy {
    proxy: Proxy,
    addr: SocketAddr,
    /// The HTTPS listener, when `config.tls` has a certificate.
    tls_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    serve: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    /// The proxy on 127.0.0.1 port 0, and on another port 0 for HTTPS when `config.tls` has a
    /// certificate and key.
    async fn start(config: ProxyConfig) -> Self {
        init_tracing();
        let https = config.tls.files().is_some();
        let proxy = Proxy::new(config).unwrap();
        let mut listeners = Listeners::bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        if https {
            listeners.bind_tls("127.0.0.1:0".parse().unwrap()).unwrap();
        }
        let addr = listeners.local_addr();
        let tls_addr = listeners.tls_addr();
        let shutdown = CancellationToken::new();
        let serve = tokio::spawn(proxy.clone().serve(listeners, shutdown.clone()));
        Self {
            proxy,
            addr,
            tls_addr,
            shutdown,
            serve: Some(serve),
        }
    }

    /// `https://localhost:<port><path>` on the HTTPS listener.
    fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.tls_addr.unwrap().port())
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn upstream(&self, url: &str) -> UpstreamStatus {
        self.proxy
            .upstreams()
            .into_iter()
            .find(|u| u.url == url)
            .unwrap_or_else(|| panic!("{url} is not an upstream: {:?}", self.proxy.upstreams()))
    }

    fn state(&self, url: &str) -> UpstreamState {
        self.upstream(url).state
    }

    async fn get(&self, client: &reqwest::Client, path: &str) -> reqwest::Response {
        client.get(self.url(path)).send().await.unwrap()
    }

    /// GET `/echo` and the name of the upstream that answered (which must be a 200).
    async fn served_by(&self, client: &reqwest::Client) -> String {
        let response = self.get(client, "/echo").await;
        assert_eq!(response.status(), 200);
        let echo: Value = response.json().await.unwrap();
        echo["upstream"].as_str().unwrap().to_owned()
    }

    /// Which upstream served each of `n` sequential requests.
    async fn served_by_each(&self, client: &reqwest::Client, n: usize) -> Vec<String> {
        let mut served = Vec::with_capacity(n);
        for _ in 0..n {
            served.push(self.served_by(client).await);
        }
        served
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap()
}

/// A client speaking HTTP/2 without upgrade (h2c prior knowledge).
fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(WAIT)
        .build()
        .unwrap()
}

/// Polls `condition` every 10 ms until it holds; panics after `WAIT`.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `future`, panicking when it takes longer than `WAIT`.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Checks that something bounded by a timeout of `at_least_ms` took at least that, and not
/// much more (under 3 s).
#[track_caller]
fn assert_took(took: Duration, at_least_ms: u64) {
    assert!(
        took >= Duration::from_millis(at_least_ms) && took < Duration::from_secs(3),
        "took {took:?}, expected {at_least_ms} ms to 3 s"
    );
}

/// Checks a problem+json answer of the proxy and returns its document.
async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["status"], status, "{doc}");
    assert!(doc["type"].is_string() && doc["title"].is_string(), "{doc}");
    doc
}

/// Sends one request over a fresh HTTP/1.1 connection with hyper's low-level client (which
/// can stream any body); adds `Host`.
async fn send_h1<B>(addr: SocketAddr, mut request: Request<B>) -> Response<Incoming>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    request
        .headers_mut()
        .insert("host", addr.to_string().parse().unwrap());
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender.send_request(request).await.unwrap()
}

/// A request body fed chunk by chunk through the returned sender (chunked encoding).
fn channel_body() -> (
    mpsc::Sender<Bytes>,
    StreamBody<impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static>,
) {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    }));
    (tx, body)
}

/// The value of the Prometheus sample `series` (name and labels exactly as rendered).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|value| value.parse().unwrap())
    })
}
