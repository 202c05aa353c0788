//! The load balancer (`taskd proxy`, and inside `taskd serve`): HTTP/1.1 and h2c from clients,
//! HTTPS (h2 and HTTP/1.1) when `[proxy.tls]` is on, pooled HTTP/1.1 keep-alive connections to
//! upstream workers.
//!
//! # Layout
//!
//! - [`Proxy`]: the upstream set and the interface the supervisor drives (add, drain, remove);
//!   `reload.rs`: a new `[proxy]` applied in place; `balance.rs`: picking an upstream by weight;
//!   `discovery.rs`: `proxy.upstream_dns`; `control.rs`: the admin write routes;
//!   `standalone.rs`: `taskd proxy` itself.
//! - [`listen`]: the listening sockets, each thread's accept loop, one client connection's life.
//! - [`tls`]: the HTTPS listener's certificate, reloaded in place; the redirect to HTTPS.
//! - [`forward`]: one request: choosing an upstream, retries, own errors; [`headers`]: the
//!   header rules and what is known of the client.
//! - [`upgrade`]: WebSocket and other HTTP/1.1 upgrades, bytes copied both ways.
//! - [`upstream`]: one upstream's health, counters and connection pool.
//! - [`outgoing`], [`body`]: the streamed request and response bodies; `clock.rs`: the
//!   millisecond clock their stamps use.
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
mod balance;
pub(crate) mod body;
mod clock;
pub(crate) mod compress;
mod control;
mod discovery;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod headers;
pub(crate) mod idle;
pub(crate) mod listen;
pub(crate) mod metrics;
pub(crate) mod outgoing;
mod reload;
mod standalone;
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

use crate::config::{ProxyConfig, Strategy, parse_upstream, parse_upstream_url};

use self::{
    clock::now_ms,
    metrics::ProxyMetrics,
    tls::Certificates,
    upstream::{Joining, Origin, Upstream, UpstreamState, set_pool_slot},
};
pub use self::{
    listen::Listeners,
    standalone::{bind_listeners, run},
};

/// State shared by every serving thread.
pub struct Shared {
    /// `[proxy]` as last loaded; a reload ([`Proxy::reload`]) swaps in a new one.
    config: ArcSwap<ProxyConfig>,
    /// Bumped by every reload, so serving threads notice they have settings to take up.
    generation: AtomicU64,
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
    /// `admin.token`: what the admin listener's write routes want as a bearer token (empty: the
    /// routes are off).
    admin_token: ArcSwap<String>,
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

/// The settings one request reads, copied from the configuration when it starts: a reload
/// applies to the requests that start after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub retries: u32,
    pub retry_body_limit: bytesize::ByteSize,
    pub retry_after_ejection: Duration,
    pub max_idle_per_upstream: usize,
    pub upgrade_idle_timeout: Duration,
    pub compression: bool,
    pub redirect_http: bool,
}

impl Shared {
    /// The configuration as it is now (a cheap load; drop the guard before waiting on anything).
    fn config(&self) -> arc_swap::Guard<Arc<ProxyConfig>> {
        self.config.load()
    }

    /// What a request starting now reads of the configuration.
    pub(crate) fn limits(&self) -> Limits {
        let config = self.config.load();
        Limits {
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            idle_timeout: config.idle_timeout,
            body_timeout: config.body_timeout,
            retries: config.retries,
            retry_body_limit: config.retry_body_limit,
            retry_after_ejection: config.retry_after_ejection,
            max_idle_per_upstream: config.max_idle_per_upstream,
            upgrade_idle_timeout: config.upgrade_idle_timeout,
            compression: config.compression,
            redirect_http: config.tls.redirect_http,
        }
    }

    fn strategy(&self) -> Strategy {
        self.config.load().strategy
    }

    /// Bumped by each reload.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// Takes `bytes` of the proxy-wide retry buffer, or `None` when that would go past it.
    fn reserve_buffer(&self, bytes: u64) -> Option<BufferReservation> {
        let cap = self
            .config()
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

    fn record_failure(&self, upstream: &Upstream, reason: &error::UpstreamFailure) {
        let passive = self.config().passive.clone();
        if upstream.record_failure(passive.max_fails, passive.fail_timeout) {
            tracing::warn!(
                upstream = %upstream.url,
                %reason,
                for_ = %humantime::format_duration(passive.fail_timeout),
                "upstream ejected after {} failures",
                passive.max_fails
            );
        } else {
            tracing::debug!(upstream = %upstream.url, %reason, "upstream try failed");
        }
    }

    fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config()
            .trusted_proxies
            .iter()
            .any(|net: &IpNet| net.contains(&ip))
    }
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
    /// Its configured weight.
    pub weight: u32,
    /// Where it came from: `{"kind": "config"}`, `{"kind": "dns", "name": ...}`, `admin`,
    /// `supervisor`.
    pub origin: Origin,
    /// While draining: how long it has been (in-flight requests finish meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining_for_ms: Option<u64>,
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
                config: ArcSwap::from_pointee(config),
                generation: AtomicU64::new(0),
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
                admin_token: ArcSwap::from_pointee(String::new()),
                https_port: AtomicU16::new(0),
            }),
        };
        for entry in upstreams {
            let (url, weight) =
                parse_upstream(&entry).map_err(|e| anyhow::anyhow!("proxy.upstreams: {e}"))?;
            let joining = Joining {
                weight,
                ..Joining::at_once(Origin::Config, true)
            };
            proxy
                .join(&url, joining)
                .map_err(|e| anyhow::anyhow!("proxy.upstreams: {e}"))?;
        }
        Ok(proxy)
    }

    /// Threads that serve clients.
    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Sets `admin.token` (at start, and on a reload).
    pub fn set_admin_token(&self, token: &str) {
        self.shared.admin_token.store(Arc::new(token.to_owned()));
    }

    /// `admin.token` as last set.
    pub fn admin_token(&self) -> Arc<String> {
        self.shared.admin_token.load_full()
    }

    /// The configuration in effect.
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.shared.config.load_full()
    }

    /// Adds a worker of `taskd serve` (or any upstream at full weight at once) and starts its
    /// health checks; `healthy` is its state until the checks decide (the supervisor adds
    /// workers it has already seen ready). See [`join`](Self::join).
    pub fn add_upstream(&self, url: &str, healthy: bool) -> Result<(), String> {
        self.join(url, Joining::at_once(Origin::Supervisor, healthy))
    }

    /// Adds an upstream as `joining` says and starts its health checks. An upstream with the
    /// same URL that is draining is replaced; one that is not is an error.
    pub fn join(&self, url: &str, joining: Joining) -> Result<(), String> {
        let url = parse_upstream_url(url)?;
        let (healthy, weight) = (joining.healthy, joining.weight);
        let upstream = Arc::new(Upstream::new(&url, joining, self.shared.threads));
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
        tracing::info!(upstream = %url, healthy, weight, origin = ?upstream.origin, "upstream added");
        self.shared
            .runtime
            .spawn(health_checks(self.shared.clone(), upstream));
        Ok(())
    }

    /// Removes an upstream at once; requests in flight on it still finish. False when unknown.
    pub fn remove_upstream(&self, url: &str) -> bool {
        self.find_upstream(url)
            .is_some_and(|upstream| self.remove_exact(&upstream))
    }

    /// The listed upstream with this URL, as given or as the configuration would normalise it.
    fn find_upstream(&self, url: &str) -> Option<Arc<Upstream>> {
        let url = parse_upstream_url(url).unwrap_or_else(|_| url.to_owned());
        self.shared
            .upstreams
            .load()
            .iter()
            .find(|u| *u.url == *url)
            .cloned()
    }

    /// Removes this very upstream (not another that has its URL); false when it is gone already.
    fn remove_exact(&self, gone: &Arc<Upstream>) -> bool {
        {
            let _edit = self.shared.edit.lock().unwrap_or_else(|e| e.into_inner());
            let current = self.shared.upstreams.load();
            if !current.iter().any(|u| Arc::ptr_eq(u, gone)) {
                return false;
            }
            let next: Vec<_> = current
                .iter()
                .filter(|u| !Arc::ptr_eq(u, gone))
                .cloned()
                .collect();
            self.shared.upstreams.store(Arc::new(next));
        }
        gone.removed.cancel();
        gone.prune_idle(Duration::ZERO);
        tracing::info!(upstream = %gone.url, "upstream removed");
        true
    }

    /// Stops sending new requests to an upstream and waits until the ones in flight have
    /// finished (response bodies included), for at most `proxy.shutdown_timeout`. False when
    /// unknown. The upstream stays listed as `draining` until it is removed.
    pub async fn drain_upstream(&self, url: &str) -> bool {
        match self.find_upstream(url) {
            Some(upstream) => {
                self.drain_exact(&upstream).await;
                true
            }
            None => false,
        }
    }

    async fn drain_exact(&self, upstream: &Arc<Upstream>) {
        upstream.set_draining();
        tracing::info!(upstream = %upstream.url, in_flight = upstream.in_flight(), "upstream draining");
        // Bounded whatever clients do: a reader that stopped cannot hold a rolling restart.
        let grace = self.shared.config().shutdown_timeout;
        if tokio::time::timeout(grace, upstream.drained())
            .await
            .is_err()
        {
            tracing::warn!(
                upstream = %upstream.url,
                in_flight = upstream.in_flight(),
                "requests still in flight after the shutdown timeout; draining anyway"
            );
        }
        upstream.prune_idle(Duration::ZERO);
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
                weight: u.weight(),
                origin: u.origin.clone(),
                draining_for_ms: u.draining_for_ms(now),
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
    loop {
        // Read each round: a reload may change them.
        let (health, idle_timeout) = {
            let config = shared.config();
            (config.health.clone(), config.idle_timeout)
        };
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
        upstream.prune_idle(idle_timeout);
        let jitter = health.interval.mul_f64(rand::random::<f64>() * 0.1);
        tokio::select! {
            _ = upstream.removed.cancelled() => break,
            _ = tokio::time::sleep(health.interval + jitter) => {}
        }
    }
    upstream.prune_idle(Duration::ZERO);
}
