//! WebSocket and other HTTP/1.1 upgrades (RFC 9110 §7.8).
//!
//! An upgrade request goes through the same header rules as any other (`X-Forwarded-*`,
//! `X-Request-Id`, hop-by-hop headers removed), then gets back its `Connection: upgrade` and
//! `Upgrade`, and goes to an upstream on a connection of its own (never a pooled one: it will not
//! come back). An answer other than 101 is passed on as an ordinary response. On 101, the
//! client's connection and the upstream's are joined and bytes are copied both ways until:
//!
//! - both sides have closed (a side that closes its half is passed on: the other side's writes
//!   still flow back);
//! - `proxy.upgrade_idle_timeout` passes without a byte either way (a reader that stopped counts:
//!   nothing moves);
//! - the proxy shuts down: upgraded connections are waited for like requests in flight, and cut
//!   after `proxy.shutdown_timeout`.
//!
//! For as long as it is open, an upgraded connection is a request in flight: in its upstream's
//! `inFlight` (so a drain waits for it), in `taskd_proxy_in_flight`, and it keeps its client
//! connection's `proxy.max_connections` slot.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    Request, Response, StatusCode, Uri, Version,
    body::{Body, Incoming},
    client::conn::http1::SendRequest,
    header::{self, HeaderValue},
    http::uri::PathAndQuery,
    upgrade::OnUpgrade,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    Limits, Shared,
    body::ClientBody,
    clock::now_ms,
    error::{ProxyError, UpstreamFailure},
    headers::{Client, strip_hop_by_hop},
    outgoing::UpstreamBody,
    upstream::InFlight,
};

/// Forwards an upgrade request whose headers the forwarding rules have already been applied to;
/// `protocol` is the `Upgrade` it asked for, `client_side` the hook to its connection.
pub async fn forward(
    shared: &Arc<Shared>,
    config: &Limits,
    client: &Arc<Client>,
    mut parts: hyper::http::request::Parts,
    body: Incoming,
    protocol: HeaderValue,
    client_side: OnUpgrade,
) -> Result<Response<ClientBody>, ProxyError> {
    parts.uri = Uri::from(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.version = Version::HTTP_11;
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, protocol.clone());
    let body = if body.is_end_stream() {
        UpstreamBody::empty()
    } else {
        UpstreamBody::streamed(body, config.body_timeout)
    };
    let mut request = Request::from_parts(parts, body);

    let upstreams = shared.upstreams.load();
    let mut tried = [usize::MAX; 17];
    let mut last_failure = None;
    // Only a connection that could not be made is tried elsewhere: once sent, an upgrade
    // request may have started something on the upstream.
    for attempt in 0..=config.retries {
        let Some(index) = shared.pick(&upstreams, &tried[..attempt as usize]) else {
            break;
        };
        tried[attempt as usize] = index;
        if attempt > 0 {
            shared.metrics.retries.fetch_add(1, Relaxed);
        }
        let upstream = &upstreams[index];
        let flight = upstream.begin();
        if upstream.is_draining() {
            last_failure = Some(UpstreamFailure::Draining);
            continue;
        }
        if !request.headers().contains_key(header::HOST) {
            request
                .headers_mut()
                .insert(header::HOST, upstream.host_header.clone());
        }
        let mut sender = match upstream.connect_upgradable(config.connect_timeout).await {
            Ok(sender) => sender,
            Err(error) => {
                let reason = UpstreamFailure::from(error);
                shared.record_failure(upstream, &reason);
                last_failure = Some(reason);
                continue;
            }
        };
        let response =
            match tokio::time::timeout(config.response_timeout, sender.send_request(request)).await
            {
                Err(_) => {
                    shared.record_failure(upstream, &UpstreamFailure::Timeout);
                    return Err(ProxyError::Timeout);
                }
                Ok(Err(error)) => {
                    let reason = UpstreamFailure::exchange(error);
                    shared.record_failure(upstream, &reason);
                    return Err(ProxyError::Upstream(reason));
                }
                Ok(Ok(response)) => response,
            };
        upstream.statuses.record(response.status().as_u16());
        return Ok(answer(
            shared,
            client,
            response,
            protocol,
            client_side,
            flight,
            sender,
        ));
    }
    Err(ProxyError::NoUpstream(last_failure))
}

/// The client's answer: the upstream's, and on 101 the tunnel between the two connections.
fn answer(
    shared: &Arc<Shared>,
    client: &Arc<Client>,
    mut response: Response<Incoming>,
    asked: HeaderValue,
    client_side: OnUpgrade,
    flight: InFlight,
    sender: SendRequest<UpstreamBody>,
) -> Response<ClientBody> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        let _ = strip_hop_by_hop(&mut parts.headers);
        // Not pooled: the connection closes once this answer has been read.
        return Response::from_parts(
            parts,
            ClientBody::Upstream {
                body,
                conn: None,
                in_flight: Some(flight),
            },
        );
    }
    let upstream_side = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    let protocol = strip_hop_by_hop(&mut parts.headers).unwrap_or(asked);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, protocol);
    let tunnel = Tunnel {
        _open: Open::new(shared.clone()),
        _flight: flight,
        _client: client.clone(),
        idle: shared.limits().upgrade_idle_timeout,
    };
    client
        .tunnels
        .spawn(tunnel.run(client_side, upstream_side, sender));
    Response::from_parts(parts, ClientBody::local(Bytes::new()))
}

/// One upgraded connection; what it holds is released when it ends.
struct Tunnel {
    _open: Open,
    _flight: InFlight,
    _client: Arc<Client>,
    idle: Duration,
}

impl Tunnel {
    async fn run(
        self,
        client_side: OnUpgrade,
        upstream_side: OnUpgrade,
        sender: SendRequest<UpstreamBody>,
    ) {
        // The client's side is handed over once hyper has written the 101 to it.
        let sides = tokio::time::timeout(self.idle, async {
            tokio::try_join!(client_side, upstream_side)
        })
        .await;
        drop(sender);
        let (client_io, upstream_io) = match sides {
            Ok(Ok(sides)) => sides,
            Ok(Err(error)) => {
                tracing::debug!(%error, "upgrade did not complete");
                return;
            }
            Err(_) => {
                tracing::debug!("upgrade did not complete within the idle timeout");
                return;
            }
        };
        let last = Arc::new(AtomicU64::new(now_ms()));
        let mut client_io = Moving {
            io: TokioIo::new(client_io),
            last: last.clone(),
        };
        let mut upstream_io = TokioIo::new(upstream_io);
        let copy = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io);
        tokio::pin!(copy);
        let idle_ms = self.idle.as_millis() as u64;
        loop {
            let quiet = now_ms().saturating_sub(last.load(Relaxed));
            if quiet >= idle_ms {
                tracing::debug!("upgraded connection idle; closing it");
                return;
            }
            tokio::select! {
                copied = &mut copy => {
                    match copied {
                        Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
                        Err(error) => tracing::debug!(%error, "upgraded connection ended with an error"),
                    }
                    return;
                }
                () = tokio::time::sleep(Duration::from_millis(idle_ms - quiet)) => {}
            }
        }
    }
}

/// Counts an upgraded connection in `taskd_proxy_in_flight` and the upgraded gauge.
struct Open(Arc<Shared>);

impl Open {
    fn new(shared: Arc<Shared>) -> Self {
        shared.metrics.in_flight.fetch_add(1, Relaxed);
        shared.metrics.upgraded.fetch_add(1, Relaxed);
        Self(shared)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, Relaxed);
        self.0.metrics.upgraded.fetch_sub(1, Relaxed);
    }
}

/// The client's side of a tunnel, noting when bytes last moved either way (everything the
/// upstream sends is written here, everything the client sends is read here).
struct Moving<T> {
    io: T,
    last: Arc<AtomicU64>,
}

impl<T> Moving<T> {
    fn moved(&self, bytes: usize) {
        if bytes > 0 {
            self.last.store(now_ms(), Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Moving<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.moved(buf.filled().len() - before);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Moving<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            this.moved(written);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
