//! Changing a running proxy: a new `[proxy]` applied in place on SIGHUP ([`Proxy::reload`]),
//! and upstreams retired by draining ([`Proxy::retire`]), as a reload, DNS discovery and the
//! admin listener's `POST /upstreams/drain` do.
//!
//! A reload never closes a listener or a connection. What a request reads of the configuration
//! is copied when it starts ([`super::Limits`]), so requests in flight finish under the settings
//! they began with and the next ones take up the new; each serving thread takes up new client
//! timeouts at its next sweep. The listening addresses, the thread count, the connection cap
//! and the TLS file paths are fixed while the process runs: a change to one of them is logged
//! and waits for a restart. The certificate files themselves are read again.

use std::{collections::HashMap, sync::Arc};

use super::{
    Proxy,
    clock::now_ms,
    upstream::{Joining, Origin, UpstreamState},
};
use crate::config::{ProxyConfig, parse_upstream};

impl Proxy {
    /// Re-reads the TLS certificate and key and, with `next`, applies a new `[proxy]` (see the
    /// module docs). `why` is logged. False when the certificate did not load (the current one
    /// is kept and the error logged).
    pub fn reload(&self, why: &str, next: Option<ProxyConfig>) -> bool {
        if let Some(next) = next {
            self.apply(next, why);
        }
        match &self.shared.tls {
            Some(tls) => tls.certificates.reload(why).is_ok(),
            None => true,
        }
    }

    fn apply(&self, mut next: ProxyConfig, why: &str) {
        let current = self.shared.config.load_full();
        let fixed = [
            (next.listen != current.listen, "proxy.listen"),
            (next.threads != current.threads, "proxy.threads"),
            (
                next.max_connections != current.max_connections,
                "proxy.max_connections",
            ),
            (
                next.tls.listen != current.tls.listen
                    || next.tls.cert != current.tls.cert
                    || next.tls.key != current.tls.key,
                "proxy.tls.listen, cert and key (the files' contents are read again)",
            ),
        ];
        for (changed, key) in fixed {
            if changed {
                tracing::warn!(
                    reason = why,
                    "{key} changed: it takes effect at the next restart"
                );
            }
        }
        next.listen = current.listen;
        next.threads = current.threads;
        next.max_connections = current.max_connections;
        next.tls.listen = current.tls.listen;
        next.tls.cert.clone_from(&current.tls.cert);
        next.tls.key.clone_from(&current.tls.key);
        self.reconcile_configured(&next);
        let upstreams = next.upstreams.len();
        let names = next.upstream_dns.len();
        self.shared.config.store(Arc::new(next));
        self.shared
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            reason = why,
            upstreams,
            upstream_dns = names,
            "proxy configuration reloaded"
        );
    }

    /// Makes the upstreams that came from the configuration those of `next`: new ones join (not
    /// trusted until their health checks pass, then with slow start), missing ones drain and
    /// go, changed weights apply at once. Upstreams of other origins are not touched.
    fn reconcile_configured(&self, next: &ProxyConfig) {
        let wanted: HashMap<String, u32> = next
            .upstreams
            .iter()
            .filter_map(|entry| parse_upstream(entry).ok())
            .collect();
        let now = now_ms();
        let current = self.shared.upstreams.load_full();
        for upstream in current.iter() {
            if upstream.origin != Origin::Config || upstream.state(now) == UpstreamState::Draining {
                continue;
            }
            match wanted.get(&*upstream.url) {
                Some(&weight) => upstream.set_weight(weight),
                None => {
                    self.retire(&upstream.url);
                }
            }
        }
        for (url, &weight) in &wanted {
            let present = current
                .iter()
                .any(|u| *u.url == **url && u.state(now) != UpstreamState::Draining);
            if !present {
                let joining = Joining {
                    weight,
                    origin: Origin::Config,
                    healthy: false,
                    slow_start: next.slow_start,
                };
                if let Err(error) = self.join(url, joining) {
                    tracing::warn!(upstream = %url, "not added on reload: {error}");
                }
            }
        }
    }

    /// Drains an upstream in the background (no new requests; those in flight finish, for at
    /// most `proxy.shutdown_timeout`) and then removes it, unless it was added again meanwhile.
    /// False when there is no such upstream.
    pub fn retire(&self, url: &str) -> bool {
        let Some(upstream) = self
            .shared
            .upstreams
            .load()
            .iter()
            .find(|u| *u.url == *url)
            .cloned()
        else {
            return false;
        };
        // At once, so the caller sees it draining and no new request goes there.
        upstream.set_draining();
        let proxy = self.clone();
        self.shared.runtime.spawn(async move {
            proxy.drain_exact(&upstream).await;
            // Only the instance that was drained: the URL may have joined again since.
            proxy.remove_exact(&upstream);
        });
        true
    }
}
