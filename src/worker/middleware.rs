//! What wraps every request: request id, `X-Served-By`, the request timeout, metrics and one log
//! line per request; plus the problem+json answers for unknown routes, wrong methods and panics.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, OnceLock},
    time::Instant,
};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use ipnet::IpNet;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

use super::{
    AppState,
    error::{ApiError, ErrorCause, REQUEST_ID, problem_response},
};

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_SERVED_BY: &str = "x-served-by";

/// The process-wide Prometheus recorder (installed once; tests build many apps in one process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("http_request_duration_seconds".into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ],
                )
                .expect("non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            // A recorder that is built, not installed, has no upkeep task of its own: without
            // one, histogram samples pile up until the next scrape (memory grows with requests).
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawning the metrics upkeep thread");
            // Another recorder may already be installed (e.g. by a test harness): keep ours
            // usable for rendering either way.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The request id to use: the caller's when it is a sane token, else a new UUID.
fn request_id(headers: &HeaderMap) -> Arc<str> {
    headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::telemetry::is_safe_request_id(v.as_bytes()))
        .map(Arc::from)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string().into())
}

/// The client address: the TCP peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy. A client can prepend anything to
/// the header, but never the entries that trusted proxies append.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let entries = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for entry in entries.iter().rev() {
        match entry.parse::<IpAddr>() {
            Ok(ip) if is_trusted(&ip) => client = ip,
            Ok(ip) => return ip,
            // Garbage from a client: stop at the last address a trusted hop vouched for.
            Err(_) => return client,
        }
    }
    client
}

/// The client address of a request (see [`client_ip`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

impl axum::extract::FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([127, 0, 0, 1]), |ConnectInfo(peer)| peer.ip());
        Ok(ClientIp(client_ip(
            peer,
            &parts.headers,
            &state.config.worker.trusted_proxies,
        )))
    }
}

/// Wraps every request; see the module docs.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(request.headers());
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| {
            client_ip(
                peer.ip(),
                request.headers(),
                &state.config.worker.trusted_proxies,
            )
        });
    // The proxy's health checks and the supervisor's probes name themselves (`taskd-...`).
    let is_probe = route.starts_with("/health")
        && request
            .headers()
            .get(axum::http::header::USER_AGENT)
            .is_some_and(|agent| agent.as_bytes().starts_with(b"taskd-"));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        instance = %state.instance,
        method = %method,
        route = %route,
    );
    let timeout = state.config.worker.request_timeout;
    let mut response = REQUEST_ID
        .scope(id.clone(), async move {
            match tokio::time::timeout(timeout, next.run(request)).await {
                Ok(response) => response,
                Err(_) => ApiError::Unavailable("the request took too long; retry shortly")
                    .into_response(),
            }
        })
        .instrument(span)
        .await;

    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(X_REQUEST_ID, value);
    }
    headers.insert(X_SERVED_BY, state.served_by.clone());

    let status = response.status();
    let elapsed = started.elapsed();
    let method = method_label(&method);
    record_request(method, &route, status.as_u16(), elapsed);

    // The request line carries every field itself (not via the span), so log shippers find
    // them at the top level of a JSON line.
    let latency_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    let client = OptionalIp(client);
    let status = status.as_u16();
    macro_rules! request_line {
        ($level:ident, $($extra:tt)*) => {
            tracing::$level!(
                request_id = %id, instance = %state.instance, %method, %route, status,
                latency_ms, %client, $($extra)*
            )
        };
    }
    match response.extensions().get::<ErrorCause>() {
        Some(ErrorCause(cause)) => request_line!(error, error = %cause, "request failed"),
        None if status >= 500 => request_line!(warn, "request"),
        // Probes from the proxy and the supervisor arrive every second per worker: passing ones
        // would drown the log.
        None if is_probe => request_line!(debug, "request"),
        None => request_line!(info, "request"),
    }
    response
}

/// The method as a metric label: the standard ones by name, anything else as `OTHER`, so that
/// made-up methods cannot grow the number of series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

/// A request's metrics handles, per thread and route. Finding a labelled series in the
/// registry builds its key (three label strings) and hashes it on every call; the handles are
/// looked up once per thread instead and kept (routes are the router's, so the map is bounded).
#[derive(Default)]
struct RouteMetrics {
    by_method: Vec<MethodMetrics>,
}

/// One method's latency histogram and its counter per status.
struct MethodMetrics {
    method: &'static str,
    latency: Histogram,
    by_status: Vec<(u16, Counter)>,
}

fn record_request(method: &'static str, route: &str, status: u16, elapsed: std::time::Duration) {
    thread_local! {
        static HANDLES: RefCell<HashMap<Box<str>, RouteMetrics>> = RefCell::default();
    }
    HANDLES.with_borrow_mut(|handles| {
        if !handles.contains_key(route) {
            handles.insert(route.into(), RouteMetrics::default());
        }
        let by_method = &mut handles.get_mut(route).expect("just inserted").by_method;
        let index = match by_method.iter().position(|m| m.method == method) {
            Some(index) => index,
            None => {
                let labels = [("method", method.to_owned()), ("route", route.to_owned())];
                by_method.push(MethodMetrics {
                    method,
                    latency: metrics::histogram!("http_request_duration_seconds", &labels),
                    by_status: Vec::new(),
                });
                by_method.len() - 1
            }
        };
        let MethodMetrics {
            latency, by_status, ..
        } = &mut by_method[index];
        latency.record(elapsed.as_secs_f64());
        match by_status.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => counter.increment(1),
            None => {
                let labels = [
                    ("method", method.to_owned()),
                    ("route", route.to_owned()),
                    ("status", status.to_string()),
                ];
                let counter = metrics::counter!("http_requests_total", &labels);
                counter.increment(1);
                by_status.push((status, counter));
            }
        }
    });
}

/// The client address in the request line (empty when unknown), formatted only when the line
/// is written.
struct OptionalIp(Option<IpAddr>);

impl std::fmt::Display for OptionalIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => Ok(()),
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A panic in a handler is a bug: answer a plain 500 and keep its message for the log.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".into());
    let mut response = problem_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "an unexpected error occurred; it has been logged with this request id".into(),
        None,
    );
    response
        .extensions_mut()
        .insert(ErrorCause(format!("panic: {message}").into()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn client_ip_believes_only_trusted_hops() {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Untrusted peer: its header is ignored.
        assert_eq!(
            client_ip(ip("203.0.113.9"), &xff("1.2.3.4"), &trusted),
            ip("203.0.113.9")
        );
        // Trusted peer: the right-most untrusted entry wins, spoofed left entries are ignored.
        assert_eq!(
            client_ip(
                ip("127.0.0.1"),
                &xff("6.6.6.6, 198.51.100.7, 10.1.1.1"),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // Trusted peer without the header: the peer itself.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &HeaderMap::new(), &trusted),
            ip("127.0.0.1")
        );
        // Garbage to the right of nothing trusted: fall back to the last trusted hop.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &xff("nonsense"), &trusted),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(&*request_id(&headers), "abc-123");
        headers.insert(X_REQUEST_ID, "has space".parse().unwrap());
        assert_ne!(&*request_id(&headers), "has space");
    }
}
