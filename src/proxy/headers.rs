//! What the proxy knows of a client connection ([`Client`], [`Peer`]) and the header rules of
//! a forwarded request (docs/contract.md §5): `X-Forwarded-*` (a client can never choose the
//! address rate limits see), `X-Request-Id`, hop-by-hop headers removed both ways, and which
//! requests may be sent twice.

use std::{cell::Cell, net::IpAddr};

use hyper::{
    HeaderMap, Method, Uri,
    header::{self, HeaderName, HeaderValue},
};
use tokio_util::task::TaskTracker;

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
pub(super) fn may_resend(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || headers.contains_key(&IDEMPOTENCY_KEY)
}

/// One client connection, as its requests (and an upgraded connection that outlives its HTTP
/// life) see it.
pub struct Client {
    pub peer: Peer,
    /// The connection's slot of `proxy.max_connections`, given back when the connection and
    /// whatever outlives it (an upgraded connection, HTTP/2 request tasks) have all ended.
    pub(super) _slot: tokio::sync::OwnedSemaphorePermit,
    /// Upgraded connections of this serving thread, which shutdown waits for.
    pub tunnels: TaskTracker,
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
