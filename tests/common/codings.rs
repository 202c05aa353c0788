//! Decoding response bodies in the compression tests, with each coding's own decoder crate
//! (flate2, brotli-decompressor, zstd) rather than anything of taskd's.

use std::io::{Read, Write};

/// `bytes` decoded from `coding` (`br`, `gzip`, `zstd`); panics when they are not valid.
#[track_caller]
pub fn decode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "br" => {
            brotli_decompressor::Decompressor::new(bytes, 4096)
                .read_to_end(&mut out)
                .expect("valid brotli");
        }
        "gzip" => {
            flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .expect("valid gzip");
        }
        "zstd" => {
            zstd::stream::read::Decoder::new(bytes)
                .expect("zstd decoder")
                .read_to_end(&mut out)
                .expect("valid zstd");
        }
        other => panic!("unknown coding {other:?}"),
    }
    out
}

/// A gzip stream decoded piece by piece: what the client could show so far.
pub struct GzipStream(flate2::write::GzDecoder<Vec<u8>>);

impl Default for GzipStream {
    fn default() -> Self {
        Self(flate2::write::GzDecoder::new(Vec::new()))
    }
}

impl GzipStream {
    /// Feeds the next received bytes; returns everything decoded so far.
    pub fn feed(&mut self, bytes: &[u8]) -> &[u8] {
        self.0.write_all(bytes).expect("valid gzip");
        self.0.flush().expect("valid gzip");
        self.0.get_ref()
    }
}
