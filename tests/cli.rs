//! End-to-end tests of the built `taskd` binary (STYLE.md §9, third tier): each test runs the
//! real executable against the real PostgreSQL and Redis, on a fresh database, a per-test Redis
//! key prefix, a free port and an empty working directory, and checks what an operator or a
//! client would see: exit codes, stdout/stderr, HTTP answers and log lines.
//!
//! Needs PostgreSQL at `127.0.0.1:5432` (user `postgres`, trust auth) and Redis at
//! `127.0.0.1:6379`.

#[path = "common/ports.rs"]
mod ports;

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use ports::free_port;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};

const BIN: &str = env!("CARGO_BIN_EXE_taskd");
/// Server URL without a database: where fresh databases are looked up and dropped.
const PG_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
/// Upper bound for a one-shot command (`migrate`, `user create`) on a loaded machine.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for a worker to migrate, connect and answer ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a worker to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
const PASSWORD: &str = "correct horse battery staple";

/// One test's world: a database name (not created until a command creates it), a Redis key
/// prefix and a working directory. Dropping it drops the database and removes the directory,
/// also when the test panics.
struct Harness {
    db_name: String,
    prefix: String,
    dir: PathBuf,
}

impl Harness {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("taskd-e2e-{id}"));
        std::fs::create_dir_all(&dir).expect("create the test's working directory");
        Self {
            db_name: format!("taskd_e2e_{id}"),
            prefix: format!("taskd-e2e-{id}:"),
            dir,
        }
    }

    fn db_url(&self) -> String {
        format!("{PG_SERVER}/{}", self.db_name)
    }

    /// `taskd <args>` in the test's directory with only the test's environment: nothing
    /// inherited can point it at another database, Redis prefix or config file.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .current_dir(&self.dir)
            .env_clear()
            .env("DATABASE_URL", self.db_url())
            .env("TASKD_REDIS__KEY_PREFIX", &self.prefix)
            .env("TASKD_AUTH__ARGON2_MEMORY_KIB", "64")
            .env("TASKD_AUTH__ARGON2_ITERATIONS", "1")
            .env("TASKD_DATABASE__MAX_CONNECTIONS", "4")
            .stdin(Stdio::null());
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        command
    }

    /// Runs a one-shot command to completion, feeding `stdin` when given.
    async fn output(&self, command: Command, stdin: Option<&str>) -> Output {
        let mut command = tokio::process::Command::from(command);
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn taskd");
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes()).await.expect("write stdin");
            drop(pipe);
        }
        tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .expect("taskd did not finish in time")
            .expect("wait for taskd")
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.output(self.command(args), None).await
    }

    /// Starts `taskd [global] worker --port P --host 127.0.0.1 --instance-id ID` on a free port,
    /// its stdout and stderr going to files in the test's directory.
    fn spawn_worker(&self, global: &[&str], instance: &str) -> Worker {
        let port = free_port();
        let port_arg = port.to_string();
        let mut args = global.to_vec();
        args.extend([
            "worker",
            "--port",
            &port_arg,
            "--host",
            "127.0.0.1",
            "--instance-id",
            instance,
        ]);
        self.spawn_worker_with(self.command(&args), port)
    }

    fn spawn_worker_with(&self, mut command: Command, port: u16) -> Worker {
        let stdout = self.dir.join(format!("worker-{port}.stdout"));
        let stderr = self.dir.join(format!("worker-{port}.stderr"));
        let child = command
            .stdout(File::create(&stdout).expect("create stdout log"))
            .stderr(File::create(&stderr).expect("create stderr log"))
            .spawn()
            .expect("spawn taskd worker");
        Worker {
            child,
            port,
            base: format!("http://127.0.0.1:{port}"),
            stdout,
            stderr,
        }
    }

    /// Whether the test's database exists on the server.
    async fn database_exists(&self) -> bool {
        let mut conn = PgConnection::connect(&format!("{PG_SERVER}/postgres"))
            .await
            .expect("connect to PostgreSQL");
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
        )
        .bind(&self.db_name)
        .fetch_one(&mut conn)
        .await
        .expect("query pg_database")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Drop may run inside a test's runtime (or while unwinding from it): use a thread with
        // its own runtime rather than blocking the caller's.
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

/// A running `taskd worker`; killed on drop unless it already exited.
struct Worker {
    child: Child,
    port: u16,
    base: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Worker {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn logs(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// Polls `/health/ready` until it answers 200; fails early if the process exits.
    async fn wait_ready(&mut self, client: &reqwest::Client) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll worker") {
                panic!(
                    "worker exited before it was ready: {status}\n{}",
                    self.logs()
                );
            }
            let probe = client
                .get(self.url("/health/ready"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if matches!(&probe, Ok(response) if response.status() == StatusCode::OK) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready after {READY_TIMEOUT:?} (last probe: {probe:?})\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll worker").is_none()
    }

    /// Waits for the process to exit on its own.
    async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll worker") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker still running {timeout:?} later\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Panics with the command's output unless it exited 0.
#[track_caller]
fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "expected success, got {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// Panics unless the command failed and its stderr contains `needle` (case-insensitive).
#[track_caller]
fn assert_failure_mentions(output: &Output, needle: &str) {
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure mentioning {needle:?}, got success\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
        text(&output.stdout)
    );
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr does not mention {needle:?}: {stderr}"
    );
}

/// The JSON document a command printed last. Log lines share stdout with it (the telemetry
/// layer writes to stdout), so skip whatever comes before the document's opening line.
#[track_caller]
fn printed_json(stdout: &str) -> Value {
    let start = if stdout.starts_with('{') {
        0
    } else {
        stdout.find("\n{").map_or(0, |i| i + 1)
    };
    serde_json::from_str(&stdout[start..])
        .unwrap_or_else(|e| panic!("no JSON document on stdout ({e}):\n{stdout}"))
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `POST /api/v1/auth/login` → the access token.
async fn login(client: &reqwest::Client, worker: &Worker, email: &str, password: &str) -> String {
    let response = client
        .post(worker.url("/api/v1/auth/login"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .expect("login request");
    assert_eq!(response.status(), StatusCode::OK, "login as {email}");
    let body: Value = response.json().await.expect("login JSON");
    body["accessToken"]
        .as_str()
        .expect("accessToken in the login response")
        .to_owned()
}

#[tokio::test]
async fn migrate_creates_the_database_and_is_idempotent() {
    let h = Harness::new();
    assert!(!h.database_exists().await, "fresh name already taken");

    let first = h.run(&["migrate"]).await;
    assert_success(&first);
    assert!(
        h.database_exists().await,
        "migrate did not create the database"
    );

    let mut conn = PgConnection::connect(&h.db_url()).await.expect("connect");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .expect("list tables");
    for table in ["users", "categories", "tasks", "refresh_tokens", "settings"] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing: {tables:?}"
        );
    }
    let applied =
        || sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success");
    let before = applied().fetch_one(&mut conn).await.expect("count");
    assert!(before >= 1);

    let second = h.run(&["migrate"]).await;
    assert_success(&second);
    let after = applied().fetch_one(&mut conn).await.expect("count");
    assert_eq!(before, after, "a second migrate applied something again");
    conn.close().await.ok();
}

#[tokio::test]
async fn worker_serves_the_api_and_exits_cleanly_on_sigterm() {
    let h = Harness::new();
    let client = client();
    let mut worker = h.spawn_worker(&[], "e2e-1");
    worker.wait_ready(&client).await;

    // Every response says who served it and carries a request id: ours when we send one.
    let response = client.get(worker.url("/health/live")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-served-by"), Some("e2e-1"));
    assert!(
        header(&response, "x-request-id").is_some_and(|id| !id.is_empty()),
        "no generated X-Request-Id"
    );
    let response = client
        .get(worker.url("/health/ready"))
        .header("x-request-id", "e2e-trace-1")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "x-request-id"), Some("e2e-trace-1"));
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["instance"], "e2e-1");
    assert_eq!(ready["checks"]["database"]["status"], "ok");

    // Register, create a task, list it back, over real HTTP.
    let response = client
        .post(worker.url("/api/v1/auth/register"))
        .json(&json!({ "email": "ada@example.com", "password": PASSWORD, "name": "Ada" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(header(&response, "x-served-by"), Some("e2e-1"));
    let session: Value = response.json().await.unwrap();
    let token = session["accessToken"].as_str().expect("accessToken");

    let response = client
        .post(worker.url("/api/v1/tasks"))
        .bearer_auth(token)
        .json(&json!({ "title": "Ship the e2e tests", "priority": "high" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let task: Value = response.json().await.unwrap();
    assert_eq!(task["status"], "pending");

    let response = client
        .get(worker.url("/api/v1/tasks"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "x-request-id").is_some());
    let listing: Value = response.json().await.unwrap();
    let data = listing["data"].as_array().expect("data array");
    assert_eq!(data.len(), 1, "{listing}");
    assert_eq!(data[0]["id"], task["id"]);
    assert_eq!(data[0]["title"], "Ship the e2e tests");
    assert_eq!(listing["pagination"]["total"], 1);
    drop(client);

    worker.sigterm();
    let status = worker.wait_exit(EXIT_TIMEOUT).await;
    assert!(status.success(), "exit status {status}\n{}", worker.logs());
    assert!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, worker.port)).is_err(),
        "something still accepts on the port"
    );
    TcpListener::bind((Ipv4Addr::LOCALHOST, worker.port)).expect("the port is free again");
}

#[tokio::test]
async fn sigterm_stops_accepting_but_finishes_the_request_in_flight() {
    let h = Harness::new();
    let client = client();
    let mut worker = h.spawn_worker(&[], "e2e-drain");
    worker.wait_ready(&client).await;
    let addr = (Ipv4Addr::LOCALHOST, worker.port);

    // A request whose head has only partly arrived keeps its connection in flight.
    let mut in_flight = TcpStream::connect(addr).expect("connect");
    in_flight
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    in_flight
        .write_all(
            b"GET /health/ready HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: e2e-drain-1\r\n",
        )
        .unwrap();
    // The accept queue is FIFO: once a later connection is answered, the worker has accepted
    // (and is serving) the first one too.
    let response = client.get(worker.url("/health/live")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;

    worker.sigterm();

    // New connections are refused from now on while the old one is still being served.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        match TcpStream::connect(addr) {
            Err(_) => break,
            // Accepted just before the listener closed: hang up so it holds nothing open.
            Ok(stream) => drop(stream),
        }
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        worker.is_running(),
        "worker exited with a request in flight\n{}",
        worker.logs()
    );

    // Finish the request: it is answered (readiness now says 503) and the connection closed.
    in_flight.write_all(b"\r\n").unwrap();
    let mut raw = String::new();
    in_flight
        .read_to_string(&mut raw)
        .expect("read the in-flight response");
    let lower = raw.to_lowercase();
    assert!(
        lower.starts_with("http/1.1 503"),
        "in-flight response: {raw}"
    );
    assert!(lower.contains("x-request-id: e2e-drain-1"), "{raw}");
    assert!(lower.contains("connection: close"), "{raw}");
    assert!(raw.contains(r#""status":"unavailable""#), "{raw}");

    let status = worker.wait_exit(EXIT_TIMEOUT).await;
    assert!(status.success(), "exit status {status}\n{}", worker.logs());
    assert!(TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn config_prints_redacted_toml_and_rejects_bad_values_by_name() {
    let h = Harness::new();
    let secret = "s3cr3t-0123456789-abcdefghij-0123456789x";
    assert_eq!(secret.len(), 40);

    let mut command = h.command(&["config"]);
    command
        .env("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x")
        .env("TASKD_AUTH__JWT_SECRET", secret);
    let output = h.output(command, None).await;
    assert_success(&output);
    let stdout = text(&output.stdout);
    assert!(stdout.contains("[database]"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "password leaked: {stdout}");
    assert!(!stdout.contains(secret), "JWT secret leaked: {stdout}");
    let shown: toml::Table = stdout.parse().expect("config prints TOML");
    assert_eq!(
        shown["database"]["url"].as_str().map(|u| u.contains("u:")),
        Some(true)
    );
    assert_eq!(
        shown["redis"]["key_prefix"].as_str(),
        Some(h.prefix.as_str())
    );

    // The printed configuration (without redacted values) is itself a valid config file.
    std::fs::write(h.dir.join("printed.toml"), h.run(&["config"]).await.stdout).unwrap();
    assert_success(&h.run(&["--config", "printed.toml", "config"]).await);

    // Precedence: flag > environment > config.toml > default.
    let level = |output: &Output| -> String {
        assert_success(output);
        let shown: toml::Table = text(&output.stdout).parse().expect("TOML");
        shown["telemetry"]["log_level"].as_str().unwrap().to_owned()
    };
    assert_eq!(level(&h.run(&["config"]).await), "info");
    std::fs::write(
        h.dir.join("config.toml"),
        "[telemetry]\nlog_level = \"error\"\n",
    )
    .unwrap();
    assert_eq!(level(&h.run(&["config"]).await), "error");
    let with_env = || {
        let mut command = h.command(&["config"]);
        command.env("TASKD_TELEMETRY__LOG_LEVEL", "warn");
        command
    };
    assert_eq!(level(&h.output(with_env(), None).await), "warn");
    let mut command = with_env();
    command.args(["--log-level", "debug"]);
    assert_eq!(level(&h.output(command, None).await), "debug");
    std::fs::remove_file(h.dir.join("config.toml")).unwrap();

    // Invalid values and unknown keys: non-zero, and the message names the key.
    for (key, value, named) in [
        ("TASKD_WORKER__PORT", "notaport", "worker.port"),
        ("TASKD_REDIS__POOL_SIZE", "0", "redis.pool_size"),
        ("TASKD_WORKER__PROT", "1", "prot"),
    ] {
        let mut command = h.command(&["config"]);
        command.env(key, value);
        let output = h.output(command, None).await;
        assert_failure_mentions(&output, named);
    }
    std::fs::write(h.dir.join("config.toml"), "[database]\nbogus = 1\n").unwrap();
    let output = h.run(&["config"]).await;
    assert_failure_mentions(&output, "bogus");
    assert_failure_mentions(&output, "config.toml");
    std::fs::remove_file(h.dir.join("config.toml")).unwrap();

    let output = h.run(&["--config", "/nonexistent.toml", "config"]).await;
    assert_failure_mentions(&output, "/nonexistent.toml");
}

#[tokio::test]
async fn user_create_makes_an_admin_who_can_log_in() {
    let h = Harness::new();

    // Password from TASKD_PASSWORD.
    let mut command = h.command(&[
        "user",
        "create",
        "--email",
        "admin@example.com",
        "--role",
        "admin",
    ]);
    command.env("TASKD_PASSWORD", PASSWORD);
    let output = h.output(command, None).await;
    assert_success(&output);
    let stdout = text(&output.stdout);
    assert!(!stdout.contains(PASSWORD), "password echoed: {stdout}");
    let user = printed_json(&stdout);
    assert_eq!(user["role"], "admin");
    assert_eq!(user["email"], "admin@example.com");
    assert_eq!(user["name"], "admin");
    assert!(user.get("password").is_none() && user.get("passwordHash").is_none());

    // Password from stdin (no TASKD_PASSWORD in the environment).
    let stdin_password = "another long passphrase";
    let command = h.command(&[
        "user",
        "create",
        "--email",
        "Ops@Example.com",
        "--name",
        "Ops",
        "--role",
        "admin",
        "--tier",
        "pro",
    ]);
    let output = h
        .output(command, Some(&format!("{stdin_password}\n")))
        .await;
    assert_success(&output);
    let ops = printed_json(&text(&output.stdout));
    assert_eq!(ops["role"], "admin");
    assert_eq!(ops["tier"], "pro");
    assert_eq!(ops["email"], "ops@example.com");

    // Too short: refused with a message saying why.
    let mut command = h.command(&["user", "create", "--email", "short@example.com"]);
    command.env("TASKD_PASSWORD", "short");
    let output = h.output(command, None).await;
    assert_failure_mentions(&output, "at least 8 characters");

    // Duplicate email (any case): refused.
    let mut command = h.command(&["user", "create", "--email", "ADMIN@example.com"]);
    command.env("TASKD_PASSWORD", PASSWORD);
    let output = h.output(command, None).await;
    assert_failure_mentions(&output, "already exists");

    // Both admins log in through a real worker and may list users.
    let client = client();
    let mut worker = h.spawn_worker(&[], "e2e-users");
    worker.wait_ready(&client).await;
    for (email, password) in [
        ("admin@example.com", PASSWORD),
        ("ops@example.com", stdin_password),
    ] {
        let token = login(&client, &worker, email, password).await;
        let response = client
            .get(worker.url("/api/v1/users"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET /users as {email}");
        let users: Value = response.json().await.unwrap();
        let emails: Vec<&str> = users["data"]
            .as_array()
            .expect("data array")
            .iter()
            .filter_map(|u| u["email"].as_str())
            .collect();
        assert!(emails.contains(&"admin@example.com"), "{users}");
        assert!(!emails.contains(&"short@example.com"), "{users}");
    }
    worker.sigterm();
    assert!(worker.wait_exit(EXIT_TIMEOUT).await.success());
}

#[tokio::test]
async fn worker_on_a_busy_port_fails_naming_the_address() {
    let h = Harness::new();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = taken.local_addr().unwrap().port();
    let port_arg = port.to_string();
    let command = h.command(&[
        "worker",
        "--port",
        &port_arg,
        "--host",
        "127.0.0.1",
        "--instance-id",
        "e2e-busy",
    ]);
    let mut worker = h.spawn_worker_with(command, port);
    let status = worker.wait_exit(READY_TIMEOUT).await;
    assert!(
        !status.success(),
        "worker started on a taken port\n{}",
        worker.logs()
    );
    let stderr = worker.stderr();
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "stderr does not name the address: {stderr}"
    );
    drop(taken);
}

#[tokio::test]
async fn help_describes_every_flag() {
    let h = Harness::new();
    let help = |output: Output| -> String {
        assert_success(&output);
        text(&output.stdout)
    };
    let top = help(h.run(&["--help"]).await);
    for flag in ["--config", "--log-format", "--log-level"] {
        assert!(top.contains(flag), "taskd --help lacks {flag}:\n{top}");
    }
    for command in ["serve", "worker", "migrate", "user", "config"] {
        assert!(
            top.contains(command),
            "taskd --help lacks {command}:\n{top}"
        );
    }

    let worker = help(h.run(&["worker", "--help"]).await);
    for flag in [
        "--config",
        "--log-format",
        "--log-level",
        "--port",
        "--host",
        "--instance-id",
    ] {
        assert!(
            worker.contains(flag),
            "taskd worker --help lacks {flag}:\n{worker}"
        );
    }

    let serve = help(h.run(&["serve", "--help"]).await);
    for flag in [
        "--config",
        "--log-format",
        "--instances",
        "--listen",
        "--base-port",
        "--admin-listen",
    ] {
        assert!(
            serve.contains(flag),
            "taskd serve --help lacks {flag}:\n{serve}"
        );
    }

    let create = help(h.run(&["user", "create", "--help"]).await);
    for flag in ["--email", "--name", "--role", "--tier", "--config"] {
        assert!(
            create.contains(flag),
            "taskd user create --help lacks {flag}:\n{create}"
        );
    }
    for args in [
        ["migrate", "--help"],
        ["config", "--help"],
        ["user", "--help"],
    ] {
        let text = help(h.run(&args).await);
        assert!(text.contains("--log-format"), "{args:?}:\n{text}");
    }
}

#[tokio::test]
async fn json_logs_have_one_line_per_request_with_its_fields() {
    let h = Harness::new();
    let client = client();
    let mut worker = h.spawn_worker(&["--log-format", "json"], "e2e-json");
    worker.wait_ready(&client).await;
    let response = client
        .get(worker.url("/health/live"))
        .header("x-request-id", "e2e-log-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(client);
    worker.sigterm();
    let status = worker.wait_exit(EXIT_TIMEOUT).await;
    assert!(status.success(), "exit status {status}\n{}", worker.logs());

    let output = format!("{}\n{}", worker.stdout(), worker.stderr());
    let lines: Vec<Value> = output
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
        })
        .collect();
    // A field of the event itself or of the request span it was logged in.
    let field = |line: &Value, name: &str| -> Option<Value> {
        line.get(name)
            .or_else(|| line.get("fields").and_then(|f| f.get(name)))
            .or_else(|| line.get("span").and_then(|s| s.get(name)))
            .cloned()
    };
    let request = lines
        .iter()
        .find(|line| field(line, "request_id") == Some(json!("e2e-log-1")))
        .unwrap_or_else(|| panic!("no log line for request e2e-log-1:\n{output}"));
    assert_eq!(field(request, "status"), Some(json!(200)), "{request}");
    assert!(
        field(request, "latency_ms").is_some_and(|v| v.is_number()),
        "{request}"
    );
    assert_eq!(
        field(request, "route"),
        Some(json!("/health/live")),
        "{request}"
    );
    assert_eq!(field(request, "method"), Some(json!("GET")), "{request}");
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "worker listening"),
        "{output}"
    );
}
