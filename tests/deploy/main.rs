//! `deploy/` against the binary it deploys (docs/contract.md §8.3). scripts/validate-deploy.sh
//! checks that the manifests are well-formed Kubernetes and the units well-formed systemd; these
//! tests check that they run taskd the way taskd runs:
//!
//! - `static_checks.rs`: every command line in the manifests, the systemd units and the
//!   Dockerfile is one that `taskd … --help` documents, every `TASKD_*` variable is a
//!   configuration key (`taskd config` accepts it and shows it), the ConfigMap's config.toml
//!   loads, the grace periods cover `worker.drain_delay` + the shutdown timeouts, and the objects
//!   refer to each other correctly (Services, HPA, PDBs, Secret keys, the image's user and ports).
//! - `containers.rs`: the worker and proxy containers started as their pods start them — the
//!   manifest's args and env (secrets: the test's own database, Redis and values), the
//!   ConfigMap's file where the pod mounts it, a free port for each container port — answer every
//!   probe, and on the stop signal drain and exit 0 within `terminationGracePeriodSeconds`.
//!
//! The harness is here: the manifests, the Dockerfile and unit files, read into plain values.

#[path = "../common/mod.rs"]
mod common;

mod containers;
mod static_checks;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::binary::{BIN, World, text};
use serde::Deserialize;
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One Kubernetes object of `deploy/k8s/`.
struct Object {
    file: PathBuf,
    doc: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// `kind/name (file)`, for messages.
    fn what(&self) -> String {
        format!(
            "{}/{} ({})",
            self.kind(),
            self.name(),
            self.file
                .strip_prefix(repo())
                .unwrap_or(&self.file)
                .display()
        )
    }

    /// The pod template of a Deployment, StatefulSet, DaemonSet or Job.
    fn pod(&self) -> Option<&Value> {
        let template = &self.doc["spec"]["template"];
        template.is_object().then_some(template)
    }
}

/// Every YAML document under `deploy/k8s/` (sub-directories too: the example Secret).
fn manifests() -> Vec<Object> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy/k8s") {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo().join("deploy/k8s"), &mut files);
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for document in serde_norway::Deserializer::from_str(&source) {
            let doc = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
            if !doc.is_null() {
                objects.push(Object {
                    file: file.clone(),
                    doc,
                });
            }
        }
    }
    assert!(!objects.is_empty(), "no manifests under deploy/k8s");
    objects
}

fn object<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Object {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in deploy/k8s"))
}

/// The Deployment whose pods run `taskd <role>`, and its container doing so.
fn role<'a>(objects: &'a [Object], role: &str) -> (&'a Object, &'a Value) {
    for o in objects.iter().filter(|o| o.kind() == "Deployment") {
        for c in containers_of(o) {
            if subcommand(&argv(c, &dockerfile()))
                .first()
                .map(String::as_str)
                == Some(role)
            {
                return (o, c);
            }
        }
    }
    panic!("no Deployment runs `taskd {role}`")
}

fn containers_of(o: &Object) -> impl Iterator<Item = &Value> {
    o.pod()
        .and_then(|p| p["spec"]["containers"].as_array())
        .into_iter()
        .flatten()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

/// What the runtime stage of `deploy/Dockerfile` says about the container.
struct Image {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: String,
    exposed: Vec<u16>,
    stop_signal: Option<String>,
}

fn dockerfile() -> Image {
    let source = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let joined = source
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let mut image = Image {
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        user: "0".into(),
        exposed: Vec::new(),
        stop_signal: None,
    };
    let words = |json: &str| -> Vec<String> {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("not exec form: {json} ({e})"))
    };
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
        match keyword.to_ascii_uppercase().as_str() {
            // Each stage starts afresh: what counts is the last one.
            "FROM" => {
                image = Image {
                    entrypoint: Vec::new(),
                    cmd: Vec::new(),
                    user: "0".into(),
                    exposed: Vec::new(),
                    stop_signal: None,
                }
            }
            "ENTRYPOINT" => image.entrypoint = words(rest),
            "CMD" => image.cmd = words(rest),
            "USER" => image.user = rest.trim().into(),
            "EXPOSE" => {
                image.exposed = rest
                    .split_whitespace()
                    .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE port"))
                    .collect()
            }
            "STOPSIGNAL" => image.stop_signal = Some(rest.trim().into()),
            _ => {}
        }
    }
    image
}

/// The container's command line after the `taskd` executable, as the runtime builds it:
/// `command` replaces the image's ENTRYPOINT, `args` its CMD.
fn argv(container: &Value, image: &Image) -> Vec<String> {
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        })
    };
    let mut line = strings(&container["command"]).unwrap_or_else(|| image.entrypoint.clone());
    line.extend(strings(&container["args"]).unwrap_or_else(|| image.cmd.clone()));
    strip_executable(line)
}

/// `taskd …` or `/usr/local/bin/taskd …` → the arguments.
fn strip_executable(mut line: Vec<String>) -> Vec<String> {
    assert!(
        line.first()
            .is_some_and(|exe| exe == "taskd" || exe.ends_with("/taskd")),
        "the command line does not run taskd: {line:?}"
    );
    line.remove(0);
    line
}

/// The subcommand path of an argument list: `worker`, `proxy`, `user create`. Global flags
/// before it (`--config PATH`, `--log-format F`, `--log-level L`) all take a value.
fn subcommand(args: &[String]) -> Vec<String> {
    let mut path = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word.starts_with("--") {
            if path.is_empty() && !word.contains('=') {
                words.next();
            }
            continue;
        }
        path.push(word.clone());
        if word != "user" {
            break;
        }
    }
    path
}

/// The `--flag` names of an argument list.
fn flags(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_owned())
        .collect()
}

/// The value of `--flag` in an argument list.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

/// The value a `TASKD_*`/`*_URL` variable that comes from a secret gets in these tests: the
/// test's own database and Redis (as `World` sets them), and values of the right form.
fn secret_value(world: &World, name: &str) -> String {
    let world_env = |key: &str| -> String {
        world
            .command(&[])
            .get_envs()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v)
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_else(|| panic!("World sets no {key}"))
    };
    match name {
        "DATABASE_URL" | "TASKD_DATABASE__DIRECT_URL" => world.db.url.clone(),
        "REDIS_URL" => world_env("REDIS_URL"),
        "TASKD_AUTH__JWT_SECRET" => "deploy-test-jwt-secret-0123456789abcdef0123".into(),
        "TASKD_ADMIN__TOKEN" => "deploy-test-admin-token-0123456789".into(),
        other => panic!("{other} comes from a secret: give it a test value in secret_value()"),
    }
}

/// A container's environment as (name, value) pairs: literal values as written, values from
/// the Secret as [`secret_value`] gives them. Other sources are not used by taskd's manifests.
fn container_env(world: &World, container: &Value) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            value.to_owned()
        } else if var["valueFrom"]["secretKeyRef"].is_object() {
            secret_value(world, &name)
        } else {
            panic!("env {name}: only value and secretKeyRef are supported here: {var}")
        };
        env.push((name, value));
    }
    assert!(
        container["envFrom"].is_null(),
        "envFrom hides which variables a container gets: name them in env"
    );
    env
}

/// `taskd [--config file] config` with `env` set: the effective configuration as TOML, or the
/// error (exit status and stderr).
fn effective_config(
    world: &World,
    config_file: Option<&Path>,
    env: &[(String, String)],
) -> Result<toml::Table, String> {
    let mut args = Vec::new();
    if let Some(file) = config_file {
        args.extend(["--config".to_owned(), file.display().to_string()]);
    }
    args.push("config".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = world.command(&args);
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let output = command.output().expect("run taskd config");
    if !output.status.success() {
        return Err(format!("{}: {}", output.status, text(&output.stderr)));
    }
    Ok(text(&output.stdout)
        .parse()
        .expect("taskd config prints TOML"))
}

/// A duration of the effective configuration: `section.key` (humantime).
fn duration(config: &toml::Table, section: &str, key: &str) -> Duration {
    let raw = config[section][key]
        .as_str()
        .unwrap_or_else(|| panic!("{section}.{key} missing from `taskd config`"));
    humantime::parse_duration(raw).unwrap_or_else(|e| panic!("{section}.{key} = {raw}: {e}"))
}

/// `taskd <subcommand> --help`.
fn help(subcommand: &[String]) -> String {
    let output = Command::new(BIN)
        .args(subcommand)
        .arg("--help")
        .output()
        .expect("run taskd --help");
    assert!(
        output.status.success(),
        "taskd {} --help: {}",
        subcommand.join(" "),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Whether `help` documents `--flag` (as a whole word).
fn documents(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        !help[i + flag.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// A systemd unit: `[Service]` settings, in order (keys repeat).
struct Unit {
    name: String,
    service: Vec<(String, String)>,
}

impl Unit {
    fn get(&self, key: &str) -> Option<&str> {
        self.service
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, key: &str) -> impl Iterator<Item = &str> {
        self.service
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn units() -> Vec<Unit> {
    let dir = repo().join("deploy/systemd");
    let mut units = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    paths.sort();
    for path in paths {
        let mut service = Vec::new();
        let mut section = String::new();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line.to_owned();
            } else if section == "[Service]" && !line.starts_with('#') {
                if let Some((k, v)) = line.split_once('=') {
                    service.push((k.trim().to_owned(), v.trim().to_owned()));
                }
            }
        }
        units.push(Unit {
            name: path.file_name().unwrap().to_string_lossy().into_owned(),
            service,
        });
    }
    assert!(!units.is_empty(), "no units in deploy/systemd");
    units
}

/// `NAME=value` lines of a systemd `Environment=` setting or an environment file.
fn assignments(text: &str) -> BTreeMap<String, String> {
    text.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// A systemd time span as written in these units: `20s`, `1min`, `500ms` (humantime reads
/// the same spellings), or plain seconds.
fn timespan(raw: &str) -> Duration {
    raw.parse::<u64>()
        .map(Duration::from_secs)
        .or_else(|_| humantime::parse_duration(raw))
        .unwrap_or_else(|e| panic!("time span {raw}: {e}"))
}
