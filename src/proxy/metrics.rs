//! The proxy's counters, kept in plain atomics and rendered in the Prometheus text format.
//!
//! The worker uses the `metrics` crate's recorder; the proxy does not, because a recorder call
//! hashes its labels on every request, and the proxy's budget per request is a few
//! microseconds. Here a request costs three relaxed atomic increments.

use std::{
    fmt::Write,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use super::{
    clock::now_ms,
    upstream::{StatusCounts, Upstream},
};

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Latency until response headers, as a cumulative Prometheus histogram.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// A per-upstream series: name, type, help, and how to read it at `now_ms()`.
type PerUpstream = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Upstream, u64) -> u64,
);

/// Counters that are not per upstream.
#[derive(Default)]
pub struct ProxyMetrics {
    /// Time to response headers of every proxied request, the proxy's own answers included.
    pub latency: Histogram,
    /// Extra tries after a failed one.
    pub retries: AtomicU64,
    /// Answers the proxy wrote itself, by status (502, 503, 504, ...).
    pub local: StatusCounts,
    /// Requests being handled right now (an upgraded connection counts as one until it closes).
    pub in_flight: AtomicU64,
    /// Upgraded connections (WebSocket, other `Upgrade`s) open now.
    pub upgraded: AtomicU64,
    /// Connections accepted while every `proxy.max_connections` slot was taken (accepting then
    /// paused until one freed).
    pub accept_paused: AtomicU64,
    /// TLS handshakes that failed, and those that ran out of `proxy.tls.handshake_timeout`.
    pub tls_handshake_errors: AtomicU64,
    pub tls_handshake_timeouts: AtomicU64,
}

/// The HTTPS certificate's figures for `/metrics`.
pub struct TlsGauges {
    /// End of the served certificate's validity, Unix seconds.
    pub not_after: i64,
    pub reloads: u64,
    pub reload_failures: u64,
}

impl ProxyMetrics {
    /// The Prometheus text exposition of these counters and of each upstream's.
    pub fn render(&self, upstreams: &[std::sync::Arc<Upstream>]) -> String {
        let mut out = String::with_capacity(4096);
        let now = now_ms();
        out.push_str("# HELP taskd_proxy_requests_total Responses sent, by upstream and status (upstream=\"proxy\": the proxy's own answers).\n# TYPE taskd_proxy_requests_total counter\n");
        for up in upstreams {
            for (status, n) in up.statuses.seen() {
                let _ = writeln!(
                    out,
                    "taskd_proxy_requests_total{{upstream=\"{}\",status=\"{status}\"}} {n}",
                    up.url
                );
            }
        }
        for (status, n) in self.local.seen() {
            let _ = writeln!(
                out,
                "taskd_proxy_requests_total{{upstream=\"proxy\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP taskd_proxy_request_duration_seconds Time until response headers.\n# TYPE taskd_proxy_request_duration_seconds histogram\n");
        self.latency
            .render(&mut out, "taskd_proxy_request_duration_seconds");
        let _ = writeln!(
            out,
            "# HELP taskd_proxy_retries_total Extra tries after a failed one.\n# TYPE taskd_proxy_retries_total counter\ntaskd_proxy_retries_total {}",
            self.retries.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP taskd_proxy_in_flight Requests being handled.\n# TYPE taskd_proxy_in_flight gauge\ntaskd_proxy_in_flight {}",
            self.in_flight.load(Relaxed)
        );
        let per_upstream: [PerUpstream; 5] = [
            (
                "taskd_proxy_upstream_in_flight",
                "gauge",
                "Requests in flight on the upstream.",
                |u, _| u.in_flight() as u64,
            ),
            (
                "taskd_proxy_upstream_tries_total",
                "counter",
                "Tries sent to the upstream (retries included).",
                |u, _| u.requests.load(Relaxed),
            ),
            (
                "taskd_proxy_upstream_failures_total",
                "counter",
                "Tries that failed at the transport level (refused, reset, timed out).",
                |u, _| u.failures.load(Relaxed),
            ),
            (
                "taskd_proxy_ejections_total",
                "counter",
                "Times the upstream was ejected by passive health checks.",
                |u, _| u.ejections.load(Relaxed),
            ),
            (
                "taskd_proxy_upstream_healthy",
                "gauge",
                "1 when the upstream takes new requests.",
                |u, now| u64::from(u.is_available(now)),
            ),
        ];
        for (name, kind, help, value) in per_upstream {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for up in upstreams {
                let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {}", up.url, value(up, now));
            }
        }
        out
    }
}

impl ProxyMetrics {
    /// The client-side series (connections, upgrades, TLS), appended to `out`.
    pub fn render_edge(&self, out: &mut String, open: usize, max: usize, tls: Option<TlsGauges>) {
        let gauges: [(&str, &str, &str, u64); 4] = [
            (
                "taskd_proxy_connections_open",
                "gauge",
                "Client connections open (HTTPS ones from the start of their handshake).",
                open as u64,
            ),
            (
                "taskd_proxy_connections_max",
                "gauge",
                "proxy.max_connections: past it, accepting pauses.",
                max as u64,
            ),
            (
                "taskd_proxy_accept_paused_total",
                "counter",
                "Connections accepted while every slot was taken (they waited for one).",
                self.accept_paused.load(Relaxed),
            ),
            (
                "taskd_proxy_upgraded_connections",
                "gauge",
                "Upgraded connections (WebSocket and other Upgrades) open.",
                self.upgraded.load(Relaxed),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let Some(tls) = tls else { return };
        let _ = writeln!(
            out,
            "# HELP taskd_proxy_tls_handshake_failures_total TLS handshakes that failed or timed out.\n# TYPE taskd_proxy_tls_handshake_failures_total counter\ntaskd_proxy_tls_handshake_failures_total{{reason=\"error\"}} {}\ntaskd_proxy_tls_handshake_failures_total{{reason=\"timeout\"}} {}",
            self.tls_handshake_errors.load(Relaxed),
            self.tls_handshake_timeouts.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP taskd_proxy_tls_certificate_expiry_seconds End of the served certificate's validity (Unix time).\n# TYPE taskd_proxy_tls_certificate_expiry_seconds gauge\ntaskd_proxy_tls_certificate_expiry_seconds {}",
            tls.not_after
        );
        let _ = writeln!(
            out,
            "# HELP taskd_proxy_tls_reloads_total Certificate reloads (SIGHUP, changed files), by result.\n# TYPE taskd_proxy_tls_reloads_total counter\ntaskd_proxy_tls_reloads_total{{result=\"ok\"}} {}\ntaskd_proxy_tls_reloads_total{{result=\"failed\"}} {}",
            tls.reloads, tls.reload_failures
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.record(Duration::from_micros(300));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(30));
        let mut out = String::new();
        h.render(&mut out, "x");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn status_counts_ignore_out_of_range_codes() {
        let s = StatusCounts::default();
        s.record(200);
        s.record(200);
        s.record(503);
        s.record(42);
        s.record(600);
        assert_eq!(s.seen().collect::<Vec<_>>(), vec![(200, 2), (503, 1)]);
    }
}
