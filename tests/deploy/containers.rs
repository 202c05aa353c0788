//! The worker and proxy containers of the manifests, started as their pods start them, probed as
//! the kubelet probes them, and stopped as the kubelet stops them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, TcpStream},
    time::Instant,
};

use common::{
    binary::{Process, client},
    ports::free_port,
};

use super::{static_checks::container_port, *};

/// Longest a ready probe may take after start-up, beyond what the probes' own budget allows
/// (readiness failing only takes a pod out of rotation, so Kubernetes sets no deadline).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A container of the manifests running as the real binary.
struct Container {
    process: Process,
    spec: Value,
    /// Container port → the free port it listens on here.
    ports: BTreeMap<u16, u16>,
    /// Budget from the stop signal to exit: terminationGracePeriodSeconds less a preStop pause
    /// (the kubelet runs the pause first, then signals; the grace period covers both).
    stop_budget: Duration,
    /// The effective configuration of the container (`taskd config` with its file and env).
    config: toml::Table,
}

/// Starts `container` of `o` as its pod would: its command line (the ConfigMap's file where it
/// is mounted, container ports moved to free ports), its env (secrets from [`secret_value`]).
/// `rewrite` may change the arguments further (the proxy's DNS name, which has no DNS here).
fn start(
    world: &World,
    o: &Object,
    container: &Value,
    rewrite: impl Fn(&mut [String]),
) -> Container {
    let objects = manifests();
    let image = dockerfile();
    let mut args = argv(container, &image);
    let mut ports = BTreeMap::new();
    for port in container["ports"].as_array().into_iter().flatten() {
        let declared = port["containerPort"].as_u64().unwrap() as u16;
        let local = free_port();
        // `--port P` or `--listen ADDR:P`: the binary listens where the manifest says it does.
        let mut found = false;
        for arg in args.iter_mut() {
            if *arg == declared.to_string() {
                *arg = local.to_string();
                found = true;
            } else if let Some((host, p)) = arg.rsplit_once(':') {
                if p == declared.to_string() && host.parse::<IpAddr>().is_ok() {
                    *arg = format!("{host}:{local}");
                    found = true;
                }
            }
        }
        assert!(
            found,
            "{}: container port {declared} is nowhere in the command line {args:?}",
            o.what()
        );
        ports.insert(declared, local);
    }
    // The configuration file where the pod has it: the ConfigMap mounted over its directory.
    let mut config_file = None;
    if let Some(i) = args.iter().position(|a| a == "--config") {
        let map = object(&objects, "ConfigMap", "taskd-config");
        let path = world.dir.join(format!("{}.toml", o.name()));
        std::fs::write(&path, map.doc["data"]["config.toml"].as_str().unwrap()).unwrap();
        args[i + 1] = path.display().to_string();
        config_file = Some(path);
    }
    rewrite(&mut args);
    let env = container_env(world, container);
    let config = effective_config(world, config_file.as_deref(), &env)
        .unwrap_or_else(|e| panic!("{}: taskd rejects its configuration: {e}", o.what()));
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = world.command(&args_ref);
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let process = world.spawn(command, o.name());

    let pod = &o.pod().unwrap()["spec"];
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
    let pause = Duration::from_secs(
        container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0),
    );
    Container {
        process,
        spec: container.clone(),
        ports,
        stop_budget: grace.saturating_sub(pause),
        config,
    }
}

impl Container {
    fn port(&self, port: &Value) -> u16 {
        let declared = container_port(&self.spec, port)
            .unwrap_or_else(|| panic!("probe port {port} is not a port of the container"));
        *self
            .ports
            .get(&declared)
            .unwrap_or_else(|| panic!("port {declared} is not declared in `ports`"))
    }

    /// One try of the probe `kind`: the HTTP status (httpGet), 200 for a TCP connection made.
    async fn probe(&self, kind: &str) -> Result<u16, String> {
        let probe = &self.spec[kind];
        if probe["httpGet"].is_object() {
            let get = &probe["httpGet"];
            let url = format!(
                "http://127.0.0.1:{}{}",
                self.port(&get["port"]),
                get["path"].as_str().unwrap_or("/")
            );
            let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
            let response = client().get(&url).timeout(timeout).send().await;
            response
                .map(|r| r.status().as_u16())
                .map_err(|e| format!("{url}: {e}"))
        } else if probe["tcpSocket"].is_object() {
            let port = self.port(&probe["tcpSocket"]["port"]);
            TcpStream::connect(("127.0.0.1", port))
                .map(|_| 200)
                .map_err(|e| format!("connect to {port}: {e}"))
        } else {
            panic!("{kind}: only httpGet and tcpSocket probes are run here: {probe}")
        }
    }

    /// Tries `kind` until it answers 200, for at most `budget`.
    async fn until_passing(&mut self, kind: &str, budget: Duration) -> Duration {
        let start = Instant::now();
        loop {
            self.process
                .assert_running(&format!("waiting for its {kind}"));
            let result = self.probe(kind).await;
            if result == Ok(200) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < budget,
                "{kind} still failing after {budget:?}: {result:?}\n{}",
                self.process.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The kubelet's budget for `kind` to first pass before it restarts the container.
    fn budget(&self, kind: &str) -> Duration {
        let probe = &self.spec[kind];
        let field = |name: &str, default: u64| probe[name].as_u64().unwrap_or(default);
        Duration::from_secs(
            field("initialDelaySeconds", 0)
                + field("periodSeconds", 10) * field("failureThreshold", 3),
        )
    }

    /// Start-up as the kubelet sees it: the startup probe (or, without one, liveness) passes
    /// within its budget, then every probe answers 200.
    async fn start_up(&mut self) {
        let first = if self.spec["startupProbe"].is_object() {
            "startupProbe"
        } else {
            "livenessProbe"
        };
        let took = self.until_passing(first, self.budget(first)).await;
        eprintln!("{first} passed after {took:?}");
        self.until_passing("readinessProbe", READY_TIMEOUT).await;
        for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
            if self.spec[kind].is_object() {
                assert_eq!(
                    self.probe(kind).await,
                    Ok(200),
                    "{kind}\n{}",
                    self.process.logs()
                );
            }
        }
    }

    /// The signal the kubelet stops the container with: the container's `lifecycle.stopSignal`,
    /// else the image's STOPSIGNAL, else SIGTERM.
    fn stop_signal(&self) -> libc::c_int {
        let image = dockerfile();
        let name = self.spec["lifecycle"]["stopSignal"]
            .as_str()
            .map(str::to_owned)
            .or(image.stop_signal)
            .unwrap_or_else(|| "SIGTERM".into());
        match name.as_str() {
            "SIGTERM" => libc::SIGTERM,
            "SIGINT" => libc::SIGINT,
            other => panic!("stop signal {other}: taskd drains on SIGTERM and SIGINT only"),
        }
    }

    /// Waits for the exit that follows the stop signal sent `since`: 0, within the budget.
    async fn exits_cleanly(&mut self, since: Instant) {
        let left = self.stop_budget.saturating_sub(since.elapsed());
        let status = self.process.wait_exit(left).await;
        assert!(
            status.success(),
            "exit status {status}\n{}",
            self.process.logs()
        );
        eprintln!(
            "exited 0 {:?} after the stop signal (budget {:?})",
            since.elapsed(),
            self.stop_budget
        );
    }
}

#[tokio::test]
async fn worker_container_answers_its_probes_and_drains_on_its_stop_signal() {
    let world = World::new();
    let objects = manifests();
    let (deployment, spec) = role(&objects, "worker");
    let mut worker = start(&world, deployment, spec, |_| {});
    worker.start_up().await;

    let drain = duration(&worker.config, "worker", "drain_delay");
    assert!(!drain.is_zero(), "the manifest sets no worker.drain_delay");
    let sent = Instant::now();
    worker.process.signal(worker.stop_signal());
    // Lame duck: readiness fails at once, liveness still passes, the process still serves.
    loop {
        match worker.probe("readinessProbe").await {
            Ok(503) => break,
            other => assert!(
                sent.elapsed() < drain,
                "readiness still {other:?} {drain:?} after the stop signal\n{}",
                worker.process.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let turned = sent.elapsed();
    assert_eq!(
        worker.probe("livenessProbe").await,
        Ok(200),
        "liveness while draining"
    );
    assert!(
        sent.elapsed() < drain,
        "checks took past the drain delay ({:?}), the draining phase went unobserved",
        sent.elapsed()
    );
    eprintln!("readiness 503 {turned:?} after the stop signal; liveness still 200");
    worker.exits_cleanly(sent).await;
}

#[tokio::test]
async fn proxy_container_answers_its_probes_and_reaches_workers_by_dns() {
    let world = World::new();
    let objects = manifests();
    let (deployment, spec) = role(&objects, "worker");
    let mut worker = start(&world, deployment, spec, |_| {});
    worker.start_up().await;
    let worker_port = *worker.ports.values().next().unwrap();

    // `--upstream-dns taskd-worker:3000` names the headless Service; here the name that leads to
    // the worker started above is localhost.
    let (deployment, spec) = role(&objects, "proxy");
    let mut proxy = start(&world, deployment, spec, |args| {
        let i = args
            .iter()
            .position(|a| a == "--upstream-dns")
            .expect("the proxy uses --upstream-dns");
        args[i + 1] = format!("localhost:{worker_port}");
    });
    proxy.start_up().await;

    // A request through the port of the public Service reaches the worker.
    let service = objects
        .iter()
        .find(|o| {
            o.kind() == "Service"
                && o.doc["spec"]["clusterIP"] != "None"
                && labels_match(
                    &o.doc["spec"]["selector"],
                    &deployment.pod().unwrap()["metadata"]["labels"],
                )
        })
        .expect("a Service in front of the proxy");
    let public = proxy.port(&service.doc["spec"]["ports"][0]["targetPort"]);
    let url = format!("http://127.0.0.1:{public}/health/ready");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        proxy
            .process
            .assert_running("waiting for the worker to join");
        let response = client().get(&url).send().await;
        if let Ok(r) = &response {
            if r.status() == 200 {
                assert!(r.headers().contains_key("x-served-by"));
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no worker behind the proxy: {response:?}\n{}",
            proxy.process.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let sent = Instant::now();
    proxy.process.signal(proxy.stop_signal());
    proxy.exits_cleanly(sent).await;
    let sent = Instant::now();
    worker.process.signal(worker.stop_signal());
    worker.exits_cleanly(sent).await;
}
