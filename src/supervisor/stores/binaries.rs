//! Finding the PostgreSQL and Redis server binaries, and the install command when they are
//! missing.

use std::path::{Path, PathBuf};

use super::{Kind, process::is_root};

pub(super) struct PostgresBinaries {
    pub(super) dir: PathBuf,
}

impl PostgresBinaries {
    pub(super) fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A directory holding both `postgres` and `initdb`: `PATH` first, then the highest version of
/// Debian's and the RPM packages' layouts.
pub(super) fn find_postgres() -> Option<PostgresBinaries> {
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

pub(super) fn find_redis() -> Option<PathBuf> {
    path_dirs()
        .chain([
            "/usr/bin".into(),
            "/usr/sbin".into(),
            "/usr/local/bin".into(),
        ])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
}

pub(super) fn path_dirs() -> impl Iterator<Item = PathBuf> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
}

/// The error for missing server binaries, with this system's install command.
pub(super) fn missing(absent: &[Kind]) -> anyhow::Error {
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
