//! End-to-end tests of the built `taskd` binary's one-shot commands and `taskd worker`
//! (STYLE.md §9, third tier): each test runs the real executable in its own
//! [`World`](common::binary::World) (fresh database, Redis key prefix, working directory, free
//! port) and checks what an operator or a client would see: exit codes, stdout/stderr, HTTP
//! answers and log lines. The harness is here; the tests are in `commands.rs` (migrate, config,
//! user create, help) and `worker.rs`.
//!
//! Needs PostgreSQL (`TEST_DATABASE_URL`, default `127.0.0.1:5432`, user `postgres`) and Redis
//! (`TEST_REDIS_URL`, default `127.0.0.1:6379`).

#[path = "../common/mod.rs"]
mod common;

mod commands;
mod worker;

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::{
    binary::{Process, World, client, text},
    ports::free_port,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Upper bound for a worker to migrate, connect and answer ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a worker to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
const PASSWORD: &str = "correct horse battery staple";

/// A test's [`World`] and the workers it starts.
struct Harness {
    world: World,
}

impl std::ops::Deref for Harness {
    type Target = World;

    fn deref(&self) -> &World {
        &self.world
    }
}

impl Harness {
    fn new() -> Self {
        Self {
            world: World::new(),
        }
    }

    /// Starts `taskd [global] worker --port P --host 127.0.0.1 --instance-id ID` on a free port.
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

    fn spawn_worker_with(&self, command: Command, port: u16) -> Worker {
        Worker {
            process: self.spawn(command, &format!("worker-{port}")),
            port,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

/// A running `taskd worker`; stopped on drop unless it already exited.
struct Worker {
    process: Process,
    port: u16,
    base: String,
}

impl std::ops::Deref for Worker {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Worker {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Polls `/health/ready` until it answers 200; fails early if the process exits.
    async fn wait_ready(&mut self, client: &reqwest::Client) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.assert_running("waiting for the worker to be ready");
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
        self.signal(libc::SIGTERM);
    }
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
