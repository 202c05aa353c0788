//! The supervisor's HTTP needs of a local worker: [`get`], the status code of a probe, and
//! [`fetch`], a small body (its `/metrics`).
//!
//! Each is a connection of its own rather than a pooled client: a probe must never share a
//! connection pool with the proxy (a pooled connection would hide a worker that stopped
//! accepting), and a hung worker must show up as a timeout, not as a queued request.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The status code of `GET path` on `127.0.0.1:port`, or `None` when there is no complete
/// status line within `timeout` (refused, reset, hung, or not HTTP).
pub async fn get(port: u16, path: &str, timeout: Duration) -> Option<u16> {
    tokio::time::timeout(timeout, exchange(port, path))
        .await
        .ok()
        .flatten()
}

/// The body of `GET path` on `127.0.0.1:port` when it answers 200 within `timeout` with at
/// most `limit` bytes; `None` otherwise.
pub async fn fetch(port: u16, path: &str, timeout: Duration, limit: usize) -> Option<Bytes> {
    let exchange = async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
            .header(hyper::header::USER_AGENT, "taskd-supervisor")
            .body(Empty::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        if response.status() != hyper::StatusCode::OK {
            return None;
        }
        let body = Limited::new(response.into_body(), limit);
        Some(body.collect().await.ok()?.to_bytes())
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

async fn exchange(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: taskd-supervisor\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 128];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status_line(&head)
}

/// `HTTP/1.1 200 OK\r\n...` → 200.
fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_http_status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 OK\r\ncontent-length: 2"),
            Some(200)
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[tokio::test]
    async fn a_listener_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepted by the kernel's backlog, never read: what a SIGSTOPped worker looks like.
        let started = std::time::Instant::now();
        assert_eq!(
            get(port, "/health/live", Duration::from_millis(200)).await,
            None
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(listener);
    }

    #[tokio::test]
    async fn fetch_returns_a_body_within_its_limit_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nup 1\nok 2\n")
                    .await;
            }
        });
        let timeout = Duration::from_secs(2);
        assert_eq!(
            fetch(port, "/metrics", timeout, 64).await.as_deref(),
            Some(&b"up 1\nok 2\n"[..])
        );
        assert_eq!(fetch(port, "/metrics", timeout, 9).await, None);
    }

    #[tokio::test]
    async fn reads_the_status_of_a_real_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                .await;
        });
        assert_eq!(
            get(port, "/health/live", Duration::from_secs(2)).await,
            Some(204)
        );
    }
}
