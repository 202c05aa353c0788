//! End-to-end tests of `taskd serve` (STYLE.md §9, third tier): the real binary supervising real
//! worker processes on free ports, over a fresh database and a per-test Redis key prefix. Each
//! test checks what an operator or a client sees: `/status`, HTTP answers under load, process
//! ids, exit codes and messages.
//!
//! Short probe intervals and backoffs (`TASKD_SUPERVISOR__*`) keep the file fast. The tests take
//! turns (one cluster at a time): each runs four processes, and timing checks such as "a hung
//! worker is detected" should not depend on how many other clusters share the two cores. Under
//! `cargo test` the tests of this file are threads of one process and [`TURN`] serialises them;
//! under `cargo nextest run` each is a process of its own and the `clusters` test group of
//! `.config/nextest.toml` does.
//!
//! Needs PostgreSQL at `127.0.0.1:5432` (user `postgres`, trust auth) and Redis at
//! `127.0.0.1:6379`.

#[path = "common/ports.rs"]
mod ports;
// Its own `super::ports` is this file's `ports`; only the test CA is used here.
#[allow(dead_code)]
#[path = "common/tls.rs"]
mod tls;
#[path = "common/walkthrough.rs"]
mod walkthrough;

use std::{
    collections::{BTreeSet, HashSet},
    fs::File,
    net::{Ipv4Addr, TcpListener},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ports::{free_port, free_port_range};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};

const BIN: &str = env!("CARGO_BIN_EXE_taskd");
const PG_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
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

/// A test's world: database name, Redis prefix, working directory, ports. Dropping it drops the
/// database and removes the directory, also when the test panics.
struct Harness {
    db_name: String,
    prefix: String,
    dir: PathBuf,
    listen: u16,
    admin: u16,
    /// First worker port; `base..=base+instances` are free when the harness is made.
    base: u16,
}

impl Harness {
    fn new(instances: u16) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("taskd-serve-{id}"));
        std::fs::create_dir_all(&dir).expect("create the test's working directory");
        Self {
            db_name: format!("taskd_serve_{id}"),
            prefix: format!("taskd-serve-{id}:"),
            dir,
            listen: free_port(),
            admin: free_port(),
            base: free_port_range(instances + 1),
        }
    }

    /// `taskd serve` with the test's ports and environment only (nothing inherited can point it
    /// at another database or config file).
    fn command(&self, instances: u16) -> Command {
        let mut command = Command::new(BIN);
        command
            .args([
                "serve",
                "--instances",
                &instances.to_string(),
                "--listen",
                &format!("127.0.0.1:{}", self.listen),
                "--admin-listen",
                &format!("127.0.0.1:{}", self.admin),
                "--base-port",
                &self.base.to_string(),
            ])
            .current_dir(&self.dir)
            .env_clear()
            .env("DATABASE_URL", format!("{PG_SERVER}/{}", self.db_name))
            .env("TASKD_REDIS__KEY_PREFIX", &self.prefix)
            .env("TASKD_AUTH__ARGON2_MEMORY_KIB", "64")
            .env("TASKD_AUTH__ARGON2_ITERATIONS", "1")
            .env("TASKD_DATABASE__MAX_CONNECTIONS", "4")
            .env("TASKD_RATE_LIMIT__ENABLED", "false")
            .envs(FAST_SUPERVISOR.iter().copied())
            .stdin(Stdio::null());
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
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

    fn spawn(&self, mut command: Command) -> Cluster {
        let stdout = self.dir.join("serve.stdout");
        let stderr = self.dir.join("serve.stderr");
        let child = command
            .stdout(File::create(&stdout).expect("create stdout log"))
            .stderr(File::create(&stderr).expect("create stderr log"))
            .spawn()
            .expect("spawn taskd serve");
        Cluster {
            child,
            api: format!("http://127.0.0.1:{}", self.listen),
            admin: format!("http://127.0.0.1:{}", self.admin),
            stdout,
            stderr,
            seen_pids: Mutex::new(HashSet::new()),
            client: client(),
        }
    }

    async fn count_tasks(&self) -> i64 {
        let mut conn = PgConnection::connect(&format!("{PG_SERVER}/{}", self.db_name))
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

impl Drop for Harness {
    fn drop(&mut self) {
        let name = self.db_name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for cleanup");
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&format!("{PG_SERVER}/postgres")).await?;
                conn.execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str())
                    .await
                    .map(drop)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.db_name);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `taskd serve`. Dropping it stops the supervisor and kills every worker pid it was
/// seen with, so a failed test leaves no process behind.
struct Cluster {
    child: Child,
    api: String,
    admin: String,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Every worker pid `/status` ever showed.
    seen_pids: Mutex<HashSet<u32>>,
    client: reqwest::Client,
}

impl Cluster {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn logs(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr (last 60 lines) ---\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            last_lines(
                &std::fs::read_to_string(&self.stderr).unwrap_or_default(),
                60
            )
        )
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The log (`self.stdout` or `self.stderr`) once it contains `needle`, or as it is after
    /// `timeout`. Output can trail what `/status` shows: the banner, for one, is printed after
    /// the supervisor's own readiness poll.
    async fn log_with(log: &std::path::Path, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains(needle) || Instant::now() >= deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

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
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!(
                    "taskd serve exited ({exit}) while waiting for {what}\n{}",
                    self.logs()
                );
            }
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

    async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll taskd serve") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "taskd serve still running {timeout:?} later\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in self.seen_pids.lock().unwrap().iter() {
            if is_taskd_worker(*pid) {
                signal(*pid, libc::SIGKILL);
            }
        }
    }
}

/// Sends `sig` to `pid`.
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let result = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert!(
        result == 0 || sig == libc::SIGKILL,
        "kill({pid}, {sig}) failed"
    );
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

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("HTTP client")
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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

#[tokio::test]
async fn serve_starts_every_worker_behind_the_proxy_and_shows_them() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let started = Instant::now();
    let cluster = h.start(3).await;
    let took = started.elapsed();

    let status = cluster.status().await.unwrap();
    let workers = status["workers"].as_array().unwrap();
    let ids: Vec<_> = workers.iter().map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["worker-1", "worker-2", "worker-3"]);
    for (i, w) in workers.iter().enumerate() {
        assert_eq!(w["port"], u64::from(h.base) + i as u64, "{w}");
        assert!(w["pid"].as_u64().is_some(), "{w}");
        assert_eq!(w["restarts"], 0, "{w}");
        assert!(
            w.get("uptimeSeconds").is_some() && w.get("lastExit").is_some(),
            "{w}"
        );
    }
    let upstreams: Vec<_> = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["url"].as_str().unwrap().to_owned(), u["state"].clone()))
        .collect();
    for i in 0..3 {
        let url = format!("http://127.0.0.1:{}", h.base + i);
        assert!(
            upstreams.iter().any(|(u, s)| *u == url && s == "healthy"),
            "{url} not a healthy upstream: {upstreams:?}"
        );
    }

    // Requests through the proxy reach every worker, each named by its id.
    let mut served_by = BTreeSet::new();
    for _ in 0..9 {
        let response = cluster
            .client
            .get(format!("{}/health/live", cluster.api))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        served_by.insert(
            response.headers()["x-served-by"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        served_by.into_iter().collect::<Vec<_>>(),
        ["worker-1", "worker-2", "worker-3"]
    );
    let docs = cluster
        .client
        .get(format!("{}/docs/", cluster.api))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), StatusCode::OK);

    // The banner says where everything is; the worker lines are tagged.
    for needle in [
        format!("http://127.0.0.1:{}/api/v1", h.listen),
        format!("http://127.0.0.1:{}/docs", h.listen),
        format!("http://127.0.0.1:{}/status", h.admin),
        format!("worker-3 127.0.0.1:{}", h.base + 2),
    ] {
        let stdout = Cluster::log_with(&cluster.stdout, &needle, Duration::from_secs(5)).await;
        assert!(stdout.contains(&needle), "banner lacks {needle}:\n{stdout}");
    }
    let stderr = cluster.stderr();
    assert!(
        stderr.contains("worker-2 | "),
        "untagged worker output:\n{stderr}"
    );
    assert!(stderr.contains("worker ready"), "{stderr}");

    // The dashboard and the worker metrics.
    let page = cluster
        .client
        .get(format!("{}/", cluster.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(
        page.contains("/status") && page.contains("<script"),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads something from elsewhere"
    );
    let metrics = cluster
        .client
        .get(format!("{}/metrics", cluster.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("taskd_worker_restarts_total{worker=\"worker-1\",reason=\"exited\"} 0"),
        "{metrics}"
    );
    eprintln!("3 workers ready in {took:?} (debug build)");
}

#[tokio::test]
async fn a_worker_killed_under_get_load_is_replaced_without_failed_gets() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let token = cluster.register().await;
    let victim = cluster.worker(1).await;
    let old_pid = victim["pid"].as_u64().unwrap() as u32;

    let load = Load::start(&cluster.api, &token, 8, 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(old_pid, libc::SIGKILL);
    let killed = Instant::now();
    let status = cluster
        .wait_status("worker-2 back with a new pid", REACT_TIMEOUT, |s| {
            let w = &s["workers"][1];
            w["state"] == "ready" && w["pid"].as_u64().is_some_and(|p| p as u32 != old_pid)
        })
        .await;
    let recovered = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = load.finish().await;

    let worker = &status["workers"][1];
    assert_eq!(worker["restarts"], 1, "{worker}");
    assert!(
        worker["lastExit"].as_str().unwrap().contains("SIGKILL"),
        "{worker}"
    );
    assert!(
        report.gets_ok > 50,
        "too little load to mean anything: {report:?}"
    );
    assert!(
        report.failures.is_empty(),
        "{} failed GETs of {}: {:?}",
        report.failures.len(),
        report.gets_ok,
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.served_by.contains("worker-2"), "{report:?}");
    eprintln!(
        "killed worker back and ready in {recovered:?}; {} GETs, 0 failed",
        report.gets_ok
    );
}

#[tokio::test]
async fn a_stopped_worker_is_detected_as_hung_and_replaced() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let old_pid = cluster.worker(0).await["pid"].as_u64().unwrap() as u32;

    signal(old_pid, libc::SIGSTOP);
    let stopped = Instant::now();
    let status = cluster
        .wait_status("worker-1 replaced", REACT_TIMEOUT, |s| {
            let w = &s["workers"][0];
            w["state"] == "ready" && w["pid"].as_u64().is_some_and(|p| p as u32 != old_pid)
        })
        .await;
    let worker = &status["workers"][0];
    let last_exit = worker["lastExit"].as_str().unwrap();
    assert!(last_exit.contains("liveness"), "{worker}");
    assert_eq!(worker["restarts"], 1, "{worker}");
    assert!(
        wait_gone(&[old_pid], Duration::from_secs(5)).await.is_ok(),
        "the hung worker {old_pid} is still running"
    );
    let stderr = cluster.stderr();
    assert!(stderr.contains("worker unhealthy"), "{stderr}");
    eprintln!(
        "hung worker replaced after {:?} ({last_exit})",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn a_worker_that_cannot_start_backs_off_and_recovers_when_its_port_is_free() {
    let _turn = TURN.lock().await;
    let h = Harness::new(2);
    let mut cluster = h.start(2).await;
    let port = h.base + 1;
    let old_pid = cluster.worker(1).await["pid"].as_u64().unwrap() as u32;

    // Kill worker-2 and take its port before its replacement can.
    signal(old_pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    let squatter = loop {
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            break listener;
        }
        assert!(Instant::now() < deadline, "port {port} never came free");
        std::thread::sleep(Duration::from_millis(1));
    };

    // It keeps failing; the waits between tries grow and /status shows them.
    let mut backoffs = BTreeSet::new();
    let status = cluster
        .wait_status("worker-2 backing off at least 800ms", REACT_TIMEOUT, |s| {
            let w = &s["workers"][1];
            if w["state"] == "backoff" {
                backoffs.insert(w["backoffMs"].as_u64().unwrap_or_default());
            }
            w["state"] == "backoff" && w["backoffMs"].as_u64() >= Some(800)
        })
        .await;
    let worker = &status["workers"][1];
    assert!(worker["restarts"].as_u64().unwrap() >= 3, "{worker}");
    assert!(
        worker["lastExit"].as_str().unwrap().contains("code"),
        "{worker}"
    );
    assert!(backoffs.len() >= 2, "backoff did not grow: {backoffs:?}");
    let stderr = cluster.stderr();
    assert!(stderr.contains("worker backoff"), "{stderr}");
    assert!(
        stderr.contains(&format!("{port}")) && stderr.contains("worker-2 | "),
        "{stderr}"
    );
    // Worker-1 keeps serving meanwhile.
    assert_eq!(status["workers"][0]["state"], "ready");

    drop(squatter);
    cluster
        .wait_status("worker-2 ready again", REACT_TIMEOUT, |s| {
            s["workers"][1]["state"] == "ready"
        })
        .await;
    eprintln!("backoffs seen: {backoffs:?}");
}

#[tokio::test]
async fn sighup_rolls_every_worker_without_a_failed_get_or_post() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let token = cluster.register().await;
    let before = cluster.worker_pids().await;
    let tasks_before = h.count_tasks().await;

    let load = Load::start(&cluster.api, &token, 6, 4);
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(cluster.pid(), libc::SIGHUP);
    let status = cluster
        .wait_status("every worker replaced and ready", REACT_TIMEOUT * 2, |s| {
            s["workers"].as_array().is_some_and(|ws| {
                ws.iter().all(|w| {
                    w["state"] == "ready"
                        && w["pid"]
                            .as_u64()
                            .is_some_and(|p| !before.contains(&(p as u32)))
                })
            })
        })
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = load.finish().await;

    assert!(
        report.failures.is_empty(),
        "{} failed requests ({} GETs and {} POSTs ok): {:?}",
        report.failures.len(),
        report.gets_ok,
        report.posts_ok,
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.gets_ok > 30 && report.posts_ok > 10, "{report:?}");
    // Every accepted POST created exactly one task.
    assert_eq!(h.count_tasks().await - tasks_before, report.posts_ok as i64);
    for w in status["workers"].as_array().unwrap() {
        assert_eq!(w["restarts"], 0, "a rolling restart is not a crash: {w}");
    }
    assert!(
        wait_gone(&before, Duration::from_secs(5)).await.is_ok(),
        "old workers still running"
    );
    // Only the new workers are upstreams now.
    let upstreams = status["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 3, "{upstreams:?}");
    let stderr = Cluster::log_with(
        &cluster.stderr,
        "rolling restart finished",
        Duration::from_secs(5),
    )
    .await;
    assert!(stderr.contains("rolling restart finished"), "{stderr}");
    eprintln!(
        "rolling restart under load: {} GETs and {} POSTs, 0 failed",
        report.gets_ok, report.posts_ok
    );
}

#[tokio::test]
async fn sigterm_stops_proxy_and_workers_and_exits_0() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let pids = cluster.worker_pids().await;

    signal(cluster.pid(), libc::SIGTERM);
    let status = cluster.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}\n{}", cluster.logs());
    // The supervisor stopped and waited for its children before exiting.
    let left = wait_gone(&pids, Duration::ZERO).await;
    assert!(
        left.is_ok(),
        "workers {left:?} still running after the supervisor exited"
    );
    for port in [h.listen, h.admin, h.base, h.base + 1, h.base + 2] {
        assert!(
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok(),
            "port {port} still held after exit"
        );
    }
    let stderr = cluster.stderr();
    assert!(stderr.contains("taskd serve stopped"), "{stderr}");
}

#[tokio::test]
async fn workers_exit_by_themselves_when_the_supervisor_is_killed() {
    let _turn = TURN.lock().await;
    let h = Harness::new(3);
    let mut cluster = h.start(3).await;
    let pids = cluster.worker_pids().await;

    signal(cluster.pid(), libc::SIGKILL);
    cluster.wait_exit(Duration::from_secs(5)).await;
    let gone = wait_gone(&pids, Duration::from_secs(2)).await;
    assert!(
        gone.is_ok(),
        "workers {gone:?} outlived their supervisor by 2s"
    );
    for port in [h.base, h.base + 1, h.base + 2] {
        assert!(
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok(),
            "port {port} still held by an orphan"
        );
    }
    eprintln!("orphaned workers gone after {:?}", gone.unwrap());
}

#[tokio::test]
async fn a_busy_port_is_a_clear_error_and_starts_no_worker() {
    let _turn = TURN.lock().await;
    let h = Harness::new(2);
    for (busy, flag) in [(h.listen, "--listen"), (h.base + 1, "--base-port")] {
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, busy)).unwrap();
        let mut cluster = h.spawn(h.command(2));
        let status = cluster.wait_exit(Duration::from_secs(30)).await;
        drop(squatter);
        assert!(
            !status.success(),
            "taskd serve started although {busy} is taken"
        );
        let stderr = cluster.stderr();
        assert!(
            stderr.contains(&format!("port {busy} is in use")) && stderr.contains(flag),
            "the error does not name port {busy} and {flag}:\n{stderr}"
        );
        assert!(!stderr.contains("worker started"), "{stderr}");
    }
}

/// The README's curl walkthrough ("The API in five minutes"), extracted from README.md and run
/// with bash against a real cluster exactly as written, except that its first line points at
/// this test's proxy port instead of 8080. Every value it prints is checked.
#[tokio::test]
async fn the_readme_walkthrough_runs_verbatim() {
    let _turn = TURN.lock().await;
    let h = Harness::new(2);
    let cluster = h.start(2).await;

    let script = walkthrough::script().replacen(
        walkthrough::FIRST_LINE,
        &format!("API={}/api/v1\n", cluster.api),
        1,
    );
    walkthrough::require_tools();
    // -e and pipefail: a failed curl or a jq that cannot parse its input fails the test.
    let output = tokio::process::Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(&h.dir)
        .output()
        .await
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "walkthrough failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
        output.status,
        cluster.logs()
    );

    walkthrough::check_output(&stdout);
}

/// `serve --tls-cert/--tls-key`: HTTPS in front of the workers, and SIGHUP reads the files again
/// before rolling the workers.
#[tokio::test]
async fn serve_terminates_https_and_reads_the_certificate_again_on_sighup() {
    let _turn = TURN.lock().await;
    let h = Harness::new(1);
    let (old, new) = (
        tls::TestCa::new(&h.dir, "old"),
        tls::TestCa::new(&h.dir, "new"),
    );
    let (cert, key) = (h.dir.join("cert.pem"), h.dir.join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let https = free_port();
    let mut command = h.command(1);
    command
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .args(["--tls-listen", &format!("127.0.0.1:{https}")]);
    let mut cluster = h.spawn(command);
    cluster
        .wait_status("the worker ready", READY_TIMEOUT, |s| {
            s["workers"][0]["state"] == "ready"
        })
        .await;
    let trusting = |ca: &tls::TestCa| {
        let pem = std::fs::read(&ca.ca).unwrap();
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    };
    let url = format!("https://localhost:{https}/health/live");
    let response = trusting(&old).get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-served-by"], "worker-1");
    let banner = Cluster::log_with(&cluster.stdout, "HTTPS", READY_TIMEOUT).await;
    assert!(
        banner.contains(&format!("https://127.0.0.1:{https}/api/v1")),
        "{banner}"
    );

    std::fs::copy(&new.cert, &cert).unwrap();
    std::fs::copy(&new.key, &key).unwrap();
    signal(cluster.pid(), libc::SIGHUP);
    let stderr =
        Cluster::log_with(&cluster.stderr, "rolling restart finished", REACT_TIMEOUT).await;
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("TLS certificate reloaded") && l.contains("SIGHUP")),
        "{}",
        cluster.logs()
    );
    assert!(
        stderr.contains("rolling restart finished"),
        "{}",
        cluster.logs()
    );
    let response = trusting(&new).get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    signal(cluster.pid(), libc::SIGTERM);
    assert!(cluster.wait_exit(REACT_TIMEOUT).await.success());
}
