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
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{
    binaries::{PostgresBinaries, find_postgres, find_redis, missing},
    process::{as_user, choose_port, launch, own_dir, run_as, stop_leftover},
};
use crate::config::{Config, DatabaseConfig, RedisConfig, StoresMode, SupervisorConfig};

mod binaries;
mod process;

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
