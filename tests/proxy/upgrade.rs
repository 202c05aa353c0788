//! WebSocket and other HTTP/1.1 upgrades through the proxy (docs/contract.md §8.2): bytes both
//! ways, half-close, the idle timeout, in-flight accounting, drains and shutdown.

use super::*;

use futures_util::{SinkExt, StreamExt};
use std::sync::Mutex;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

// ---------------------------------------------------------------------------------------------
// In-test upstream that takes upgrades: a hyper HTTP/1.1 server with upgrades on.
//
// - `/health/ready`: 200.
// - `/ws`: a WebSocket (RFC 6455) that echoes every text and binary message.
// - `/raw`: switches to `x-echo`: reads until the client closes its half, then writes back what
//   it read in upper case and closes.
// - anything else: 403, no upgrade.
// Every upgrade request's headers are kept in `requests`; `open` counts upgraded connections.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
pub(super) struct UpgradeState {
    pub requests: Mutex<Vec<hyper::HeaderMap>>,
    pub open: AtomicUsize,
}

pub(super) struct UpgradeUpstream {
    pub url: String,
    pub state: Arc<UpgradeState>,
    stop: CancellationToken,
}

impl UpgradeUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(UpgradeState::default());
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
                    let service = service_fn(move |req| upgrade_handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self { url, state, stop }
    }

    pub fn open(&self) -> usize {
        self.state.open.load(SeqCst)
    }

    /// The headers of the last upgrade request.
    pub fn last_request(&self) -> hyper::HeaderMap {
        self.state.requests.lock().unwrap().last().unwrap().clone()
    }
}

impl Drop for UpgradeUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Counts an upgraded connection of the upstream while it lives.
struct Open(Arc<UpgradeState>);

impl Open {
    fn new(state: Arc<UpgradeState>) -> Self {
        state.open.fetch_add(1, SeqCst);
        Self(state)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, SeqCst);
    }
}

fn switching(protocol: &'static str) -> Response<UpBody> {
    let mut response = reply(101, "");
    let headers = response.headers_mut();
    headers.insert("connection", "upgrade".parse().unwrap());
    headers.insert("upgrade", protocol.parse().unwrap());
    response
}

async fn upgrade_handle(
    state: Arc<UpgradeState>,
    mut req: Request<Incoming>,
) -> Result<Response<UpBody>, std::io::Error> {
    let path = req.uri().path().to_owned();
    if path == "/health/ready" {
        return Ok(reply(200, ""));
    }
    if path != "/ws" && path != "/raw" {
        return Ok(reply(403, "no"));
    }
    state.requests.lock().unwrap().push(req.headers().clone());
    let upgrade = hyper::upgrade::on(&mut req);
    if path == "/ws" {
        let Some(key) = req.headers().get("sec-websocket-key") else {
            return Ok(reply(400, "not a websocket handshake"));
        };
        let accept = derive_accept_key(key.as_bytes());
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let _open = Open::new(state);
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(message)) = ws.next().await {
                if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                    break;
                }
            }
        });
        let mut response = switching("websocket");
        response
            .headers_mut()
            .insert("sec-websocket-accept", accept.parse().unwrap());
        return Ok(response);
    }
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let _open = Open::new(state);
        let mut io = TokioIo::new(upgraded);
        let mut received = Vec::new();
        if io.read_to_end(&mut received).await.is_ok() {
            let _ = io.write_all(&received.to_ascii_uppercase()).await;
            let _ = io.shutdown().await;
        }
    });
    Ok(switching("x-echo"))
}

/// A WebSocket client connected through the proxy at `addr`.
async fn ws_connect(addr: SocketAddr) -> WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, response) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// Sends `message` and returns the next message received.
async fn echo<S>(ws: &mut WebSocketStream<S>, message: Message) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(message).await.unwrap();
    within("the echo", ws.next()).await.unwrap().unwrap()
}

/// Sends `text` and returns the next message received, as text.
async fn say<S>(ws: &mut WebSocketStream<S>, text: impl Into<String>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let answer = echo(ws, Message::text(text.into())).await;
    answer.into_text().unwrap().to_string()
}

/// Resolves when the proxy has closed the WebSocket (a close, an error or the end).
async fn closed<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = ws.next().await {
        assert!(message.is_close(), "unexpected message {message:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy_counts_in_flight_and_holds_a_drain() {
    let up = UpgradeUpstream::start().await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let mut ws = ws_connect(proxy.addr).await;

    assert_eq!(say(&mut ws, "hello").await, "hello");
    let big: Vec<u8> = pattern_at(0, CHUNK)
        .iter()
        .copied()
        .cycle()
        .take(300_000)
        .collect();
    assert_eq!(
        echo(&mut ws, Message::binary(big.clone())).await,
        Message::binary(big)
    );

    // The same header rules as any request, plus the upgrade itself.
    let seen = up.last_request();
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["connection"], "upgrade");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["host"], proxy.addr.to_string());
    assert_eq!(seen["x-request-id"].len(), 32);

    // Open, it is a request in flight: on its upstream, in the gauge, in /status.
    assert_eq!(proxy.upstream(&up.url).in_flight, 1);
    let metrics = proxy.proxy.render_metrics();
    assert_eq!(
        sample(&metrics, "taskd_proxy_in_flight"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "taskd_proxy_upgraded_connections"),
        Some(1.0)
    );
    let status = admin::status_document(&proxy.proxy, None);
    assert_eq!(status["connections"]["upgraded"], 1, "{status}");

    // A drain (rolling restart) waits for it.
    let drain = tokio::spawn({
        let (proxy, url) = (proxy.proxy.clone(), up.url.clone());
        async move { proxy.drain_upstream(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!drain.is_finished(), "the drain ignored an open WebSocket");
    assert_eq!(say(&mut ws, "draining").await, "draining");

    // A client closes its socket once the close handshake is done.
    ws.close(None).await.unwrap();
    closed(&mut ws).await;
    drop(ws);
    assert!(within("the drain", drain).await.unwrap());
    eventually("the upgraded connection is no longer counted", || {
        proxy.upstream(&up.url).in_flight == 0 && proxy.proxy.connections().upgraded == 0
    })
    .await;
    eventually("the upstream's side is closed", || up.open() == 0).await;
}

/// A client that closes its half still gets the answer the upstream writes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_upgrade_still_carries_the_answer() {
    let up = UpgradeUpstream::start().await;
    let proxy = TestProxy::start(config(&[&up.url])).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /raw HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: x-echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        within("the 101", stream.read_exact(&mut byte))
            .await
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: x-echo\r\n"), "{head}");
    assert!(head.contains("connection: upgrade\r\n"), "{head}");

    stream.write_all(b"hello through ").await.unwrap();
    stream.write_all(b"the proxy").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    within("the answer and the end", stream.read_to_end(&mut answer))
        .await
        .unwrap();
    assert_eq!(answer, b"HELLO THROUGH THE PROXY");
    eventually("nothing left in flight", || {
        proxy.upstream(&up.url).in_flight == 0
    })
    .await;
}

/// An upgrade the upstream does not take is an ordinary answer; the upgrade headers reach it
/// and the client's hop-by-hop headers do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_upstream_refuses_is_an_ordinary_answer() {
    let up = UpgradeUpstream::start().await;
    let echo_up = TestUpstream::start("plain").await;
    let refusing = TestProxy::start(config(&[&up.url])).await;
    let mut stream = TcpStream::connect(refusing.addr).await.unwrap();
    stream
        .write_all(
            b"GET /refuse HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    within("the answer", stream.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 403");
    eventually("nothing left in flight", || {
        refusing.upstream(&up.url).in_flight == 0
    })
    .await;

    let proxy = TestProxy::start(config(&[&echo_up.url])).await;
    let request = Request::get("/echo")
        .header("connection", "keep-alive, Upgrade, x-private")
        .header("upgrade", "websocket")
        .header("x-private", "hop")
        .header("keep-alive", "timeout=5")
        .header("x-forwarded-for", "6.6.6.6")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = send_h1(proxy.addr, request).await;
    assert_eq!(response.status(), 200);
    let echo: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen(&echo, "upgrade"), ["websocket"]);
    assert_eq!(seen(&echo, "connection"), ["upgrade"]);
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);
    assert!(seen(&echo, "x-private").is_empty(), "{echo}");
    assert!(seen(&echo, "keep-alive").is_empty(), "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upgraded_connection_is_closed_and_a_busy_one_is_not() {
    let up = UpgradeUpstream::start().await;
    let mut config = config(&[&up.url]);
    config.upgrade_idle_timeout = Duration::from_millis(500);
    let proxy = TestProxy::start(config).await;

    // Busy: a message every 150 ms for 1.2 s, well past the idle timeout.
    let mut busy = ws_connect(proxy.addr).await;
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let text = format!("tick {i}");
        assert_eq!(say(&mut busy, text.clone()).await, text);
    }
    // Then idle: closed after the timeout.
    let idle_from = Instant::now();
    within("the idle connection to close", closed(&mut busy)).await;
    assert_took(idle_from.elapsed(), 500);
    eventually("nothing left in flight", || {
        proxy.upstream(&up.url).in_flight == 0 && proxy.proxy.connections().open == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_upgraded_connections_then_closes_them() {
    let up = UpgradeUpstream::start().await;
    let mut config = config(&[&up.url]);
    config.shutdown_timeout = Duration::from_secs(1);
    let mut proxy = TestProxy::start(config.clone()).await;
    let mut ws = ws_connect(proxy.addr).await;
    assert_eq!(say(&mut ws, "before").await, "before");

    let cancelled = Instant::now();
    proxy.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still open while the proxy drains.
    assert_eq!(say(&mut ws, "during").await, "during");
    let serve = proxy.serve.take().unwrap();
    assert!(!serve.is_finished(), "serve returned with a WebSocket open");
    within("serve to return", serve).await.unwrap().unwrap();
    assert_took(cancelled.elapsed(), 1000);
    within("the WebSocket to be closed", closed(&mut ws)).await;

    // One that closes during the grace period ends it early.
    config.shutdown_timeout = Duration::from_secs(8);
    let mut proxy = TestProxy::start(config).await;
    let mut ws = ws_connect(proxy.addr).await;
    assert_eq!(say(&mut ws, "hi").await, "hi");
    proxy.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.close(None).await.unwrap();
    closed(&mut ws).await;
    drop(ws);
    let closed_at = Instant::now();
    within("serve to return", proxy.serve.take().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        closed_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        closed_at.elapsed()
    );
}
