//! `taskd proxy`: the load balancer alone, in front of workers anywhere, with its admin
//! listener, DNS discovery and SIGHUP reloads; and binding the client listeners, which
//! `taskd serve` shares.

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{Listeners, Proxy, admin, discovery};
use crate::config::{Config, ProxyConfig, Reloader};

/// `taskd proxy`: the load balancer alone, with its admin listener. SIGHUP reloads what
/// [`Proxy::reload`] can.
pub async fn run(
    config: Config,
    reloader: Reloader,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything else: SIGHUP's default action would end the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    if config.proxy.upstreams.is_empty() && config.proxy.upstream_dns.is_empty() {
        anyhow::bail!(
            "no upstreams: pass --upstream http://host:port or --upstream-dns host:port, or set \
             proxy.upstreams or proxy.upstream_dns"
        );
    }
    let proxy = Proxy::new(config.proxy.clone())?;
    proxy.set_admin_token(&config.admin.token);
    let listeners = bind_listeners(&config.proxy, proxy.threads())?;
    let admin = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin.listen)", config.admin.listen))?;
    tracing::info!(
        listen = %listeners.local_addr(),
        https = ?listeners.tls_addr(),
        admin = %config.admin.listen,
        upstreams = ?config.proxy.upstreams,
        upstream_dns = ?config.proxy.upstream_dns,
        strategy = config.proxy.strategy.as_str(),
        threads = proxy.threads(),
        "proxy listening"
    );
    // Each stops on `shutdown`, or when another ends: a proxy whose admin listener died cannot
    // be watched, an admin listener alone serves nobody, and a proxy whose upstreams are no
    // longer discovered would go stale.
    let serving = shutdown.child_token();
    let mut watched = crate::shutdown::Watched::default();
    watched.spawn(
        "admin listener",
        admin::serve(admin, admin::router(proxy.clone(), None), serving.clone()),
    );
    watched.spawn("proxy", proxy.clone().serve(listeners, serving.clone()));
    watched.spawn(
        "DNS discovery",
        discovery::run(proxy.clone(), serving.clone()),
    );
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                watched.join().await;
                break Ok(());
            }
            failed = watched.first_to_end() => {
                tracing::error!("{failed:#}; stopping");
                serving.cancel();
                watched.join().await;
                break Err(failed);
            }
            _ = hangup.recv() => match reloader() {
                Ok(next) => {
                    proxy.set_admin_token(&next.admin.token);
                    proxy.reload("SIGHUP", Some(next.proxy));
                }
                Err(error) => tracing::error!(
                    "SIGHUP: the configuration does not load ({error}); the running one stays"
                ),
            },
        }
    }
}

/// The client listeners of `[proxy]`: `listen`, and `tls.listen` when HTTPS is on; an error
/// names the address and the key (and flag) that sets it.
pub fn bind_listeners(config: &ProxyConfig, threads: usize) -> anyhow::Result<Listeners> {
    let mut listeners = Listeners::bind(config.listen, threads).with_context(|| {
        format!(
            "cannot listen on {} (proxy.listen, --listen): port {} is in use or not available",
            config.listen,
            config.listen.port()
        )
    })?;
    if config.tls.files().is_some() {
        let addr = config.tls.listen;
        listeners.bind_tls(addr).with_context(|| {
            format!(
                "cannot listen on {addr} (proxy.tls.listen, --tls-listen): port {} is in use or \
                 not available",
                addr.port()
            )
        })?;
    }
    Ok(listeners)
}
