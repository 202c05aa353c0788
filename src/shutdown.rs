//! The one owner of shutdown: OS signals become a [`CancellationToken`] that every component
//! watches through a child token.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGTERM or SIGINT (Ctrl-C).
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!(signal, "shutdown requested");
        trigger.cancel();
    });
    token
}

/// Also cancels `token` when stdin reaches end of file (or cannot be read): the process that
/// holds the other end of the pipe, a supervisor, is gone, however it died. A plain thread
/// rather than tokio's stdin, whose blocked read would hold up the runtime's shutdown.
pub fn cancel_on_stdin_eof(token: CancellationToken) {
    let spawned = std::thread::Builder::new()
        .name("taskd-stdin-watch".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            if !token.is_cancelled() {
                tracing::info!("stdin closed (the supervisor is gone): shutting down");
                token.cancel();
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot watch stdin; the worker will not exit with its supervisor");
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}
