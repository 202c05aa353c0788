//! What goes to an upstream: [`UpstreamBody`], the client's request body streamed as it
//! arrives (with a timer on its pauses, `proxy.body_timeout`), or a copy kept in memory so the
//! request can be sent again; and [`Progress`], when the streamed body last moved. A plain enum,
//! so no request allocates a boxed body.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::clock::now_ms;

/// What a request body's poll can fail with: the client's connection, or `proxy.body_timeout`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
pub(super) fn poll_full(
    full: &mut Full<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
    Pin::new(full)
        .poll_frame(cx)
        .map(|frame| frame.map(|f| f.map_err(|never| match never {})))
}
