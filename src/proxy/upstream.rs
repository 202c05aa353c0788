//! One upstream: its address, health, counters and keep-alive connection pool.
//!
//! Everything a request touches is an atomic or a per-thread, almost never contended mutex,
//! so the request path takes no shared lock.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{
            AtomicBool, AtomicU32, AtomicU64, AtomicUsize,
            Ordering::{Relaxed, SeqCst},
        },
    },
    time::{Duration, Instant},
};

use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::Notify};
use tokio_util::sync::CancellationToken;

use super::{clock::now_ms, outgoing::UpstreamBody};
use crate::health::Consecutive;

/// What the balancer may do with an upstream, as `/status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamState {
    /// Takes requests.
    Healthy,
    /// Failing its active health checks; used only when nothing is healthy.
    Unhealthy,
    /// Taken out for `fail_timeout` after `max_fails` failed requests.
    Ejected,
    /// Finishing its in-flight requests; gets no new ones.
    Draining,
}

/// Where an upstream came from, which decides what may change or remove it: a reload only
/// reconciles the configured ones, DNS discovery only its own, and the admin routes leave the
/// supervisor's workers alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Origin {
    /// `proxy.upstreams` (or `--upstream`).
    Config,
    /// An address of this `proxy.upstream_dns` name.
    Dns(Arc<str>),
    /// Added through the admin listener's `POST /upstreams`.
    Admin,
    /// A worker of `taskd serve`.
    Supervisor,
}

/// How an upstream joins the proxy.
#[derive(Debug, Clone)]
pub struct Joining {
    pub weight: u32,
    pub origin: Origin,
    /// Its state until the active checks decide.
    pub healthy: bool,
    /// Ramp its share up over this long (zero: full share at once).
    pub slow_start: Duration,
}

impl Joining {
    /// A worker of `taskd serve`, or an upstream of the configuration at start: full weight 1,
    /// no ramp.
    pub fn at_once(origin: Origin, healthy: bool) -> Self {
        Self {
            weight: 1,
            origin,
            healthy,
            slow_start: Duration::ZERO,
        }
    }
}

thread_local! {
    /// Which idle-connection pool this thread uses: each serving thread has its own, so a
    /// pooled connection is always driven by the runtime that reuses it.
    static POOL_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Binds the current thread to pool slot `slot` (called once by each serving thread).
pub fn set_pool_slot(slot: usize) {
    POOL_SLOT.with(|s| s.set(slot));
}

/// A connection to an upstream that is waiting for its next request.
struct IdleConn {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// Failures of real requests counted toward ejection.
#[derive(Default)]
struct FailWindow {
    started_ms: u64,
    count: u32,
}

/// One upstream worker.
pub struct Upstream {
    /// `http://host:port`, as configured; the key for add/remove/drain and in `/status`.
    pub url: Arc<str>,
    /// `host:port`, resolved on each new connection when it is not an IP literal.
    authority: String,
    /// `authority` as a `Host` header, for requests that arrived without one.
    pub(super) host_header: hyper::header::HeaderValue,
    /// The address when the host is an IP literal (no resolution needed).
    addr: Option<SocketAddr>,
    /// Share of requests relative to the others (`weight=N`); a reload may change it.
    weight: AtomicU32,
    /// Who added it.
    pub origin: Origin,
    /// `now_ms()` until which its share ramps up (slow start), and when the ramp began; both
    /// 0 without one.
    ramp_until_ms: u64,
    ramp_from_ms: u64,
    /// Set before the upstream is stopped or removed: no new requests.
    draining: AtomicBool,
    /// `now_ms()` when the drain began (0 while not draining), for `/status`.
    draining_since_ms: AtomicU64,
    /// `now_ms()` until which the upstream is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Requests sent and not yet finished (response body included); what `least_conn` compares
    /// and what a drain waits for.
    in_flight: AtomicUsize,
    /// Woken whenever `in_flight` drops to zero.
    idle_notify: Notify,
    /// Requests forwarded (each try counts).
    pub(super) requests: AtomicU64,
    /// Tries that failed at the transport level (refused, reset, timed out).
    pub(super) failures: AtomicU64,
    /// Times the upstream was ejected.
    pub(super) ejections: AtomicU64,
    /// Duration of the last active probe, in milliseconds (`u64::MAX` before the first).
    last_probe_ms: AtomicU64,
    /// Active health: consecutive passing and failing probes, rise/fall.
    health: Consecutive,
    /// Woken when the upstream is ejected (active or passive), for the requests waiting on it
    /// that may be sent elsewhere (`proxy.retry_after_ejection`).
    ejected: Notify,
    /// Failed requests within the current `fail_timeout` window.
    fail_window: Mutex<FailWindow>,
    /// Idle keep-alive connections, one pool per serving thread.
    idle: Box<[Mutex<Vec<IdleConn>>]>,
    /// Responses by status code.
    pub(super) statuses: StatusCounts,
    /// Stops this upstream's health checker when it is removed.
    pub(super) removed: CancellationToken,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("url", &self.url).finish()
    }
}

/// Why a connection to an upstream could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

impl Upstream {
    /// A new upstream for a URL already checked by [`crate::config::parse_upstream_url`].
    pub fn new(url: &str, joining: Joining, pool_slots: usize) -> Self {
        let authority = url.trim_start_matches("http://").to_owned();
        let addr = authority.parse().ok();
        let now = now_ms();
        let ramp = joining.slow_start.as_millis() as u64;
        Self {
            url: url.into(),
            host_header: hyper::header::HeaderValue::from_str(&authority)
                .expect("a checked URL's authority is a valid header"),
            authority,
            addr,
            weight: AtomicU32::new(joining.weight.max(1)),
            origin: joining.origin,
            ramp_until_ms: if ramp > 0 { now + ramp } else { 0 },
            ramp_from_ms: if ramp > 0 { now } else { 0 },
            draining: AtomicBool::new(false),
            draining_since_ms: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_notify: Notify::new(),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            last_probe_ms: AtomicU64::new(u64::MAX),
            health: Consecutive::new(joining.healthy),
            ejected: Notify::new(),
            fail_window: Mutex::new(FailWindow::default()),
            idle: (0..pool_slots.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            statuses: StatusCounts::default(),
            removed: CancellationToken::new(),
        }
    }

    /// The state the balancer acts on.
    pub fn state(&self, now: u64) -> UpstreamState {
        if self.draining.load(Relaxed) {
            UpstreamState::Draining
        } else if self.ejected_until.load(Relaxed) > now {
            UpstreamState::Ejected
        } else if self.health.is_up() {
            UpstreamState::Healthy
        } else {
            UpstreamState::Unhealthy
        }
    }

    /// Its share at `now` in thousandths of its weight's worth: `weight × 1000`, or during a
    /// slow start a part of it growing from a tenth to all of it. Never 0.
    pub fn effective_weight(&self, now: u64) -> u64 {
        let full = u64::from(self.weight()) * 1000;
        if now >= self.ramp_until_ms {
            return full;
        }
        let span = (self.ramp_until_ms - self.ramp_from_ms).max(1);
        let done = now.saturating_sub(self.ramp_from_ms);
        (full / 10 + full * 9 / 10 * done / span).max(1)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Relaxed);
    }

    /// Whether its share is still ramping up at `now`.
    pub fn is_ramping(&self, now: u64) -> bool {
        now < self.ramp_until_ms
    }

    /// How long it has been draining, while it is.
    pub fn draining_for_ms(&self, now: u64) -> Option<u64> {
        match self.draining_since_ms.load(Relaxed) {
            0 => None,
            since => Some(now.saturating_sub(since)),
        }
    }

    /// Whether the balancer should send new requests here.
    pub fn is_available(&self, now: u64) -> bool {
        self.state(now) == UpstreamState::Healthy
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    pub fn last_probe_ms(&self) -> Option<u64> {
        match self.last_probe_ms.load(Relaxed) {
            u64::MAX => None,
            ms => Some(ms),
        }
    }

    /// Counts a request as started; the guard ends it.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        // SeqCst pairs with `set_draining` + `drained`: either the drain sees this request in
        // flight, or the request sees the drain (`is_draining`) and goes elsewhere.
        self.in_flight.fetch_add(1, SeqCst);
        self.requests.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    pub fn set_draining(&self) {
        let _ = self
            .draining_since_ms
            .compare_exchange(0, now_ms(), Relaxed, Relaxed);
        self.draining.store(true, SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(SeqCst)
    }

    /// Waits until no request is in flight.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle_notify.notified();
            if self.in_flight.load(SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Records a transport failure of a real request; ejects the upstream after `max_fails`
    /// of them within `fail_timeout`. Returns true when this failure ejected it.
    pub fn record_failure(&self, max_fails: u32, fail_timeout: Duration) -> bool {
        self.failures.fetch_add(1, Relaxed);
        if max_fails == 0 {
            return false;
        }
        let now = now_ms();
        let window = fail_timeout.as_millis() as u64;
        let mut fails = self.fail_window.lock().unwrap_or_else(|e| e.into_inner());
        if fails.count == 0 || now.saturating_sub(fails.started_ms) > window {
            fails.started_ms = now;
            fails.count = 0;
        }
        fails.count += 1;
        if fails.count < max_fails || self.ejected_until.load(Relaxed) > now {
            return false;
        }
        fails.count = 0;
        self.ejected_until.store(now + window, Relaxed);
        // The active checker must see `rise` fresh passes before it may end the ejection early.
        self.health.restart_passes();
        self.ejections.fetch_add(1, Relaxed);
        drop(fails);
        self.on_ejection();
        true
    }

    /// What an ejection does besides taking the upstream out of rotation: requests waiting on
    /// it learn of it, and its idle connections (likely to a dead host) are closed.
    fn on_ejection(&self) {
        self.ejected.notify_waiters();
        self.prune_idle(Duration::ZERO);
    }

    /// Completes when this upstream is next ejected. Call [`Notified::enable`] on it before
    /// relying on it: only then does an ejection that happens before its first poll count.
    pub fn ejection(&self) -> tokio::sync::futures::Notified<'_> {
        self.ejected.notified()
    }

    /// Records the outcome of an active probe. Returns the new health when it flipped.
    pub fn record_probe(&self, ok: bool, took: Duration, rise: u32, fall: u32) -> Option<bool> {
        self.last_probe_ms.store(took.as_millis() as u64, Relaxed);
        let flipped = self.health.record(ok, rise, fall);
        if flipped == Some(false) {
            self.on_ejection();
        }
        if ok && self.health.passes() >= rise {
            // Recovered for long enough: an ejection may end before `fail_timeout`.
            self.ejected_until.store(0, Relaxed);
        }
        flipped
    }

    /// Takes an idle connection of this thread's pool, newest first, dropping stale ones.
    pub fn checkout(&self, idle_timeout: Duration) -> Option<SendRequest<UpstreamBody>> {
        let slot = POOL_SLOT.with(|s| s.get()) % self.idle.len();
        let mut idle = self.idle[slot].lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Returns a connection whose last response has been read completely.
    pub fn checkin(&self, sender: SendRequest<UpstreamBody>, max_idle: usize) {
        // `max_idle_per_upstream = 0`: no connection is kept, every request opens its own.
        if max_idle == 0 || sender.is_closed() || self.removed.is_cancelled() {
            return;
        }
        let slot = POOL_SLOT.with(|s| s.get()) % self.idle.len();
        let mut idle = self.idle[slot].lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= max_idle {
            // Keep the newest: the oldest is the likeliest to have been closed by the upstream.
            idle.remove(0);
        }
        idle.push(IdleConn {
            sender,
            since: Instant::now(),
        });
    }

    /// Closes idle connections unused for `idle_timeout`, and all of them once removed.
    pub fn prune_idle(&self, idle_timeout: Duration) {
        let removed = self.removed.is_cancelled();
        for pool in &self.idle {
            let mut idle = pool.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|c| !removed && !c.sender.is_closed() && c.since.elapsed() < idle_timeout);
        }
    }

    /// Opens a new keep-alive HTTP/1.1 connection; its driver task runs on this thread's runtime.
    pub async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<SendRequest<UpstreamBody>, ConnectError> {
        let stream = self.tcp_connect(timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "upstream connection closed");
            }
        });
        Ok(sender)
    }

    /// Opens a connection for one request that may switch protocols (`Upgrade`): never pooled,
    /// and handed over to the caller (`hyper::upgrade::on`) when the upstream answers 101.
    pub async fn connect_upgradable(
        &self,
        timeout: Duration,
    ) -> Result<SendRequest<UpstreamBody>, ConnectError> {
        let stream = self.tcp_connect(timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%error, "upstream connection closed");
            }
        });
        Ok(sender)
    }

    /// A TCP connection to the upstream. `timeout` bounds the name lookup and then each
    /// address's connect on its own, as NGINX's `proxy_connect_timeout` bounds each server of
    /// an upstream block: an address that black-holes costs one timeout, then the next is tried.
    async fn tcp_connect(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        match self.addr {
            Some(addr) => connect_any([addr], timeout).await,
            None => {
                let resolve_error = |error| ConnectError::Resolve(self.authority.clone(), error);
                let addrs = tokio::time::timeout(timeout, tokio::net::lookup_host(&self.authority))
                    .await
                    .map_err(|_| resolve_error(std::io::ErrorKind::TimedOut.into()))?
                    .map_err(resolve_error)?;
                // `localhost` is often `::1` first while the worker listens on 127.0.0.1 only.
                connect_any(addrs, timeout).await
            }
        }
    }

    /// One active probe: GET `path` on a fresh connection, passing on a 2xx within `timeout`.
    pub async fn probe(&self, path: &str, timeout: Duration) -> bool {
        let attempt = async {
            let stream = self.tcp_connect(timeout).await.ok()?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, UpstreamBody>(TokioIo::new(stream))
                    .await
                    .ok()?;
            let driver = tokio::spawn(conn);
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, &self.authority)
                .header("user-agent", "taskd-proxy-health")
                .body(UpstreamBody::empty())
                .ok()?;
            let response: hyper::Response<Incoming> = sender.send_request(request).await.ok()?;
            driver.abort();
            Some(response.status().is_success())
        };
        matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
    }
}

/// Connects to the first of `addrs` that accepts within `timeout`, trying them in order; the
/// error is the last address's.
async fn connect_any(
    addrs: impl IntoIterator<Item = SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let mut last_error = None;
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // Requests and responses are written whole; Nagle would only add latency.
                stream.set_nodelay(true)?;
                dead_peer_detection(&stream)?;
                return Ok(stream);
            }
            Ok(Err(error)) => last_error = Some(ConnectError::Io(error)),
            Err(_) => last_error = Some(ConnectError::Timeout),
        }
    }
    Err(last_error.unwrap_or_else(|| ConnectError::Io(std::io::Error::other("no addresses"))))
}

/// How long data sent to an upstream may stay unacknowledged before the kernel gives up on
/// the connection (`TCP_USER_TIMEOUT`). A worker that is merely slow acknowledges what it
/// receives, so this never cuts a slow response; it ends connections to a host that vanished.
const USER_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive probes on idle upstream connections: the first after this much silence, then
/// every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`] of them before the connection is dropped.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_PROBES: u32 = 3;

/// TCP keep-alive and `TCP_USER_TIMEOUT`, so a dead peer is noticed without traffic, and a
/// pooled connection to a host that vanished is closed, not handed to the next request.
fn dead_peer_detection(stream: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// A request in flight on an upstream; dropping it ends the request.
pub struct InFlight(Arc<Upstream>);

impl InFlight {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, SeqCst) == 1 {
            self.0.idle_notify.notify_waiters();
        }
    }
}

/// Responses by status code (100–599), one counter each.
pub struct StatusCounts(Box<[AtomicU64]>);

impl Default for StatusCounts {
    fn default() -> Self {
        Self((100..600).map(|_| AtomicU64::new(0)).collect())
    }
}

impl StatusCounts {
    pub fn record(&self, status: u16) {
        if let Some(counter) = self.0.get(usize::from(status).wrapping_sub(100)) {
            counter.fetch_add(1, Relaxed);
        }
    }

    /// `(status, count)` for every status seen.
    pub fn seen(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.0
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u16 + 100, c.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accept queue (backlog 0) is full, so a `connect` to it hangs; keep the
    /// returned sockets alive while the address is used.
    fn unanswered() -> (SocketAddr, socket2::Socket, std::net::TcpStream) {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let filler = std::net::TcpStream::connect(addr).unwrap();
        (addr, socket, filler)
    }

    /// An address nothing listens on (connects are refused at once).
    fn refused() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[tokio::test]
    async fn each_address_gets_its_own_connect_timeout() {
        let (silent, _socket, _filler) = unanswered();
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let timeout = Duration::from_millis(300);

        let started = Instant::now();
        let stream = connect_any([silent, refused(), live_addr], timeout)
            .await
            .expect("the live address was not reached");
        let took = started.elapsed();
        assert_eq!(stream.peer_addr().unwrap(), live_addr);
        assert!(stream.nodelay().unwrap());
        // One timeout for the silent address, none for the refused one.
        assert!(took >= timeout, "{took:?}");
        assert!(took < timeout * 2, "{took:?}");

        let started = Instant::now();
        let error = connect_any([refused(), silent], timeout).await.unwrap_err();
        assert!(matches!(error, ConnectError::Timeout), "{error}");
        assert!(started.elapsed() >= timeout);
        let error = connect_any([silent, refused()], timeout).await.unwrap_err();
        assert!(matches!(error, ConnectError::Io(_)), "{error}");
        let error = connect_any([], timeout).await.unwrap_err();
        assert_eq!(error.to_string(), "connect: no addresses");
    }
}
