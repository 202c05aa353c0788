//! What the supervisor shows about its workers: the `workers` part of `/status` (docs/contract.md §5),
//! worker metrics on `/metrics`, and the dashboard at `/` of the admin listener.

use std::{
    fmt::Write,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::scrape;
use crate::proxy::admin::AdminExtension;

/// A worker slot's state, as `/status` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Spawned, not yet answering `/health/ready`.
    Starting,
    /// Ready once and answering its liveness probes.
    Ready,
    /// Missed at least one liveness probe, fewer than `probe_threshold` in a row.
    Unhealthy,
    /// Being stopped (SIGTERM, then SIGKILL after the grace period).
    Stopping,
    /// Waiting before a restart because it keeps dying young.
    Backoff,
}

/// Why a worker was started again, the `reason` label of `taskd_worker_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// Its process ended on its own (crash, kill -9, could not bind its port).
    Exited,
    /// It stopped answering liveness probes and was stopped.
    Unresponsive,
    /// It did not become ready within `start_timeout`.
    NotReady,
    /// Replaced by a rolling restart (`SIGHUP`); not counted in `restarts` of `/status`.
    Rolling,
}

impl RestartReason {
    const ALL: [RestartReason; 4] = [
        RestartReason::Exited,
        RestartReason::Unresponsive,
        RestartReason::NotReady,
        RestartReason::Rolling,
    ];

    fn label(self) -> &'static str {
        match self {
            RestartReason::Exited => "exited",
            RestartReason::Unresponsive => "unresponsive",
            RestartReason::NotReady => "not_ready",
            RestartReason::Rolling => "rolling",
        }
    }
}

/// One slot's record, written by its supervising task, read by the admin listener.
#[derive(Debug, Clone)]
pub struct WorkerRecord {
    /// `worker-<n>`, also its `--instance-id` and so its `X-Served-By`.
    pub id: String,
    /// The port of the current process (changes with a rolling restart).
    pub port: u16,
    /// The current process, while there is one.
    pub pid: Option<u32>,
    pub state: WorkerState,
    /// When the current process was spawned.
    pub started: Option<Instant>,
    /// How the previous process ended, and why when the supervisor ended it.
    pub last_exit: Option<String>,
    /// The wait before the pending restart, while in `backoff`.
    pub backoff: Option<Duration>,
    /// Restarts by reason, indexed like [`RestartReason::ALL`].
    restarts: [u64; 4],
}

impl WorkerRecord {
    pub fn record_restart(&mut self, reason: RestartReason) {
        self.restarts[reason as usize] += 1;
    }

    /// Unplanned restarts: every reason but a rolling restart.
    pub fn restarts(&self) -> u64 {
        self.restarts[..3].iter().sum()
    }
}

/// The records of every slot.
#[derive(Debug)]
pub struct Board {
    workers: Vec<Mutex<WorkerRecord>>,
    /// Served at `/` of the admin listener.
    dashboard: &'static str,
}

impl Board {
    /// Slots `worker-1..=worker-n` on `base_port..`.
    pub fn new(instances: u16, base_port: u16) -> Self {
        let workers = (0..instances)
            .map(|i| {
                Mutex::new(WorkerRecord {
                    id: format!("worker-{}", i + 1),
                    port: base_port + i,
                    pid: None,
                    state: WorkerState::Starting,
                    started: None,
                    last_exit: None,
                    backoff: None,
                    restarts: [0; 4],
                })
            })
            .collect();
        Self {
            workers,
            dashboard: include_str!("dashboard.html"),
        }
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// The record of slot `index` (0-based), for its task to update.
    pub fn slot(&self, index: usize) -> MutexGuard<'_, WorkerRecord> {
        self.workers[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of every record.
    pub fn snapshot(&self) -> Vec<WorkerRecord> {
        (0..self.workers.len())
            .map(|i| self.slot(i).clone())
            .collect()
    }

    /// The `workers` array of `/status`.
    pub fn workers_json(&self) -> Value {
        let now = Instant::now();
        Value::Array(
            self.snapshot()
                .iter()
                .map(|w| {
                    let usage = w.pid.and_then(scrape::usage);
                    json!({
                        "id": w.id,
                        "port": w.port,
                        "pid": w.pid,
                        "state": w.state,
                        "restarts": w.restarts(),
                        "uptimeSeconds": w.started.map_or(0, |s| now.duration_since(s).as_secs()),
                        "lastExit": w.last_exit,
                        "backoffMs": w.backoff.map(|b| b.as_millis() as u64),
                        "rssBytes": usage.map(|u| u.rss_bytes),
                        "cpuSeconds": usage.map(|u| (u.cpu_seconds * 100.0).round() / 100.0),
                    })
                })
                .collect(),
        )
    }

    /// Prometheus text for the workers.
    pub fn render_metrics(&self) -> String {
        let workers = self.snapshot();
        let now = Instant::now();
        let mut out = String::with_capacity(1024);
        out.push_str("# HELP taskd_worker_restarts_total Worker processes started again by the supervisor, by reason.\n# TYPE taskd_worker_restarts_total counter\n");
        for w in &workers {
            for reason in RestartReason::ALL {
                let _ = writeln!(
                    out,
                    "taskd_worker_restarts_total{{worker=\"{}\",reason=\"{}\"}} {}",
                    w.id,
                    reason.label(),
                    w.restarts[reason as usize]
                );
            }
        }
        out.push_str("# HELP taskd_worker_ready 1 when the worker is ready and answering liveness probes.\n# TYPE taskd_worker_ready gauge\n");
        for w in &workers {
            let ready = u8::from(w.state == WorkerState::Ready);
            let _ = writeln!(out, "taskd_worker_ready{{worker=\"{}\"}} {ready}", w.id);
        }
        out.push_str("# HELP taskd_worker_uptime_seconds Time since the worker's current process started.\n# TYPE taskd_worker_uptime_seconds gauge\n");
        for w in &workers {
            let up = w
                .started
                .map_or(0.0, |s| now.duration_since(s).as_secs_f64());
            let _ = writeln!(
                out,
                "taskd_worker_uptime_seconds{{worker=\"{}\"}} {up:.3}",
                w.id
            );
        }
        let usage: Vec<_> = workers
            .iter()
            .map(|w| (&w.id, w.pid.and_then(scrape::usage)))
            .collect();
        out.push_str("# HELP taskd_worker_resident_memory_bytes Resident memory of the worker's current process.\n# TYPE taskd_worker_resident_memory_bytes gauge\n");
        for (id, usage) in &usage {
            if let Some(usage) = usage {
                let _ = writeln!(
                    out,
                    "taskd_worker_resident_memory_bytes{{worker=\"{id}\"}} {}",
                    usage.rss_bytes
                );
            }
        }
        out.push_str("# HELP taskd_worker_cpu_seconds_total CPU time (user and system) of the worker's current process.\n# TYPE taskd_worker_cpu_seconds_total counter\n");
        for (id, usage) in &usage {
            if let Some(usage) = usage {
                let _ = writeln!(
                    out,
                    "taskd_worker_cpu_seconds_total{{worker=\"{id}\"}} {:.2}",
                    usage.cpu_seconds
                );
            }
        }
        out
    }
}

impl AdminExtension for Board {
    fn status_fields(&self) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert("workers".into(), self.workers_json());
        fields
    }

    fn metrics(&self) -> futures_util::future::BoxFuture<'_, String> {
        Box::pin(async move {
            let mut text = self.render_metrics();
            let running: Vec<(String, u16)> = self
                .snapshot()
                .into_iter()
                .filter(|w| w.pid.is_some())
                .map(|w| (w.id, w.port))
                .collect();
            text.push_str(&scrape::workers(&running).await);
            text
        })
    }

    fn dashboard(&self) -> Option<&'static str> {
        Some(self.dashboard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_has_the_spec_fields_and_restarts_exclude_rolling() {
        let board = Board::new(2, 3000);
        {
            let mut w = board.slot(1);
            w.pid = Some(42);
            w.state = WorkerState::Backoff;
            w.record_restart(RestartReason::Exited);
            w.record_restart(RestartReason::Rolling);
            w.last_exit = Some("killed by signal 9 (SIGKILL)".into());
        }
        let workers = board.workers_json();
        let second = &workers[1];
        for field in [
            "id",
            "port",
            "pid",
            "state",
            "restarts",
            "uptimeSeconds",
            "lastExit",
        ] {
            assert!(second.get(field).is_some(), "no {field} in {second}");
        }
        assert_eq!(second["id"], "worker-2");
        assert_eq!(second["port"], 3001);
        assert_eq!(second["state"], "backoff");
        assert_eq!(second["restarts"], 1);
        let metrics = board.render_metrics();
        assert!(
            metrics
                .contains("taskd_worker_restarts_total{worker=\"worker-2\",reason=\"rolling\"} 1"),
            "{metrics}"
        );
    }
}
