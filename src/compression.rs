//! Content codings shared by the proxy and the worker: which coding a client gets
//! (`Accept-Encoding` with quality values), which responses are worth compressing, and the
//! br, zstd and gzip encoders of the async-compression project (its push API, `codecs`), fed
//! piece by piece as a body streams or all at once for a cached body.
//!
//! The proxy compresses responses that arrive uncompressed, as they stream
//! ([`crate::proxy::compress`]); the worker keeps compressed variants of cached reads next to the
//! plain entry in Redis and serves them as they are ([`crate::worker::cache`]), so a cache hit
//! costs no compression. Both choose the coding here, so a client gets the same coding whichever
//! of them compressed. Why compression runs where it does: docs/proxy.md#compression.

use std::io;

use async_compression::{
    Level,
    codecs::{BrotliEncoder, EncodeV2, GzipEncoder, ZstdEncoder, brotli::params::EncoderParams},
    core::util::{PartialBuffer, WriteBuffer},
};
use bytes::Bytes;
use hyper::{
    HeaderMap,
    header::{self, HeaderValue},
};

/// Bodies of this many bytes or fewer are sent as they are: the coding's framing and the
/// client's work would cost more than the bytes saved (docs/contract.md §8.2: "over 1 KiB").
pub const MIN_SIZE: u64 = 1024;

/// A content coding taskd produces. Identity (no coding) is `None` wherever an
/// `Option<Encoding>` is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Br,
    Zstd,
    Gzip,
}

impl Encoding {
    /// Every coding, in the server's order of preference among equal quality values: brotli
    /// compresses JSON best at the levels used, zstd is next and cheapest, gzip is what every
    /// client has.
    pub const ALL: [Encoding; 3] = [Encoding::Br, Encoding::Zstd, Encoding::Gzip];

    /// The `Content-Encoding` token.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }

    /// The coding named by a `Content-Encoding` token.
    pub fn parse(token: &str) -> Option<Encoding> {
        Encoding::ALL
            .into_iter()
            .find(|e| token.eq_ignore_ascii_case(e.as_str()))
    }
}

/// The coding to answer a request with: of br, zstd and gzip, the one with the highest quality
/// value in `Accept-Encoding` (a coding not listed takes the value of `*`, else 0), ties going
/// by [`Encoding::ALL`]; `None` (identity) when the header is absent or accepts none of them.
/// `x-gzip` counts as `gzip` (RFC 9110 §8.4.1.3). Malformed entries are ignored.
pub fn negotiate(headers: &HeaderMap) -> Option<Encoding> {
    let mut lines = headers.get_all(header::ACCEPT_ENCODING).iter().peekable();
    lines.peek()?;
    // Quality values in thousandths; `None` when the coding is not listed.
    let mut listed: [Option<u16>; 3] = [None; 3];
    let mut any: Option<u16> = None;
    for entry in lines
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','))
    {
        let mut params = entry.split(';');
        let coding = params.next().unwrap_or_default().trim();
        if coding.is_empty() {
            continue;
        }
        let Some(q) = quality(params) else { continue };
        let slot = match coding {
            "*" => &mut any,
            c if c.eq_ignore_ascii_case("x-gzip") => &mut listed[2],
            c => match Encoding::parse(c) {
                Some(e) => &mut listed[Encoding::ALL.iter().position(|x| *x == e).unwrap_or(0)],
                None => continue,
            },
        };
        // A coding listed twice keeps its highest value.
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    let mut best: Option<(Encoding, u16)> = None;
    for (i, encoding) in Encoding::ALL.into_iter().enumerate() {
        let q = listed[i].or(any).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, top)| q > top) {
            best = Some((encoding, q));
        }
    }
    best.map(|(encoding, _)| encoding)
}

/// The `q` parameter of one `Accept-Encoding` entry in thousandths (1000 when absent); `None`
/// when it is malformed (RFC 9110 §12.4.2: `0`–`1` with up to three decimals).
fn quality<'a>(params: impl Iterator<Item = &'a str>) -> Option<u16> {
    let mut q = 1000;
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("q") {
            continue;
        }
        let value = value.trim();
        let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
        if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let thousandths = fraction
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(3)
            .fold(0u16, |n, digit| n * 10 + u16::from(digit - b'0'));
        q = match whole {
            "0" => thousandths,
            "1" if thousandths == 0 => 1000,
            _ => return None,
        };
    }
    Some(q)
}

/// Whether a body of this `Content-Type` is worth compressing: text, JSON, XML, JavaScript and
/// the like; not images, archives, fonts or anything already compressed.
pub fn is_compressible(content_type: Option<&HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let ends_with = |suffix: &str| {
        subtype.len() >= suffix.len()
            && subtype.as_bytes()[subtype.len() - suffix.len()..]
                .eq_ignore_ascii_case(suffix.as_bytes())
    };
    let is = |name: &str| subtype.eq_ignore_ascii_case(name);
    if kind.eq_ignore_ascii_case("text") {
        return true;
    }
    (kind.eq_ignore_ascii_case("application")
        && (ends_with("+json")
            || ends_with("+xml")
            || [
                "json",
                "xml",
                "javascript",
                "ecmascript",
                "x-javascript",
                "wasm",
                "yaml",
            ]
            .into_iter()
            .any(is)))
        || (kind.eq_ignore_ascii_case("image") && is("svg+xml"))
}

/// Whether `Vary` already names `Accept-Encoding` (or is `*`).
pub fn varies_on_encoding(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|name| name == "*" || name.eq_ignore_ascii_case("accept-encoding"))
}

/// Adds `Accept-Encoding` to `Vary` unless it is there already.
pub fn add_vary(headers: &mut HeaderMap) {
    if !varies_on_encoding(headers) {
        headers.append(
            header::VARY,
            HeaderValue::from_static(header::ACCEPT_ENCODING.as_str()),
        );
    }
}

/// How hard to compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    /// On the fly, once per response (the proxy): brotli 4 and zstd 3 (NGINX's and zstd's
    /// defaults for this), gzip 6.
    Streaming,
    /// Once per cached variant, served many times (the worker's cache): the same, but gzip 9.
    /// Higher brotli and zstd levels were measured on a 6.8 KB page of tasks: 6 % smaller (br
    /// 9) or no smaller (zstd 9) for 20–30 times the CPU, which a miss would pay.
    Stored,
}

/// Largest window of the encoders (2^18 = 256 KiB): bounds each compressing response's memory
/// (brotli's default 4 MiB window and zstd's 2 MiB would take that much per response) at a
/// ratio cost only for bodies far larger than an API response.
const WINDOW_LOG: u32 = 18;

/// The window for a body of `size` bytes (when known): no larger than the body, so a small
/// body does not pay for setting up large match tables (most of the cost of compressing a few
/// KB).
fn window_log(size: Option<u64>) -> u32 {
    size.map_or(WINDOW_LOG, |size| {
        (u64::BITS - size.max(1).saturating_sub(1).leading_zeros()).clamp(10, WINDOW_LOG)
    })
}

/// One body being compressed: push pieces with [`Compressor::push`], take what is ready with
/// [`Compressor::flush`], end with [`Compressor::finish`].
pub struct Compressor {
    codec: Codec,
    out: Vec<u8>,
}

enum Codec {
    Br(Box<BrotliEncoder>),
    Zstd(ZstdEncoder),
    Gzip(GzipEncoder),
}

impl Codec {
    fn get(&mut self) -> &mut dyn EncodeV2 {
        match self {
            Codec::Br(c) => &mut **c,
            Codec::Zstd(c) => c,
            Codec::Gzip(c) => c,
        }
    }
}

impl Compressor {
    /// `size_hint`: the body's length when known, so brotli sizes its buffers to it.
    pub fn new(encoding: Encoding, effort: Effort, size_hint: Option<u64>) -> Self {
        let stored = effort == Effort::Stored;
        let window = window_log(size_hint);
        let codec = match encoding {
            Encoding::Br => {
                let mut params = EncoderParams::default()
                    .quality(Level::Precise(4))
                    .window_size(window as i32)
                    .text_mode();
                if let Some(size) = size_hint {
                    params = params.size_hint(usize::try_from(size).unwrap_or(usize::MAX));
                }
                Codec::Br(Box::new(BrotliEncoder::new(params)))
            }
            Encoding::Zstd => {
                use async_compression::zstd::CParameter;
                Codec::Zstd(ZstdEncoder::new_with_params(
                    3,
                    &[
                        CParameter::window_log(window),
                        CParameter::hash_log((window + 1).min(17)),
                        CParameter::chain_log(window.min(16)),
                    ],
                ))
            }
            Encoding::Gzip => Codec::Gzip(GzipEncoder::new(
                Level::Precise(if stored { 9 } else { 6 }).into(),
            )),
        };
        Self {
            codec,
            out: Vec::new(),
        }
    }

    /// Compresses `input`; the output may stay inside the encoder until [`Self::flush`].
    pub fn push(&mut self, input: &[u8]) -> io::Result<()> {
        let mut input = PartialBuffer::new(input);
        while !input.unwritten().is_empty() {
            let room = input.unwritten().len().clamp(1024, 64 * 1024);
            self.run(room, |codec, out| {
                codec.encode(&mut input, out).map(|()| false)
            })?;
        }
        Ok(())
    }

    /// Output so far, including everything pushed (a flush of the coding: the client can
    /// decode it all without waiting for more).
    pub fn flush(&mut self) -> io::Result<Bytes> {
        loop {
            if self.run(4096, |codec, out| codec.flush(out))? {
                return Ok(self.take());
            }
        }
    }

    /// The rest of the output, with the coding's end of stream.
    pub fn finish(&mut self) -> io::Result<Bytes> {
        loop {
            if self.run(4096, |codec, out| codec.finish(out))? {
                return Ok(self.take());
            }
        }
    }

    /// Bytes of output waiting to be taken.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Output so far, without flushing the encoder.
    pub fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.out))
    }

    /// One call of the encoder with `room` more bytes of output space; its result ("done").
    fn run(
        &mut self,
        room: usize,
        step: impl FnOnce(&mut dyn EncodeV2, &mut WriteBuffer<'_>) -> io::Result<bool>,
    ) -> io::Result<bool> {
        let start = self.out.len();
        self.out.resize(start + room, 0);
        let mut buffer = WriteBuffer::new_initialized(&mut self.out[start..]);
        let done = step(self.codec.get(), &mut buffer);
        let written = buffer.written_len();
        self.out.truncate(start + written);
        done
    }
}

/// `body` compressed whole, or `None` when that does not make it smaller: a compressed copy is
/// never larger than the plain one (which is what bounds a cached variant's size).
pub fn compress(encoding: Encoding, effort: Effort, body: &[u8]) -> Option<Bytes> {
    let mut compressor = Compressor::new(encoding, effort, Some(body.len() as u64));
    compressor.push(body).ok()?;
    let out = compressor.finish().ok()?;
    (out.len() < body.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> Option<Encoding> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_ENCODING, value.parse().unwrap());
        negotiate(&headers)
    }

    #[test]
    fn negotiation_follows_quality_values_then_preference() {
        use Encoding::*;
        assert_eq!(negotiate(&HeaderMap::new()), None);
        assert_eq!(accept(""), None);
        assert_eq!(accept("identity"), None);
        assert_eq!(accept("gzip"), Some(Gzip));
        assert_eq!(accept("x-gzip"), Some(Gzip));
        assert_eq!(accept("gzip, deflate, br, zstd"), Some(Br));
        assert_eq!(accept("gzip, zstd"), Some(Zstd));
        assert_eq!(accept("br;q=0.5, gzip;q=0.8"), Some(Gzip));
        assert_eq!(accept("br;q=0, gzip"), Some(Gzip));
        assert_eq!(accept("BR;Q=0.9, zstd;q=0.85"), Some(Br));
        assert_eq!(accept("*"), Some(Br));
        assert_eq!(accept("*;q=0.5, br;q=0"), Some(Zstd));
        assert_eq!(accept("*;q=0"), None);
        assert_eq!(accept("gzip;q=0"), None);
        assert_eq!(accept("deflate, compress"), None);
        // Malformed quality values are ignored, not read as 1.
        assert_eq!(accept("br;q=2, gzip"), Some(Gzip));
        assert_eq!(accept("br;q=0.1234, gzip;q=0.001"), Some(Gzip));
        assert_eq!(accept("br;q=abc"), None);
        assert_eq!(accept(",,;q=1, zstd ; q = 1.000"), Some(Zstd));
    }

    #[test]
    fn compressible_types() {
        let yes = |t: &str| is_compressible(Some(&HeaderValue::from_str(t).unwrap()));
        for t in [
            "application/json",
            "application/problem+json",
            "application/json; charset=utf-8",
            "text/html",
            "TEXT/CSS",
            "application/javascript",
            "image/svg+xml",
            "application/vnd.api+json",
        ] {
            assert!(yes(t), "{t}");
        }
        for t in [
            "image/png",
            "application/octet-stream",
            "application/zip",
            "font/woff2",
            "video/mp4",
            "nonsense",
        ] {
            assert!(!yes(t), "{t}");
        }
        assert!(!is_compressible(None));
    }

    #[test]
    fn vary_is_added_once() {
        let mut headers = HeaderMap::new();
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        add_vary(&mut headers);
        add_vary(&mut headers);
        let values: Vec<_> = headers.get_all(header::VARY).iter().collect();
        assert_eq!(values, ["Origin", "accept-encoding"]);
    }

    #[test]
    fn windows_follow_the_body_size() {
        assert_eq!(window_log(None), 18);
        assert_eq!(window_log(Some(0)), 10);
        assert_eq!(window_log(Some(6822)), 13);
        assert_eq!(window_log(Some(8192)), 13);
        assert_eq!(window_log(Some(8193)), 14);
        assert_eq!(window_log(Some(10 << 20)), 18);
    }

    #[test]
    fn stored_variants_are_never_larger_than_the_body() {
        for encoding in Encoding::ALL {
            assert_eq!(compress(encoding, Effort::Stored, b"{}"), None);
            let body = "{\"title\":\"write the report\"},".repeat(100);
            let out = compress(encoding, Effort::Stored, body.as_bytes()).unwrap();
            assert!(out.len() < body.len() / 5, "{encoding:?}: {}", out.len());
        }
    }
}
