//! End-to-end tests of `taskd serve` (STYLE.md §9, third tier): the real binary supervising real
//! worker processes on free ports, in its own [`World`](common::binary::World) (fresh database,
//! Redis key prefix, working directory). Each test checks what an operator or a client sees:
//! `/status`, HTTP answers under load, process ids, exit codes and messages. The harness is
//! here; the tests are in `startup.rs` (start, banner, busy ports, the README walkthrough),
//! `supervision.rs` (killed, hung and crash-looping workers) and `signals.rs` (SIGHUP, SIGTERM,
//! SIGKILL of the supervisor).
//!
//! Short probe intervals and backoffs (`TASKD_SUPERVISOR__*`) keep the tests fast. They take
//! turns (one cluster at a time): each runs several processes, and timing checks such as "a hung
//! worker is detected" should not depend on how many other clusters share the two cores. Under
//! `cargo test` the tests are threads of one process and [`TURN`] serialises them; under
//! `cargo nextest run` each is a process of its own and the `clusters` test group of
//! `.config/nextest.toml` does.

#[path = "../common/mod.rs"]
mod common;

mod operator;
mod signals;
mod startup;
mod supervision;

use std::{
    collections::{BTreeSet, HashSet},
    net::{Ipv4Addr, TcpListener},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    binary::{Process, World, client, signal},
    ports::{free_port, free_port_range},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Upper bound for a cluster to migrate and have every worker ready, on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for anything the supervisor does in reaction to an event (restart, replace).
const REACT_TIMEOUT: Duration = Duration::from_secs(15);

/// One cluster at a time under `cargo test` (see the module docs).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Short probe and backoff settings, so hangs and crash loops show within a second or two.
const FAST_SUPERVISOR: &[(&str, &str)] = &[
    ("TASKD_SUPERVISOR__PROBE_INTERVAL", "200ms"),
    ("TASKD_SUPERVISOR__PROBE_TIMEOUT", "300ms"),
    ("TASKD_SUPERVISOR__PROBE_THRESHOLD", "3"),
    ("TASKD_SUPERVISOR__GRACE_PERIOD", "2s"),
    ("TASKD_SUPERVISOR__BACKOFF_INITIAL", "200ms"),
    ("TASKD_SUPERVISOR__BACKOFF_MAX", "1600ms"),
    ("TASKD_SUPERVISOR__MIN_UPTIME", "5s"),
    ("TASKD_PROXY__HEALTH__INTERVAL", "200ms"),
];

/// A test's [`World`] and the cluster's ports.
struct Harness {
    world: World,
    listen: u16,
    admin: u16,
    /// First worker port; `base..=base+instances` are free when the harness is made.
    base: u16,
}

impl std::ops::Deref for Harness {
    type Target = World;

    fn deref(&self) -> &World {
        &self.world
    }
}

impl Harness {
    fn new(instances: u16) -> Self {
        Self {
            world: World::new(),
            listen: free_port(),
            admin: free_port(),
            base: free_port_range(instances + 1),
        }
    }

    /// `taskd serve` on the test's ports, rate limits off, fast probes.
    fn command(&self, instances: u16) -> Command {
        let mut command = self.world.command(&[
            "serve",
            "--instances",
            &instances.to_string(),
            "--listen",
            &format!("127.0.0.1:{}", self.listen),
            "--admin-listen",
            &format!("127.0.0.1:{}", self.admin),
            "--base-port",
            &self.base.to_string(),
        ]);
        command
            .env("TASKD_RATE_LIMIT__ENABLED", "false")
            .envs(FAST_SUPERVISOR.iter().copied());
        command
    }

    /// Starts the cluster and waits until all `instances` workers are ready.
    async fn start(&self, instances: u16) -> Cluster {
        let mut cluster = self.spawn(self.command(instances));
        cluster
            .wait_status("every worker ready", READY_TIMEOUT, |status| {
                let workers = status["workers"].as_array().map_or(&[][..], Vec::as_slice);
                workers.len() == usize::from(instances)
                    && workers.iter().all(|w| w["state"] == "ready")
            })
            .await;
        cluster
    }

    fn spawn(&self, command: Command) -> Cluster {
        Cluster {
            process: self.world.spawn(command, "serve"),
            api: format!("http://127.0.0.1:{}", self.listen),
            admin: format!("http://127.0.0.1:{}", self.admin),
            seen_pids: Mutex::new(HashSet::new()),
            client: client(),
        }
    }

    async fn count_tasks(&self) -> i64 {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.db.url)
            .await
            .expect("connect to the test database");
        let count = sqlx::query_scalar("SELECT count(*) FROM tasks")
            .fetch_one(&mut conn)
            .await
            .expect("count tasks");
        conn.close().await.ok();
        count
    }
}

/// A running `taskd serve`. Dropping it stops the supervisor and kills every worker pid it was
/// seen with, so a failed test leaves no process behind.
struct Cluster {
    process: Process,
    api: String,
    admin: String,
    /// Every worker pid `/status` ever showed.
    seen_pids: Mutex<HashSet<u32>>,
    client: reqwest::Client,
}

impl std::ops::Deref for Cluster {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Cluster {
    /// `GET /status` of the admin listener; `None` while it does not answer.
    async fn status(&self) -> Option<Value> {
        let response = self
            .client
            .get(format!("{}/status", self.admin))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let status: Value = response.json().await.ok()?;
        let mut seen = self.seen_pids.lock().unwrap();
        for worker in status["workers"].as_array().into_iter().flatten() {
            if let Some(pid) = worker["pid"].as_u64() {
                seen.insert(pid as u32);
            }
        }
        Some(status)
    }

    /// Polls `/status` until `done` holds; panics with the logs after `timeout`.
    async fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            self.assert_running(&format!("waiting for {what}"));
            if let Some(status) = self.status().await {
                if done(&status) {
                    return status;
                }
                last = Some(status);
            }
            assert!(
                Instant::now() < deadline,
                "not {what} after {timeout:?}; last /status: {last:#?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn worker(&self, index: usize) -> Value {
        self.status().await.expect("/status")["workers"][index].clone()
    }

    async fn worker_pids(&self) -> Vec<u32> {
        let status = self.status().await.expect("/status");
        status["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["pid"].as_u64().expect("a ready worker has a pid") as u32)
            .collect()
    }

    /// Registers a user through the proxy and returns its access token.
    async fn register(&self) -> String {
        let response = self
            .client
            .post(format!("{}/api/v1/auth/register", self.api))
            .json(&json!({
                "email": format!("{}@example.com", uuid::Uuid::new_v4().simple()),
                "password": "correct horse battery staple",
                "name": "Serve Test",
            }))
            .send()
            .await
            .expect("register through the proxy");
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        body["accessToken"].as_str().unwrap().to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.process.stop();
        for pid in self.seen_pids.lock().unwrap().iter() {
            if is_taskd_worker(*pid) {
                signal(*pid, libc::SIGKILL);
            }
        }
    }
}

/// Whether `pid` is a live (not zombie) process: an exited child of a dead parent stays a
/// zombie until init reaps it, which can take a while and is no running process.
fn is_alive(pid: u32) -> bool {
    // Every thread counts, not only `/proc/{pid}/stat`, which is the first thread's: while a
    // process exits, that thread can already be a zombie while another is still running and
    // holds the file table, listening sockets included (a one-off "port still held by an
    // orphan" in a full local run, on a busy machine).
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.flatten().any(|thread| {
        std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

/// Whether `pid` is alive and a `taskd worker` (so cleanup never hits a reused pid).
fn is_taskd_worker(pid: u32) -> bool {
    is_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("worker"))
}

async fn wait_gone(pids: &[u32], timeout: Duration) -> Result<Duration, Vec<u32>> {
    let started = Instant::now();
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| is_alive(*p)).collect();
        if alive.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(alive);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests sent during a load, by method.
#[derive(Debug, Default)]
struct LoadReport {
    gets_ok: u64,
    posts_ok: u64,
    /// Every request that was not answered 2xx: method, and status or transport error.
    failures: Vec<String>,
    /// `X-Served-By` values seen.
    served_by: BTreeSet<String>,
}

/// Client loops sending GETs (and POSTs creating tasks, without `Idempotency-Key`) through the
/// proxy until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl Load {
    fn start(api: &str, token: &str, getters: usize, posters: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let client = client();
        let tasks = (0..getters + posters)
            .map(|i| {
                let (client, stop) = (client.clone(), stop.clone());
                let (url, token) = (format!("{api}/api/v1/tasks"), token.to_owned());
                let post = i >= getters;
                tokio::spawn(async move {
                    let mut report = LoadReport::default();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let request = if post {
                            client
                                .post(&url)
                                .json(&json!({ "title": format!("load {i}-{n}") }))
                        } else {
                            client.get(&url)
                        };
                        let method = if post { "POST" } else { "GET" };
                        match request.bearer_auth(&token).send().await {
                            Ok(response) if response.status().is_success() => {
                                if let Some(by) = response.headers().get("x-served-by") {
                                    report
                                        .served_by
                                        .insert(by.to_str().unwrap_or_default().to_owned());
                                }
                                // Read the body: a response cut short is a failure too.
                                match response.bytes().await {
                                    Ok(_) if post => report.posts_ok += 1,
                                    Ok(_) => report.gets_ok += 1,
                                    Err(e) => report.failures.push(format!("{method} body: {e}")),
                                }
                            }
                            Ok(response) => {
                                let status = response.status();
                                let body = response.text().await.unwrap_or_default();
                                report.failures.push(format!("{method} {status}: {body}"));
                            }
                            Err(e) => report.failures.push(format!("{method}: {e:?}")),
                        }
                    }
                    report
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadReport::default();
        for task in self.tasks {
            let report = task.await.expect("load task");
            total.gets_ok += report.gets_ok;
            total.posts_ok += report.posts_ok;
            total.failures.extend(report.failures);
            total.served_by.extend(report.served_by);
        }
        total
    }
}
