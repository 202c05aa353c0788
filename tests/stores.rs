//! `taskd serve` on a fresh host (`supervisor.stores = "auto"`): in a network namespace of its
//! own, where nothing answers on PostgreSQL's and Redis's ports, the real binary starts private
//! stores from the installed servers, serves the README walkthrough exactly as written (its
//! `localhost:8080` is the namespace's), stops leaving no process behind, and starts again on
//! the data it kept.
//!
//! Needs root (to make the namespace; CI runs as root) and the PostgreSQL and Redis server
//! binaries (`.ci/run` installs them). Elsewhere it is skipped with a message, except under
//! `CI=true`, where a skip is a failure.

#[path = "common/netns.rs"]
mod netns;
#[path = "common/walkthrough.rs"]
mod walkthrough;

use std::{
    fs::File,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use netns::Namespace;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_taskd");
/// initdb on first use, then four processes migrating: generous for a loaded 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// One `taskd serve` in the namespace, its output in files.
struct Serve {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Serve {
    fn start(ns: &Namespace, dir: &Path, run: &str) -> Self {
        let stdout = dir.join(format!("serve-{run}.stdout"));
        let stderr = dir.join(format!("serve-{run}.stderr"));
        let mut command = ns.command([BIN, "serve", "--instances", "2"]);
        command
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TASKD_AUTH__ARGON2_MEMORY_KIB", "64")
            .env("TASKD_AUTH__ARGON2_ITERATIONS", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("create stdout log"))
            .stderr(File::create(&stderr).expect("create stderr log"));
        let child = command.spawn().expect("spawn taskd serve");
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("stdout:\n{out}\nstderr:\n{err}")
    }

    /// Waits for the banner; returns it and how long it took.
    fn wait_ready(&mut self, started: Instant) -> (String, Duration) {
        loop {
            let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            if out.contains("workers ready in") {
                return (out, started.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "taskd serve exited ({status}) before ready\n{}",
                    self.output()
                );
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "not ready within {READY_TIMEOUT:?}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM; the exit must be clean within 30 s.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within 30 s\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "exit {status}\n{}", self.output());
        self.output()
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn serve_on_a_host_with_no_stores_running_brings_its_own_and_keeps_their_data() {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ns = if root {
        Namespace::new("taskd-st")
    } else {
        None
    };
    let Some(ns) = ns else {
        let why = "needs root and `ip netns` to make a host with no stores running";
        assert!(
            std::env::var("CI").is_err(),
            "CI must run this test: it {why}"
        );
        eprintln!("skipped: this test {why}");
        return;
    };
    walkthrough::require_tools();
    // Nothing answers in the namespace: the point of the test.
    assert!(ns.curl(&["-o", "/dev/null", "-w", "%{http_code}", "127.0.0.1:5432"]) == "000");

    let dir = tempfile::tempdir().expect("temporary directory");
    // The stores run as an unprivileged user, who must be able to reach the directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // First run: initdb, then the walkthrough, then one task to find again.
    let started = Instant::now();
    let mut serve = Serve::start(&ns, dir.path(), "first");
    let (banner, took) = serve.wait_ready(started);
    eprintln!("first start (initdb) to ready: {took:?}");
    let stores_line = banner
        .lines()
        .find(|l| l.trim_start().starts_with("Stores"))
        .unwrap_or_else(|| panic!("the banner names no stores:\n{banner}"));
    let data = dir.path().join(".taskd");
    for expected in [
        format!(
            "PostgreSQL 127.0.0.1:5432 ({})",
            data.join("postgres").display()
        ),
        format!("Redis 127.0.0.1:6379 ({})", data.join("redis").display()),
    ] {
        assert!(stores_line.contains(&expected), "{stores_line}");
    }

    let script = walkthrough::script();
    let output = ns.exec(["bash", "-e", "-o", "pipefail", "-c", &script]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "walkthrough failed ({})\nstdout:\n{stdout}\nstderr:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        serve.output()
    );
    walkthrough::check_output(&stdout);

    let api = "http://127.0.0.1:8080/api/v1";
    let credentials = r#"{"email":"kept@example.com","password":"correct horse battery"}"#;
    let register = r#"{"email":"kept@example.com","password":"correct horse battery","name":"K"}"#;
    let registered = json(&ns.curl(&[
        "-X",
        "POST",
        &format!("{api}/auth/register"),
        "-H",
        "Content-Type: application/json",
        "-d",
        register,
    ]));
    let token = registered["accessToken"]
        .as_str()
        .expect("a token")
        .to_owned();
    let auth = format!("Authorization: Bearer {token}");
    let created = json(&ns.curl(&[
        "-X",
        "POST",
        &format!("{api}/tasks"),
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"title":"Survives a restart"}"#,
    ]));
    assert_eq!(created["title"], "Survives a restart", "{created}");

    let output = serve.stop();
    assert!(output.contains("private store stopped"), "{output}");
    let left = ns.pids();
    assert!(
        left.is_empty(),
        "processes left running after exit: {left:?}\n{output}"
    );
    assert!(data.join("postgres/PG_VERSION").is_file());

    // Second run: same data, no initdb, the task is there.
    let started = Instant::now();
    let mut serve = Serve::start(&ns, dir.path(), "second");
    let (_, took) = serve.wait_ready(started);
    eprintln!("restart on kept data to ready: {took:?}");
    let login = json(&ns.curl(&[
        "-X",
        "POST",
        &format!("{api}/auth/login"),
        "-H",
        "Content-Type: application/json",
        "-d",
        credentials,
    ]));
    let token = login["accessToken"]
        .as_str()
        .unwrap_or_else(|| panic!("{login}"));
    let listed = json(&ns.curl(&[
        &format!("{api}/tasks"),
        "-H",
        &format!("Authorization: Bearer {token}"),
    ]));
    assert_eq!(listed["data"][0]["title"], "Survives a restart", "{listed}");
    let output = serve.stop();
    assert!(
        !output.contains("first use of the private PostgreSQL"),
        "{output}"
    );
    let left = ns.pids();
    assert!(
        left.is_empty(),
        "processes left running after exit: {left:?}\n{output}"
    );
}
