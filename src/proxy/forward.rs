//! Forwarding one request: choosing an upstream, retries, and the proxy's own errors (the
//! header rules are in `headers.rs`).

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    Request, Response, Uri, Version,
    body::{Body, Incoming},
    header,
    http::uri::PathAndQuery,
};

use super::{
    Limits, Shared,
    body::{ClientBody, PooledConn},
    compress,
    error::{ProxyError, UpstreamFailure},
    headers::{Client, Forwarding, forwarding_headers, may_resend, strip_hop_by_hop},
    idle::Watch,
    outgoing::{Progress, UpstreamBody},
    upstream::Upstream,
};

/// How one try on one upstream failed.
// The request travels back by value: failures are rare and boxing would cost every request.
#[allow(clippy::large_enum_variant)]
enum TryError {
    /// The request never left the proxy (connect refused, reset before writing); it comes
    /// back untouched and can go to another upstream whatever its method.
    NotSent(Request<UpstreamBody>, UpstreamFailure),
    /// The request was written, at least in part, and then the connection failed.
    Sent(UpstreamFailure),
    /// No response headers within `response_timeout`.
    Timeout,
    /// The client's streamed body stalled for `body_timeout`.
    BodyTimeout,
}

/// Handles one client request arriving on the connection `watch` watches; never fails (errors
/// are problem+json responses).
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    client: &Arc<Client>,
    watch: &Watch,
) -> Response<ClientBody> {
    let started = Instant::now();
    let limits = shared.limits();
    if limits.redirect_http && !client.peer.https {
        return super::tls::redirect(&req, shared.https_port.load(Relaxed));
    }
    // Decremented on drop: hyper drops this future when the client goes away mid-request.
    let _in_flight = InFlightGauge::new(&shared.metrics.in_flight);
    // HTTP/1 requests are polled by their connection's task, whose sweeper times their waits.
    let swept = (req.version() != Version::HTTP_2).then_some(watch);
    let (mut parts, body) = req.into_parts();
    let Forwarding {
        request_id,
        upgrade,
    } = forwarding_headers(&mut parts.headers, &parts.uri, &client.peer);
    // An HTTP/1.1 upgrade (not h2c: an HTTP/2 connection is the proxy's to make, not the
    // upstream's), with the hook hyper gives the request to take over its connection.
    let upgrade = upgrade
        .filter(|protocol| {
            parts.version == Version::HTTP_11 && !protocol.as_bytes().eq_ignore_ascii_case(b"h2c")
        })
        .and_then(|protocol| {
            let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
            Some((protocol, on_upgrade))
        });
    let compression = if limits.compression {
        compress::plan(&parts)
    } else {
        None
    };
    // The workers' metrics are for the operator (the admin listener), not the internet.
    let forwarded = if parts.uri.path() == "/metrics" {
        Err(ProxyError::NotFound)
    } else if let Some((protocol, on_upgrade)) = upgrade {
        super::upgrade::forward(&shared, &limits, client, parts, body, protocol, on_upgrade).await
    } else {
        forward(&shared, &limits, parts, body, swept).await
    };
    let response = match forwarded {
        Ok(response) => compress::apply(compression, response),
        Err(error) => {
            shared.metrics.local.record(error.status().as_u16());
            error.into_response(Some(&request_id))
        }
    };
    shared.metrics.latency.record(started.elapsed());
    response
}

/// One request counted in `taskd_proxy_in_flight` for as long as it lives.
struct InFlightGauge<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> InFlightGauge<'a> {
    fn new(gauge: &'a std::sync::atomic::AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Self(gauge)
    }
}

impl Drop for InFlightGauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// `config`: the settings the request read when it started. `swept`: the connection's watch
/// when the sweeper times the response wait (see [`Watch::within_response_timeout`]); otherwise
/// a tokio timer does.
async fn forward(
    shared: &Shared,
    config: &Limits,
    mut parts: hyper::http::request::Parts,
    body: Incoming,
    swept: Option<&Watch>,
) -> Result<Response<ClientBody>, ProxyError> {
    // Upstreams get origin-form targets over HTTP/1.1.
    parts.uri = Uri::from(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.version = Version::HTTP_11;

    let resendable = may_resend(&parts.method, &parts.headers);
    // A copy of the body, when a retry after sending may need it.
    let (replay, first_body, _reserved) = if body.is_end_stream() {
        (Some(Bytes::new()), UpstreamBody::empty(), None)
    } else if resendable
        && body
            .size_hint()
            .upper()
            .is_some_and(|len| len <= config.retry_body_limit.as_u64())
        && let Some(reserved) = shared.reserve_buffer(body.size_hint().upper().unwrap_or(0))
    {
        let length = body.size_hint().upper().unwrap_or(0);
        let bytes = collect_within(body, config.body_timeout, length).await?;
        (
            Some(bytes.clone()),
            UpstreamBody::buffered(bytes),
            Some(reserved),
        )
    } else {
        (
            None,
            UpstreamBody::streamed(body, config.body_timeout),
            None,
        )
    };
    let kept_parts = (resendable && replay.is_some()).then(|| parts.clone());
    let mut request = Request::from_parts(parts, first_body);

    let upstreams = shared.upstreams.load();
    // Upstreams tried so far; `retries` is at most 16 (checked at start-up), so no allocation.
    let mut tried = [usize::MAX; 17];
    let mut last_failure = None;
    let mut all_unsent = true;
    for attempt in 0..=config.retries {
        let Some(index) = shared.pick(&upstreams, &tried[..attempt as usize]) else {
            break;
        };
        tried[attempt as usize] = index;
        if attempt > 0 {
            shared.metrics.retries.fetch_add(1, Relaxed);
        }
        let upstream = &upstreams[index];
        // Given up on when its upstream is ejected only if it can go elsewhere next.
        let movable = kept_parts.is_some() && attempt < config.retries;
        match try_upstream(config, upstream, request, swept, movable).await {
            Ok(response) => return Ok(response),
            Err(TryError::NotSent(back, reason)) => {
                shared.record_failure(upstream, &reason);
                last_failure = Some(reason);
                request = back;
            }
            Err(TryError::Sent(reason)) => {
                shared.record_failure(upstream, &reason);
                all_unsent = false;
                match (&kept_parts, &replay) {
                    (Some(parts), Some(bytes)) => {
                        tracing::debug!(upstream = %upstream.url, %reason, "retrying a resendable request");
                        request = Request::from_parts(
                            parts.clone(),
                            UpstreamBody::buffered(bytes.clone()),
                        );
                        last_failure = Some(reason);
                    }
                    _ => return Err(ProxyError::Upstream(reason)),
                }
            }
            Err(TryError::BodyTimeout) => return Err(ProxyError::BodyTimeout),
            Err(TryError::Timeout) => {
                shared.record_failure(upstream, &UpstreamFailure::Timeout);
                return Err(ProxyError::Timeout);
            }
        }
    }
    match last_failure {
        Some(reason) if !all_unsent => Err(ProxyError::Upstream(reason)),
        reason => Err(ProxyError::NoUpstream(reason)),
    }
}

/// One try on one upstream: an idle pooled connection when there is one, else a new one.
///
/// `resendable`: the request may be sent again (its body is kept); it then waits for response
/// headers only until `proxy.retry_after_ejection` after the upstream is ejected, and fails as
/// sent, to be retried elsewhere.
async fn try_upstream(
    config: &Limits,
    upstream: &Arc<Upstream>,
    mut request: Request<UpstreamBody>,
    swept: Option<&Watch>,
    resendable: bool,
) -> Result<Response<ClientBody>, TryError> {
    let flight = upstream.begin();
    if upstream.is_draining() {
        // Picked just as a drain began: the drain may not have counted this request.
        return Err(TryError::NotSent(request, UpstreamFailure::Draining));
    }
    // HTTP/1.1 requires Host; a client on HTTP/1.0 may have sent none.
    if !request.headers().contains_key(header::HOST) {
        request
            .headers_mut()
            .insert(header::HOST, upstream.host_header.clone());
    }
    let progress = match request.body() {
        UpstreamBody::Streamed(streamed) => {
            streamed.progress().touch();
            Some(streamed.progress().clone())
        }
        UpstreamBody::Buffered(_) => None,
    };
    loop {
        let (mut sender, fresh) = match upstream.checkout(config.idle_timeout) {
            Some(sender) => (sender, false),
            None => match upstream.connect(config.connect_timeout).await {
                Ok(sender) => (sender, true),
                Err(error) => return Err(TryError::NotSent(request, error.into())),
            },
        };
        // A pooled connection the upstream closed meanwhile is skipped: not its fault. The
        // wait is timed: a connection still busy with something else must not hold us.
        let ready = tokio::time::timeout(config.connect_timeout, sender.ready()).await;
        if !matches!(ready, Ok(Ok(()))) {
            if fresh {
                return Err(TryError::NotSent(request, UpstreamFailure::NotReady));
            }
            continue;
        }
        let send = sender.try_send_request(request);
        let wait = async {
            match (&progress, swept) {
                (None, Some(watch)) => watch.within_response_timeout(send).await,
                (None, None) => tokio::time::timeout(config.response_timeout, send)
                    .await
                    .ok(),
                (Some(progress), _) => until_quiet(send, progress, config.response_timeout).await,
            }
        };
        let sent = if resendable {
            match unless_ejected(wait, upstream, config.retry_after_ejection).await {
                Some(sent) => sent,
                None => return Err(TryError::Sent(UpstreamFailure::Ejected)),
            }
        } else {
            wait.await
        };
        match sent {
            None => return Err(TryError::Timeout),
            Some(Err(mut error)) => match error.take_message() {
                Some(back) if !fresh => request = back,
                Some(back) => {
                    return Err(TryError::NotSent(
                        back,
                        UpstreamFailure::exchange(error.into_error()),
                    ));
                }
                // The client stalled its upload, not the upstream's fault.
                None if progress
                    .as_ref()
                    .is_some_and(|p| !p.finished() && p.quiet_for() >= config.body_timeout) =>
                {
                    return Err(TryError::BodyTimeout);
                }
                None => {
                    return Err(TryError::Sent(UpstreamFailure::exchange(
                        error.into_error(),
                    )));
                }
            },
            Some(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                upstream.statuses.record(parts.status.as_u16());
                let _ = strip_hop_by_hop(&mut parts.headers);
                return Ok(Response::from_parts(
                    parts,
                    ClientBody::Upstream {
                        body,
                        conn: Some(PooledConn {
                            sender,
                            max_idle: config.max_idle_per_upstream,
                            request: progress.clone(),
                        }),
                        in_flight: Some(flight),
                    },
                ));
            }
        }
    }
}

/// Awaits `wait` (an upstream's response headers); `None` when the upstream is ejected
/// meanwhile and `grace` then passes without an answer. The ejection is noticed however long
/// before it the wait began: the waiter is registered before the first poll.
async fn unless_ejected<T>(
    wait: impl std::future::Future<Output = T>,
    upstream: &Upstream,
    grace: std::time::Duration,
) -> Option<T> {
    let ejection = upstream.ejection();
    tokio::pin!(ejection, wait);
    ejection.as_mut().enable();
    tokio::select! {
        biased;
        answered = &mut wait => Some(answered),
        () = &mut ejection => tokio::time::timeout(grace, wait).await.ok(),
    }
}

/// The whole request body, waiting at most `limit` for each next piece of it: a client that
/// sends its headers and then stalls gets 408 instead of holding a task and a buffer.
/// `length` (at most `retry_body_limit`, already reserved) is allocated at once: growing the
/// buffer piece by piece left about as much again in freed copies (30 stalled 1 MiB uploads
/// peaked at 79 MiB of proxy RSS, 58 MiB allocated at once: `scripts/stalled-uploads.sh`).
async fn collect_within(
    mut body: Incoming,
    limit: std::time::Duration,
    length: u64,
) -> Result<Bytes, ProxyError> {
    let mut bytes = bytes::BytesMut::with_capacity(length as usize);
    loop {
        match tokio::time::timeout(limit, body.frame()).await {
            Err(_) => return Err(ProxyError::BodyTimeout),
            Ok(None) => return Ok(bytes.freeze()),
            Ok(Some(Err(error))) => return Err(ProxyError::ClientBody(error)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Awaits `future` (the response headers) until `limit` has passed without the request body
/// making progress: a slow upload that the upstream is reading is not a slow upstream.
async fn until_quiet<F: std::future::Future>(
    future: F,
    progress: &Progress,
    limit: std::time::Duration,
) -> Option<F::Output> {
    tokio::pin!(future);
    let mut wait = limit;
    loop {
        if let Ok(output) = tokio::time::timeout(wait, &mut future).await {
            return Some(output);
        }
        let quiet = progress.quiet_for();
        if quiet >= limit {
            return None;
        }
        wait = limit - quiet;
    }
}
