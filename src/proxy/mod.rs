//! The load balancer (`taskd proxy`, and inside `taskd serve`): HTTP/1.1 and h2c from clients,
//! HTTPS (h2 and HTTP/1.1) when `[proxy.tls]` is on, pooled HTTP/1.1 keep-alive connections to
//! upstream workers.
//!
//! # Layout
//!
//! - [`Proxy`]: the upstream set and the interface the supervisor drives (add, drain, remove,
//!   reload).
//! - [`listen`]: the listening sockets, each thread's accept loop, one client connection's life.
//! - [`tls`]: the HTTPS listener's certificate, reloaded in place; the redirect to HTTPS.
//! - [`forward`]: one request: header rules, choosing an upstream, retries, own errors.
//! - [`upgrade`]: WebSocket and other HTTP/1.1 upgrades, bytes copied both ways.
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
pub(crate) mod listen;
pub(crate) mod metrics;
pub(crate) mod tls;
pub(crate) mod upgrade;
pub mod upstream;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ProxyConfig, Strategy, parse_upstream_url};

pub use self::listen::Listeners;
use self::{
    metrics::ProxyMetrics,
    tls::Certificates,
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
    /// `proxy.max_connections` as the semaphore holds it (at most its maximum).
    max_connections: usize,
    /// Request-body bytes held in memory for retries right now, all requests together.
    buffered: Arc<AtomicU64>,
    /// HTTPS, when `[proxy.tls]` is on.
    tls: Option<TlsState>,
    /// The HTTPS listener's port, for `proxy.tls.redirect_http` (known once it is bound).
    https_port: AtomicU16,
}

/// The HTTPS side of the proxy.
struct TlsState {
    certificates: Arc<Certificates>,
    acceptor: tokio_rustls::TlsAcceptor,
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

/// Client connections as `/status` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsStatus {
    /// Client connections open now (HTTPS ones from the start of their handshake).
    pub open: usize,
    /// `proxy.max_connections`: past it, accepting pauses until one closes.
    pub max: usize,
    /// Of the open ones, those upgraded (WebSocket and other `Upgrade`s).
    pub upgraded: u64,
}

/// The HTTPS listener's certificate as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsStatus {
    pub subject: String,
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
    /// Reloads that replaced the certificate, and those that kept it (the new one failed).
    pub reloads: u64,
    pub reload_failures: u64,
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
        let max_connections = config
            .max_connections
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let tls = match config.tls.files() {
            None => None,
            Some(_) => {
                let certificates = Certificates::new(&config.tls)?;
                let acceptor = tokio_rustls::TlsAcceptor::from(certificates.server_config());
                Some(TlsState {
                    certificates,
                    acceptor,
                })
            }
        };
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
                connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
                max_connections,
                buffered: Arc::default(),
                tls,
                https_port: AtomicU16::new(0),
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

    /// Client connections open now, and the cap.
    pub fn connections(&self) -> ConnectionsStatus {
        let max = self.shared.max_connections;
        ConnectionsStatus {
            open: max.saturating_sub(self.shared.connections.available_permits()),
            max,
            upgraded: self.shared.metrics.upgraded.load(Relaxed),
        }
    }

    /// The certificate the HTTPS listener presents; `None` when HTTPS is off.
    pub fn tls(&self) -> Option<TlsStatus> {
        let tls = self.shared.tls.as_ref()?;
        let current = tls.certificates.current();
        Some(TlsStatus {
            subject: current.subject.clone(),
            serial: current.serial.clone(),
            not_after: chrono::DateTime::from_timestamp(current.not_after, 0)
                .map_or_else(String::new, |t| t.to_rfc3339()),
            reloads: tls.certificates.reloads.load(Relaxed),
            reload_failures: tls.certificates.reload_failures.load(Relaxed),
        })
    }

    /// Re-reads in place what the proxy takes from files: today the TLS certificate and key
    /// (`[proxy.tls]`); the rest of `[proxy]` is fixed for the proxy's life (a full reload is
    /// issue 22). Connections, open or being set up, are not touched. Called on SIGHUP, by
    /// `taskd proxy` and `taskd serve`. False when a file did not load (the current
    /// certificate is kept and the error logged).
    pub fn reload(&self, why: &str) -> bool {
        match &self.shared.tls {
            Some(tls) => tls.certificates.reload(why).is_ok(),
            None => {
                tracing::info!(reason = why, "nothing to reload: HTTPS is off");
                true
            }
        }
    }

    /// The proxy's counters in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let mut text = self.shared.metrics.render(&self.shared.upstreams.load());
        let tls = self.shared.tls.as_ref().map(|tls| {
            let current = tls.certificates.current();
            metrics::TlsGauges {
                not_after: current.not_after,
                reloads: tls.certificates.reloads.load(Relaxed),
                reload_failures: tls.certificates.reload_failures.load(Relaxed),
            }
        });
        let connections = self.connections();
        self.shared
            .metrics
            .render_edge(&mut text, connections.open, connections.max, tls);
        text
    }

    /// Serves clients on `listeners` (one per thread, see [`Listeners::bind`]; with HTTPS sockets
    /// too, [`Listeners::bind_tls`], exactly when `[proxy.tls]` is on) until `shutdown` is
    /// cancelled, then stops accepting and lets in-flight requests finish for up to
    /// `proxy.shutdown_timeout`. Meanwhile watches the TLS files for changes.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Listeners { plain, tls, .. } = listeners;
        let mut tls_sockets = match (tls, &self.shared.tls) {
            (Some((sockets, addr)), Some(state)) => {
                self.shared.https_port.store(addr.port(), Relaxed);
                tokio::spawn(state.certificates.clone().watch(shutdown.clone()));
                sockets.into_iter().map(Some).collect()
            }
            (None, None) => Vec::new(),
            (Some(_), None) => anyhow::bail!("HTTPS sockets given, but proxy.tls is off"),
            (None, Some(_)) => anyhow::bail!("proxy.tls is on, but no HTTPS sockets were bound"),
        };
        tls_sockets.resize_with(plain.len(), || None);
        let mut threads = Vec::new();
        for (slot, (listener, tls_listener)) in plain.into_iter().zip(tls_sockets).enumerate() {
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
                            runtime.block_on(listen::accept_loop(
                                listener,
                                tls_listener,
                                shared,
                                shutdown,
                            ));
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

/// `taskd proxy`: the load balancer alone, with its admin listener. SIGHUP reloads what
/// [`Proxy::reload`] can.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Before anything else: SIGHUP's default action would end the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    if config.proxy.upstreams.is_empty() {
        anyhow::bail!("no upstreams: pass --upstream http://host:port or set proxy.upstreams");
    }
    let proxy = Proxy::new(config.proxy.clone())?;
    let listeners = bind_listeners(&config.proxy, proxy.threads())?;
    let admin = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin.listen)", config.admin.listen))?;
    tracing::info!(
        listen = %listeners.local_addr(),
        https = ?listeners.tls_addr(),
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
    watched.spawn("proxy", proxy.clone().serve(listeners, serving.clone()));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                watched.join().await;
                break Ok(());
            }
            failed = watched.first_to_end() => {
                tracing::error!("{failed:#}; stopping");
                serving.cancel();
                watched.join().await;
                break Err(failed);
            }
            _ = hangup.recv() => {
                proxy.reload("SIGHUP");
            }
        }
    }
}

/// The client listeners of `[proxy]`: `listen`, and `tls.listen` when HTTPS is on; an error
/// names the address and the key (and flag) that sets it.
pub fn bind_listeners(config: &ProxyConfig, threads: usize) -> anyhow::Result<Listeners> {
    let mut listeners = Listeners::bind(config.listen, threads).with_context(|| {
        format!(
            "cannot listen on {} (proxy.listen, --listen): port {} is in use or not available",
            config.listen,
            config.listen.port()
        )
    })?;
    if config.tls.files().is_some() {
        let addr = config.tls.listen;
        listeners.bind_tls(addr).with_context(|| {
            format!(
                "cannot listen on {addr} (proxy.tls.listen, --tls-listen): port {} is in use or \
                 not available",
                addr.port()
            )
        })?;
    }
    Ok(listeners)
}
