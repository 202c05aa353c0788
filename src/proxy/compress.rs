//! Response compression (`proxy.compression`, docs/contract.md §8.2): responses that arrive
//! uncompressed are compressed as they stream, in the coding the client prefers.
//!
//! What is compressed: a response with a body, of a compressible type ([`is_compressible`]),
//! larger than [`MIN_SIZE`] or of unknown length, not already encoded (`Content-Encoding`), not
//! a part (`Content-Range`, 206), not marked `Cache-Control: no-transform`, to a request that is
//! neither `HEAD` nor a `Range` request. Every such response gets `Vary: Accept-Encoding`,
//! compressed or not, so a shared cache keeps the variants apart. A compressed response loses
//! `Content-Length` and `Accept-Ranges`, and a strong `ETag` becomes weak (`W/"…"`): the bytes
//! differ from the upstream's, the content does not, and `If-None-Match` compares weakly.
//!
//! Streaming: each piece of the upstream body is pushed into the encoder as it arrives, and
//! what the encoder holds is flushed to the client whenever the upstream has nothing more ready
//! (or 16 KiB are waiting), so a slow stream reaches the client as it is produced, and a fast
//! one is not cut into tiny flushed blocks. Memory per compressed response: the encoder's
//! window (256 KiB at most) and at most one upstream piece plus 16 KiB of output.
//!
//! A request without `Accept-Encoding` costs the checks above, the size first (most small
//! answers stop there), and `Vary` on a compressible answer. The compressing body itself is
//! [`Compressing`], in `body.rs` with the [`ClientBody`] it wraps.

use hyper::{
    HeaderMap, Method, Response, StatusCode,
    body::Body,
    header::{self, HeaderValue},
    http::request::Parts,
};

use super::body::{ClientBody, Compressing};
use crate::compression::{
    Compressor, Effort, Encoding, MIN_SIZE, add_vary, is_compressible, negotiate,
};

/// What the request allows: `None` when it may not be compressed at all (`HEAD`, `Range`),
/// else the coding it takes (`Some(None)`: identity, but the response still varies).
pub type Plan = Option<Option<Encoding>>;

/// Reads the request's side of the decision (before its headers go upstream).
pub fn plan(parts: &Parts) -> Plan {
    if parts.method == Method::HEAD || parts.headers.contains_key(header::RANGE) {
        return None;
    }
    Some(negotiate(&parts.headers))
}

/// Applies `plan` to the upstream's response: `Vary`, and the compressing body when the client
/// takes a coding.
pub fn apply(plan: Plan, response: Response<ClientBody>) -> Response<ClientBody> {
    let Some(encoding) = plan else {
        return response;
    };
    if !eligible(response.status(), response.headers(), response.body()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    add_vary(&mut parts.headers);
    let Some(encoding) = encoding else {
        return Response::from_parts(parts, body);
    };
    let size = body
        .size_hint()
        .exact()
        .or_else(|| content_length(&parts.headers));
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::ACCEPT_RANGES);
    parts
        .headers
        .insert(header::CONTENT_ENCODING, encoding.header_value());
    if let Some(etag) = parts.headers.get(header::ETAG)
        && !etag.as_bytes().starts_with(b"W/")
    {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(etag.as_bytes());
        if let Ok(weak) = HeaderValue::from_bytes(&weak) {
            parts.headers.insert(header::ETAG, weak);
        }
    }
    let body = ClientBody::Compressed(Box::new(Compressing::new(
        body,
        Compressor::new(encoding, Effort::Streaming, size),
    )));
    Response::from_parts(parts, body)
}

/// The response's side of the decision (see the module docs).
fn eligible(status: StatusCode, headers: &HeaderMap, body: &ClientBody) -> bool {
    if status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
        )
        || headers.contains_key(header::CONTENT_ENCODING)
        || headers.contains_key(header::CONTENT_RANGE)
    {
        return false;
    }
    // The size before the media type (NGINX's order too): most small answers stop here. The
    // body knows a Content-Length hyper has already parsed.
    let size = body.size_hint().exact().or_else(|| content_length(headers));
    if size.is_some_and(|size| size <= MIN_SIZE) {
        return false;
    }
    is_compressible(headers.get(header::CONTENT_TYPE))
        && !headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|directive| directive.trim().eq_ignore_ascii_case("no-transform"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
