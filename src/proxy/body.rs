//! The two body types of the proxy, as plain enums so no request allocates a boxed body.
//!
//! [`UpstreamBody`] is what goes to a worker: the client's body streamed as it arrives, or a
//! copy kept in memory so the request can be sent again. [`ClientBody`] is what goes back: the
//! worker's body streamed, holding the upstream connection until its last byte so the
//! connection returns to the pool only when it can carry the next request, or the proxy's own
//! small problem+json answer.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use tokio::time::{Instant, Sleep};

/// What a request body's poll can fail with: the client's connection, or `proxy.body_timeout`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

use super::upstream::{InFlight, now_ms};

/// When a streamed request body last moved (`now_ms()`): the response timeout counts from
/// there, so that it measures the upstream, not the client's upload speed. Also whether it
/// has been sent to its end: until then its upstream connection cannot carry another request.
pub struct Progress(AtomicU64, AtomicBool);

impl Progress {
    pub fn new() -> Self {
        Self(AtomicU64::new(now_ms()), AtomicBool::new(false))
    }

    pub fn touch(&self) {
        self.0.store(now_ms(), Relaxed);
    }

    /// Whether the whole body has been read from the client (and handed to the upstream).
    pub fn finished(&self) -> bool {
        self.1.load(Relaxed)
    }

    pub fn quiet_for(&self) -> std::time::Duration {
        std::time::Duration::from_millis(now_ms().saturating_sub(self.0.load(Relaxed)))
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// A request body on its way to an upstream.
pub enum UpstreamBody {
    /// The client's body, streamed; a wait of `proxy.body_timeout` for its next bytes ends it
    /// with an error (the upstream request is then abandoned and its connection closed).
    Streamed(Box<Streamed>),
    /// A body held in memory (empty bodies, and bodies kept for a retry).
    Buffered(Full<Bytes>),
}

/// See [`UpstreamBody::Streamed`].
pub struct Streamed {
    body: Incoming,
    progress: std::sync::Arc<Progress>,
    limit: std::time::Duration,
    /// Armed while waiting for the client; pushed back after every frame.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Streamed {
    pub fn progress(&self) -> &std::sync::Arc<Progress> {
        &self.progress
    }
}

impl UpstreamBody {
    pub fn streamed(body: Incoming, limit: std::time::Duration) -> Self {
        Self::Streamed(Box::new(Streamed {
            body,
            progress: std::sync::Arc::new(Progress::new()),
            limit,
            timer: None,
        }))
    }

    pub fn empty() -> Self {
        Self::buffered(Bytes::new())
    }

    pub fn buffered(bytes: Bytes) -> Self {
        Self::Buffered(Full::new(bytes))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Streamed(streamed) => {
                let Streamed {
                    body,
                    progress,
                    limit,
                    timer,
                } = &mut **streamed;
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        progress.touch();
                        if frame.is_none() || body.is_end_stream() {
                            progress.1.store(true, Relaxed);
                        }
                        if let Some(timer) = timer {
                            timer.as_mut().reset(Instant::now() + *limit);
                        }
                        Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
                    }
                    Poll::Pending => {
                        let timer =
                            timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(*limit)));
                        ready!(timer.as_mut().poll(cx));
                        Poll::Ready(Some(Err(
                            "no request body bytes within proxy.body_timeout".into()
                        )))
                    }
                }
            }
            Self::Buffered(full) => poll_full(full, cx).map(|f| f.map(|f| f.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Streamed(streamed) => streamed.body.is_end_stream(),
            Self::Buffered(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Streamed(streamed) => streamed.body.size_hint(),
            Self::Buffered(full) => full.size_hint(),
        }
    }
}

/// One poll of an in-memory body; `Full` cannot fail.
fn poll_full(
    full: &mut Full<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
    Pin::new(full)
        .poll_frame(cx)
        .map(|frame| frame.map(|f| f.map_err(|never| match never {})))
}

/// Where a finished upstream connection goes back to.
pub struct PooledConn {
    pub sender: SendRequest<UpstreamBody>,
    pub max_idle: usize,
    /// The request's streamed body, if it had one: an upstream may answer before it has read
    /// the whole body, and the connection is reusable only once both directions are done.
    pub request: Option<std::sync::Arc<Progress>>,
}

/// A response body on its way to the client.
pub enum ClientBody {
    /// The upstream's body. Holds the request's in-flight slot and, until the body has been
    /// read to the end, the connection it arrives on.
    Upstream {
        body: Incoming,
        conn: Option<PooledConn>,
        in_flight: Option<InFlight>,
    },
    /// A response the proxy wrote itself.
    Local(Full<Bytes>),
    /// An upstream's body compressed on its way (`proxy.compression`).
    Compressed(Box<super::compress::Compressing>),
}

impl ClientBody {
    pub fn local(bytes: Bytes) -> Self {
        Self::Local(Full::new(bytes))
    }

    /// Ends the request: the connection goes back to the pool when its response was read to
    /// the end (otherwise it is dropped, which closes it), and the in-flight slot is freed.
    fn finish(conn: &mut Option<PooledConn>, in_flight: &mut Option<InFlight>, complete: bool) {
        if let (Some(conn), Some(flight)) = (conn.take(), in_flight.as_ref())
            && complete
            && conn
                .request
                .as_ref()
                .is_none_or(|request| request.finished())
        {
            flight.upstream().checkin(conn.sender, conn.max_idle);
        }
        in_flight.take();
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Upstream {
                body,
                conn,
                in_flight,
            } => {
                let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
                match &frame {
                    None => Self::finish(conn, in_flight, true),
                    Some(Err(_)) => Self::finish(conn, in_flight, false),
                    Some(Ok(_)) if body.is_end_stream() => Self::finish(conn, in_flight, true),
                    Some(Ok(_)) => {}
                }
                Poll::Ready(frame)
            }
            Self::Local(full) => poll_full(full, cx),
            Self::Compressed(compressing) => compressing.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body, .. } => body.is_end_stream(),
            Self::Local(full) => full.is_end_stream(),
            Self::Compressed(compressing) => compressing.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream { body, .. } => body.size_hint(),
            Self::Local(full) => full.size_hint(),
            Self::Compressed(compressing) => compressing.size_hint(),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Self::Upstream {
            body,
            conn,
            in_flight,
        } = self
        {
            // Bodiless responses (HEAD, 204, 304) are never polled; they are complete anyway.
            let complete = body.is_end_stream();
            Self::finish(conn, in_flight, complete);
        }
    }
}
