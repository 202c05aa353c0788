//! Running one store's server: the account it runs as, its data directory, its port, and its
//! process from spawn through readiness, restarts and stop.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    net::Ipv4Addr,
    os::unix::{fs::MetadataExt, process::CommandExt as _},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::{Child, Command},
};
use tokio_util::sync::CancellationToken;

use super::{Kind, LocalStores, Spec, User};
use crate::{config::SupervisorConfig, supervisor::backoff::Backoff};

pub(super) fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// As root, the account the servers run as: `postgres` (made by the PostgreSQL packages), else
/// `nobody`.
pub(super) fn run_as() -> anyhow::Result<Option<User>> {
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
pub(super) fn own_dir(dir: &Path, user: Option<&User>) -> anyhow::Result<()> {
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
pub(super) fn choose_port(default: u16) -> anyhow::Result<u16> {
    let bind = |port| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port));
    if bind(default).is_ok() {
        return Ok(default);
    }
    Ok(bind(0)
        .and_then(|l| l.local_addr())
        .context("finding a free port for a private store")?
        .port())
}

/// Stops a server left running by an earlier supervisor on the same data (its pid file names
/// a live process of that name), so that this run can start its own.
pub(super) async fn stop_leftover(pidfile: &Path, comm: &str, signal: libc::c_int) {
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

pub(super) fn send(pid: i32, signal: libc::c_int) {
    if pid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions; pid is a single positive pid.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Runs the command as `user` (when given): uid, gid, no supplementary groups (std drops them
/// when root changes uid).
pub(super) fn as_user(command: &mut std::process::Command, user: Option<&User>) {
    if let Some(user) = user {
        command.uid(user.uid).gid(user.gid).env("HOME", "/");
        command.env("USER", &user.name);
    }
}

/// Starts the server, waits until it answers, and leaves a task supervising it.
pub(super) async fn launch(
    spec: Spec,
    sup: &SupervisorConfig,
    stores: &LocalStores,
) -> anyhow::Result<()> {
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

pub(super) fn spawn(spec: &Spec) -> anyhow::Result<Child> {
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
pub(super) async fn wait_ready(
    spec: &Spec,
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<()> {
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
pub(super) async fn answers_as(kind: Kind, port: u16) -> bool {
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
pub(super) async fn supervise(
    spec: Spec,
    mut child: Child,
    sup: SupervisorConfig,
    stop: CancellationToken,
) {
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
pub(super) async fn stop_child(spec: &Spec, child: &mut Child, grace: Duration) {
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
pub(super) fn log_tail(path: &Path) -> String {
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
