//! The client side: listening sockets, the accept loop of each serving thread, and one client
//! connection's life (TLS handshake when it came to the HTTPS listener, then HTTP/1.1 or
//! HTTP/2, and upgrades).
//!
//! Plain and HTTPS connections go through the same loop: the same `proxy.max_connections`
//! slots, the same sweeper for idle connections and response waits, the same graceful shutdown.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    task::Poll,
    time::Duration,
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    Shared, forward,
    headers::{Client, Peer},
    idle::{self, Watch},
};

/// The client-facing sockets: one per serving thread on `proxy.listen`, and as many on
/// `proxy.tls.listen` when HTTPS is on.
pub struct Listeners {
    pub(super) plain: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    pub(super) tls: Option<(Vec<std::net::TcpListener>, SocketAddr)>,
}

impl Listeners {
    /// Binds `count` `SO_REUSEPORT` sockets to `addr` (port 0 picks one free port for all).
    /// Fails with `AddrInUse` when anything else holds the port, even another process that
    /// uses `SO_REUSEPORT` itself.
    pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Self> {
        let (plain, addr) = bind_group(addr, count)?;
        Ok(Self {
            plain,
            addr,
            tls: None,
        })
    }

    /// Adds the HTTPS sockets, on `addr`, one per serving thread like the plain ones.
    pub fn bind_tls(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        self.tls = Some(bind_group(addr, self.plain.len())?);
        Ok(())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTPS listener's address, when it is bound.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(_, addr)| *addr)
    }
}

fn bind_group(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
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
    Ok((sockets, addr))
}

/// Accepts and serves client connections on one thread until shutdown: on `plain`, and on `tls`
/// with the proxy's TLS acceptor.
pub(super) async fn accept_loop(
    plain: std::net::TcpListener,
    tls: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let register = |listener| match TcpListener::from_std(listener) {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::error!(%error, "cannot register the proxy listener");
            None
        }
    };
    let Some(plain) = register(plain) else { return };
    let tls = match (tls.map(register), &shared.tls) {
        (None, _) => None,
        (Some(Some(listener)), Some(tls)) => Some((listener, tls.acceptor.clone())),
        _ => return,
    };
    let mut generation = shared.generation();
    let mut builder = connection_builder(&shared);
    let graceful = GracefulShutdown::new();
    let tunnels = TaskTracker::new();
    let mut sweeper = {
        let config = shared.config();
        idle::Sweeper::new(
            config.idle_timeout,
            config.response_timeout,
            config.write_timeout,
        )
    };
    let mut sweeps = sweep_interval(&sweeper);
    let mut tls_first = false;
    'accept: loop {
        let (accepted, https) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = sweeps.tick() => {
                sweeper.sweep();
                // A reload: new client timeouts from this sweep on, for new connections the
                // HTTP/2 keep-alive too.
                if shared.generation() != generation {
                    generation = shared.generation();
                    let config = shared.config();
                    sweeper.retime(config.idle_timeout, config.response_timeout, config.write_timeout);
                    sweeps = sweep_interval(&sweeper);
                    builder = connection_builder(&shared);
                }
                continue;
            }
            accepted = accept_either(&plain, tls.as_ref().map(|(l, _)| l), &mut tls_first) => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, or a connection reset before accept: back off
                // briefly rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Then a connection slot (`proxy.max_connections`), before the next accept: past the
        // limit, one connection per serving thread waits here and the rest in the kernel's
        // backlog. (A slot taken before accepting would sit idle in a thread whose socket gets
        // no connection while another thread's connections wait.) Sweeps go on meanwhile;
        // they are what frees slots.
        let slot = match shared.connections.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                shared.metrics.accept_paused.fetch_add(1, Relaxed);
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break 'accept,
                        _ = sweeps.tick() => sweeper.sweep(),
                        slot = shared.connections.clone().acquire_owned() => match slot {
                            Ok(slot) => break slot,
                            Err(_) => break 'accept,
                        },
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let client = Arc::new(Client {
            peer: Peer::new(peer.ip(), shared.is_trusted(peer.ip())).over_tls(https),
            _slot: slot,
            tunnels: tunnels.clone(),
        });
        let watch = sweeper.watch();
        match (&tls, https) {
            (Some((_, acceptor)), true) => {
                tokio::spawn(serve_tls(
                    stream,
                    acceptor.clone(),
                    builder.clone(),
                    shared.clone(),
                    client,
                    watch,
                    graceful.watcher(),
                    shutdown.clone(),
                ));
            }
            _ => {
                let connection = serve_http(
                    &builder,
                    TokioIo::new(stream),
                    shared.clone(),
                    client,
                    &watch,
                    graceful.watcher(),
                );
                tokio::spawn(drive(connection, watch));
            }
        }
    }
    drop((plain, tls));
    tunnels.close();
    let drained = async {
        graceful.shutdown().await;
        // Upgraded connections too: they are requests in flight until they close.
        tunnels.wait().await;
    };
    let deadline = tokio::time::sleep(shared.config().shutdown_timeout);
    tokio::pin!(drained, deadline);
    loop {
        tokio::select! {
            () = &mut drained => break,
            () = &mut deadline => {
                tracing::warn!(
                    upgraded = tunnels.len(),
                    "requests still in flight after the shutdown timeout; closing them"
                );
                break;
            }
            // Requests finishing meanwhile still have their response timeout.
            _ = sweeps.tick() => sweeper.sweep(),
        }
    }
}

/// The next connection on either listener; each poll tries the other one first, so neither
/// can starve the other.
fn accept_either<'a>(
    plain: &'a TcpListener,
    tls: Option<&'a TcpListener>,
    tls_first: &'a mut bool,
) -> impl Future<Output = (std::io::Result<(TcpStream, SocketAddr)>, bool)> + 'a {
    std::future::poll_fn(move |cx| {
        let Some(tls) = tls else {
            return plain.poll_accept(cx).map(|accepted| (accepted, false));
        };
        *tls_first = !*tls_first;
        let order = if *tls_first {
            [(tls, true), (plain, false)]
        } else {
            [(plain, false), (tls, true)]
        };
        for (listener, https) in order {
            if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                return Poll::Ready((accepted, https));
            }
        }
        Poll::Pending
    })
}

/// The HTTP side of one client connection (HTTP/1.1 with upgrades, or HTTP/2), watched for
/// graceful shutdown.
fn serve_http<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    shared: Arc<Shared>,
    client: Arc<Client>,
    watch: &Arc<Watch>,
    graceful: Watcher,
) -> impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let requests = watch.clone();
    let service = service_fn(move |request| {
        let shared = shared.clone();
        let client = client.clone();
        let busy = requests.begin();
        async move {
            let response = forward::handle(shared, request, &client, busy.watch()).await;
            Ok::<_, Infallible>(response.map(|body| idle::BusyBody::new(body, busy)))
        }
    });
    graceful.watch(
        builder
            .serve_connection_with_upgrades(io, service)
            .into_owned(),
    )
}

/// Runs a connection until it ends or the sweeper closes it.
async fn drive<E: std::fmt::Display>(
    connection: impl Future<Output = Result<(), E>>,
    watch: Arc<Watch>,
) {
    tokio::select! {
        biased;
        ended = connection => if let Err(error) = ended {
            tracing::debug!(%error, "client connection ended with an error");
        },
        // Idle for `idle_timeout` with nothing in flight: dropping it closes it.
        () = watch.closed() => {}
    }
}

/// A connection to the HTTPS listener: the TLS handshake, bounded by
/// `proxy.tls.handshake_timeout` (and by `idle_timeout`, and cut short by shutdown), then HTTP.
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
    client: Arc<Client>,
    watch: Arc<Watch>,
    graceful: Watcher,
    shutdown: CancellationToken,
) {
    let handshake = tokio::time::timeout(
        shared.config().tls.handshake_timeout,
        acceptor.accept(stream),
    );
    let metrics = &shared.metrics;
    let stream = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return,
        () = watch.closed() => {
            metrics.tls_handshake_timeouts.fetch_add(1, Relaxed);
            return;
        }
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                metrics.tls_handshake_errors.fetch_add(1, Relaxed);
                tracing::debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                metrics.tls_handshake_timeouts.fetch_add(1, Relaxed);
                tracing::debug!("TLS handshake timed out");
                return;
            }
        },
    };
    let connection = serve_http(
        &builder,
        TokioIo::new(stream),
        shared,
        client,
        &watch,
        graceful,
    );
    drive(connection, watch).await;
}

/// How client connections are served: HTTP/1.1 and HTTP/2 with the current settings.
fn connection_builder(shared: &Shared) -> Arc<auto::Builder<TokioExecutor>> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper timer for HTTP/1: the sweeper closes connections idle for `idle_timeout`
    // (waiting for a request or for the rest of its headers) without a timer per request.
    builder
        .http2()
        // Each stream may hold an upstream request and a body buffer: fewer than hyper's 200.
        .max_concurrent_streams(64)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(shared.config().idle_timeout / 2));
    Arc::new(builder)
}

fn sweep_interval(sweeper: &idle::Sweeper) -> tokio::time::Interval {
    let mut sweeps = tokio::time::interval(sweeper.period());
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweeps
}
