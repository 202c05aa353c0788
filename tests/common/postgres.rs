//! Private PostgreSQL servers for tests of the data tier: a primary and a streaming replica
//! made with `initdb` and `pg_basebackup` in a temporary directory, on free loopback ports,
//! stopped with their guard. Run as the `postgres` user when the tests run as root (PostgreSQL
//! refuses root), as the current user otherwise.

use std::{
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sqlx::{Connection, PgConnection};

use super::ports;

/// The directory of the newest installed server binaries (Debian's layout), else `PATH`.
fn bin(name: &str) -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .max();
    match newest {
        Some((_, dir)) if dir.join(name).exists() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

/// The user the servers run as: `postgres` when we are root.
fn server_user() -> Option<(u32, u32)> {
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    if me != 0 {
        return None;
    }
    let line = std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find(|l| l.starts_with("postgres:"))?
        .to_owned();
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

fn command(name: &str) -> Command {
    let mut command = Command::new(bin(name));
    if let Some((uid, gid)) = server_user() {
        command.uid(uid).gid(gid);
    }
    command.env_remove("PGDATA");
    command
}

fn run(mut command: Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A new cluster in `data`, trust-authenticated, superuser `postgres`.
fn initdb(data: &Path) {
    let mut init = command("initdb");
    init.arg("-D")
        .arg(data)
        .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]);
    run(init, "initdb");
}

fn chown(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
    }
}

/// One `postgres` server process on a data directory.
pub struct PgServer {
    pub port: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl PgServer {
    /// `postgres://postgres@127.0.0.1:<port>/<database>`
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(&self.log).expect("server log");
        chown(&self.log);
        let child = command("postgres")
            .arg("-D")
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // `prefer` (sqlx's default) also reaches a server that takes TLS only.
        while PgConnection::connect(&self.url("postgres")).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres on {} did not start: {}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Immediate shutdown (`SIGQUIT`), as when the host dies: clients see their connections
    /// drop and new ones refused.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl PgServer {
    /// A standalone server in `dir` that accepts only TLS connections (`hostssl`, plain ones
    /// rejected), with the certificate of `ca`.
    pub async fn spawn_tls(dir: &Path, ca: &super::tls::TestCa) -> Self {
        chown(dir);
        let data = dir.join("tls-data");
        initdb(&data);
        for (from, to) in [(&ca.cert, "server.crt"), (&ca.key, "server.key")] {
            std::fs::copy(from, data.join(to)).unwrap();
            chown(&data.join(to));
            std::fs::set_permissions(
                data.join(to),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
        let port = ports::free_port();
        append(
            &data.join("postgresql.conf"),
            &format!(
                "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 fsync = off\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
                dir.display()
            ),
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let mut server = PgServer {
            port,
            data,
            log: dir.join("tls.log"),
            child: None,
        };
        server.start().await;
        server
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A primary and one streaming replica whose WAL is applied `apply_delay` late
/// (`recovery_min_apply_delay`), so replica reads are certainly stale for that long after a
/// write. The servers are trust-authenticated on 127.0.0.1 only.
pub struct PgReplicaSet {
    pub primary: PgServer,
    pub replica: PgServer,
    _dir: tempfile::TempDir,
}

impl PgReplicaSet {
    pub async fn spawn(apply_delay: Duration) -> Self {
        let dir = tempfile::tempdir().expect("a directory for the servers");
        chown(dir.path());
        let data = dir.path().join("primary");
        initdb(&data);
        let port = ports::free_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 4\nfsync = off\nsynchronous_commit = on\n\
             full_page_writes = off\nshared_buffers = 32MB\nmax_connections = 60\n",
            dir.path().display()
        );
        append(&data.join("postgresql.conf"), &conf);
        let mut primary = PgServer {
            port,
            data,
            log: dir.path().join("primary.log"),
            child: None,
        };
        primary.start().await;

        let replica_data = dir.path().join("replica");
        let mut backup = command("pg_basebackup");
        backup
            .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R"])
            .args(["-p", &port.to_string()])
            .arg("-D")
            .arg(&replica_data);
        run(backup, "pg_basebackup");
        let replica_port = ports::free_port();
        append(
            &replica_data.join("postgresql.conf"),
            &format!(
                "port = {replica_port}\nhot_standby = on\n\
                 recovery_min_apply_delay = '{}ms'\n",
                apply_delay.as_millis()
            ),
        );
        let mut replica = PgServer {
            port: replica_port,
            data: replica_data,
            log: dir.path().join("replica.log"),
            child: None,
        };
        replica.start().await;
        Self {
            primary,
            replica,
            _dir: dir,
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(text.as_bytes()).unwrap();
}

/// A private PgBouncer in transaction mode with stock settings (nothing in
/// `ignore_startup_parameters`, no prepared-statement support: Debian's 1.18), on a free port,
/// in front of the test PostgreSQL server. A small server pool (`default_pool_size`), so
/// concurrent clients share server connections, transaction by transaction.
pub struct PgBouncer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// In front of `host:port` (every database name passes through), with `pool_size` server
    /// connections per database.
    pub async fn spawn(host: &str, upstream: u16, pool_size: u32) -> Self {
        let dir = tempfile::tempdir().expect("a directory for pgbouncer");
        chown(dir.path());
        let port = ports::free_port();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host={host} port={upstream}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = transaction\n\
                 default_pool_size = {pool_size}\nmax_client_conn = 500\n\
                 logfile = {log}\n",
                users = dir.path().join("users.txt").display(),
                log = dir.path().join("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        for file in ["pgbouncer.ini", "users.txt"] {
            chown(&dir.path().join(file));
        }
        let binary = if Path::new("/usr/sbin/pgbouncer").exists() {
            PathBuf::from("/usr/sbin/pgbouncer")
        } else {
            PathBuf::from("pgbouncer")
        };
        let mut command = Command::new(binary);
        if let Some((uid, gid)) = server_user() {
            command.uid(uid).gid(gid);
        }
        let child = command
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting pgbouncer (apt-get install pgbouncer)");
        let bouncer = Self {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pgbouncer did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bouncer
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
