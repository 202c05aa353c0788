//! Integration tests of the load balancer (SPEC §5) over real sockets: the proxy runs in-process
//! on port 0 with its real serving threads, in front of small hyper upstreams spawned by each
//! test, and every assertion is about what a client (or an upstream, or an operator reading
//! `/status` and `/metrics`) would observe. The last tests run the built binary.
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

mod common;

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
            Response::new(StreamBody::new(pattern_stream(total, gate)).boxed_unsync())
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
    shutdown: CancellationToken,
    serve: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    async fn start(config: ProxyConfig) -> Self {
        init_tracing();
        let proxy = Proxy::new(config).unwrap();
        let listeners = Listeners::bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = listeners.local_addr();
        let shutdown = CancellationToken::new();
        let serve = tokio::spawn(proxy.clone().serve(listeners, shutdown.clone()));
        Self {
            proxy,
            addr,
            shutdown,
            serve: Some(serve),
        }
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

// ---------------------------------------------------------------------------------------------
// Balancing
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_four_upstreams_even_shares() {
    let mut upstreams = Vec::new();
    for name in ["a", "b", "c", "d"] {
        upstreams.push(TestUpstream::start(name).await);
    }
    let urls: Vec<&str> = upstreams.iter().map(|u| u.url.as_str()).collect();
    let proxy = TestProxy::start(config(&urls)).await;
    let client = client();
    for _ in 0..400 {
        let response = proxy.get(&client, "/echo").await;
        assert_eq!(response.status(), 200);
    }
    for upstream in &upstreams {
        let share = upstream.hits() as f64 / 400.0;
        assert!(
            (share - 0.25).abs() <= 0.01,
            "{} got {} of 400 requests",
            upstream.name(),
            upstream.hits()
        );
        assert_eq!(
            proxy.upstream(&upstream.url).requests,
            upstream.hits() as u64
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_shares_stay_even_when_an_upstream_is_out() {
    shares_stay_even_when_an_upstream_is_out(Strategy::RoundRobin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_shares_stay_even_when_an_upstream_is_out() {
    // Sequential requests: every upstream has 0 in flight, so the tie-break decides.
    shares_stay_even_when_an_upstream_is_out(Strategy::LeastConn).await;
}

async fn shares_stay_even_when_an_upstream_is_out(strategy: Strategy) {
    let mut upstreams = Vec::new();
    for name in ["a", "b", "c", "d"] {
        upstreams.push(TestUpstream::start(name).await);
    }
    let urls: Vec<&str> = upstreams.iter().map(|u| u.url.as_str()).collect();
    let mut config = config(&urls);
    config.strategy = strategy;
    let proxy = TestProxy::start(config).await;
    // `a` fails its checks: the three others should share the load evenly, not hand `a`'s
    // turn to its neighbour every time.
    upstreams[0].set_ready(false);
    eventually("a is unhealthy", || {
        proxy.state(&upstreams[0].url) == UpstreamState::Unhealthy
    })
    .await;
    let client = client();
    for _ in 0..300 {
        assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
    }
    let hits: Vec<usize> = upstreams.iter().map(|u| u.hits()).collect();
    assert_eq!(hits[0], 0, "{hits:?}");
    for (upstream, n) in upstreams.iter().zip(&hits).skip(1) {
        let share = *n as f64 / 300.0;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.01,
            "{} got {n} of 300 requests (a, b, c, d: {hits:?})",
            upstream.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_prefers_the_idle_upstream() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let mut config = config(&[&a.url, &b.url]);
    config.strategy = Strategy::LeastConn;
    let proxy = TestProxy::start(config).await;
    let client = client();

    let held = tokio::spawn(client.get(proxy.url("/hold")).send());
    eventually("one upstream holds the slow request", || {
        a.active() + b.active() == 1
    })
    .await;
    let (busy, idle) = if a.active() == 1 { (&a, &b) } else { (&b, &a) };
    assert_eq!(proxy.upstream(&busy.url).in_flight, 1);
    let busy_hits = busy.hits();
    for _ in 0..10 {
        assert_eq!(proxy.served_by(&client).await, idle.name());
    }
    assert_eq!(
        busy.hits(),
        busy_hits,
        "least_conn sent work to the busy upstream"
    );

    busy.release();
    let held = within("the held request", held).await.unwrap().unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(held.text().await.unwrap(), busy.name());
}

// ---------------------------------------------------------------------------------------------
// Header rules
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peer_headers_are_replaced_and_hop_by_hop_removed() {
    let up = TestUpstream::start("a").await;
    // Default config: no trusted proxies, so 127.0.0.1 is an ordinary client.
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let client = client();
    let spoofing = |url: String| {
        client
            .get(url)
            .header("host", "api.example.com")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-for", "7.7.7.7")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "hop-only")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("te", "trailers")
            .header("x-kept", "yes")
    };

    // Sanity: sent straight to the upstream, every one of these headers arrives.
    let direct: Value = spoofing(format!("{}/echo?page=2", up.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for name in [
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "connection",
    ] {
        assert!(!seen(&direct, name).is_empty(), "{name} not sent: {direct}");
    }

    let echo: Value = spoofing(proxy.url("/echo?page=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["target"], "/echo?page=2", "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        ["api.example.com"],
        "{echo}"
    );
    assert_eq!(seen(&echo, "host"), ["api.example.com"], "{echo}");
    assert_eq!(seen(&echo, "x-kept"), ["yes"], "{echo}");
    for gone in [
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
    ] {
        assert!(seen(&echo, gone).is_empty(), "{gone} was forwarded: {echo}");
    }
    let ids = seen(&echo, "x-request-id");
    assert_eq!(ids.len(), 1, "{echo}");
    assert!(
        ids[0].len() >= 16
            && ids[0]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-'),
        "{echo}"
    );

    // A second request gets a different id; one the client sent is kept.
    let again: Value = proxy.get(&client, "/echo").await.json().await.unwrap();
    assert_ne!(seen(&again, "x-request-id"), ids);
    let kept: Value = client
        .get(proxy.url("/echo"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen(&kept, "x-request-id"), ["client-chosen-42"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_peer_gets_its_address_appended() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let proxy = TestProxy::start(config).await;
    let client = client();

    let echo: Value = client
        .get(proxy.url("/echo"))
        .header("host", "api.example.com")
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-forwarded-for", "5.6.7.8")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "public.example")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        seen(&echo, "x-forwarded-for"),
        ["1.2.3.4, 5.6.7.8, 127.0.0.1"],
        "{echo}"
    );
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"], "{echo}");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        ["public.example"],
        "{echo}"
    );
    assert_eq!(seen(&echo, "host"), ["api.example.com"], "{echo}");

    // Without forwarding headers, the trusted peer is the first hop.
    let echo: Value = proxy.get(&client, "/echo").await.json().await.unwrap();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        [proxy.addr.to_string()],
        "{echo}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_forwarded_host_is_replaced_even_without_a_host_header() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    // HTTP/1.0 allows a request without Host; the client still must not choose the
    // X-Forwarded-Host the upstream sees.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /echo HTTP/1.0\r\nx-forwarded-host: evil.example\r\n\
              x-forwarded-proto: https\r\n\r\n",
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    within("the HTTP/1.0 answer", stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{raw}");
    let echo: Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"], "{echo}");
    // Forwarded as HTTP/1.1, which requires a Host header (RFC 9112 §3.2).
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(
        seen(&echo, "host").len(),
        1,
        "HTTP/1.1 without Host: {echo}"
    );
    assert!(
        !seen(&echo, "x-forwarded-host").contains(&"evil.example".to_owned()),
        "an untrusted client chose X-Forwarded-Host: {echo}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_hop_by_hop_headers_are_removed() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let client = client();

    // Sanity: the upstream does send them.
    let direct = client.get(format!("{}/hop", up.url)).send().await.unwrap();
    for name in ["connection", "x-private", "keep-alive", "proxy-connection"] {
        assert!(direct.headers().contains_key(name), "{name} not sent");
    }

    let response = proxy.get(&client, "/hop").await;
    assert_eq!(response.status(), 200);
    for gone in ["connection", "x-private", "keep-alive", "proxy-connection"] {
        assert!(
            !response.headers().contains_key(gone),
            "{gone} reached the client: {:?}",
            response.headers()
        );
    }
    assert_eq!(response.headers()["x-kept"], "yes");
    assert_eq!(response.text().await.unwrap(), "hop");
}

// ---------------------------------------------------------------------------------------------
// Bodies and protocols
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_is_streamed_not_buffered() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let (tx, body) = channel_body();
    let request = Request::post("/upload").body(body).unwrap();
    let response = tokio::spawn(send_h1(proxy.addr, request));

    tx.send(pattern_at(0, 1000)).await.unwrap();
    // The rest is sent only once the upstream has the first piece: a proxy that waited for the
    // whole body would never get it.
    eventually("the upstream receives the first chunk", || {
        up.state.received.load(SeqCst) == 1000
    })
    .await;
    tx.send(pattern_at(1000, 3000)).await.unwrap();
    drop(tx);

    let response = within("the upload answer", response).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc, json!({"upstream": "a", "bytes": 4000, "intact": true}));
}

/// An upstream that answers before it has read the request body: its connection is still busy
/// with that body, so it must not go back to the pool (the next request would wait behind the
/// body, for ever here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_returns_to_the_pool_only_when_both_directions_are_done() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    // One serving thread, one idle pool: the next request would check out that connection.
    // Found busy, it would cost the next request a `connect_timeout` wait.
    config.threads = 1;
    config.connect_timeout = Duration::from_secs(3);
    let proxy = TestProxy::start(config).await;
    let (tx, body) = channel_body();
    let request = Request::post("/early").body(body).unwrap();
    let early = within("the early answer", send_h1(proxy.addr, request)).await;
    assert_eq!(early.status(), 200);
    tx.send(pattern_at(0, 1000)).await.unwrap();
    let text = within("the early body", early.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(text, "early");
    // The upload is still open (`tx` alive). The next requests get their own connection.
    let client = client();
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a request waited {:?} behind an unfinished upload",
            started.elapsed()
        );
    }
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_is_streamed_not_buffered() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let total = 4 * CHUNK as u64;
    // The upstream sends one chunk, then waits for `release`: the client must get that chunk
    // before the upstream has finished.
    let mut response = within(
        "the response headers",
        proxy.get(&client(), &format!("/gated/{total}")),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut got = 0u64;
    while got < CHUNK as u64 {
        let chunk = within("the first chunk", response.chunk())
            .await
            .unwrap()
            .expect("the body ended early");
        assert!(is_pattern(got, &chunk));
        got += chunk.len() as u64;
    }
    up.release();
    while let Some(chunk) = within("the rest", response.chunk()).await.unwrap() {
        assert!(is_pattern(got, &chunk));
        got += chunk.len() as u64;
    }
    assert_eq!(got, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_through_intact() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let total = 64 * MIB;
    let request = Request::post("/upload")
        .header("content-length", total)
        .body(StreamBody::new(pattern_stream(total, None)))
        .unwrap();
    let response = within("the 64 MiB upload", send_h1(proxy.addr, request)).await;
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        doc,
        json!({"upstream": "a", "bytes": total, "intact": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_through_intact() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let total = 64 * MIB;
    let mut response = proxy.get(&client(), &format!("/download/{total}")).await;
    assert_eq!(response.status(), 200);
    let (mut got, mut intact) = (0u64, true);
    while let Some(chunk) = response.chunk().await.unwrap() {
        intact &= is_pattern(got, &chunk);
        got += chunk.len() as u64;
    }
    assert_eq!(got, total);
    assert!(
        intact,
        "the downloaded bytes differ from what the upstream sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upload_is_not_cut_by_the_response_timeout() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.response_timeout = Duration::from_millis(500);
    let proxy = TestProxy::start(config).await;
    let (tx, body) = channel_body();
    let response = tokio::spawn(send_h1(
        proxy.addr,
        Request::post("/upload").body(body).unwrap(),
    ));
    // A client on a slow link: 6 pieces 200 ms apart, each reaching the upstream as it is sent.
    // The upstream is busy reading the whole time; it has not been slow to answer.
    let mut sent = 0u64;
    for _ in 0..6 {
        if tx.send(pattern_at(sent, 1000)).await.is_err() {
            break; // the proxy gave up on the body
        }
        sent += 1000;
        eventually("the upstream receives the piece", || {
            up.state.received.load(SeqCst) == sent || response.is_finished()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(tx);
    let response = within("the upload answer", response).await.unwrap();
    assert_eq!(response.status(), 200, "a progressing upload was cut off");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc, json!({"upstream": "a", "bytes": 6000, "intact": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_upload_is_served() {
    // curl sends `Expect: 100-continue` for bodies over 1 KiB and waits for the interim answer.
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: api.example.com\r\ncontent-length: 5000\r\n\
              expect: 100-continue\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        within("the interim answer", stream.read_exact(&mut byte))
            .await
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    stream.write_all(&[b'x'; 5000]).await.unwrap();
    let mut raw = Vec::new();
    within("the answer", stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    let echo: Value = serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(echo["bodyLen"], 5000, "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_client_is_served() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let h2 = h2_client();

    let response = h2
        .post(proxy.url("/echo?via=h2"))
        .body("hello over h2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["target"], "/echo?via=h2");
    assert_eq!(echo["version"], "HTTP/1.1", "upstreams get HTTP/1.1");
    assert_eq!(echo["bodyLen"], 13);
    // `:authority` becomes Host.
    assert_eq!(seen(&echo, "host"), [proxy.addr.to_string()], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-host"), [proxy.addr.to_string()]);
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);

    // Multiplexed requests on the one connection.
    let responses = join_all((0..16).map(|_| h2.get(proxy.url("/echo")).send())).await;
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
    }
    assert_eq!(up.hits(), 17);
}

// ---------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------

/// POSTs `/echo` `n` times through `proxy`, checking that each is answered 200 and reaches
/// `good` exactly once; returns the longest a POST took.
async fn posts_each_reach_once(proxy: &TestProxy, good: &TestUpstream, n: usize) -> Duration {
    let client = client();
    let before = good.hits();
    let mut slowest = Duration::ZERO;
    for i in 1..=n {
        let started = Instant::now();
        let response = client
            .post(proxy.url("/echo"))
            .body("{}")
            .send()
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        assert_eq!(response.status(), 200);
        assert_eq!(
            good.hits() - before,
            i,
            "each POST reaches the live upstream once"
        );
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_retried_elsewhere_even_for_post() {
    let dead = closed_port_url();
    let good = TestUpstream::start("good").await;
    let proxy = TestProxy::start(probed_once(&[&dead, &good.url])).await;
    posts_each_reach_once(&proxy, &good, 4).await;
    assert!(
        proxy.upstream(&dead).failures >= 1,
        "the dead upstream was never tried"
    );
    let retries = sample(&proxy.proxy.render_metrics(), "taskd_proxy_retries_total").unwrap();
    assert!(retries >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_given_by_host_name_is_resolved() {
    let up = TestUpstream::start("named").await;
    let port = up.url.rsplit(':').next().unwrap();
    // The upstream listens on 127.0.0.1 only; where `localhost` also resolves to `::1` (often
    // first), the proxy must go on to the next address.
    let named = format!("http://localhost:{port}");
    let proxy = TestProxy::start(config(&[&named])).await;
    assert_eq!(proxy.served_by(&client()).await, "named");
    assert_eq!(proxy.state(&named), UpstreamState::Healthy);
}

/// A listening socket that never completes a connection: its accept queue (backlog 0) is full,
/// so Linux drops further SYNs and a `connect` to it hangs until the connecting side gives up.
/// Keep the returned value alive for as long as the address is used.
async fn unanswered_listener() -> (String, socket2::Socket, std::net::TcpStream) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr))
            .await
            .is_err(),
        "this kernel completes connections beyond the accept queue; the test cannot run here"
    );
    (format!("http://{addr}"), socket, filler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_accepts_costs_only_the_connect_timeout() {
    let (silent, _socket, _filler) = unanswered_listener().await;
    let good = TestUpstream::start("good").await;
    let mut config = probed_once(&[&silent, &good.url]);
    config.connect_timeout = Duration::from_millis(300);
    config.health.timeout = Duration::from_millis(100);
    let proxy = TestProxy::start(config).await;
    // Each POST goes to the silent upstream or straight to the good one; when it tries the
    // silent one first, the connect timeout sends it on (never sent, so any method may go).
    let slowest = posts_each_reach_once(&proxy, &good, 4).await;
    assert!(proxy.upstream(&silent).failures >= 1, "never tried");
    assert_took(slowest, 300);

    // With nothing else to try: a 503 once the connect timeout passes.
    let (silent, _socket, _filler) = unanswered_listener().await;
    let mut config = self::config(&[&silent]);
    config.connect_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start(config).await;
    let started = Instant::now();
    let response = proxy.get(&client(), "/echo").await;
    let took = started.elapsed();
    assert_problem(response, 503).await;
    assert_took(took, 300);
}

/// Sends requests built by `request` through a proxy in front of `dropper` (reads the request,
/// then drops the connection) and `good`; returns, per request, its status and how many times
/// each upstream saw it.
async fn through_dropper(
    request: impl Fn(&reqwest::Client, String) -> reqwest::RequestBuilder,
) -> Vec<(u16, usize, usize)> {
    let dropper = TestUpstream::start("dropper").await;
    dropper.set_broken(true);
    let good = TestUpstream::start("good").await;
    let mut config = config(&[&dropper.url, &good.url]);
    config.passive.max_fails = 0; // no ejection: every request may start on the dropper
    let proxy = TestProxy::start(config).await;
    let client = client();
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let (d, g) = (dropper.hits(), good.hits());
        let response = request(&client, proxy.url("/echo")).send().await.unwrap();
        let status = response.status().as_u16();
        if status == 502 {
            assert_problem(response, 502).await;
        }
        outcomes.push((status, dropper.hits() - d, good.hits() - g));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_get_is_retried_on_another_upstream() {
    let outcomes = through_dropper(|c, url| c.get(url)).await;
    for &(status, to_dropper, to_good) in &outcomes {
        assert_eq!((status, to_good), (200, 1), "{outcomes:?}");
        assert!(to_dropper <= 1, "{outcomes:?}");
    }
    assert!(
        outcomes.iter().any(|o| o.1 == 1),
        "no GET started on the dropping upstream: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_post_without_idempotency_key_is_not_retried() {
    let outcomes = through_dropper(|c, url| c.post(url).body(r#"{"title":"x"}"#)).await;
    for &outcome in &outcomes {
        assert!(
            outcome == (200, 0, 1) || outcome == (502, 1, 0),
            "a POST was sent twice or lost: {outcomes:?}"
        );
    }
    assert!(
        outcomes.iter().any(|o| o.0 == 502),
        "no POST started on the dropping upstream: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_post_with_idempotency_key_is_retried() {
    let outcomes = through_dropper(|c, url| {
        c.post(url)
            .header("idempotency-key", "k-1")
            .body(r#"{"title":"x"}"#)
    })
    .await;
    for &(status, to_dropper, to_good) in &outcomes {
        assert_eq!((status, to_good), (200, 1), "{outcomes:?}");
        assert!(to_dropper <= 1, "{outcomes:?}");
    }
    assert!(
        outcomes.iter().any(|o| o.1 == 1),
        "no POST started on the dropping upstream: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_by_the_configured_count() {
    let mut droppers = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let dropper = TestUpstream::start(name).await;
        dropper.set_broken(true);
        droppers.push(dropper);
    }
    let urls: Vec<&str> = droppers.iter().map(|u| u.url.as_str()).collect();
    let mut config = config(&urls);
    config.retries = 1;
    config.passive.max_fails = 0;
    let proxy = TestProxy::start(config).await;
    let response = proxy.get(&client(), "/echo").await;
    assert!(response.headers().contains_key("x-request-id"));
    assert_problem(response, 502).await;
    let tries: usize = droppers.iter().map(|d| d.hits()).sum();
    assert_eq!(tries, 2, "one try plus `retries` = 1 extra");
    let retries = sample(&proxy.proxy.render_metrics(), "taskd_proxy_retries_total");
    assert_eq!(retries, Some(1.0));
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstream_is_ejected_then_returns_after_passing_checks() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let mut config = config(&[&a.url, &b.url]);
    config.passive = PassiveHealthConfig {
        max_fails: 2,
        // Long: only the active checks can end this ejection within the test.
        fail_timeout: Duration::from_secs(60),
    };
    config.health.interval = Duration::from_millis(300);
    config.health.rise = 3;
    let proxy = TestProxy::start(config).await;
    let client = client();

    a.set_broken(true);
    let mut sent = 0;
    while proxy.state(&a.url) != UpstreamState::Ejected {
        assert!(sent < 10, "never ejected: {:?}", proxy.upstream(&a.url));
        let failures = proxy.upstream(&a.url).failures;
        assert!(failures < 2, "{failures} failures and still not ejected");
        // Each GET that lands on `a` fails there and is retried on `b`.
        assert_eq!(proxy.served_by(&client).await, "b");
        sent += 1;
    }
    assert_eq!(
        proxy.upstream(&a.url).failures,
        2,
        "ejected after max_fails"
    );
    let probes_at_ejection = a.probes();

    // Ejected: no traffic (the active checks need 3 × 300 ms to bring it back).
    let hits = a.hits();
    for _ in 0..6 {
        assert_eq!(proxy.served_by(&client).await, "b");
    }
    assert_eq!(a.hits(), hits, "an ejected upstream got requests");
    assert_eq!(proxy.state(&a.url), UpstreamState::Ejected);

    a.set_broken(false);
    eventually("the recovered upstream is healthy again", || {
        proxy.state(&a.url) == UpstreamState::Healthy
    })
    .await;
    assert!(
        a.probes() - probes_at_ejection >= 3,
        "back before `rise` probes"
    );
    let served = proxy.served_by_each(&client, 4).await;
    assert_eq!(served.iter().filter(|s| *s == "a").count(), 2, "{served:?}");
    let metrics = proxy.proxy.render_metrics();
    let series = format!("taskd_proxy_ejections_total{{upstream=\"{}\"}}", a.url);
    assert_eq!(sample(&metrics, &series), Some(1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_an_upstream_out_after_fall_and_back_after_rise() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let proxy = TestProxy::start(config(&[&a.url, &b.url])).await; // rise 2, fall 2, 100 ms
    let client = client();
    eventually("both upstreams are probed", || {
        proxy
            .proxy
            .upstreams()
            .iter()
            .all(|u| u.last_probe_ms.is_some() && u.state == UpstreamState::Healthy)
    })
    .await;

    let before = a.probes();
    a.set_ready(false);
    eventually("a is unhealthy", || {
        proxy.state(&a.url) == UpstreamState::Unhealthy
    })
    .await;
    assert!(
        a.probes() - before >= 2,
        "unhealthy before `fall` failed probes"
    );
    let hits = a.hits();
    for _ in 0..6 {
        assert_eq!(proxy.served_by(&client).await, "b");
    }
    assert_eq!(a.hits(), hits, "an unhealthy upstream got requests");

    let before = a.probes();
    a.set_ready(true);
    eventually("a is healthy again", || {
        proxy.state(&a.url) == UpstreamState::Healthy
    })
    .await;
    assert!(
        a.probes() - before >= 2,
        "healthy before `rise` passing probes"
    );
    let served = proxy.served_by_each(&client, 4).await;
    assert_eq!(served.iter().filter(|s| *s == "a").count(), 2, "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_upstreams_are_still_tried_before_a_503() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    a.set_ready(false);
    b.set_ready(false);
    let proxy = TestProxy::start(config(&[&a.url, &b.url])).await;
    eventually("both upstreams are unhealthy", || {
        proxy
            .proxy
            .upstreams()
            .iter()
            .all(|u| u.state == UpstreamState::Unhealthy)
    })
    .await;
    let response = proxy.get(&client(), "/echo").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_down_gives_503_with_retry_after() {
    let proxy = TestProxy::start(config(&[&closed_port_url(), &closed_port_url()])).await;
    let client = client();
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let started = Instant::now();
        let response = client
            .request(method, proxy.url("/echo"))
            .send()
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .expect("Retry-After in seconds");
        assert!(retry_after >= 1);
        let doc = assert_problem(response, 503).await;
        assert!(
            !doc.to_string().contains("127.0.0.1"),
            "leaks addresses: {doc}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_beyond_response_timeout_gives_504() {
    let up = TestUpstream::start("slow").await;
    let mut config = config(&[&up.url]);
    config.response_timeout = Duration::from_millis(300);
    let proxy = TestProxy::start(config).await;
    // HTTP/1 waits are timed by the thread's sweeper, HTTP/2 ones by a timer each.
    for client in [client(), h2_client()] {
        let started = Instant::now();
        let response = proxy.get(&client, "/slow/5000").await;
        let took = started.elapsed();
        assert_problem(response, 504).await;
        assert_took(took, 300);
        // A fast answer within the timeout is still fine, on the same connection.
        assert_eq!(proxy.get(&client, "/slow/10").await.status(), 200);
    }
}

/// One upstream behind a proxy whose `idle_timeout` is `idle`.
async fn behind_proxy_with_idle_timeout(idle: Duration) -> (TestUpstream, TestProxy) {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.idle_timeout = idle;
    let proxy = TestProxy::start(config).await;
    (up, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connection_is_closed_after_the_idle_timeout() {
    let (_up, proxy) = behind_proxy_with_idle_timeout(Duration::from_millis(500)).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let closed = tokio::spawn(connection);
    let get = || {
        Request::get("/echo")
            .header("host", proxy.addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let mut last_used = Instant::now();
    for _ in 0..2 {
        let response = sender.send_request(get()).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        last_used = Instant::now();
        // Well inside the idle timeout: the keep-alive connection must still be usable.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    within("the proxy to close the idle connection", closed)
        .await
        .unwrap()
        .unwrap();
    // The proxy's clock starts as it finishes the response, a moment before the client has it.
    let idle = last_used.elapsed();
    assert_took(idle, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let (up, proxy) = behind_proxy_with_idle_timeout(Duration::from_millis(500)).await;
    let client = client();
    assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
    let used = Instant::now();
    // The pooled connection stays open (probes come and go on connections of their own) until
    // it has been idle for `idle_timeout`; the health checker closes it within one interval.
    eventually("the idle pooled connection to be closed", || {
        up.connections() == 0
    })
    .await;
    let idle = used.elapsed();
    assert_took(idle, 400);
    // A request after that opens a new connection and is served as usual.
    assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trickling_its_headers_is_cut_off_after_the_idle_timeout() {
    let (up, proxy) = behind_proxy_with_idle_timeout(Duration::from_millis(500)).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nhost: trickle\r\n")
        .await
        .unwrap();
    // One more header line every 100 ms, never the blank line that ends them: activity does not
    // keep a connection whose request never arrives.
    let mut buf = [0u8; 1024];
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still open after {:?}",
            started.elapsed()
        );
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => panic!(
                "expected the connection closed, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => {
                if stream.write_all(b"x-trickle: 1\r\n").await.is_err() {
                    break;
                }
            }
        }
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "cut off after {took:?}");
    assert_eq!(
        up.hits(),
        0,
        "the incomplete request must not reach the upstream"
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown and runtime changes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.shutdown_timeout = Duration::from_secs(8);
    let mut proxy = TestProxy::start(config).await;
    let client = client();
    // This client keeps an idle keep-alive connection open through the shutdown.
    let idle_client = self::client();
    assert_eq!(proxy.get(&idle_client, "/echo").await.status(), 200);

    let slow = tokio::spawn(client.get(proxy.url("/slow/3000")).send());
    eventually("the slow request reaches the upstream", || up.active() == 1).await;
    proxy.shutdown.cancel();

    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(proxy.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let serve = proxy.serve.take().unwrap();
    assert_eq!(up.active(), 1, "the slow request should still be running");
    assert!(
        !serve.is_finished(),
        "serve returned with a request in flight"
    );

    let response = within("the slow request", slow).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "a");
    // Done once nothing is in flight: idle connections do not hold it for the grace period.
    let finished = Instant::now();
    within("serve to return", serve).await.unwrap().unwrap();
    assert!(
        finished.elapsed() < Duration::from_secs(3),
        "{:?}",
        finished.elapsed()
    );
    drop(idle_client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_requests_after_the_grace_period() {
    let up = TestUpstream::start("a").await;
    let mut config = config(&[&up.url]);
    config.shutdown_timeout = Duration::from_millis(300);
    let mut proxy = TestProxy::start(config).await;
    let held = tokio::spawn(client().get(proxy.url("/hold")).send());
    eventually("the request reaches the upstream", || up.active() == 1).await;
    let cancelled = Instant::now();
    proxy.shutdown.cancel();
    within("serve to return", proxy.serve.take().unwrap())
        .await
        .unwrap()
        .unwrap();
    let took = cancelled.elapsed();
    assert_took(took, 300);
    let held = within("the cut request", held).await.unwrap();
    assert!(held.is_err(), "{held:?}");
    up.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_can_be_added_and_removed_at_runtime() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let proxy = TestProxy::start(config(&[&a.url])).await;
    let client = client();
    for _ in 0..2 {
        assert_eq!(proxy.served_by(&client).await, "a");
    }

    proxy.proxy.add_upstream(&b.url, true).unwrap();
    assert!(
        proxy.proxy.add_upstream(&b.url, true).is_err(),
        "added twice"
    );
    let served = proxy.served_by_each(&client, 4).await;
    assert_eq!(served.iter().filter(|s| *s == "b").count(), 2, "{served:?}");

    assert!(proxy.proxy.remove_upstream(&a.url));
    assert!(!proxy.proxy.remove_upstream(&a.url), "removed twice");
    let hits = a.hits();
    for _ in 0..4 {
        assert_eq!(proxy.served_by(&client).await, "b");
    }
    assert_eq!(a.hits(), hits, "a removed upstream got requests");
    let urls: Vec<String> = proxy.proxy.upstreams().into_iter().map(|u| u.url).collect();
    assert_eq!(urls, std::slice::from_ref(&b.url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_the_request_in_flight_and_sends_no_new_ones() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let proxy = TestProxy::start(config(&[&a.url, &b.url])).await;
    let client = client();

    let held = tokio::spawn(client.get(proxy.url("/hold")).send());
    eventually("one upstream holds the slow request", || {
        a.active() + b.active() == 1
    })
    .await;
    let (busy, idle) = if a.active() == 1 { (&a, &b) } else { (&b, &a) };
    let drain = tokio::spawn({
        let (proxy, url) = (proxy.proxy.clone(), busy.url.clone());
        async move { proxy.drain_upstream(&url).await }
    });
    eventually("the upstream is draining", || {
        proxy.state(&busy.url) == UpstreamState::Draining
    })
    .await;

    let hits = busy.hits();
    for _ in 0..6 {
        assert_eq!(proxy.served_by(&client).await, idle.name());
    }
    assert_eq!(busy.hits(), hits, "a draining upstream got new requests");
    assert!(
        !drain.is_finished(),
        "drain returned with a request in flight"
    );
    assert_eq!(proxy.upstream(&busy.url).in_flight, 1);

    busy.release();
    let held = within("the held request", held).await.unwrap().unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(held.text().await.unwrap(), busy.name());
    assert!(within("the drain", drain).await.unwrap());
    let status = proxy.upstream(&busy.url);
    assert_eq!(
        (status.state, status.in_flight),
        (UpstreamState::Draining, 0)
    );
    assert!(!proxy.proxy.drain_upstream("http://127.0.0.1:1").await);
}

// ---------------------------------------------------------------------------------------------
// Admin listener
// ---------------------------------------------------------------------------------------------

async fn start_admin(proxy: &TestProxy) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin::serve(
        listener,
        admin::router(proxy.proxy.clone(), None),
        proxy.shutdown.clone(),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_and_metrics_report_upstreams_retries_and_ejections() {
    let dead = closed_port_url();
    let good = TestUpstream::start("good").await;
    let mut config = probed_once(&[&dead, &good.url]);
    config.passive.max_fails = 1;
    let proxy = TestProxy::start(config).await;
    let admin = start_admin(&proxy).await;
    let client = client();
    eventually("both upstreams are probed", || {
        proxy
            .proxy
            .upstreams()
            .iter()
            .all(|u| u.last_probe_ms.is_some())
    })
    .await;
    for _ in 0..2 {
        assert_eq!(proxy.served_by(&client).await, "good");
    }

    let status: Value = client
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"), "{status}");
    assert!(status["uptimeSeconds"].is_u64(), "{status}");
    assert_eq!(status["strategy"], "round_robin", "{status}");
    let upstreams = status["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 2, "{status}");
    for upstream in upstreams {
        let mut keys: Vec<&str> = upstream
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "failures",
                "inFlight",
                "lastProbeMs",
                "requests",
                "state",
                "url"
            ],
            "{status}"
        );
        assert!(upstream["lastProbeMs"].is_u64(), "{status}");
        assert_eq!(upstream["inFlight"], 0, "{status}");
    }
    assert_eq!(upstreams[0]["url"], dead.as_str());
    assert_eq!(upstreams[0]["state"], "ejected", "{status}");
    assert_eq!(upstreams[0]["failures"], 1, "{status}");
    assert_eq!(upstreams[1]["url"], good.url.as_str());
    assert_eq!(upstreams[1]["state"], "healthy", "{status}");
    assert_eq!(upstreams[1]["requests"], 2, "{status}");
    assert_eq!(upstreams[1]["failures"], 0, "{status}");

    // With only the ejected, refusing upstream left, the proxy answers 503 itself.
    assert!(proxy.proxy.remove_upstream(&good.url));
    assert_problem(proxy.get(&client, "/echo").await, 503).await;

    let response = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let metrics = response.text().await.unwrap();
    let expect = |series: String, value: f64| {
        assert_eq!(
            sample(&metrics, &series),
            Some(value),
            "{series}\n{metrics}"
        );
    };
    // `good` was removed, so only the proxy's own answers and `dead` remain listed.
    expect(
        "taskd_proxy_requests_total{upstream=\"proxy\",status=\"503\"}".into(),
        1.0,
    );
    expect("taskd_proxy_request_duration_seconds_count".into(), 3.0);
    expect(
        "taskd_proxy_request_duration_seconds_bucket{le=\"+Inf\"}".into(),
        3.0,
    );
    expect("taskd_proxy_retries_total".into(), 1.0);
    expect(
        format!("taskd_proxy_ejections_total{{upstream=\"{dead}\"}}"),
        1.0,
    );
    expect("taskd_proxy_in_flight".into(), 0.0);
    assert!(metrics.contains("# TYPE taskd_proxy_request_duration_seconds histogram"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_upstream_and_status() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let admin = start_admin(&proxy).await;
    let client = client();
    for _ in 0..3 {
        assert_eq!(proxy.get(&client, "/echo").await.status(), 200);
    }
    // The upstream's own 503 (its readiness endpoint) is an upstream answer, not the proxy's.
    up.set_ready(false);
    assert_eq!(proxy.get(&client, "/health/ready").await.status(), 503);
    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = |status: u16| {
        format!(
            "taskd_proxy_requests_total{{upstream=\"{}\",status=\"{status}\"}}",
            up.url
        )
    };
    assert_eq!(sample(&metrics, &series(200)), Some(3.0), "{metrics}");
    assert_eq!(sample(&metrics, &series(503)), Some(1.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "taskd_proxy_request_duration_seconds_count"),
        Some(4.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_gauge_returns_to_zero_when_a_client_gives_up() {
    let up = TestUpstream::start("a").await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = impatient
        .get(proxy.url("/slow/600"))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    // The upstream finishes its work; nothing is in flight any more.
    eventually("the upstream finished the abandoned request", || {
        up.active() == 0
    })
    .await;
    eventually("the upstream's in-flight count is back to zero", || {
        proxy.upstream(&up.url).in_flight == 0
    })
    .await;
    eventually("taskd_proxy_in_flight is back to zero", || {
        sample(&proxy.proxy.render_metrics(), "taskd_proxy_in_flight") == Some(0.0)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_taskd");

/// `taskd proxy <args>` with a clean environment, in an empty directory (no `config.toml`),
/// logging to `dir/stderr`.
fn proxy_command(dir: &std::path::Path, args: &[&str]) -> tokio::process::Command {
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

fn output_of(dir: &std::path::Path) -> String {
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

    let status: Value = client
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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

/// SPEC §8: the public listener answers `/metrics` itself with a 404 problem; the upstream
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
    // A slot frees: the waiting connection is served.
    drop(answered.pop());
    let mut head = [0u8; 12];
    within("a freed slot", waiting[0].read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
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
