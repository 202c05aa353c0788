//! What goes back to the client: [`ClientBody`], the upstream's response body streamed,
//! holding the upstream connection until its last byte so the connection returns to the pool
//! only when it can carry the next request; a compressed one; or the proxy's own small
//! problem+json answer. A plain enum, so no request allocates a boxed body.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};

use super::{
    outgoing::{Progress, UpstreamBody, poll_full},
    upstream::InFlight,
};
use crate::compression::Compressor;

/// Output waiting in the encoder past which it is sent without waiting for the upstream.
const FLUSH_AT: usize = 16 * 1024;

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
    Compressed(Box<Compressing>),
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

/// A response body compressed as it streams ([`ClientBody::Compressed`]).
pub struct Compressing {
    inner: ClientBody,
    compressor: Compressor,
    /// Input pushed since the last flush.
    unflushed: bool,
    /// The end of the coding has been produced.
    done: bool,
}

impl Compressing {
    pub fn new(inner: ClientBody, compressor: Compressor) -> Self {
        Self {
            inner,
            compressor,
            unflushed: false,
            done: false,
        }
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            let out = match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers (rare from an HTTP/1.1 upstream) do not survive a new coding.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if let Err(error) = self.compressor.push(&data) {
                        return self.fail(&error);
                    }
                    self.unflushed = true;
                    if self.compressor.pending() < FLUSH_AT {
                        continue;
                    }
                    Ok(self.compressor.take())
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => {
                    self.done = true;
                    self.compressor.finish()
                }
                Poll::Pending if self.unflushed => {
                    self.unflushed = false;
                    self.compressor.flush()
                }
                Poll::Pending => return Poll::Pending,
            };
            match out {
                Ok(bytes) if bytes.is_empty() => {}
                Ok(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Err(error) => return self.fail(&error),
            }
        }
    }

    /// An encoder failure (none is known to happen on any input): the body ends without the
    /// coding's end marker, which the client's decoder reports as a truncated body.
    fn fail(
        &mut self,
        error: &std::io::Error,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        tracing::warn!(%error, "compression failed; response cut short");
        self.done = true;
        Poll::Ready(None)
    }

    pub fn is_end_stream(&self) -> bool {
        self.done
    }

    pub fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
