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

/// The long-lived tasks of a process (the proxy's listeners, the admin listener): none of them
/// should end before shutdown, and when one does the process must not go on without it (a
/// cluster nobody can reach). [`first_to_end`](Self::first_to_end) says which one ended and why.
#[derive(Default)]
pub struct Watched {
    tasks: Vec<(&'static str, tokio::task::JoinHandle<anyhow::Result<()>>)>,
}

impl Watched {
    /// Spawns `task` under `name` (used in the error when it ends).
    pub fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.tasks.push((name, tokio::spawn(task)));
    }

    /// Waits until one task ends, removes it and returns why: its error, its panic, or that it
    /// returned early. Pending forever when there are none. Cancel-safe.
    pub async fn first_to_end(&mut self) -> anyhow::Error {
        if self.tasks.is_empty() {
            return std::future::pending().await;
        }
        let (ended, index, _) =
            futures_util::future::select_all(self.tasks.iter_mut().map(|(_, task)| task)).await;
        let (name, _) = self.tasks.swap_remove(index);
        match ended {
            Ok(Ok(())) => anyhow::anyhow!("the {name} stopped unexpectedly"),
            Ok(Err(error)) => error.context(format!("the {name} failed")),
            Err(error) if error.is_panic() => anyhow::anyhow!("the {name} panicked: {error}"),
            Err(error) => anyhow::anyhow!("the {name} was cancelled: {error}"),
        }
    }

    /// Waits for every task still running (after the shutdown token they watch is cancelled);
    /// logs any that failed.
    pub async fn join(self) {
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!("the {name} failed: {error:#}"),
                Err(error) => tracing::error!(%error, "the {name} task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_to_end_names_the_task_that_panicked_and_why() {
        let mut watched = Watched::default();
        let stop = CancellationToken::new();
        let token = stop.clone();
        watched.spawn("listener", async move {
            token.cancelled().await;
            Ok(())
        });
        watched.spawn("admin listener", async { panic!("boom") });
        let error = watched.first_to_end().await.to_string();
        assert!(
            error.starts_with("the admin listener panicked") && error.contains("boom"),
            "{error}"
        );
        stop.cancel();
        watched.join().await;
    }

    #[tokio::test]
    async fn first_to_end_keeps_an_error_and_an_early_return() {
        let mut watched = Watched::default();
        watched.spawn("proxy", async { anyhow::bail!("accept failed") });
        let error = watched.first_to_end().await;
        assert_eq!(format!("{error:#}"), "the proxy failed: accept failed");
        watched.spawn("proxy", async { Ok(()) });
        let error = watched.first_to_end().await;
        assert_eq!(error.to_string(), "the proxy stopped unexpectedly");
    }
}
