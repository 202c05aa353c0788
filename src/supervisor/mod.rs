//! The local cluster (`taskd serve`): worker processes of this same executable behind the proxy
//! in this process, kept alive, probed, restarted and rolled.
//!
//! # Layout
//!
//! - [`run`]: start-up order, the signal loop (`SIGHUP` rolling restart, `SIGTERM`/`SIGINT`
//!   stop) and shutdown order.
//! - [`instance`]: one worker slot's life as one task: spawn, wait ready, join the proxy, probe,
//!   stop, restart with backoff, and its part of a rolling restart.
//! - [`process`]: a worker child process: its command line, its tagged output, its signals.
//! - [`probe`]: the bare `GET` behind liveness and readiness probes.
//! - [`backoff`]: the restart delay policy.
//! - [`status`]: the `workers` of `/status`, worker metrics and the dashboard.
//!
//! The supervisor drives the proxy only through [`Proxy`]'s upstream interface (add, drain,
//! remove) and the admin listener's [`AdminExtension`](crate::proxy::admin::AdminExtension);
//! workers know nothing of it beyond `--exit-on-stdin-eof`.
//!
//! # Ports
//!
//! Worker `n` (1-based) starts on `base_port + n - 1`. A rolling restart needs a port for the
//! replacement while the old worker still serves, so one more port, `base_port + instances`, is
//! kept spare: the replacement starts there, and the port it frees becomes the next spare. After
//! a `SIGHUP` a worker may thus sit on any port of `base_port..=base_port + instances`;
//! `/status` always shows where.

pub(crate) mod backoff;
pub(crate) mod instance;
pub(crate) mod probe;
pub(crate) mod process;
pub(crate) mod scrape;
pub(crate) mod status;
pub(crate) mod stores;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Config, ProxyConfig, Reloader},
    proxy::{Listeners, Proxy, admin},
    shutdown::Watched,
};

pub use process::Launch;

use self::{
    instance::Control,
    status::{Board, WorkerState},
};

/// `taskd serve`: runs until `shutdown`, then stops the proxy (in-flight requests finish) and
/// then the workers.
pub async fn run(
    mut config: Config,
    launch: Launch,
    reloader: Reloader,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // Before anything else: SIGHUP's default action would kill the supervisor.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let sup = config.supervisor.clone();
    let proxy = Proxy::new(own_proxy_config(&config))?;
    proxy.set_admin_token(&config.admin.token);
    // Every port is checked before the first worker starts, so a second `taskd serve` fails
    // at once and leaves nothing behind.
    let listeners = crate::proxy::bind_listeners(&config.proxy, proxy.threads())?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (admin.listen, --admin-listen): port {} is in use or not available",
                config.admin.listen,
                config.admin.listen.port()
            )
        })?;
    for i in 0..sup.instances {
        let port = sup.base_port + i;
        check_port(port).with_context(|| {
            format!(
                "cannot start worker-{} on 127.0.0.1:{port} (supervisor.base_port + {i}, --base-port): port {port} is in use",
                i + 1
            )
        })?;
    }
    let spare = sup.base_port.saturating_add(sup.instances);
    if check_port(spare).is_err() {
        tracing::warn!(
            port = spare,
            "the spare port for rolling restarts is in use; SIGHUP will fail until it is free"
        );
    }

    let stores = tokio::select! {
        stores = stores::start(&mut config) => stores?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let launch = launch.with_env(stores.worker_env());
    let cluster = Cluster {
        config,
        proxy,
        launch,
        listeners,
        admin_listener,
        spare,
        started,
        stores: stores.describe(),
        reloader,
    };
    let result = cluster.run(hangup, shutdown).await;
    stores.stop().await;
    result
}

/// What [`run`] has set up before the workers start: the bound listeners and the stores.
struct Cluster {
    config: Config,
    proxy: Proxy,
    launch: Launch,
    listeners: Listeners,
    admin_listener: tokio::net::TcpListener,
    spare: u16,
    started: Instant,
    /// The banner's line on the private stores, if any run.
    stores: Option<String>,
    /// Loads the configuration again, for SIGHUP.
    reloader: Reloader,
}

impl Cluster {
    /// Migrations, the workers, the proxy and admin listener, the signal loop, and the stop
    /// in order: proxy, workers (the stores after them, in [`run`]).
    async fn run(
        self,
        mut hangup: tokio::signal::unix::Signal,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Cluster {
            config,
            proxy,
            launch,
            listeners,
            admin_listener,
            mut spare,
            started,
            stores,
            reloader,
        } = self;
        let sup = config.supervisor.clone();
        tokio::select! {
            migrated = crate::db::migrate(&config.database) => {
                migrated.context("applying migrations before starting workers")?;
            }
            _ = shutdown.cancelled() => return Ok(()),
        }

        let board = Arc::new(Board::new(sup.instances, sup.base_port));
        let shared = Arc::new(instance::Shared {
            launch,
            proxy: proxy.clone(),
            config: sup.clone(),
            board: board.clone(),
        });
        let workers_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut controls = Vec::new();
        for index in 0..board.len() {
            let (tx, rx) = mpsc::channel(1);
            controls.push(tx);
            tracker.spawn(instance::run(
                shared.clone(),
                index,
                rx,
                workers_stop.clone(),
            ));
        }
        tracker.close();

        let proxy_addr = listeners.local_addr();
        let https_addr = listeners.tls_addr();
        let admin_addr = admin_listener.local_addr()?;
        // The proxy and the admin listener stop on `shutdown`, or when the other one ends.
        let serving = shutdown.child_token();
        let mut watched = Watched::default();
        watched.spawn(
            "admin listener",
            admin::serve(
                admin_listener,
                admin::router(proxy.clone(), Some(board.clone())),
                serving.clone(),
            ),
        );
        watched.spawn("proxy", proxy.clone().serve(listeners, serving.clone()));

        // Biased, shutdown first: SIGTERM ends the proxy and the admin listener by design, and
        // their end may wake this select before the wait for readiness sees the signal.
        let all_ready = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            ready = wait_all_ready(&board, sup.start_timeout, &shutdown) => ready,
            failed = watched.first_to_end() => {
                return stop_on_failure(failed, serving, watched, workers_stop, tracker).await;
            }
        };
        if !shutdown.is_cancelled() {
            print_banner(
                &board,
                proxy_addr,
                https_addr,
                admin_addr,
                started.elapsed(),
                all_ready,
                stores.as_deref(),
            );
        }

        loop {
            // Biased: after SIGTERM the proxy ends by design, which is no failure.
            let failed = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                failed = watched.first_to_end() => failed,
                _ = hangup.recv() => {
                    // The proxy's configuration and files first (TLS certificate), then the
                    // workers.
                    match reloader() {
                        Ok(next) => {
                            proxy.set_admin_token(&next.admin.token);
                            proxy.reload("SIGHUP", Some(own_proxy_config(&next)));
                        }
                        Err(error) => {
                            tracing::error!("SIGHUP: the configuration does not load ({error}); the proxy keeps the running one");
                            proxy.reload("SIGHUP", None);
                        }
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        failed = watched.first_to_end() => failed,
                        free = rolling_restart(&controls, spare) => {
                            spare = free;
                            continue;
                        }
                    }
                }
            };
            return stop_on_failure(failed, serving, watched, workers_stop, tracker).await;
        }

        tracing::info!("stopping: proxy first (in-flight requests finish), then workers");
        watched.join().await;
        workers_stop.cancel();
        tracker.wait().await;
        tracing::info!("taskd serve stopped");
        Ok(())
    }
}

/// The proxy or the admin listener ended before shutdown: workers nobody can reach (or nobody
/// can watch) are no cluster. Stops the rest in the usual order and returns the failure, so
/// `taskd serve` exits non-zero saying which part stopped and why.
async fn stop_on_failure(
    failed: anyhow::Error,
    serving: CancellationToken,
    watched: Watched,
    workers_stop: CancellationToken,
    tracker: TaskTracker,
) -> anyhow::Result<()> {
    tracing::error!("{failed:#}; stopping the cluster");
    serving.cancel();
    watched.join().await;
    workers_stop.cancel();
    tracker.wait().await;
    Err(failed)
}

/// `[proxy]` of `config` for the supervisor's own proxy: its upstreams are the workers, which
/// it adds and removes itself.
fn own_proxy_config(config: &Config) -> ProxyConfig {
    if !config.proxy.upstreams.is_empty() || !config.proxy.upstream_dns.is_empty() {
        tracing::warn!(
            "proxy.upstreams and proxy.upstream_dns are ignored by taskd serve: its upstreams are its workers"
        );
    }
    ProxyConfig {
        upstreams: Vec::new(),
        upstream_dns: Vec::new(),
        ..config.proxy.clone()
    }
}

/// Fails when something listens on (or holds) `127.0.0.1:port`.
fn check_port(port: u16) -> std::io::Result<()> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map(drop)
}

/// Replaces every worker, one at a time (see [`instance`]). Returns the spare port afterwards.
async fn rolling_restart(controls: &[mpsc::Sender<Control>], mut spare: u16) -> u16 {
    tracing::info!(
        workers = controls.len(),
        "SIGHUP: rolling restart, one worker at a time"
    );
    let started = Instant::now();
    for control in controls {
        let (done, answer) = oneshot::channel();
        if control
            .send(Control::Replace { spare, done })
            .await
            .is_err()
        {
            continue;
        }
        if let Ok(free) = answer.await {
            spare = free;
        }
    }
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        "rolling restart finished"
    );
    spare
}

/// Waits until every worker is ready (true), or `timeout` or shutdown (false).
async fn wait_all_ready(board: &Board, timeout: Duration, shutdown: &CancellationToken) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !shutdown.is_cancelled() {
        if board
            .snapshot()
            .iter()
            .all(|w| w.state == WorkerState::Ready)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Where everything is, on stdout.
fn print_banner(
    board: &Board,
    proxy: SocketAddr,
    https: Option<SocketAddr>,
    admin: SocketAddr,
    took: Duration,
    all_ready: bool,
    stores: Option<&str>,
) {
    let local = |addr: SocketAddr| {
        if addr.ip().is_unspecified() {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        } else {
            addr
        }
    };
    let (api, admin_url) = (local(proxy), local(admin));
    let workers = board.snapshot();
    let ready = workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
        .count();
    let headline = if all_ready {
        format!("{ready} workers ready in {:.2}s", took.as_secs_f64())
    } else {
        format!(
            "{ready} of {} workers ready after {:.1}s (see /status)",
            workers.len(),
            took.as_secs_f64()
        )
    };
    let https = https.map_or_else(String::new, |addr| {
        format!(
            "\n  HTTPS      https://{}/api/v1    (listening on {addr})",
            local(addr)
        )
    });
    let mut text = format!(
        "\ntaskd serve {}: {headline}\n\n  API        http://{api}/api/v1    (listening on {proxy}){https}\n  Docs       http://{api}/docs\n  Dashboard  http://{admin_url}/\n  Status     http://{admin_url}/status    metrics: http://{admin_url}/metrics\n  Workers   ",
        env!("CARGO_PKG_VERSION")
    );
    for w in &workers {
        let pid = w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        text.push_str(&format!(" {} 127.0.0.1:{} (pid {pid}) ", w.id, w.port));
    }
    if let Some(stores) = stores {
        text.push_str(&format!(
            "\n  Stores     {stores}    (private, stopped with taskd serve)"
        ));
    }
    text.push_str(
        "\n  Signals    SIGHUP: TLS files re-read, rolling restart, zero downtime    SIGTERM / Ctrl-C: graceful stop\n",
    );
    println!("{text}");
}
