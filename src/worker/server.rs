//! The worker's own HTTP server: what `axum::serve` does, plus the limits a server reachable
//! by any client needs (in split mode a worker's port may face the internet):
//!
//! - `worker.max_connections`: past it the accept loop waits for a connection to end, so new
//!   connections queue in the kernel's backlog instead of taking memory and descriptors.
//! - `worker.header_read_timeout`: from the first byte of a request to the end of its headers.
//!   A client that trickles its headers, or sends half a request and stops, is cut off.
//! - `worker.idle_timeout`: a connection with nothing in flight and no bytes either way for
//!   this long is closed. Keep it above `proxy.idle_timeout`, so that it is the proxy that
//!   retires its pooled connections to a worker, never a worker under the proxy's feet.
//!
//! Each connection's IO is wrapped in [`Tracked`], which notes when bytes move; a watchdog per
//! connection looks every quarter of the shorter timeout. While a request is being handled,
//! `worker.request_timeout` bounds it instead.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, extract::ConnectInfo};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Most concurrent HTTP/2 streams per client connection.
const MAX_CONCURRENT_STREAMS: u32 = 64;

/// Connection limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long in-flight requests may go on after shutdown begins.
    pub shutdown_timeout: Duration,
}

/// When bytes last moved on a connection and whether a request is in flight.
struct Activity {
    epoch: Instant,
    /// Requests being handled (HTTP/2 may have several).
    in_flight: AtomicU32,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_ms: AtomicU64,
    /// Milliseconds since `epoch` (plus one, so 0 means none) of the first byte of a request
    /// whose headers are not complete yet.
    head_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            last_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn read(&self) {
        let now = self.now_ms();
        self.last_ms.store(now, Relaxed);
        if self.in_flight.load(Relaxed) == 0 && self.head_since_ms.load(Relaxed) == 0 {
            self.head_since_ms.store(now + 1, Relaxed);
        }
    }

    fn wrote(&self) {
        self.last_ms.store(self.now_ms(), Relaxed);
    }

    /// A request's headers are complete: it is in flight until the guard drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.head_since_ms.store(0, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// Why the connection should be closed now, if it should.
    fn expired(&self, limits: &Limits) -> Option<&'static str> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        let now = self.now_ms();
        let head = self.head_since_ms.load(Relaxed);
        if head != 0
            && now.saturating_sub(head - 1) >= limits.header_read_timeout.as_millis() as u64
        {
            return Some("request headers not complete within worker.header_read_timeout");
        }
        let last = self.last_ms.load(Relaxed);
        (now.saturating_sub(last) >= limits.idle_timeout.as_millis() as u64)
            .then_some("idle for worker.idle_timeout")
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.wrote();
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A connection's IO, noting in [`Activity`] when bytes move.
struct Tracked<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets in-flight requests finish for up to
/// `limits.shutdown_timeout`. Handlers see the peer as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tick = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        // Past the limit, wait for a connection to end before accepting another.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, or reset before accept: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            io: stream,
            activity: activity.clone(),
        };
        let app = app.clone();
        let requests = activity.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let in_flight = requests.begin();
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer));
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(axum::body::Body::new)).await;
                drop(in_flight);
                Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
            }
        });
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let watchdog = async {
                let mut ticks = tokio::time::interval(tick);
                loop {
                    ticks.tick().await;
                    if let Some(reason) = activity.expired(&limits) {
                        return reason;
                    }
                }
            };
            tokio::select! {
                ended = connection => if let Err(error) = ended {
                    tracing::debug!(%error, %peer, "client connection ended with an error");
                },
                reason = watchdog => tracing::debug!(%peer, reason, "closing client connection"),
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!(grace = ?limits.shutdown_timeout, "in-flight requests still running after the grace period; exiting");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 10,
            header_read_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            shutdown_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_request_in_flight_never_expires() {
        let activity = Arc::new(Activity::new());
        activity.read();
        let _in_flight = activity.begin();
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(activity.expired(&limits()), None);
    }

    #[test]
    fn partial_headers_expire_before_idleness_does() {
        let activity = Arc::new(Activity::new());
        assert_eq!(activity.expired(&limits()), None);
        activity.read();
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            activity
                .expired(&limits())
                .unwrap()
                .contains("header_read_timeout")
        );
        // Complete headers and a finished request: only idleness counts from then on.
        drop(activity.begin());
        assert_eq!(activity.expired(&limits()), None);
        std::thread::sleep(Duration::from_millis(320));
        assert!(
            activity
                .expired(&limits())
                .unwrap()
                .contains("idle_timeout")
        );
    }
}
