//! The built `taskd` binary in a test's own world (STYLE.md §9, third tier), shared by the
//! end-to-end tests of `tests/cli/` and `tests/serve/`: a fresh database name on the
//! `TEST_DATABASE_URL` server (the binary creates the database itself; it is dropped with the
//! [`World`]), a per-test Redis key prefix on `TEST_REDIS_URL`, an empty working directory, and
//! nothing else inherited from the environment but `PATH`, so no setting of the developer's can
//! point a test at another database, prefix or config file.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use super::{TestDb, redis_url};

pub const BIN: &str = env!("CARGO_BIN_EXE_taskd");

/// Upper bound for a one-shot command (`migrate`, `user create`) on a loaded machine.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// One test's database, Redis prefix and working directory. Dropping it drops the database and
/// removes the directory, also when the test panics.
pub struct World {
    pub db: TestDb,
    pub prefix: String,
    pub dir: PathBuf,
}

impl World {
    pub fn new() -> Self {
        let db = TestDb::reserve();
        let id = db.name.trim_start_matches("taskd_test_").to_owned();
        let dir = std::env::temp_dir().join(format!("taskd-e2e-{id}"));
        std::fs::create_dir_all(&dir).expect("create the test's working directory");
        Self {
            db,
            prefix: format!("taskd-e2e-{id}:"),
            dir,
        }
    }

    /// `taskd <args>` in the test's directory with the test's environment only: its database and
    /// Redis prefix, fast password hashing and a small pool.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .current_dir(&self.dir)
            .env_clear()
            .env("DATABASE_URL", &self.db.url)
            .env("REDIS_URL", redis_url())
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
    pub async fn output(&self, command: Command, stdin: Option<&str>) -> Output {
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

    /// `taskd <args>` to completion.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.output(self.command(args), None).await
    }

    /// Starts a long-running command, its stdout and stderr going to `<name>.stdout` and
    /// `<name>.stderr` in the test's directory.
    pub fn spawn(&self, mut command: Command, name: &str) -> Process {
        let stdout = self.dir.join(format!("{name}.stdout"));
        let stderr = self.dir.join(format!("{name}.stderr"));
        let child = command
            .stdout(File::create(&stdout).expect("create stdout log"))
            .stderr(File::create(&stderr).expect("create stderr log"))
            .spawn()
            .expect("spawn taskd");
        Process {
            child,
            stdout,
            stderr,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `taskd`, its output in files. Dropping it stops it (SIGTERM, SIGKILL 10 s later)
/// unless it already exited.
pub struct Process {
    pub child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Both logs, stderr cut to its last 80 lines, for a failed assertion's message.
    pub fn logs(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr (last 80 lines) ---\n{}",
            self.stdout(),
            last_lines(&self.stderr(), 80)
        )
    }

    /// The stdout or stderr file once it contains `needle`, or as it is after `timeout`.
    pub async fn log_with(&self, stderr: bool, needle: &str, timeout: Duration) -> String {
        let path: &Path = if stderr { &self.stderr } else { &self.stdout };
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(needle) || Instant::now() >= deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll taskd").is_none()
    }

    /// Panics with the logs when the process has exited.
    #[track_caller]
    pub fn assert_running(&mut self, while_doing: &str) {
        if let Some(status) = self.child.try_wait().expect("poll taskd") {
            panic!(
                "taskd exited ({status}) while {while_doing}\n{}",
                self.logs()
            );
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        signal(self.pid(), sig);
    }

    /// Waits for the process to exit on its own; panics with the logs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll taskd") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "taskd still running {timeout:?} later\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Process {
    /// SIGTERM, SIGKILL 10 s later, unless it already exited.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to `pid`; only SIGKILL may find the process gone.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let result = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert!(
        result == 0 || sig == libc::SIGKILL,
        "kill({pid}, {sig}) failed"
    );
}

/// An HTTP client for talking to the binary: no system proxy, a 30 s bound per request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
