//! Private stores for `taskd serve` (`supervisor.stores`): on a machine that has the PostgreSQL
//! and Redis servers installed but not running, the supervisor runs its own, with their data
//! under `supervisor.stores_dir` (`./.taskd`), so that `cargo run --release -- serve` works on a
//! fresh host.
//!
//! # Life of a store
//!
//! 1. [`start`] decides per store: with `auto`, only when the configured URL is the default and
//!    nothing accepts a connection there; with `always`, in any case; never with `never`.
//! 2. It finds the server binaries (`PATH`, then Debian's `/usr/lib/postgresql/*/bin` and the
//!    RPM layout `/usr/pgsql-*/bin`). When they are missing it fails with the install command
//!    of this system.
//! 3. PostgreSQL's cluster is made with `initdb` on first use (user `postgres`, trust auth, TCP
//!    on 127.0.0.1 only, no Unix socket); Redis keeps an append-only file.
//! 4. Each server starts on its default port when that is free, else on a free one, in a
//!    process group of its own (a Ctrl-C reaches only the supervisor, which stops the stores
//!    after the workers). It is ready when it answers (a PostgreSQL login, a Redis `PING`).
//! 5. A task per store restarts it with the workers' backoff when it exits unexpectedly, and
//!    stops it on [`LocalStores::stop`]: SIGINT (PostgreSQL's fast shutdown) or SIGTERM (Redis
//!    saves), SIGKILL after `grace_period`.
//!
//! The workers get the stores' URLs through their environment (`TASKD_DATABASE__URL`,
//! `TASKD_REDIS__URL`). As root the servers run as the `postgres` user (or `nobody`):
//! PostgreSQL refuses to run as root. Should the supervisor die without stopping them (SIGKILL),
//! the kernel sends them their stop signal (`PR_SET_PDEATHSIG`), and a store still running from
//! an earlier run is stopped before its data directory is used again.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    net::{Ipv4Addr, SocketAddr},
    os::unix::{fs::MetadataExt, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::{Child, Command},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::backoff::Backoff;
use crate::config::{Config, DatabaseConfig, RedisConfig, StoresMode, SupervisorConfig};

const POSTGRES_PORT: u16 = 5432;
const REDIS_PORT: u16 = 6379;

/// The private stores of one `taskd serve`, running until [`stop`](Self::stop).
pub struct LocalStores {
    running: Vec<Running>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// What the banner and the workers need to know of one running store.
struct Running {
    kind: Kind,
    port: u16,
    data: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Postgres,
    Redis,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Postgres => "PostgreSQL",
            Kind::Redis => "Redis",
        }
    }

    /// The signal that stops the server cleanly: PostgreSQL's fast shutdown (SIGTERM would
    /// wait for every client to disconnect), Redis's save-and-exit.
    fn stop_signal(self) -> libc::c_int {
        match self {
            Kind::Postgres => libc::SIGINT,
            Kind::Redis => libc::SIGTERM,
        }
    }
}

/// How to start one store's server, again after a crash.
#[derive(Debug, Clone)]
struct Spec {
    kind: Kind,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    user: Option<User>,
    port: u16,
}

/// An unprivileged account from `/etc/passwd`.
#[derive(Debug, Clone)]
struct User {
    name: String,
    uid: u32,
    gid: u32,
}

impl LocalStores {
    /// The environment that points a worker at the private stores.
    pub fn worker_env(&self) -> Vec<(OsString, OsString)> {
        self.running
            .iter()
            .map(|store| match store.kind {
                Kind::Postgres => (
                    "TASKD_DATABASE__URL".into(),
                    postgres_url(store.port).into(),
                ),
                Kind::Redis => ("TASKD_REDIS__URL".into(), redis_url(store.port).into()),
            })
            .collect()
    }

    /// The banner's line about them; `None` when none run.
    pub fn describe(&self) -> Option<String> {
        if self.running.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .running
            .iter()
            .map(|s| {
                format!(
                    "{} 127.0.0.1:{} ({})",
                    s.kind.name(),
                    s.port,
                    s.data.display()
                )
            })
            .collect();
        Some(parts.join("    "))
    }

    /// Stops every store (after the workers) and waits until they have exited.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Starts the private stores `config` calls for and points `config` at them. Returns once each
/// answers, or fails naming what is missing (binaries, permissions) with the last lines of the
/// server's log.
pub async fn start(config: &mut Config) -> anyhow::Result<LocalStores> {
    let sup = config.supervisor.clone();
    let stores = LocalStores {
        running: Vec::new(),
        stop: CancellationToken::new(),
        tasks: TaskTracker::new(),
    };
    let want_postgres = wanted(
        sup.stores,
        config.database.url == DatabaseConfig::default().url,
        POSTGRES_PORT,
    )
    .await;
    let want_redis = wanted(
        sup.stores,
        config.redis.url == RedisConfig::default().url,
        REDIS_PORT,
    )
    .await;
    if !want_postgres && !want_redis {
        return Ok(stores);
    }
    let mut stores = stores;
    let postgres = want_postgres.then(find_postgres);
    let redis = want_redis.then(find_redis);
    let mut absent = Vec::new();
    if matches!(postgres, Some(None)) {
        absent.push(Kind::Postgres);
    }
    if matches!(redis, Some(None)) {
        absent.push(Kind::Redis);
    }
    if !absent.is_empty() {
        return Err(missing(&absent));
    }
    let dir = std::path::absolute(&sup.stores_dir).with_context(|| {
        format!(
            "resolving supervisor.stores_dir {}",
            sup.stores_dir.display()
        )
    })?;
    let user = run_as()?;
    let result = async {
        if let Some(Some(binaries)) = &postgres {
            let running = start_postgres(binaries, &dir, user.as_ref(), &sup, &stores).await?;
            config.database.url = postgres_url(running.port);
            stores.running.push(running);
        }
        if let Some(Some(binary)) = &redis {
            let running = start_redis(binary, &dir, user.as_ref(), &sup, &stores).await?;
            config.redis.url = redis_url(running.port);
            stores.running.push(running);
        }
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(stores),
        Err(error) => {
            stores.stop().await;
            Err(error)
        }
    }
}

/// Whether a store is to be started: `auto` only for the default URL with nothing answering.
async fn wanted(mode: StoresMode, default_url: bool, port: u16) -> bool {
    match mode {
        StoresMode::Never => false,
        StoresMode::Always => true,
        StoresMode::Auto => default_url && !answers(port).await,
    }
}

/// Whether something accepts a TCP connection on `127.0.0.1:port` within a second.
async fn answers(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

fn postgres_url(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/taskd")
}

fn redis_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

struct PostgresBinaries {
    dir: PathBuf,
}

impl PostgresBinaries {
    fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A directory holding both `postgres` and `initdb`: `PATH` first, then the highest version of
/// Debian's and the RPM packages' layouts.
fn find_postgres() -> Option<PostgresBinaries> {
    let has_both = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    let on_path = path_dirs().find(|dir| has_both(dir));
    let packaged = || {
        let mut dirs: Vec<(u32, PathBuf)> = Vec::new();
        for (root, prefix, tail) in [
            ("/usr/lib/postgresql", "", "bin"),
            ("/usr", "pgsql-", "bin"),
        ] {
            let Ok(entries) = std::fs::read_dir(root) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(version) = name.strip_prefix(prefix).and_then(|v| v.parse().ok()) else {
                    continue;
                };
                let dir = entry.path().join(tail);
                if has_both(&dir) {
                    dirs.push((version, dir));
                }
            }
        }
        dirs.into_iter().max().map(|(_, dir)| dir)
    };
    on_path
        .or_else(packaged)
        .map(|dir| PostgresBinaries { dir })
}

fn find_redis() -> Option<PathBuf> {
    path_dirs()
        .chain([
            "/usr/bin".into(),
            "/usr/sbin".into(),
            "/usr/local/bin".into(),
        ])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
}

fn path_dirs() -> impl Iterator<Item = PathBuf> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
}

/// The error for missing server binaries, with this system's install command.
fn missing(absent: &[Kind]) -> anyhow::Error {
    let sudo = if is_root() { "" } else { "sudo " };
    let os = |file: &str| Path::new(file).exists();
    let packages = |postgres: &str, redis: &str| {
        let names: Vec<&str> = absent
            .iter()
            .map(|kind| match kind {
                Kind::Postgres => postgres,
                Kind::Redis => redis,
            })
            .collect();
        names.join(" ")
    };
    let command = if os("/etc/debian_version") {
        format!(
            "{sudo}apt-get install -y {}",
            packages("postgresql", "redis-server")
        )
    } else if os("/etc/fedora-release") || os("/etc/redhat-release") {
        format!(
            "{sudo}dnf install -y {}",
            packages("postgresql-server", "redis")
        )
    } else if os("/etc/alpine-release") {
        format!("{sudo}apk add {}", packages("postgresql", "redis"))
    } else if os("/etc/arch-release") {
        format!(
            "{sudo}pacman -S --noconfirm {}",
            packages("postgresql", "redis")
        )
    } else if cfg!(target_os = "macos") {
        format!("brew install {}", packages("postgresql", "redis"))
    } else {
        format!(
            "(your system's package manager) {}",
            packages("postgresql", "redis")
        )
    };
    let what: Vec<&str> = absent.iter().map(|kind| kind.name()).collect();
    let urls: Vec<&str> = absent
        .iter()
        .map(|kind| match kind {
            Kind::Postgres => "database.url (DATABASE_URL)",
            Kind::Redis => "redis.url (REDIS_URL)",
        })
        .collect();
    anyhow::anyhow!(
        "nothing answers at the default {} address and the server is not installed, so taskd \
         serve cannot start one of its own. Install it with:\n\n    {command}\n\nor point {} \
         at a running server (supervisor.stores = \"never\" turns private stores off)",
        what.join(" and "),
        urls.join(" and ")
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// As root, the account the servers run as: `postgres` (made by the PostgreSQL packages), else
/// `nobody`.
fn run_as() -> anyhow::Result<Option<User>> {
    if !is_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let find = |wanted: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 4 && fields[0] == wanted).then(|| User {
                name: wanted.to_owned(),
                uid: fields[2].parse().unwrap_or(0),
                gid: fields[3].parse().unwrap_or(0),
            })
        })
    };
    match find("postgres").or_else(|| find("nobody")) {
        Some(user) if user.uid != 0 => Ok(Some(user)),
        _ => bail!(
            "taskd serve runs as root and found no unprivileged user (postgres, nobody) to run \
             its private stores as (PostgreSQL refuses to run as root)"
        ),
    }
}

/// Makes `dir` (and its parents) and hands `dir` to `user`; fails when `user` cannot reach it
/// (a parent such as `/root` closed to others).
fn own_dir(dir: &Path, user: Option<&User>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let Some(user) = user else {
        return Ok(());
    };
    std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid))
        .with_context(|| format!("handing {} to user {}", dir.display(), user.name))?;
    for parent in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(parent)?;
        let mode = meta.mode();
        let reachable = mode & 0o001 != 0
            || (meta.uid() == user.uid && mode & 0o100 != 0)
            || (meta.gid() == user.gid && mode & 0o010 != 0);
        if !reachable {
            bail!(
                "taskd serve runs as root, so its private stores run as user {}, who cannot \
                 reach {} ({} is mode {:o}); set supervisor.stores_dir \
                 (TASKD_SUPERVISOR__STORES_DIR) to a directory it can reach, e.g. /var/lib/taskd",
                user.name,
                dir.display(),
                parent.display(),
                mode & 0o7777
            );
        }
    }
    Ok(())
}

/// The default port when it is free, else one the kernel picks.
fn choose_port(default: u16) -> anyhow::Result<u16> {
    let bind = |port| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port));
    if bind(default).is_ok() {
        return Ok(default);
    }
    Ok(bind(0)
        .and_then(|l| l.local_addr())
        .context("finding a free port for a private store")?
        .port())
}

async fn start_postgres(
    binaries: &PostgresBinaries,
    dir: &Path,
    user: Option<&User>,
    sup: &SupervisorConfig,
    stores: &LocalStores,
) -> anyhow::Result<Running> {
    let data = dir.join("postgres");
    let log = dir.join("postgres.log");
    own_dir(dir, None)?;
    stop_leftover(&data.join("postmaster.pid"), "postgres", libc::SIGINT).await;
    if !data.join("PG_VERSION").is_file() {
        own_dir(&data, user)?;
        tracing::info!(
            data = %data.display(),
            "first use of the private PostgreSQL: initdb"
        );
        let mut initdb = std::process::Command::new(binaries.tool("initdb"));
        initdb
            .arg("--pgdata")
            .arg(&data)
            .args([
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
            ])
            .args(["--locale", "C", "--no-instructions"]);
        as_user(&mut initdb, user);
        let output = tokio::process::Command::from(initdb)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb {} failed ({}):\n{}",
                data.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
    }
    let port = choose_port(POSTGRES_PORT)?;
    let spec = Spec {
        kind: Kind::Postgres,
        program: binaries.tool("postgres"),
        args: vec![
            "-D".into(),
            data.clone().into(),
            "-p".into(),
            port.to_string().into(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            // TCP only: no socket in /var/run/postgresql (which may not exist or be writable).
            "-c".into(),
            "unix_socket_directories=".into(),
        ],
        log,
        user: user.cloned(),
        port,
    };
    launch(spec, sup, stores).await?;
    Ok(Running {
        kind: Kind::Postgres,
        port,
        data,
    })
}

async fn start_redis(
    binary: &Path,
    dir: &Path,
    user: Option<&User>,
    sup: &SupervisorConfig,
    stores: &LocalStores,
) -> anyhow::Result<Running> {
    let data = dir.join("redis");
    own_dir(dir, None)?;
    own_dir(&data, user)?;
    let pidfile = data.join("redis.pid");
    stop_leftover(&pidfile, "redis-server", libc::SIGTERM).await;
    let port = choose_port(REDIS_PORT)?;
    let spec = Spec {
        kind: Kind::Redis,
        program: binary.to_owned(),
        args: [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &data.to_string_lossy(),
            "--pidfile",
            &pidfile.to_string_lossy(),
            "--appendonly",
            "yes",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        .into_iter()
        .map(OsString::from)
        .collect(),
        log: dir.join("redis.log"),
        user: user.cloned(),
        port,
    };
    launch(spec, sup, stores).await?;
    Ok(Running {
        kind: Kind::Redis,
        port,
        data,
    })
}

/// Stops a server left running by an earlier supervisor on the same data (its pid file names
/// a live process of that name), so that this run can start its own.
async fn stop_leftover(pidfile: &Path, comm: &str, signal: libc::c_int) {
    let Ok(text) = std::fs::read_to_string(pidfile) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if pid <= 1 || name.trim() != comm {
        return;
    }
    tracing::warn!(pid, pidfile = %pidfile.display(), "stopping a store left running by an earlier run");
    send(pid, signal);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn send(pid: i32, signal: libc::c_int) {
    if pid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions; pid is a single positive pid.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Runs the command as `user` (when given): uid, gid, no supplementary groups (std drops them
/// when root changes uid).
fn as_user(command: &mut std::process::Command, user: Option<&User>) {
    if let Some(user) = user {
        command.uid(user.uid).gid(user.gid).env("HOME", "/");
        command.env("USER", &user.name);
    }
}

/// Starts the server, waits until it answers, and leaves a task supervising it.
async fn launch(spec: Spec, sup: &SupervisorConfig, stores: &LocalStores) -> anyhow::Result<()> {
    let mut child = spawn(&spec)?;
    if let Err(error) = wait_ready(&spec, &mut child, sup.start_timeout).await {
        stop_child(&spec, &mut child, sup.grace_period).await;
        return Err(error);
    }
    tracing::info!(
        store = spec.kind.name(),
        port = spec.port,
        log = %spec.log.display(),
        "private store ready"
    );
    let sup = sup.clone();
    let stop = stores.stop.clone();
    stores.tasks.spawn(supervise(spec, child, sup, stop));
    Ok(())
}

fn spawn(spec: &Spec) -> anyhow::Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening {}", spec.log.display()))?;
    let mut command = std::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C reaches only the supervisor, which stops the store
        // after the workers.
        .process_group(0);
    as_user(&mut command, spec.user.as_ref());
    let signal = spec.kind.stop_signal();
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2) and
    // getppid(2), both async-signal-safe; it allocates nothing. `taskd serve` spawns from its
    // main thread (a current-thread runtime), so "the parent thread exits" means the supervisor
    // process exits. It runs after the uid change, which would otherwise clear the setting.
    unsafe {
        let parent = libc::getpid();
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 || libc::getppid() != parent {
                return Err(std::io::Error::other("the supervisor is gone"));
            }
            Ok(())
        });
    }
    let child = Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", spec.program.display()))?;
    Ok(child)
}

/// Waits until the server answers on its port; fails when it exits or `timeout` passes, with
/// the end of its log.
async fn wait_ready(spec: &Spec, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the private {} exited at start ({status}); the end of {}:\n{}",
                spec.kind.name(),
                spec.log.display(),
                log_tail(&spec.log)
            );
        }
        if answers_as(spec.kind, spec.port).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the private {} did not answer on 127.0.0.1:{} within {} \
                 (supervisor.start_timeout); the end of {}:\n{}",
                spec.kind.name(),
                spec.port,
                humantime::format_duration(timeout),
                spec.log.display(),
                log_tail(&spec.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A PostgreSQL login (the server accepts connections before it accepts logins) or a Redis
/// `PING`, each within a second.
async fn answers_as(kind: Kind, port: u16) -> bool {
    let attempt = async {
        match kind {
            Kind::Postgres => {
                use sqlx::Connection as _;
                let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                sqlx::PgConnection::connect(&url).await.is_ok()
            }
            Kind::Redis => {
                let Ok(mut stream) =
                    tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await
                else {
                    return false;
                };
                let mut reply = [0u8; 7];
                stream.write_all(b"PING\r\n").await.is_ok()
                    && stream.read_exact(&mut reply).await.is_ok()
                    && &reply == b"+PONG\r\n"
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .unwrap_or(false)
}

/// Keeps the server running until `stop`: restarted with backoff when it exits, stopped
/// cleanly at the end.
async fn supervise(spec: Spec, mut child: Child, sup: SupervisorConfig, stop: CancellationToken) {
    let mut backoff = Backoff::new(sup.backoff_initial, sup.backoff_max, sup.min_uptime);
    let mut started = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                stop_child(&spec, &mut child, sup.grace_period).await;
                return;
            }
            status = child.wait() => {
                let delay = backoff.next_delay(started.elapsed());
                tracing::error!(
                    store = spec.kind.name(),
                    status = %status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    log = %spec.log.display(),
                    restart_in_ms = delay.as_millis() as u64,
                    "private store exited; restarting it"
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
        loop {
            match spawn(&spec) {
                Ok(mut new) => match wait_ready(&spec, &mut new, sup.start_timeout).await {
                    Ok(()) => {
                        tracing::info!(store = spec.kind.name(), "private store back");
                        child = new;
                        started = Instant::now();
                        break;
                    }
                    Err(error) => {
                        stop_child(&spec, &mut new, sup.grace_period).await;
                        tracing::error!(store = spec.kind.name(), "{error:#}");
                    }
                },
                Err(error) => tracing::error!(store = spec.kind.name(), "{error:#}"),
            }
            let delay = backoff.next_delay(Duration::ZERO);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The server's stop signal, SIGKILL after `grace`.
async fn stop_child(spec: &Spec, child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        send(pid, spec.kind.stop_signal());
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(
            store = spec.kind.name(),
            "private store did not stop within supervisor.grace_period; killing it"
        );
        let _ = child.kill().await;
    }
    tracing::info!(store = spec.kind.name(), "private store stopped");
}

/// The last ~20 lines of a log file.
fn log_tail(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map_or(0, |m| m.len());
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = file.read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
