//! `proxy.upstream_dns` (`taskd proxy --upstream-dns HOST:PORT`): every address a name resolves
//! to is an upstream — how a Kubernetes headless Service, whose name resolves to its ready pods,
//! is balanced. The names are resolved again every `proxy.dns_interval` with the system's
//! resolver (`/etc/hosts`, then DNS): a new address joins (trusted once its health checks pass,
//! its share growing over `proxy.slow_start`), an address that is gone drains and is removed.
//!
//! A failed lookup keeps the current addresses: a resolver that is briefly down must not empty
//! the proxy. (Kubernetes answers a Service with no ready pod with NXDOMAIN, which is a failed
//! lookup too; its pods then fail their health checks, so nothing is lost by keeping them.)
//! The first lookups, at start, join their addresses as trusted and at full share, as
//! `proxy.upstreams` are.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{
    Proxy,
    upstream::{Joining, Origin},
};
use crate::config::parse_dns_target;

/// Longest a lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves the configured names until `shutdown`, keeping the proxy's DNS upstreams in step.
/// Reads the names, the interval and the slow start again each round, so a reload applies.
pub(super) async fn run(proxy: Proxy, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The upstreams of each name, as last resolved.
    let mut known: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut at_start = true;
    loop {
        let config = proxy.config();
        // Names a reload dropped: their upstreams go.
        known.retain(|name, urls| {
            let kept = config.upstream_dns.contains(name);
            if !kept {
                for url in urls.iter() {
                    proxy.retire(url);
                }
            }
            kept
        });
        for name in &config.upstream_dns {
            let urls = match resolve(name).await {
                Ok(urls) => urls,
                Err(error) => {
                    tracing::warn!(name, %error, "lookup failed; keeping its current upstreams");
                    continue;
                }
            };
            let current = known.entry(name.clone()).or_default();
            for url in urls.difference(current) {
                let joining = Joining {
                    weight: 1,
                    origin: Origin::Dns(Arc::from(name.as_str())),
                    healthy: at_start,
                    slow_start: if at_start {
                        Duration::ZERO
                    } else {
                        config.slow_start
                    },
                };
                match proxy.join(url, joining) {
                    Ok(()) => tracing::info!(name, upstream = %url, "address joined"),
                    Err(error) => {
                        tracing::warn!(name, upstream = %url, "address not added: {error}")
                    }
                }
            }
            for url in current.difference(&urls) {
                tracing::info!(name, upstream = %url, "address gone; draining it");
                proxy.retire(url);
            }
            *current = urls;
        }
        at_start = false;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(config.dns_interval) => {}
        }
    }
}

/// Every address of `name` (`host:port`) as an upstream URL, in a stable order.
async fn resolve(name: &str) -> std::io::Result<BTreeSet<String>> {
    let (host, port) = parse_dns_target(name).map_err(std::io::Error::other)?;
    let lookup = tokio::net::lookup_host((host.as_str(), port));
    let addrs = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "lookup timed out"))??;
    Ok(addrs.map(url_of).collect())
}

fn url_of(addr: SocketAddr) -> String {
    // `SocketAddr` writes IPv6 addresses in brackets, as a URL wants them.
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_every_address_of_a_name_to_an_upstream_url() {
        let urls = resolve("localhost:3000").await.unwrap();
        assert!(urls.contains("http://127.0.0.1:3000"), "{urls:?}");
        assert!(
            urls.iter()
                .all(|u| u == "http://127.0.0.1:3000" || u == "http://[::1]:3000"),
            "{urls:?}"
        );
        assert!(resolve("no-such-name.invalid:3000").await.is_err());
        assert_eq!(url_of("[::1]:80".parse().unwrap()), "http://[::1]:80");
    }
}
