//! Private Redis servers for tests: a standalone [`RedisServer`] a test can kill and start
//! again, a three-node [`RedisCluster`], and a primary + replica + Sentinel
//! ([`RedisSentinel`]), each on free loopback ports and stopped with its guard.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ports;

/// A private `redis-server` on a free loopback port (no persistence), killed with this guard.
/// [`RedisServer::kill`] then [`RedisServer::start`] make an outage; the port stays the same,
/// so workers configured with [`RedisServer::url`] can reconnect by themselves.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// More `redis-server` arguments (a cluster node's).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| Vec::new()).await
    }

    /// [`RedisServer::spawn`] with more arguments, made from the port.
    ///
    /// A port found free can be taken by another process before the server binds it; the
    /// server then exits at once, and another port is tried.
    async fn spawn_with(extra: impl Fn(u16) -> Vec<String>) -> Self {
        Self::spawn_on(ports::free_port, extra).await
    }

    /// [`RedisServer::spawn_with`] on ports from `pick` (a cluster node's bus port must be free
    /// too: [`ports::free_cluster_port`]).
    async fn spawn_on(pick: impl Fn() -> u16, extra: impl Fn(u16) -> Vec<String>) -> Self {
        for _ in 0..5 {
            let port = pick();
            let mut server = Self {
                port,
                child: None,
                extra: extra(port),
            };
            if server.try_start().await {
                return server;
            }
            server.kill();
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on its port, empty, and waits until it answers `PING`.
    pub async fn start(&mut self) {
        let port = self.port;
        assert!(
            self.try_start().await,
            "redis-server on port {port} did not start"
        );
    }

    /// [`RedisServer::start`]; false when the server exited or did not answer in 10 s.
    async fn try_start(&mut self) -> bool {
        assert!(self.child.is_none(), "redis-server is already running");
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--daemonize", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers_ping().await {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, and its data
    /// survives until [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// How many keys the server holds.
    pub fn keys(&self) -> u64 {
        redis_cli(self.port, &["dbsize"])
            .trim()
            .parse()
            .unwrap_or(0)
    }

    async fn answers_ping(&self) -> bool {
        let ping = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.write_all(b"PING\r\n").await?;
            let mut reply = [0u8; 7];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(&reply == b"+PONG\r\n")
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), ping).await,
            Ok(Ok(true))
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped process still dies of SIGKILL.
        self.kill();
    }
}

/// A private three-node Redis Cluster (no replicas) on free loopback ports; the nodes die with
/// this guard.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create` and
    /// waits until every node reports `cluster_state:ok`.
    pub async fn spawn() -> Self {
        let dir = tempfile::tempdir().expect("a directory for the cluster's node files");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let path = dir.path().to_owned();
            nodes.push(
                RedisServer::spawn_on(ports::free_cluster_port, |port| {
                    let file = path.join(format!("nodes-{port}.conf"));
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        file.display().to_string(),
                        "--dir".into(),
                        path.display().to_string(),
                    ]
                })
                .await,
            );
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running redis-cli --cluster create");
        assert!(created.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in &nodes {
            loop {
                if redis_cli(node.port, &["cluster", "info"]).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not form");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Self { nodes, _dir: dir }
    }

    /// `redis-cluster://` URL naming every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port));
        }
        url
    }
}

/// A private Redis primary, one replica and one Sentinel watching them (quorum 1), on free
/// loopback ports; all three die with this guard.
pub struct RedisSentinel {
    pub primary: RedisServer,
    pub replica: RedisServer,
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The name the Sentinel knows the primary by.
const SENTINEL_SERVICE: &str = "taskd";

impl RedisSentinel {
    /// Starts the primary, the replica (waits until it is in sync) and the Sentinel (told of the
    /// replica in its configuration, so it need not wait ~10 s to discover it).
    pub async fn spawn() -> Self {
        // Replication writes RDB files: into this directory, not the working directory.
        let dir = tempfile::tempdir().expect("a directory for the servers' files");
        let in_dir = |extra: &[&str]| {
            let mut args = vec!["--dir".to_owned(), dir.path().display().to_string()];
            args.extend(extra.iter().map(|&arg| arg.to_owned()));
            args
        };
        // Without the delay a diskless full sync waits 5 s for more replicas to join.
        let primary =
            RedisServer::spawn_with(|_| in_dir(&["--repl-diskless-sync-delay", "0"])).await;
        let primary_port = primary.port.to_string();
        let replica = RedisServer::spawn_with(|port| {
            let file = format!("replica-{port}.rdb");
            in_dir(&[
                "--replicaof",
                "127.0.0.1",
                &primary_port,
                "--dbfilename",
                &file,
            ])
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_cli(replica.port, &["info", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not sync");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let port = ports::free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_SERVICE} 500\n\
                 sentinel failover-timeout {SENTINEL_SERVICE} 5000\n\
                 sentinel known-replica {SENTINEL_SERVICE} 127.0.0.1 {replica}\n",
                dir = dir.path().display(),
                primary = primary.port,
                replica = replica.port,
            ),
        )
        .expect("writing sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server --sentinel");
        let sentinel = Self {
            primary,
            replica,
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while sentinel.primary_port() != Some(sentinel.primary.port) {
            assert!(Instant::now() < deadline, "the sentinel did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sentinel
    }

    /// `redis-sentinel://` URL: the Sentinel's address and the service name.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName={SENTINEL_SERVICE}",
            self.port
        )
    }

    /// The port of the primary the Sentinel names now.
    pub fn primary_port(&self) -> Option<u16> {
        redis_cli(
            self.port,
            &["sentinel", "get-master-addr-by-name", SENTINEL_SERVICE],
        )
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
    }

    /// Kills the primary once the replica has processed every write (its replication offset
    /// has caught up: `WAIT` would only wait for the writes of its own connection), and waits
    /// until the Sentinel has promoted the replica.
    pub async fn fail_over(&mut self) {
        let written = replication_offset(self.primary.port, "master_repl_offset");
        let deadline = Instant::now() + Duration::from_secs(10);
        while replication_offset(self.replica.port, "slave_repl_offset") < written {
            assert!(Instant::now() < deadline, "the replica did not catch up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.primary.kill();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.primary_port() != Some(self.replica.port) {
            assert!(Instant::now() < deadline, "the sentinel did not fail over");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A replication offset (`field` of `INFO replication`) of the server on `port`; 0 if absent.
fn replication_offset(port: u16, field: &str) -> u64 {
    redis_cli(port, &["info", "replication"])
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// `redis-cli -p PORT ARGS...`'s output.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
