//! The load balancer (`taskd proxy`, and inside `taskd serve`): HTTP/1.1 and h2c from clients,
//! pooled HTTP/1.1 keep-alive connections to upstream workers.
//!
//! # Layout
//!
//! - [`Proxy`]: the upstream set and the interface the supervisor drives (add, drain, remove).
//! - [`forward`]: one request: header rules, choosing an upstream, retries, own errors.
//! - [`upstream`]: one upstream's health, counters and connection pool.
//! - [`body`]: the streamed request and response bodies.
//! - [`compress`]: responses compressed as they stream (`proxy.compression`).
//! - [`idle`]: client connections' idle and response timeouts, swept once per thread.
//! - [`admin`]: the operator listener (`/status`, `/metrics`).
//! - [`metrics`], [`error`]: counters, and the 502/503/504 answers.
//!
//! # Runtime layout
//!
//! Clients are served by `proxy.threads` threads (default one per CPU), each running its own
//! single-threaded tokio runtime and accepting on its own `SO_REUSEPORT` socket, so the kernel
//! spreads connections and a request never crosses threads: its client connection, upstream
//! connection and pool slot all live on one thread. Health checks and the admin listener run on
//! the caller's runtime.

pub mod admin;
pub(crate) mod body;
pub(crate) mod compress;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod idle;
pub(crate) mod metrics;
pub mod upstream;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use ipnet::IpNet;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ProxyConfig, Strategy, parse_upstream_url};

use self::{
    forward::Peer,
    metrics::ProxyMetrics,
    upstream::{Upstream, UpstreamState, now_ms, set_pool_slot},
};

/// State shared by every serving thread.
pub struct Shared {
    /// `[proxy]`, fixed for the proxy's life.
    config: ProxyConfig,
    /// The upstream set. Requests read it without locking; changes swap in a new list.
    upstreams: ArcSwap<Vec<Arc<Upstream>>>,
    /// Serialises changes to `upstreams` so none is lost.
    edit: Mutex<()>,
    /// Round-robin position.
    next: AtomicUsize,
    /// Counters for `/metrics`.
    metrics: ProxyMetrics,
    /// For `uptimeSeconds`.
    started: Instant,
    /// Serving threads, and so idle-connection pools per upstream.
    threads: usize,
    /// Where health checkers run (the runtime that created the proxy).
    runtime: tokio::runtime::Handle,
    /// One permit per open client connection (`proxy.max_connections`), all threads together.
    connections: Arc<tokio::sync::Semaphore>,
    /// Request-body bytes held in memory for retries right now, all requests together.
    buffered: Arc<AtomicU64>,
}

/// Most request-body bytes the proxy holds for retries at once: this many times
/// `proxy.retry_body_limit` (64 MiB by default). Past it, bodies are streamed and a request
/// that reached an upstream is not retried.
const BUFFERED_BODIES: u64 = 64;

/// Bytes of [`Shared::buffered`] taken by one request, given back when it is dropped.
pub struct BufferReservation {
    bytes: u64,
    total: Arc<AtomicU64>,
}

impl Drop for BufferReservation {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Relaxed);
    }
}

impl Shared {
    /// Takes `bytes` of the proxy-wide retry buffer, or `None` when that would go past it.
    fn reserve_buffer(&self, bytes: u64) -> Option<BufferReservation> {
        let cap = self
            .config
            .retry_body_limit
            .as_u64()
            .saturating_mul(BUFFERED_BODIES);
        self.buffered
            .fetch_update(Relaxed, Relaxed, |held| {
                held.checked_add(bytes).filter(|total| *total <= cap)
            })
            .ok()?;
        Some(BufferReservation {
            bytes,
            total: self.buffered.clone(),
        })
    }

    /// The next upstream to try: round-robin or least-connections over the available ones not
    /// tried yet; when none is available, any not draining (docs/contract.md §5: still try before a 503).
    fn pick(&self, upstreams: &[Arc<Upstream>], tried: &[usize]) -> Option<usize> {
        let n = upstreams.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let start = self.next.fetch_add(1, Relaxed);
        let open = |i: usize| !tried.contains(&i) && upstreams[i].is_available(now);
        // The turn goes round the available upstreams only: an unavailable one's share is
        // spread over all the others instead of falling to its neighbour.
        let chosen = match self.config.strategy {
            Strategy::RoundRobin => nth_of(n, start, open),
            Strategy::LeastConn => (0..n)
                .filter(|&i| open(i))
                .map(|i| upstreams[i].in_flight())
                .min()
                .and_then(|least| {
                    nth_of(n, start, |i| open(i) && upstreams[i].in_flight() == least)
                }),
        };
        chosen.or_else(|| (0..n).find(|&i| open(i))).or_else(|| {
            (0..n)
                .map(|i| (start + i) % n)
                .filter(|i| !tried.contains(i))
                .filter(|i| upstreams[*i].state(now) != UpstreamState::Draining)
                .min_by_key(|i| upstreams[*i].in_flight())
        })
    }

    fn record_failure(&self, upstream: &Upstream, reason: &str) {
        let passive = &self.config.passive;
        if upstream.record_failure(passive.max_fails, passive.fail_timeout) {
            tracing::warn!(
                upstream = %upstream.url,
                reason,
                for_ = %humantime::format_duration(passive.fail_timeout),
                "upstream ejected after {} failures",
                passive.max_fails
            );
        } else {
            tracing::debug!(upstream = %upstream.url, reason, "upstream try failed");
        }
    }

    fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config
            .trusted_proxies
            .iter()
            .any(|net: &IpNet| net.contains(&ip))
    }
}

/// The `start`-th (modulo their number) of the indices below `n` that `keep` accepts; no
/// allocation.
fn nth_of(n: usize, start: usize, keep: impl Fn(usize) -> bool) -> Option<usize> {
    let count = (0..n).filter(|&i| keep(i)).count();
    if count == 0 {
        return None;
    }
    (0..n).filter(|&i| keep(i)).nth(start % count)
}

/// One upstream as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    pub url: String,
    pub state: UpstreamState,
    pub in_flight: usize,
    pub requests: u64,
    pub failures: u64,
    pub last_probe_ms: Option<u64>,
}

/// The load balancer. Cheap to clone; every clone drives the same upstream set.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    /// A proxy over `config.upstreams` (all presumed healthy until their checks say otherwise).
    /// Must be called inside a tokio runtime, which then runs the health checks.
    pub fn new(config: ProxyConfig) -> anyhow::Result<Self> {
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let upstreams = config.upstreams.clone();
        let config_max_connections = config
            .max_connections
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let proxy = Self {
            shared: Arc::new(Shared {
                config,
                upstreams: ArcSwap::from_pointee(Vec::new()),
                edit: Mutex::new(()),
                next: AtomicUsize::new(0),
                metrics: ProxyMetrics::default(),
                started: Instant::now(),
                threads,
                runtime: tokio::runtime::Handle::try_current()
                    .context("the proxy needs a tokio runtime")?,
                connections: Arc::new(tokio::sync::Semaphore::new(config_max_connections)),
                buffered: Arc::default(),
            }),
        };
        for url in upstreams {
            proxy
                .add_upstream(&url, true)
                .map_err(|e| anyhow::anyhow!("proxy.upstreams: {e}"))?;
        }
        Ok(proxy)
    }

    /// Threads that serve clients.
    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.shared.config
    }

    /// Adds an upstream and starts its health checks. `healthy` is its state until the checks
    /// decide (the supervisor adds workers it has already seen ready). An upstream with the same
    /// URL that is draining is replaced; one that is not is an error.
    pub fn add_upstream(&self, url: &str, healthy: bool) -> Result<(), String> {
        let url = parse_upstream_url(url)?;
        let upstream = Arc::new(Upstream::new(&url, healthy, self.shared.threads));
        {
            let _edit = self.shared.edit.lock().unwrap_or_else(|e| e.into_inner());
            let current = self.shared.upstreams.load();
            let now = now_ms();
            if current
                .iter()
                .any(|u| *u.url == *url && u.state(now) != UpstreamState::Draining)
            {
                return Err(format!("{url} is already an upstream"));
            }
            let mut next: Vec<_> = current
                .iter()
                .filter(|u| {
                    let replaced = *u.url == *url;
                    if replaced {
                        u.removed.cancel();
                    }
                    !replaced
                })
                .cloned()
                .collect();
            next.push(upstream.clone());
            self.shared.upstreams.store(Arc::new(next));
        }
        tracing::info!(upstream = %url, healthy, "upstream added");
        self.shared
            .runtime
            .spawn(health_checks(self.shared.clone(), upstream));
        Ok(())
    }

    /// Removes an upstream at once; requests in flight on it still finish. False when unknown.
    pub fn remove_upstream(&self, url: &str) -> bool {
        let url = parse_upstream_url(url).unwrap_or_else(|_| url.to_owned());
        let _edit = self.shared.edit.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.shared.upstreams.load();
        let Some(gone) = current.iter().find(|u| *u.url == *url).cloned() else {
            return false;
        };
        gone.removed.cancel();
        gone.prune_idle(Duration::ZERO);
        let next: Vec<_> = current
            .iter()
            .filter(|u| !Arc::ptr_eq(u, &gone))
            .cloned()
            .collect();
        self.shared.upstreams.store(Arc::new(next));
        tracing::info!(upstream = %url, "upstream removed");
        true
    }

    /// Stops sending new requests to an upstream and waits until the ones in flight have
    /// finished (response bodies included), for at most `proxy.shutdown_timeout`. False when unknown. The upstream stays listed as
    /// `draining` until it is removed.
    pub async fn drain_upstream(&self, url: &str) -> bool {
        let url = parse_upstream_url(url).unwrap_or_else(|_| url.to_owned());
        let Some(upstream) = self
            .shared
            .upstreams
            .load()
            .iter()
            .find(|u| *u.url == *url)
            .cloned()
        else {
            return false;
        };
        upstream.set_draining();
        tracing::info!(upstream = %url, in_flight = upstream.in_flight(), "upstream draining");
        // Bounded whatever clients do: a reader that stopped cannot hold a rolling restart.
        let grace = self.shared.config.shutdown_timeout;
        if tokio::time::timeout(grace, upstream.drained())
            .await
            .is_err()
        {
            tracing::warn!(
                upstream = %url,
                in_flight = upstream.in_flight(),
                "requests still in flight after the shutdown timeout; draining anyway"
            );
        }
        upstream.prune_idle(Duration::ZERO);
        true
    }

    /// Every upstream, in the order they were added.
    pub fn upstreams(&self) -> Vec<UpstreamStatus> {
        let now = now_ms();
        self.shared
            .upstreams
            .load()
            .iter()
            .map(|u| UpstreamStatus {
                url: u.url.to_string(),
                state: u.state(now),
                in_flight: u.in_flight(),
                requests: u.requests.load(Relaxed),
                failures: u.failures.load(Relaxed),
                last_probe_ms: u.last_probe_ms(),
            })
            .collect()
    }

    /// Seconds since the proxy started.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The proxy's counters in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        self.shared.metrics.render(&self.shared.upstreams.load())
    }

    /// Serves clients on `listeners` (one per thread, see [`Listeners::bind`]) until `shutdown`
    /// is cancelled, then stops accepting and lets in-flight requests finish for up to
    /// `proxy.shutdown_timeout`.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut threads = Vec::new();
        for (slot, listener) in listeners.sockets.into_iter().enumerate() {
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("taskd-proxy-{slot}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            set_pool_slot(slot);
                            runtime.block_on(accept_loop(listener, shared, shutdown));
                        }
                        Err(error) => tracing::error!(%error, "cannot start a proxy thread"),
                    }
                    let _ = done.send(());
                })
                .context("spawning a proxy thread")?;
            threads.push(finished);
        }
        for finished in threads {
            let _ = finished.await;
        }
        for upstream in self.shared.upstreams.load().iter() {
            upstream.removed.cancel();
        }
        tracing::info!("proxy stopped");
        Ok(())
    }
}

/// The client-facing sockets: one per serving thread, all on the same address.
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    addr: SocketAddr,
}

impl Listeners {
    /// Binds `count` `SO_REUSEPORT` sockets to `addr` (port 0 picks one free port for all).
    /// Fails with `AddrInUse` when anything else holds the port, even another process that
    /// uses `SO_REUSEPORT` itself.
    pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Self> {
        use socket2::{Domain, Socket, Type};
        // An exclusive bind first: with SO_REUSEPORT alone, a second taskd on the same port would
        // silently share it.
        let exclusive = std::net::TcpListener::bind(addr)?;
        let addr = exclusive.local_addr()?;
        drop(exclusive);
        let mut sockets = Vec::with_capacity(count);
        for _ in 0..count.max(1) {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.set_tcp_nodelay(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            sockets.push(socket.into());
        }
        Ok(Self { sockets, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Accepts and serves client connections on one thread until shutdown.
async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "cannot register the proxy listener");
            return;
        }
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper timer for HTTP/1: the sweeper below closes connections idle for `idle_timeout`
    // (waiting for a request or for the rest of its headers) without a timer per request.
    builder
        .http2()
        // Each stream may hold an upstream request and a body buffer: fewer than hyper's 200.
        .max_concurrent_streams(64)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(shared.config.idle_timeout / 2));
    let graceful = GracefulShutdown::new();
    let mut sweeper = idle::Sweeper::new(
        shared.config.idle_timeout,
        shared.config.response_timeout,
        shared.config.write_timeout,
    );
    let mut sweeps = tokio::time::interval(sweeper.period());
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'accept: loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = sweeps.tick() => {
                sweeper.sweep();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before accept: back off
                    // briefly rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Then a connection slot (`proxy.max_connections`), before the next accept: past the
        // limit, one connection per serving thread waits here and the rest in the kernel's
        // backlog. (A slot taken before accepting would sit idle in a thread whose socket gets
        // no connection while another thread's connections wait.) Sweeps go on meanwhile;
        // they are what frees slots.
        let permit = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'accept,
                _ = sweeps.tick() => sweeper.sweep(),
                permit = shared.connections.clone().acquire_owned() => match permit {
                    Ok(permit) => break permit,
                    Err(_) => break 'accept,
                },
            }
        };
        let _ = stream.set_nodelay(true);
        let peer = Peer::new(peer.ip(), shared.is_trusted(peer.ip()));
        let shared = shared.clone();
        let watch = sweeper.watch();
        let requests = watch.clone();
        let service = service_fn(move |request| {
            let shared = shared.clone();
            let peer = peer.clone();
            let busy = requests.begin();
            async move {
                let response = forward::handle(shared, request, &peer, busy.watch()).await;
                Ok::<_, Infallible>(response.map(|body| idle::BusyBody::new(body, busy)))
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                biased;
                ended = connection => if let Err(error) = ended {
                    tracing::debug!(%error, "client connection ended with an error");
                },
                // Idle for `idle_timeout` with nothing in flight: dropping it closes it.
                () = watch.closed() => {}
            }
        });
    }
    drop(listener);
    let drained = graceful.shutdown();
    let deadline = tokio::time::sleep(shared.config.shutdown_timeout);
    tokio::pin!(drained, deadline);
    loop {
        tokio::select! {
            () = &mut drained => break,
            () = &mut deadline => {
                tracing::warn!("requests still in flight after the shutdown timeout; closing them");
                break;
            }
            // Requests finishing meanwhile still have their response timeout.
            _ = sweeps.tick() => sweeper.sweep(),
        }
    }
}

/// Probes one upstream every `health.interval` (plus up to 10 % jitter, so checks of many
/// proxies do not fall in step) until it is removed; also closes its stale idle connections.
async fn health_checks(shared: Arc<Shared>, upstream: Arc<Upstream>) {
    let health = &shared.config.health;
    loop {
        let started = Instant::now();
        let ok = upstream.probe(&health.path, health.timeout).await;
        match upstream.record_probe(ok, started.elapsed(), health.rise, health.fall) {
            Some(true) => tracing::info!(upstream = %upstream.url, "upstream healthy"),
            Some(false) => tracing::warn!(
                upstream = %upstream.url,
                "upstream unhealthy: {} failed checks of {}",
                health.fall,
                health.path
            ),
            None => {}
        }
        upstream.prune_idle(shared.config.idle_timeout);
        let jitter = health.interval.mul_f64(rand::random::<f64>() * 0.1);
        tokio::select! {
            _ = upstream.removed.cancelled() => break,
            _ = tokio::time::sleep(health.interval + jitter) => {}
        }
    }
    upstream.prune_idle(Duration::ZERO);
}

/// `taskd proxy`: the load balancer alone, with its admin listener.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config.proxy.upstreams.is_empty() {
        anyhow::bail!("no upstreams: pass --upstream http://host:port or set proxy.upstreams");
    }
    let proxy = Proxy::new(config.proxy.clone())?;
    let listeners = Listeners::bind(config.proxy.listen, proxy.threads())
        .with_context(|| format!("cannot listen on {} (proxy.listen)", config.proxy.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin.listen)", config.admin.listen))?;
    tracing::info!(
        listen = %listeners.local_addr(),
        admin = %config.admin.listen,
        upstreams = ?config.proxy.upstreams,
        strategy = config.proxy.strategy.as_str(),
        threads = proxy.threads(),
        "proxy listening"
    );
    // Each stops on `shutdown`, or when the other one ends: a proxy whose admin listener died
    // cannot be watched, and an admin listener alone serves nobody.
    let serving = shutdown.child_token();
    let mut watched = crate::shutdown::Watched::default();
    watched.spawn(
        "admin listener",
        admin::serve(admin, admin::router(proxy.clone(), None), serving.clone()),
    );
    watched.spawn("proxy", proxy.serve(listeners, serving.clone()));
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            watched.join().await;
            Ok(())
        }
        failed = watched.first_to_end() => {
            tracing::error!("{failed:#}; stopping");
            serving.cancel();
            watched.join().await;
            Err(failed)
        }
    }
}
