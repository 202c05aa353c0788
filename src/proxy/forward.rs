//! Forwarding one request: header rules, choosing an upstream, retries, and the proxy's own
//! errors.

use std::{
    cell::Cell,
    net::IpAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    HeaderMap, Method, Request, Response, Uri, Version,
    body::{Body, Incoming},
    header::{self, HeaderName, HeaderValue},
    http::uri::PathAndQuery,
};

use super::{
    Shared,
    body::{ClientBody, PooledConn, Progress, UpstreamBody},
    compress,
    error::{ProxyError, UpstreamFailure},
    idle::Watch,
    listen::Client,
    upstream::Upstream,
};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1), besides those a `Connection` header names.
fn hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// What the proxy knows about the client connection a request arrived on.
#[derive(Clone)]
pub struct Peer {
    /// The peer's address as a header value, formatted once per connection.
    pub addr: HeaderValue,
    /// Whether the peer is one of `proxy.trusted_proxies` (its forwarding headers are kept).
    pub trusted: bool,
    /// Whether the connection came to the HTTPS listener (`X-Forwarded-Proto: https`).
    pub https: bool,
}

impl Peer {
    pub fn new(ip: IpAddr, trusted: bool) -> Self {
        Self {
            // `::ffff:a.b.c.d` (an IPv4 client on a dual-stack socket) is shown as `a.b.c.d`.
            addr: HeaderValue::from_str(&ip.to_canonical().to_string())
                .expect("an IP address is a valid header"),
            trusted,
            https: false,
        }
    }

    /// The same peer, on a connection to the HTTPS listener when `https`.
    pub fn over_tls(self, https: bool) -> Self {
        Self { https, ..self }
    }
}

/// Removes the hop-by-hop headers, including every header the `Connection` header names.
/// Returns the `Upgrade` header's value when `Connection` names `upgrade`: the message asks to
/// switch protocols (or, from an upstream, did switch).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Most messages carry none: one pass over the names they have (cheap comparisons) instead
    // of a hashed lookup per hop-by-hop name.
    if !headers.keys().any(|name| hop_by_hop().contains(&name)) {
        return None;
    }
    // Every `Connection` line counts: `Connection: close` then `Connection: x-secret` names
    // both.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|line| line.to_str().unwrap_or_default().split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    let upgrade = if named.contains(&header::UPGRADE) {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in named {
        headers.remove(name);
    }
    for name in hop_by_hop() {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    upgrade
}

/// The outcome of [`forwarding_headers`].
pub struct Forwarding {
    /// The request's id, the client's or a new one.
    pub request_id: HeaderValue,
    /// The protocol the request asks to upgrade to (its `Upgrade` header, named by
    /// `Connection`); removed from the headers like every hop-by-hop header.
    pub upgrade: Option<HeaderValue>,
}

/// Applies the header rules of docs/contract.md §5 to a request about to be forwarded.
/// (Each header is looked up once: these lookups are a good part of the proxy's own work.)
pub fn forwarding_headers(headers: &mut HeaderMap, uri: &Uri, peer: &Peer) -> Forwarding {
    let upgrade = strip_hop_by_hop(headers);
    let host = match headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        // An HTTP/2 request carries its host in `:authority`; HTTP/1.1 upstreams need `Host`.
        None => {
            let authority = uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            if let Some(value) = &authority {
                headers.insert(header::HOST, value.clone());
            }
            authority
        }
    };
    if peer.trusted {
        let mut seen = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
        if seen.peek().is_none() {
            headers.insert(X_FORWARDED_FOR.clone(), peer.addr.clone());
        } else {
            let mut joined = Vec::with_capacity(64);
            for value in seen {
                joined.extend_from_slice(value.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(peer.addr.as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                headers.insert(X_FORWARDED_FOR.clone(), value);
            }
        }
    } else {
        // Whatever an untrusted client claims is replaced: it cannot choose the address
        // that rate limits see.
        headers.insert(X_FORWARDED_FOR.clone(), peer.addr.clone());
    }
    if !peer.trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if peer.https { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !peer.trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
            // HTTP/1.0 without Host: nothing to forward, and the client's claim is not kept.
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
    let request_id = match headers.get(&X_REQUEST_ID) {
        Some(id) if crate::telemetry::is_safe_request_id(id.as_bytes()) => id.clone(),
        // Absent, or not something to put in every log line: a new one replaces it.
        _ => {
            let id = new_request_id();
            headers.insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    };
    Forwarding {
        request_id,
        upgrade,
    }
}

/// A new request id: 32 hex digits, a random per-thread prefix and a per-thread counter. Unique
/// without a syscall or a shared counter per request.
fn new_request_id() -> HeaderValue {
    thread_local! {
        static NEXT: Cell<(u64, u64)> = Cell::new((rand::random(), 0));
    }
    let (prefix, n) = NEXT.with(|next| {
        let (prefix, n) = next.get();
        next.set((prefix, n.wrapping_add(1)));
        (prefix, n)
    });
    let mut buf = [0u8; 32];
    let digits = b"0123456789abcdef";
    for (i, byte) in prefix
        .to_be_bytes()
        .iter()
        .chain(&n.to_be_bytes())
        .enumerate()
    {
        buf[2 * i] = digits[usize::from(byte >> 4)];
        buf[2 * i + 1] = digits[usize::from(byte & 15)];
    }
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header")
}

/// Whether a request that reached an upstream may be sent again (docs/contract.md §5).
fn may_resend(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || headers.contains_key(&IDEMPOTENCY_KEY)
}

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
        super::upgrade::forward(&shared, client, parts, body, protocol, on_upgrade).await
    } else {
        forward(&shared, parts, body, swept).await
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

/// `swept`: the connection's watch when the sweeper times the response wait (see
/// [`Watch::within_response_timeout`]); otherwise a tokio timer does.
async fn forward(
    shared: &Shared,
    mut parts: hyper::http::request::Parts,
    body: Incoming,
    swept: Option<&Watch>,
) -> Result<Response<ClientBody>, ProxyError> {
    let config = shared.limits();
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
        match try_upstream(shared, upstream, request, swept, movable).await {
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
    shared: &Shared,
    upstream: &Arc<Upstream>,
    mut request: Request<UpstreamBody>,
    swept: Option<&Watch>,
    resendable: bool,
) -> Result<Response<ClientBody>, TryError> {
    let config = shared.limits();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn uri() -> Uri {
        "/api/v1/tasks?page=2".parse().unwrap()
    }

    #[test]
    fn untrusted_peers_cannot_choose_their_forwarded_address() {
        let mut h = headers(&[
            ("host", "api.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ]);
        forwarding_headers(
            &mut h,
            &uri(),
            &Peer::new("10.0.0.9".parse().unwrap(), false),
        );
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["10.0.0.9"]
        );
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["host"], "api.example.com");
        assert_eq!(h["x-request-id"].len(), 32);
    }

    #[test]
    fn trusted_peers_get_the_address_appended() {
        let mut h = headers(&[
            ("host", "api.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "abc"),
        ]);
        forwarding_headers(
            &mut h,
            &uri(),
            &Peer::new("::ffff:10.0.0.9".parse().unwrap(), true),
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["x-request-id"], "abc");
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = headers(&[
            ("host", "a"),
            ("connection", "keep-alive, x-secret , Upgrade"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
        ]);
        forwarding_headers(
            &mut h,
            &uri(),
            &Peer::new("127.0.0.1".parse().unwrap(), false),
        );
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "upgrade",
            "te",
            "transfer-encoding",
            "proxy-connection",
        ] {
            assert!(!h.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn an_upgrade_is_reported_only_when_connection_names_it() {
        let peer = Peer::new("127.0.0.1".parse().unwrap(), false);
        let mut h = headers(&[
            ("host", "a"),
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        let forwarding = forwarding_headers(&mut h, &uri(), &peer);
        assert_eq!(forwarding.upgrade.unwrap(), "websocket");
        assert!(!h.contains_key("upgrade") && !h.contains_key("connection"));
        // `Upgrade` alone is a hop-by-hop header like any other, not a request to switch.
        let mut h = headers(&[("host", "a"), ("upgrade", "websocket")]);
        assert!(forwarding_headers(&mut h, &uri(), &peer).upgrade.is_none());
        assert!(!h.contains_key("upgrade"));
    }

    #[test]
    fn requests_over_tls_are_forwarded_as_https() {
        let peer = Peer::new("10.0.0.9".parse().unwrap(), false).over_tls(true);
        let mut h = headers(&[("host", "a"), ("x-forwarded-proto", "http")]);
        forwarding_headers(&mut h, &uri(), &peer);
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn every_connection_line_names_headers_to_remove() {
        let mut h = headers(&[
            ("host", "a"),
            ("connection", "close"),
            ("connection", "x-secret"),
            ("x-secret", "1"),
        ]);
        forwarding_headers(
            &mut h,
            &uri(),
            &Peer::new("127.0.0.1".parse().unwrap(), false),
        );
        assert!(
            !h.contains_key("x-secret"),
            "named by the second line, still forwarded"
        );
    }

    #[test]
    fn client_request_ids_are_kept_only_when_short_and_plain() {
        let peer = Peer::new("127.0.0.1".parse().unwrap(), false);
        for (sent, kept) in [
            ("0192f0c4-7b1e-7c3a-9d2e-5f6a7b8c9d0e", true),
            ("req_ABC.123:x", true),
            ("has space", false),
            ("<script>alert(1)</script>", false),
            ("a\"quote", false),
            (&"x".repeat(129), false),
        ] {
            let mut h = headers(&[("host", "a"), ("x-request-id", sent)]);
            let id = forwarding_headers(&mut h, &uri(), &peer).request_id;
            assert_eq!(id == sent, kept, "{sent:?}");
            assert_eq!(h["x-request-id"], id);
            if !kept {
                assert_eq!(id.len(), 32, "a generated id replaces {sent:?}");
            }
        }
    }

    #[test]
    fn http2_authority_becomes_the_host_header() {
        let mut h = HeaderMap::new();
        let uri: Uri = "http://api.example.com:8080/x".parse().unwrap();
        forwarding_headers(
            &mut h,
            &uri,
            &Peer::new("127.0.0.1".parse().unwrap(), false),
        );
        assert_eq!(h["host"], "api.example.com:8080");
        assert_eq!(h["x-forwarded-host"], "api.example.com:8080");
    }

    #[test]
    fn request_ids_are_unique() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn resend_rules_follow_the_spec() {
        let none = HeaderMap::new();
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(may_resend(&m, &none), "{m}");
        }
        assert!(!may_resend(&Method::POST, &none));
        assert!(!may_resend(&Method::PATCH, &none));
        assert!(may_resend(
            &Method::POST,
            &headers(&[("idempotency-key", "k1")])
        ));
    }
}
