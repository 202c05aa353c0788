//! One worker slot's life, run as one task: spawn the process, wait until it is ready, put it
//! in the proxy, probe its liveness, and when it exits or hangs take it out and start it again
//! (after a backoff when it keeps dying young). A rolling restart of the slot also runs here,
//! so only this task ever touches the slot's process.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{config::SupervisorConfig, health::Consecutive, proxy::Proxy};

use super::{
    backoff::Backoff,
    probe,
    process::{Launch, WorkerProcess, describe},
    status::{Board, RestartReason, WorkerState},
};

/// Readiness is polled this often while a worker starts, so it joins the proxy promptly.
const READY_POLL: Duration = Duration::from_millis(50);

/// What every slot task shares.
pub struct Shared {
    pub launch: Launch,
    pub proxy: Proxy,
    pub config: SupervisorConfig,
    pub board: Arc<Board>,
}

/// A request from the supervisor to a slot task.
pub enum Control {
    /// Replace the process with a new one on `spare` (SIGHUP). The answer is the port that is
    /// free afterwards: the old one when the replacement took over, else `spare`.
    Replace {
        spare: u16,
        done: oneshot::Sender<u16>,
    },
}

/// How one process's life ended.
enum Ended {
    /// It ended (or was ended) and must be started again.
    Restart {
        reason: RestartReason,
        uptime: Duration,
    },
    /// The supervisor is stopping.
    Stopped,
}

enum Start {
    Ready,
    Exited(String),
    TimedOut,
    Stopping,
}

/// The task of slot `index`: runs until `stop` is cancelled, and the process is stopped.
pub async fn run(
    shared: Arc<Shared>,
    index: usize,
    mut control: mpsc::Receiver<Control>,
    stop: CancellationToken,
) {
    let config = &shared.config;
    let mut backoff = Backoff::new(
        config.backoff_initial,
        config.backoff_max,
        config.min_uptime,
    );
    let mut slot = Slot {
        shared: shared.clone(),
        index,
        id: shared.board.slot(index).id.clone(),
    };
    loop {
        match slot.life(&mut control, &stop).await {
            Ended::Stopped => break,
            Ended::Restart { reason, uptime } => {
                slot.update(|w| w.record_restart(reason));
                let delay = backoff.next_delay(uptime);
                if !delay.is_zero() {
                    slot.update(|w| {
                        w.state = WorkerState::Backoff;
                        w.backoff = Some(delay);
                    });
                    tracing::warn!(
                        worker = %slot.id,
                        delay = %humantime::format_duration(delay),
                        "worker backoff: it keeps dying young; waiting before the restart"
                    );
                    if !slot.sleep(delay, &mut control, &stop).await {
                        break;
                    }
                    slot.update(|w| w.backoff = None);
                }
                tracing::info!(worker = %slot.id, "worker restarting");
            }
        }
    }
    slot.update(|w| {
        w.pid = None;
        w.started = None;
        w.backoff = None;
        w.state = WorkerState::Stopping;
    });
}

struct Slot {
    shared: Arc<Shared>,
    index: usize,
    id: String,
}

impl Slot {
    fn update(&self, change: impl FnOnce(&mut super::status::WorkerRecord)) {
        change(&mut self.shared.board.slot(self.index));
    }

    fn port(&self) -> u16 {
        self.shared.board.slot(self.index).port
    }

    /// Waits out a backoff; answers rolling-restart requests meanwhile (nothing to replace).
    /// False when the supervisor is stopping.
    async fn sleep(
        &self,
        delay: Duration,
        control: &mut mpsc::Receiver<Control>,
        stop: &CancellationToken,
    ) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = &mut sleep => return true,
                Some(Control::Replace { spare, done }) = control.recv() => {
                    tracing::info!(worker = %self.id, "rolling restart: skipped, the worker is in backoff and starts anew anyway");
                    let _ = done.send(spare);
                }
            }
        }
    }

    /// Starts a process on the slot's port and supervises it until it ends.
    async fn life(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        stop: &CancellationToken,
    ) -> Ended {
        let shared = self.shared.clone();
        let config = &shared.config;
        let port = self.port();
        self.update(|w| {
            w.state = WorkerState::Starting;
            w.pid = None;
            w.started = None;
        });
        let mut process = match WorkerProcess::spawn(&shared.launch, &self.id, port) {
            Ok(process) => process,
            Err(error) => {
                tracing::error!(worker = %self.id, %error, "worker cannot be spawned");
                self.update(|w| w.last_exit = Some(format!("cannot be spawned: {error}")));
                return Ended::Restart {
                    reason: RestartReason::Exited,
                    uptime: Duration::ZERO,
                };
            }
        };
        self.update(|w| {
            w.pid = Some(process.pid);
            w.started = Some(process.started);
        });
        tracing::info!(worker = %self.id, pid = process.pid, port, "worker started");

        match wait_ready(&mut process, config, stop).await {
            Start::Ready => {}
            Start::Exited(how) => {
                tracing::warn!(worker = %self.id, pid = process.pid, port, "worker {how} before it was ready");
                return self.ended(&process, how, RestartReason::Exited);
            }
            Start::TimedOut => {
                let why = format!(
                    "not ready within {} (supervisor.start_timeout)",
                    humantime::format_duration(config.start_timeout)
                );
                tracing::warn!(worker = %self.id, pid = process.pid, "worker unhealthy: {why}; stopping it");
                let how = self.stop_process(&mut process, &why).await;
                return self.ended(&process, how, RestartReason::NotReady);
            }
            Start::Stopping => {
                self.stop_process(&mut process, "supervisor stopping").await;
                return Ended::Stopped;
            }
        }
        let mut url = upstream_url(process.port);
        if let Err(error) = shared.proxy.add_upstream(&url, true) {
            tracing::warn!(worker = %self.id, %error, "cannot add the worker to the proxy");
        }
        self.update(|w| w.state = WorkerState::Ready);
        tracing::info!(
            worker = %self.id,
            pid = process.pid,
            port = process.port,
            took_ms = process.started.elapsed().as_millis() as u64,
            "worker ready"
        );

        let mut probes = tokio::time::interval(config.probe_interval);
        probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probes.tick().await;
        // Liveness: down (restart) after `probe_threshold` failed probes in a row.
        let mut liveness = Consecutive::new(true);
        loop {
            tokio::select! {
                status = process.wait() => {
                    shared.proxy.remove_upstream(&url);
                    let how = describe(status);
                    tracing::warn!(worker = %self.id, pid = process.pid, "worker {how}; restarting it");
                    return self.ended(&process, how, RestartReason::Exited);
                }
                _ = stop.cancelled() => {
                    shared.proxy.remove_upstream(&url);
                    self.stop_process(&mut process, "supervisor stopping").await;
                    return Ended::Stopped;
                }
                Some(Control::Replace { spare, done }) = control.recv() => {
                    let free = self.replace(&mut process, spare, stop).await;
                    url = upstream_url(process.port);
                    liveness = Consecutive::new(true);
                    let _ = done.send(free);
                }
                _ = probes.tick() => {
                    let live = probe::get(process.port, "/health/live", config.probe_timeout).await;
                    if live != Some(200) && process.try_wait().is_some() {
                        continue; // `wait` reports it next
                    }
                    let was_failing = liveness.fails() > 0;
                    let flipped = liveness.record(live == Some(200), 1, config.probe_threshold);
                    if live == Some(200) {
                        if was_failing {
                            tracing::info!(worker = %self.id, "worker ready: answering liveness probes again");
                            self.update(|w| w.state = WorkerState::Ready);
                        }
                        continue;
                    }
                    let failures = liveness.fails();
                    let answer = live.map_or_else(|| "no answer".to_owned(), |code| format!("status {code}"));
                    if flipped != Some(false) {
                        tracing::warn!(worker = %self.id, pid = process.pid, failures, "worker unhealthy: liveness probe failed ({answer})");
                        self.update(|w| w.state = WorkerState::Unhealthy);
                        continue;
                    }
                    let why = format!(
                        "{failures} liveness probes failed in a row (last: {answer} within {})",
                        humantime::format_duration(config.probe_timeout)
                    );
                    tracing::warn!(worker = %self.id, pid = process.pid, "worker unhealthy: {why}; stopping it");
                    shared.proxy.remove_upstream(&url);
                    let how = self.stop_process(&mut process, &why).await;
                    return self.ended(&process, how, RestartReason::Unresponsive);
                }
            }
        }
    }

    /// Records how the process ended and asks for a restart.
    fn ended(&self, process: &WorkerProcess, how: String, reason: RestartReason) -> Ended {
        self.update(|w| {
            w.last_exit = Some(how);
            w.pid = None;
            w.started = None;
        });
        Ended::Restart {
            reason,
            uptime: process.started.elapsed(),
        }
    }

    /// SIGTERM, then SIGKILL after the grace period. Returns how it ended, with `why`.
    async fn stop_process(&self, process: &mut WorkerProcess, why: &str) -> String {
        let grace = self.shared.config.grace_period;
        self.update(|w| w.state = WorkerState::Stopping);
        tracing::info!(worker = %self.id, pid = process.pid, reason = why, "worker stopping");
        let (status, killed) = process.stop(grace).await;
        let how = if killed {
            format!(
                "stopped ({why}): {} after {} without exiting on SIGTERM",
                describe(status),
                humantime::format_duration(grace)
            )
        } else {
            format!("stopped ({why}): {}", describe(status))
        };
        tracing::info!(worker = %self.id, pid = process.pid, "worker {how}");
        how
    }

    /// A rolling restart of this slot: a new process on `spare`; once it is ready it joins the
    /// proxy, the old one is drained (its in-flight requests finish), removed and stopped.
    /// Returns the port that is free afterwards.
    async fn replace(
        &mut self,
        process: &mut WorkerProcess,
        spare: u16,
        stop: &CancellationToken,
    ) -> u16 {
        let shared = self.shared.clone();
        tracing::info!(worker = %self.id, old_pid = process.pid, port = spare, "rolling restart: starting a replacement");
        let mut next = match WorkerProcess::spawn(&shared.launch, &self.id, spare) {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(worker = %self.id, %error, "rolling restart: the replacement cannot be spawned; keeping the old worker");
                return spare;
            }
        };
        match wait_ready(&mut next, &shared.config, stop).await {
            Start::Ready => {}
            outcome => {
                let why = match outcome {
                    Start::Exited(how) => how,
                    Start::TimedOut => "not ready within supervisor.start_timeout".into(),
                    _ => "supervisor stopping".into(),
                };
                tracing::error!(worker = %self.id, pid = next.pid, port = spare, reason = %why, "rolling restart: the replacement failed; keeping the old worker");
                next.stop(shared.config.grace_period).await;
                return spare;
            }
        }
        let old_url = upstream_url(process.port);
        let new_url = upstream_url(spare);
        if let Err(error) = shared.proxy.add_upstream(&new_url, true) {
            tracing::warn!(worker = %self.id, %error, "cannot add the replacement to the proxy");
        }
        tracing::info!(worker = %self.id, pid = next.pid, port = spare, "worker ready (replacement); draining the old one");
        shared.proxy.drain_upstream(&old_url).await;
        shared.proxy.remove_upstream(&old_url);
        let mut old = std::mem::replace(process, next);
        self.update(|w| {
            w.port = process.port;
            w.pid = Some(process.pid);
            w.started = Some(process.started);
            w.record_restart(RestartReason::Rolling);
        });
        let (status, _) = old.stop(shared.config.grace_period).await;
        tracing::info!(worker = %self.id, pid = old.pid, port = old.port, "rolling restart: old worker stopped ({})", describe(status));
        self.update(|w| w.state = WorkerState::Ready);
        old.port
    }
}

/// Polls `/health/ready` until 200, the process exits, `start_timeout` passes or the supervisor
/// stops.
async fn wait_ready(
    process: &mut WorkerProcess,
    config: &SupervisorConfig,
    stop: &CancellationToken,
) -> Start {
    let deadline = tokio::time::Instant::now() + config.start_timeout;
    let port = process.port;
    loop {
        tokio::select! {
            status = process.wait() => return Start::Exited(describe(status)),
            _ = stop.cancelled() => return Start::Stopping,
            _ = tokio::time::sleep_until(deadline) => return Start::TimedOut,
            ready = probe::get(port, "/health/ready", config.probe_timeout) => {
                if ready == Some(200) {
                    return Start::Ready;
                }
            }
        }
        tokio::select! {
            status = process.wait() => return Start::Exited(describe(status)),
            _ = stop.cancelled() => return Start::Stopping,
            _ = tokio::time::sleep(READY_POLL) => {}
        }
    }
}

/// The proxy's name for the worker on `port`.
pub fn upstream_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}
