//! The proxy's own failures, each mapped to one status and answered as problem+json.

use bytes::Bytes;
use hyper::{
    Response, StatusCode,
    header::{self, HeaderValue},
};

use super::{body::ClientBody, upstream::ConnectError};

/// Why the proxy answered a request itself. The source decides the status: the client's side
/// (400), the upstream's (502, 504), or nothing to send to (503).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's request body could not be read.
    #[error("the request body could not be read: {0}")]
    ClientBody(#[source] hyper::Error),
    /// An upstream took the request and failed (reset, closed, malformed response), and the
    /// request could not safely be sent again.
    #[error("the upstream failed: {0}")]
    Upstream(#[source] UpstreamFailure),
    /// No upstream could take the request: none configured, all draining, or every one tried
    /// refused the connection.
    #[error("no upstream is available{}", .0.as_ref().map(|r| format!(" (last error: {r})")).unwrap_or_default())]
    NoUpstream(Option<UpstreamFailure>),
    /// The upstream did not send response headers within `proxy.response_timeout`.
    #[error("the upstream did not answer in time")]
    Timeout,
    /// The client stopped sending its request body for `proxy.body_timeout`.
    #[error("the request body stalled")]
    BodyTimeout,
    /// A path the public listener does not forward (the workers' `/metrics`, docs/contract.md §8).
    #[error("not served on the public listener")]
    NotFound,
    /// A request to redirect to HTTPS (`proxy.tls.redirect_http`) that names no valid host.
    #[error("no valid Host to redirect to")]
    NoHost,
}

/// How a try on an upstream failed, with its source: what passive health counts and the logs
/// show. (Never sent to the client, which sees only the status.)
#[derive(Debug, thiserror::Error)]
pub enum UpstreamFailure {
    /// No connection: refused, timed out, not resolved, or the HTTP handshake failed.
    #[error("connect: {0}")]
    Connect(#[from] ConnectError),
    /// A pooled connection that could not take the request in time.
    #[error("the connection was not ready")]
    NotReady,
    /// The connection broke while the request or the response head was on it (reset, closed).
    #[error("connection failed: {0}")]
    Reset(#[source] hyper::Error),
    /// The upstream sent something that is not HTTP/1.1.
    #[error("protocol error: {0}")]
    Protocol(#[source] hyper::Error),
    /// No response headers within `proxy.response_timeout`.
    #[error("response timeout")]
    Timeout,
    /// Picked as it began draining.
    #[error("the upstream is draining")]
    Draining,
    /// Ejected while the request waited for it, for `proxy.retry_after_ejection`.
    #[error("the upstream was ejected while the request waited")]
    Ejected,
}

impl UpstreamFailure {
    /// A failed exchange with an upstream, by what hyper says of it.
    pub fn exchange(error: hyper::Error) -> Self {
        if error.is_parse() || error.is_parse_status() {
            Self::Protocol(error)
        } else {
            Self::Reset(error)
        }
    }
}

impl ProxyError {
    /// The one mapping from failure to status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::ClientBody(_) | ProxyError::NoHost => StatusCode::BAD_REQUEST,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::NoUpstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ProxyError::ClientBody(_) | ProxyError::NoHost => "bad-request",
            ProxyError::Upstream(_) => "bad-gateway",
            ProxyError::NoUpstream(_) => "no-upstream",
            ProxyError::Timeout => "gateway-timeout",
            ProxyError::NotFound => "not-found",
            ProxyError::BodyTimeout => "request-timeout",
        }
    }

    /// The problem+json answer. Details name what failed but never the upstream's address.
    pub fn into_response(self, request_id: Option<&HeaderValue>) -> Response<ClientBody> {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "proxy answered an error");
        }
        let detail = match &self {
            ProxyError::ClientBody(_) => "the request body could not be read".to_owned(),
            ProxyError::Upstream(_) => {
                "the upstream server failed while handling the request".to_owned()
            }
            ProxyError::NoUpstream(_) => {
                "no upstream server is available; try again shortly".to_owned()
            }
            ProxyError::Timeout => "the upstream server did not answer in time".to_owned(),
            ProxyError::BodyTimeout => {
                "the request body stopped arriving; send it without pauses".to_owned()
            }
            ProxyError::NotFound => {
                "metrics are not served here; scrape the proxy's admin listener".to_owned()
            }
            ProxyError::NoHost => {
                "this address redirects to HTTPS, which needs a valid Host header".to_owned()
            }
        };
        let request_id = request_id.and_then(|v| v.to_str().ok()).unwrap_or_default();
        let body = serde_json::json!({
            "type": format!("/problems/{}", self.slug()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": detail,
            "requestId": request_id,
        });
        let mut response = Response::new(ClientBody::local(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Ok(id) = HeaderValue::from_str(request_id)
            && !request_id.is_empty()
        {
            headers.insert("x-request-id", id);
        }
        if matches!(self, ProxyError::NoUpstream(_)) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
