//! `taskd proxy` in front of workers on hosts of their own, as in production: network
//! namespaces joined by a switch (`common/netns.rs`), PostgreSQL and Redis on a database host,
//! two worker hosts, the proxy and its clients on an edge host. One worker host's cable is
//! pulled under load (packets vanish, nothing answers with a reset, as when a machine dies), then
//! plugged back in.
//!
//! What a user must see (docs/contract.md §8 "Operations"): not one failed request, GETs and
//! keyed POSTs alike; none slower than `proxy.retry_after_ejection` + 2 s; no keyed POST applied
//! twice; the host serving again after `rise` probes once it is back.
//!
//! Needs root (namespaces; CI runs as root) and the PostgreSQL and Redis server binaries.
//! Elsewhere it is skipped with a message, except under `CI=true`, where a skip is a failure.
//! `MULTIHOST_PROXY=nginx` runs the same scenario with NGINX (default `proxy_next_upstream`,
//! `proxy_read_timeout` 60 s) in the proxy's place and only reports; `MULTIHOST_OUTAGE` (default
//! `6s`) sets how long the host stays cut off (`scripts/host-cut.sh` runs both).

#[path = "common/netns.rs"]
mod netns;

use std::{
    collections::BTreeSet,
    fs::File,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use netns::{Lan, Namespace};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_taskd");
/// `proxy.retry_after_ejection` in this test.
const RETRY_AFTER_EJECTION: Duration = Duration::from_secs(1);
/// The hosts, in the order of their addresses.
const EDGE: usize = 0;
const DB: usize = 1;
const WORKERS: [usize; 2] = [2, 3];

/// The processes a test started; killed (and reaped) on drop, also when the test panics.
#[derive(Default)]
struct Processes(std::sync::Mutex<Vec<std::process::Child>>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.0.get_mut().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a process inside `ns`, its output in `dir/<name>.log`.
fn spawn(
    processes: &Processes,
    ns: &Namespace,
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
) {
    let log = File::create(dir.join(format!("{name}.log"))).expect("create log");
    let child = ns
        .command(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    processes.0.lock().unwrap().push(child);
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- {} (last 30 lines) ---\n{}\n",
                path.display(),
                lines[lines.len().saturating_sub(30)..].join("\n")
            ));
        }
    }
    out
}

/// The newest PostgreSQL server binary directory (Debian's layout).
fn pg_bin(name: &str) -> String {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .max()
        .map(|(_, path)| path.join("bin").join(name));
    newest.map_or_else(|| name.to_owned(), |p| p.display().to_string())
}

/// PostgreSQL and Redis on the database host, trusting the LAN; returns when both answer.
fn start_stores(processes: &Processes, host: &netns::Host, dir: &Path) {
    let data = dir.join("pg");
    std::fs::create_dir(&data).unwrap();
    let chown = Command::new("chown")
        .args(["postgres:postgres", data.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(chown.success());
    let as_postgres = [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--clear-groups",
    ];
    let initdb = Command::new(as_postgres[0])
        .args(&as_postgres[1..])
        .args([&pg_bin("initdb"), "-D", data.to_str().unwrap()])
        .args(["-U", "postgres", "--auth=trust", "--no-instructions"])
        .output()
        .unwrap();
    assert!(initdb.status.success(), "{initdb:?}");
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhost all all 10.0.0.0/8 trust\n",
    )
    .unwrap();
    let addr = host.addr.to_string();
    let postgres = pg_bin("postgres");
    let mut args = as_postgres.to_vec();
    args.extend([
        &postgres,
        "-D",
        data.to_str().unwrap(),
        "-c",
        "unix_socket_directories=",
        "-c",
        "fsync=off",
        "-c",
        "max_connections=200",
    ]);
    let listen = format!("listen_addresses={addr}");
    args.extend(["-c", &listen]);
    spawn(processes, &host.ns, dir, "postgres", &args, &[]);
    spawn(
        processes,
        &host.ns,
        dir,
        "redis",
        &[
            "redis-server",
            "--bind",
            &addr,
            "--port",
            "6379",
            "--save",
            "",
            "--protected-mode",
            "no",
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pg = host.ns.exec([
            &pg_bin("pg_isready"),
            "-h",
            &addr,
            "-p",
            "5432",
            "-U",
            "postgres",
        ]);
        let redis = host.ns.exec(["redis-cli", "-h", &addr, "ping"]);
        if pg.status.success() && String::from_utf8_lossy(&redis.stdout).contains("PONG") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stores not up: {pg:?} {redis:?}\n{}",
            logs(dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the load saw.
#[derive(Debug, Default)]
struct Report {
    ok: u64,
    posts_ok: u64,
    failures: Vec<String>,
    slowest: Duration,
    /// (seconds since the load began, worker) of every answer.
    served: Vec<(f64, String)>,
}

/// 16 client loops through `base` until `stop`: GETs of the task list and, one in five, a
/// `POST` with a fresh `Idempotency-Key`. No client-side retry: a failure is what a user sees.
async fn load(base: String, token: String, stop: Arc<AtomicBool>, started: Instant) -> Report {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    let loops = (0..16).map(|i| {
        let (client, base, token, stop) =
            (client.clone(), base.clone(), token.clone(), stop.clone());
        tokio::spawn(async move {
            let mut report = Report::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let post = n % 5 == 0;
                let request = if post {
                    client
                        .post(format!("{base}/api/v1/tasks"))
                        .header("Idempotency-Key", format!("cut-{i}-{n}"))
                        .json(&json!({ "title": format!("cut {i}-{n}") }))
                } else {
                    client.get(format!("{base}/api/v1/tasks?limit=5"))
                };
                let sent = Instant::now();
                let answer = request.bearer_auth(&token).send().await;
                let outcome = match answer {
                    Ok(response) if response.status().is_success() => {
                        let by = response
                            .headers()
                            .get("x-served-by")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("?")
                            .to_owned();
                        response
                            .bytes()
                            .await
                            .map(|_| by)
                            .map_err(|e| e.to_string())
                    }
                    Ok(response) => Err(format!("status {}", response.status())),
                    Err(error) => Err(error.to_string()),
                };
                let took = sent.elapsed();
                report.slowest = report.slowest.max(took);
                match outcome {
                    Ok(by) => {
                        report.ok += 1;
                        report.posts_ok += u64::from(post);
                        report.served.push((started.elapsed().as_secs_f64(), by));
                    }
                    Err(error) => report.failures.push(format!(
                        "{} after {took:?}: {error}",
                        if post { "POST" } else { "GET" }
                    )),
                }
            }
            report
        })
    });
    let mut total = Report::default();
    for handle in loops.collect::<Vec<_>>() {
        let report = handle.await.unwrap();
        total.ok += report.ok;
        total.posts_ok += report.posts_ok;
        total.failures.extend(report.failures);
        total.slowest = total.slowest.max(report.slowest);
        total.served.extend(report.served);
    }
    total
}

fn nginx_conf(dir: &Path, upstreams: &[String]) -> String {
    let servers: String = upstreams
        .iter()
        .map(|u| format!("        server {u};\n"))
        .collect();
    let tmp = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log warn;\n\
         events {{ worker_connections 1024; }}\nhttp {{\n    access_log off;\n\
         client_body_temp_path {tmp}/nginx-body;\n    proxy_temp_path {tmp}/nginx-proxy;\n\
         upstream workers {{\n{servers}        keepalive 32;\n    }}\n\
         server {{\n        listen 127.0.0.1:8080;\n        location / {{\n\
         proxy_pass http://workers;\n            proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n            proxy_set_header Host $http_host;\n\
         proxy_set_header X-Forwarded-For $remote_addr;\n        }}\n    }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path.display().to_string()
}

/// The test's hosts, with the stores running and the workers started; removed on drop.
struct Site {
    /// Declared first: processes go before their hosts.
    processes: Processes,
    lan: Arc<Lan>,
    dir: tempfile::TempDir,
    /// The workers' environment: the stores on the database host.
    env: Vec<(&'static str, String)>,
    /// `address:3000` of each worker.
    workers: Vec<String>,
}

impl Site {
    /// `None` (after saying why) where namespaces cannot be made; under `CI=true` that fails.
    fn new() -> Option<Self> {
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let lan = if root {
            Lan::new(&["edge", "db", "w1", "w2"])
        } else {
            None
        };
        let Some(lan) = lan else {
            let why = "needs root and `ip netns` to make hosts of its own";
            assert!(
                std::env::var("CI").is_err(),
                "CI must run this test: it {why}"
            );
            eprintln!("skipped: this test {why}");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let processes = Processes::default();
        start_stores(&processes, lan.host(DB), dir.path());
        let db = lan.host(DB).addr;
        let env = vec![
            (
                "DATABASE_URL",
                format!("postgres://postgres@{db}:5432/taskd"),
            ),
            ("REDIS_URL", format!("redis://{db}:6379")),
            ("TASKD_AUTH__ARGON2_MEMORY_KIB", "64".to_owned()),
            ("TASKD_AUTH__ARGON2_ITERATIONS", "1".to_owned()),
            ("TASKD_RATE_LIMIT__ENABLED", "false".to_owned()),
        ];
        let migrated = lan
            .host(WORKERS[0])
            .ns
            .command([BIN, "migrate"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(migrated.status.success(), "{migrated:?}");
        let mut workers = Vec::new();
        for (n, &index) in WORKERS.iter().enumerate() {
            let host = lan.host(index);
            let id = format!("w{}", n + 1);
            spawn(
                &processes,
                &host.ns,
                dir.path(),
                &id,
                &[
                    BIN,
                    "worker",
                    "--host",
                    "0.0.0.0",
                    "--port",
                    "3000",
                    "--instance-id",
                    &id,
                ],
                &env,
            );
            workers.push(format!("{}:3000", host.addr));
        }
        Some(Self {
            processes,
            lan: Arc::new(lan),
            dir,
            env,
            workers,
        })
    }

    fn edge(&self) -> &Namespace {
        &self.lan.host(EDGE).ns
    }

    /// `taskd proxy` on the edge host's 127.0.0.1:8080 (admin :8081), fast health checks.
    fn start_proxy(&self, upstream_args: &[&str], env: &[(&'static str, &str)]) {
        let mut args = vec![
            BIN,
            "proxy",
            "--listen",
            "127.0.0.1:8080",
            "--admin-listen",
            "127.0.0.1:8081",
        ];
        args.extend(upstream_args);
        let mut proxy_env = self.env.clone();
        proxy_env.extend([
            ("TASKD_PROXY__HEALTH__INTERVAL", "250ms".to_owned()),
            ("TASKD_PROXY__HEALTH__TIMEOUT", "500ms".to_owned()),
        ]);
        proxy_env.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        spawn(
            &self.processes,
            self.edge(),
            self.dir.path(),
            "proxy",
            &args,
            &proxy_env,
        );
    }
}

/// Waits (on the edge host) until `want` workers answer through the proxy, then registers a
/// user; its access token.
async fn register_once_up(base: &str, want: usize, dir: &Path) -> String {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = BTreeSet::new();
    while seen.len() < want {
        if let Ok(response) = client.get(format!("{base}/health/ready")).send().await
            && response.status().is_success()
            && let Some(by) = response.headers().get("x-served-by")
        {
            seen.insert(by.to_str().unwrap().to_owned());
        }
        assert!(Instant::now() < deadline, "workers not up\n{}", logs(dir));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let registered: Value = client
        .post(format!("{base}/api/v1/auth/register"))
        .json(&json!({"email": "cut@example.com", "password": "correct horse battery", "name": "Cut"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    registered["accessToken"].as_str().unwrap().to_owned()
}

#[test]
fn a_worker_host_that_vanishes_costs_no_request() {
    let Some(site) = Site::new() else { return };
    let nginx = std::env::var("MULTIHOST_PROXY").is_ok_and(|p| p == "nginx");
    // How long the host stays cut off; longer in `scripts/host-cut.sh`, to outlast NGINX's
    // 60 s `proxy_read_timeout`.
    let outage = std::env::var("MULTIHOST_OUTAGE")
        .ok()
        .map_or(Duration::from_secs(6), |o| {
            humantime::parse_duration(&o).expect("MULTIHOST_OUTAGE is a duration")
        });
    let (lan, dir) = (site.lan.clone(), site.dir.path());
    let db = lan.host(DB).addr;
    let edge = site.edge();
    if nginx {
        let conf = nginx_conf(dir, &site.workers);
        spawn(
            &site.processes,
            edge,
            dir,
            "nginx",
            &["nginx", "-c", &conf, "-g", "daemon off;"],
            &[],
        );
    } else {
        let urls: Vec<String> = site.workers.iter().map(|u| format!("http://{u}")).collect();
        let mut args = Vec::new();
        for url in &urls {
            args.extend(["--upstream", url.as_str()]);
        }
        site.start_proxy(&args, &[("TASKD_PROXY__RETRY_AFTER_EJECTION", "1s")]);
    }

    let base = "http://127.0.0.1:8080".to_owned();
    let lan_for_load = lan.clone();
    let dir_logs = dir.to_owned();
    let (report, timeline) = edge.block_on(async move {
        let token = register_once_up(&base, 2, &dir_logs).await;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let running = tokio::spawn(load(base.clone(), token, stop.clone(), started));
        tokio::time::sleep(Duration::from_secs(2)).await;
        lan_for_load.cut(WORKERS[1]);
        let cut_at = started.elapsed().as_secs_f64();
        tokio::time::sleep(outage).await;
        lan_for_load.restore(WORKERS[1]);
        let restored_at = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        (running.await.unwrap(), (cut_at, restored_at))
    });

    let (cut_at, restored_at) = timeline;
    let back = report
        .served
        .iter()
        .filter(|(at, by)| *at > restored_at && by == "w2")
        .map(|(at, _)| at - restored_at)
        .fold(f64::INFINITY, f64::min);
    let during = report
        .served
        .iter()
        .filter(|(at, by)| *at > cut_at + 3.0 && *at < restored_at && by == "w2")
        .count();
    eprintln!(
        "{}: {} requests ({} keyed POSTs) answered, {} failed, slowest {:?}; host cut at \
         {cut_at:.1}s, back at {restored_at:.1}s, serving again {back:.2}s later; answers from \
         the cut host between 3 s after the cut and its return: {during}",
        if nginx { "nginx" } else { "taskd" },
        report.ok,
        report.posts_ok,
        report.failures.len(),
        report.slowest
    );
    if nginx {
        for failure in report.failures.iter().take(5) {
            eprintln!("  {failure}");
        }
        return;
    }

    assert!(
        report.failures.is_empty(),
        "{} failed: {:?}\n{}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(5)],
        logs(dir)
    );
    let bound = RETRY_AFTER_EJECTION + Duration::from_secs(2);
    assert!(
        report.slowest <= bound,
        "slowest request {:?}, over {bound:?}\n{}",
        report.slowest,
        logs(dir)
    );
    assert!(
        report.ok > 200,
        "too little load to mean anything: {report:?}"
    );
    assert!(
        back.is_finite(),
        "the host never served again after it came back"
    );
    // Every keyed POST answered 2xx made exactly one task (the user's only tasks).
    let count = lan.host(DB).ns.exec([
        &pg_bin("psql"),
        "-h",
        &db.to_string(),
        "-U",
        "postgres",
        "-d",
        "taskd",
        "-tAc",
        "SELECT count(*) FROM tasks",
    ]);
    let tasks: u64 = String::from_utf8_lossy(&count.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(tasks, report.posts_ok, "keyed POSTs applied twice or lost");
}

/// The edge host's own hosts file: `ip netns exec` puts `/etc/netns/<host>/hosts` in the place
/// of `/etc/hosts` for what it runs, so the proxy's resolver reads this file. Written in place
/// (same inode), so the running proxy sees each change; removed on drop.
struct HostsFile {
    dir: std::path::PathBuf,
}

impl HostsFile {
    fn new(ns: &Namespace) -> Self {
        let dir = std::path::PathBuf::from(format!("/etc/netns/{}", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        // Every line of a name, not only the first (glibc's `multi`).
        std::fs::write(dir.join("host.conf"), "multi on\n").unwrap();
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        Self { dir }
    }

    /// `name` resolves to `addrs` from now on.
    fn set(&self, name: &str, addrs: &[&str]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for addr in addrs {
            text.push_str(&format!("{addr} {name}\n"));
        }
        std::fs::write(self.dir.join("hosts"), text).unwrap();
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `taskd proxy --upstream-dns workers:3000`: the name's addresses change under load (a worker
/// host added, then the first one removed); the added one joins, the removed one drains and
/// leaves, and not one request fails.
#[test]
fn workers_found_by_dns_join_and_leave_under_load() {
    let Some(site) = Site::new() else { return };
    let hosts = HostsFile::new(site.edge());
    let addr = |i: usize| site.lan.host(WORKERS[i]).addr.to_string();
    let (w1, w2) = (addr(0), addr(1));
    hosts.set("workers", &[&w1]);
    site.start_proxy(
        &["--upstream-dns", "workers:3000"],
        &[
            ("TASKD_PROXY__DNS_INTERVAL", "300ms"),
            ("TASKD_PROXY__SLOW_START", "1s"),
        ],
    );
    let hosts = Arc::new(hosts);
    let dir_logs = site.dir.path().to_owned();
    let changes = hosts.clone();
    let (report, added_at, removed_at, status) = site.edge().block_on(async move {
        let base = "http://127.0.0.1:8080".to_owned();
        let token = register_once_up(&base, 1, &dir_logs).await;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let running = tokio::spawn(load(base.clone(), token, stop.clone(), started));
        tokio::time::sleep(Duration::from_secs(1)).await;
        changes.set("workers", &[&w1, &w2]);
        let added_at = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(3)).await;
        changes.set("workers", &[&w2]);
        let removed_at = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        let report = running.await.unwrap();
        let status: Value = reqwest::get("http://127.0.0.1:8081/status")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (report, added_at, removed_at, status)
    });
    let by = |who: &str, from: f64, to: f64| {
        report
            .served
            .iter()
            .filter(|(at, by)| *at >= from && *at < to && by == who)
            .count()
    };
    eprintln!(
        "dns: {} requests answered, {} failed, slowest {:?}; w2 answered {} after joining; w1 \
         answered {} in the last 2 s",
        report.ok,
        report.failures.len(),
        report.slowest,
        by("w2", added_at, removed_at),
        by("w1", removed_at + 2.0, f64::INFINITY)
    );
    assert!(
        report.failures.is_empty(),
        "{} failed: {:?}\n{}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(5)],
        logs(site.dir.path())
    );
    assert!(
        by("w2", 0.0, added_at) == 0,
        "w2 served before its address was there"
    );
    assert!(
        by("w2", added_at, removed_at) > 0,
        "the added address never served"
    );
    assert_eq!(
        by("w1", removed_at + 2.0, f64::INFINITY),
        0,
        "the removed address still served"
    );
    let upstreams = status["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 1, "{status}");
    assert_eq!(
        upstreams[0]["url"],
        format!("http://{}:3000", site.lan.host(WORKERS[1]).addr)
    );
    assert_eq!(
        upstreams[0]["origin"],
        json!({"kind": "dns", "name": "workers:3000"})
    );
}
