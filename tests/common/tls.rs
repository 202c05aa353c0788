//! TLS servers for tests: a CA made by the test ([`TestCa`]), a PostgreSQL that accepts only TLS
//! connections ([`super::postgres::PgServer::spawn_tls`]) and a Redis that speaks only TLS
//! ([`TlsRedis`]), each with a certificate for `localhost` and `127.0.0.1` signed by the CA.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use super::ports;

/// A self-signed CA and one server certificate it signed, as PEM files in `dir`.
pub struct TestCa {
    /// The CA certificate: what clients trust.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> Self {
        Self::new_with(dir, name, |_| {})
    }

    /// [`TestCa::new`], with the server certificate's parameters changed by `edit` (validity,
    /// names) before it is signed.
    pub fn new_with(dir: &Path, name: &str, edit: impl FnOnce(&mut CertificateParams)) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("taskd test CA {name}"));
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        edit(&mut params);
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let files = Self {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.ca, ca_cert.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

impl TestCa {
    /// `redis-cli --tls` trusting this CA, with `args`.
    pub fn redis_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new("redis-cli")
            .args(["--tls", "--cacert", &self.ca.display().to_string()])
            .args(args)
            .output()
            .expect("running redis-cli")
    }

    /// `DBSIZE` of the TLS server on 127.0.0.1:`port` (0 when it does not answer).
    pub fn dbsize(&self, port: u16) -> u64 {
        let out = self.redis_cli(&["-h", "127.0.0.1", "-p", &port.to_string(), "dbsize"]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

/// A `redis-server` that listens for TLS only (`--port 0 --tls-port`), killed with this guard.
pub struct TlsRedis {
    pub port: u16,
    child: Child,
}

impl TlsRedis {
    pub async fn spawn(ca: &TestCa) -> Self {
        Self::spawn_with(ca, ports::free_port, |_| Vec::new()).await
    }

    /// On a port from `pick`, with more `redis-server` arguments made from it. A port found
    /// free can be taken before the server binds it; the server then exits, and another is tried.
    async fn spawn_with(
        ca: &TestCa,
        pick: impl Fn() -> u16,
        extra: impl Fn(u16) -> Vec<String>,
    ) -> Self {
        for _ in 0..5 {
            let port = pick();
            if let Some(server) = Self::try_spawn(ca, port, &extra(port)).await {
                return server;
            }
        }
        panic!("TLS redis-server did not start on any of 5 free ports");
    }

    async fn try_spawn(ca: &TestCa, port: u16, extra: &[String]) -> Option<Self> {
        let path = |p: &Path| p.display().to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &path(&ca.cert),
                "--tls-key-file",
                &path(&ca.key),
            ])
            .args([
                "--tls-ca-cert-file",
                &path(&ca.ca),
                "--tls-auth-clients",
                "no",
            ])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server with TLS");
        let mut server = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = server.child.try_wait().ok().flatten().is_some();
            if exited || Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(server)
    }

    /// `rediss://localhost:<port>`
    pub fn url(&self) -> String {
        format!("rediss://localhost:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three TLS-only cluster nodes (`--tls-cluster yes`: the cluster bus and the addresses nodes
/// announce are TLS too), joined with `redis-cli --tls --cluster create`.
pub struct TlsRedisCluster {
    pub nodes: Vec<TlsRedis>,
    _dir: tempfile::TempDir,
}

impl TlsRedisCluster {
    pub async fn spawn(ca: &TestCa) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let path = dir.path().to_owned();
            let extra = move |port: u16| {
                vec![
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--tls-cluster".to_owned(),
                    "yes".to_owned(),
                    "--cluster-config-file".to_owned(),
                    path.join(format!("nodes-{port}.conf"))
                        .display()
                        .to_string(),
                    "--dir".to_owned(),
                    path.display().to_string(),
                ]
            };
            nodes.push(TlsRedis::spawn_with(ca, ports::free_cluster_port, extra).await);
        }
        let cli = |args: &[&str]| ca.redis_cli(args);
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let created = cli(&create);
        assert!(created.status.success(), "cluster create: {created:?}");
        let deadline = Instant::now() + Duration::from_secs(15);
        for node in &nodes {
            loop {
                let info = cli(&[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &node.port.to_string(),
                    "cluster",
                    "info",
                ]);
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the TLS cluster did not form");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Self { nodes, _dir: dir }
    }

    /// How many keys each node holds.
    pub fn keys(&self, ca: &TestCa) -> Vec<u64> {
        self.nodes.iter().map(|node| ca.dbsize(node.port)).collect()
    }

    /// `rediss-cluster://` URL naming every node.
    pub fn url(&self) -> String {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        format!(
            "rediss-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
            ports[0], ports[1], ports[2]
        )
    }
}

/// A TLS-only primary watched by a TLS-only Sentinel (`tls-replication yes`: the Sentinel talks
/// TLS to the primary too), quorum 1.
pub struct TlsRedisSentinel {
    pub primary: TlsRedis,
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TlsRedisSentinel {
    pub async fn spawn(ca: &TestCa) -> Self {
        let primary = TlsRedis::spawn(ca).await;
        let dir = tempfile::tempdir().unwrap();
        let port = ports::free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
                 tls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor taskd 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds taskd 500\n",
                dir = dir.path().display(),
                cert = ca.cert.display(),
                key = ca.key.display(),
                ca = ca.ca.display(),
                primary = primary.port,
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server --sentinel with TLS");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let port = port.to_string();
            let out = ca.redis_cli(&[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "sentinel",
                "get-master-addr-by-name",
                "taskd",
            ]);
            if String::from_utf8_lossy(&out.stdout).contains(&primary.port.to_string()) {
                break;
            }
            assert!(Instant::now() < deadline, "the TLS sentinel did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            primary,
            port,
            child,
            _dir: dir,
        }
    }

    /// `rediss-sentinel://` URL: the Sentinel's address and the service name.
    pub fn url(&self) -> String {
        format!(
            "rediss-sentinel://127.0.0.1:{}?sentinelServiceName=taskd",
            self.port
        )
    }
}

impl Drop for TlsRedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
