//! What can be checked without starting a server: command lines, variables, the configuration
//! file, grace periods, and how the objects refer to each other.

use super::*;

/// Every taskd command line of deploy/: containers, systemd `ExecStart=`, the image's default.
fn command_lines() -> Vec<(String, Vec<String>)> {
    let image = dockerfile();
    let mut lines = Vec::new();
    for o in manifests() {
        for c in containers_of(&o) {
            let name = c["name"].as_str().unwrap_or_default();
            lines.push((format!("{} container {name}", o.what()), argv(c, &image)));
        }
    }
    for unit in units() {
        let exec = unit
            .get("ExecStart")
            .unwrap_or_else(|| panic!("{}: no ExecStart", unit.name));
        let words = exec.split_whitespace().map(str::to_owned).collect();
        lines.push((format!("{} ExecStart", unit.name), strip_executable(words)));
    }
    let mut default = image.entrypoint.clone();
    default.extend(image.cmd.clone());
    lines.push((
        "deploy/Dockerfile ENTRYPOINT + CMD".into(),
        strip_executable(default),
    ));
    lines
}

#[test]
fn every_command_line_uses_flags_that_taskd_documents() {
    let mut missing = Vec::new();
    for (what, args) in command_lines() {
        let sub = subcommand(&args);
        assert!(!sub.is_empty(), "{what}: no subcommand in {args:?}");
        let help = help(&sub);
        for flag in flags(&args) {
            if !documents(&help, &flag) {
                missing.push(format!(
                    "{what}: `taskd {} --help` has no {flag}",
                    sub.join(" ")
                ));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// Every variable deploy/ sets for taskd, with the value these tests give it: literal values as
/// written, secrets and the placeholders of the example environment files as
/// [`secret_value`] makes them.
fn variables(world: &World) -> Vec<(String, String, String)> {
    let mut vars = Vec::new();
    for o in manifests() {
        for c in containers_of(&o) {
            for (name, value) in container_env(world, c) {
                vars.push((o.what(), name, value));
            }
        }
    }
    for unit in units() {
        for setting in unit.all("Environment") {
            for (name, value) in assignments(setting) {
                vars.push((unit.name.clone(), name, value));
            }
        }
    }
    for entry in std::fs::read_dir(repo().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".env.example") {
            let text = std::fs::read_to_string(&path).unwrap();
            // Commented-out lines are variables an operator may enable: check them too.
            let lines = text.lines().map(|l| l.trim_start_matches('#'));
            for (name, _) in assignments(&lines.collect::<Vec<_>>().join("\n")) {
                if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                    let value = secret_value(world, &name);
                    vars.push((path.display().to_string(), name, value));
                }
            }
        }
    }
    vars
}

#[test]
fn every_variable_is_a_configuration_key_taskd_accepts() {
    let world = World::new();
    let mut wrong = Vec::new();
    for (what, name, value) in variables(&world) {
        if name == "DATABASE_URL" || name == "REDIS_URL" {
            if let Err(e) = effective_config(&world, None, &[(name.clone(), value)]) {
                wrong.push(format!("{what}: {name}: {e}"));
            }
            continue;
        }
        let Some(path) = name.strip_prefix("TASKD_").filter(|p| p.contains("__")) else {
            wrong.push(format!("{what}: {name} is not read by taskd"));
            continue;
        };
        match effective_config(&world, None, &[(name.clone(), value)]) {
            Err(e) => wrong.push(format!("{what}: {name}: {e}")),
            Ok(config) => {
                // The key shows in the effective configuration: the variable set something.
                let mut node = Some(&config);
                let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
                let (last, sections) = keys.split_last().unwrap();
                for section in sections {
                    node = node.and_then(|n| n.get(section)).and_then(|v| v.as_table());
                }
                if !node.is_some_and(|n| n.contains_key(last)) {
                    wrong.push(format!(
                        "{what}: {name}: no {} in `taskd config`",
                        keys.join(".")
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The ConfigMap's `config.toml`, written to the test's directory.
fn configmap_file(world: &World, objects: &[Object]) -> PathBuf {
    let map = object(objects, "ConfigMap", "taskd-config");
    let text = map.doc["data"]["config.toml"]
        .as_str()
        .expect("taskd-config has a config.toml");
    let path = world.dir.join("configmap.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn grace_period(o: &Object) -> Duration {
    let seconds = &o.pod().unwrap()["spec"]["terminationGracePeriodSeconds"];
    Duration::from_secs(seconds.as_u64().unwrap_or(30))
}

fn pre_stop_sleep(container: &Value) -> Duration {
    let pre_stop = &container["lifecycle"]["preStop"];
    assert!(
        pre_stop.is_null() || pre_stop["sleep"].is_object(),
        "only a preStop sleep is accounted for here: {pre_stop}"
    );
    Duration::from_secs(pre_stop["sleep"]["seconds"].as_u64().unwrap_or(0))
}

#[test]
fn the_configmap_loads_and_grace_periods_cover_drain_and_shutdown() {
    let world = World::new();
    let objects = manifests();
    let file = configmap_file(&world, &objects);
    effective_config(&world, Some(&file), &[])
        .unwrap_or_else(|e| panic!("taskd rejects the ConfigMap's config.toml: {e}"));

    let (worker, container) = role(&objects, "worker");
    let env = container_env(&world, container);
    let config = effective_config(&world, Some(&file), &env).unwrap();
    let drain = duration(&config, "worker", "drain_delay");
    let grace = duration(&config, "worker", "shutdown_timeout");
    assert!(
        !drain.is_zero(),
        "{}: worker.drain_delay is 0: no lame duck while endpoints update",
        worker.what()
    );
    assert!(
        grace_period(worker) >= drain + grace,
        "{}: terminationGracePeriodSeconds {:?} < drain_delay {drain:?} + shutdown_timeout {grace:?}",
        worker.what(),
        grace_period(worker)
    );

    let (proxy, container) = role(&objects, "proxy");
    let env = container_env(&world, container);
    match effective_config(&world, Some(&file), &env) {
        Ok(config) => {
            let grace = duration(&config, "proxy", "shutdown_timeout");
            let pause = pre_stop_sleep(container);
            assert!(
                grace_period(proxy) >= pause + grace,
                "{}: terminationGracePeriodSeconds {:?} < preStop {pause:?} + shutdown_timeout {grace:?}",
                proxy.what(),
                grace_period(proxy)
            );
        }
        Err(e) => panic!("{}: taskd rejects its configuration: {e}", proxy.what()),
    }

    // systemd: the committed config.toml stands for /etc/taskd/config.toml.
    let config_toml = repo().join("config.toml");
    for unit in units() {
        let role = subcommand(&strip_executable(
            unit.get("ExecStart")
                .unwrap()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        ))[0]
            .clone();
        let env: Vec<(String, String)> = unit.all("Environment").flat_map(assignments).collect();
        let config = effective_config(&world, Some(&config_toml), &env).unwrap();
        let needed = match role.as_str() {
            "worker" => {
                duration(&config, "worker", "drain_delay")
                    + duration(&config, "worker", "shutdown_timeout")
            }
            "proxy" => duration(&config, "proxy", "shutdown_timeout"),
            other => panic!("{}: unexpected role {other}", unit.name),
        };
        let stop = timespan(unit.get("TimeoutStopSec").unwrap_or("90s"));
        assert!(
            stop >= needed,
            "{}: TimeoutStopSec {stop:?} < {needed:?}",
            unit.name
        );
        let signal = unit.get("KillSignal").unwrap_or("SIGTERM");
        assert!(
            signal == "SIGTERM" || signal == "SIGINT",
            "{}: KillSignal={signal}: taskd drains on SIGTERM and SIGINT only",
            unit.name
        );
        assert!(
            matches!(unit.get("Restart"), Some("on-failure" | "always")),
            "{}: no Restart=on-failure",
            unit.name
        );
    }
}

/// The container port a probe or Service port refers to, by number or by name.
pub(crate) fn container_port(container: &Value, port: &Value) -> Option<u16> {
    if let Some(n) = port.as_u64() {
        return Some(n as u16);
    }
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
        .map(|n| n as u16)
}

#[test]
fn pods_run_unprivileged_within_the_image_and_its_configuration() {
    let objects = manifests();
    let image = dockerfile();
    let uid: u64 = image
        .user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("the Dockerfile's USER is numeric (runAsNonRoot checks it)");
    assert_ne!(uid, 0, "the image runs as root");
    for o in objects.iter().filter(|o| o.pod().is_some()) {
        let spec = &o.pod().unwrap()["spec"];
        let what = o.what();
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
        assert_eq!(
            spec["securityContext"]["runAsUser"], uid,
            "{what}: not the image's user"
        );
        assert_eq!(
            spec["enableServiceLinks"], false,
            "{what}: service links add env"
        );
        assert_eq!(spec["automountServiceAccountToken"], false, "{what}");
        for c in containers_of(o) {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            let dropped = sc["capabilities"]["drop"].as_array();
            assert!(dropped.is_some_and(|d| d.contains(&"ALL".into())), "{what}");
            for key in ["requests.cpu", "requests.memory", "limits.memory"] {
                let (group, name) = key.split_once('.').unwrap();
                assert!(c["resources"][group][name].is_string(), "{what}: no {key}");
            }
            for port in c["ports"].as_array().into_iter().flatten() {
                let n = port["containerPort"].as_u64().unwrap() as u16;
                assert!(image.exposed.contains(&n), "{what}: port {n} not EXPOSEd");
            }
            // `--config PATH` is a file the pod mounts from the ConfigMap.
            let args = argv(c, &image);
            if let Some(path) = flag_value(&args, "--config") {
                let mount = c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
                    .unwrap_or_else(|| panic!("{what}: nothing mounted at {path}"));
                let volume = spec["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap();
                let map = object(
                    &objects,
                    "ConfigMap",
                    volume["configMap"]["name"].as_str().unwrap(),
                );
                let key =
                    path[mount["mountPath"].as_str().unwrap().len()..].trim_start_matches('/');
                assert!(
                    map.doc["data"][key].is_string(),
                    "{what}: {} has no {key}",
                    map.what()
                );
            }
            // Every secret it reads is in the example Secret, or optional.
            for var in c["env"].as_array().into_iter().flatten() {
                let reference = &var["valueFrom"]["secretKeyRef"];
                if reference.is_object() {
                    let secret = object(&objects, "Secret", reference["name"].as_str().unwrap());
                    let key = reference["key"].as_str().unwrap();
                    assert!(
                        secret.doc["stringData"][key].is_string() || reference["optional"] == true,
                        "{what}: {key} is neither in {} nor optional",
                        secret.what()
                    );
                }
            }
        }
    }
}

#[test]
fn services_autoscaler_and_budgets_point_at_the_right_pods() {
    let objects = manifests();
    let image = dockerfile();
    let (worker, worker_container) = role(&objects, "worker");
    let (proxy, proxy_container) = role(&objects, "proxy");
    let labels = |o: &Object| o.pod().unwrap()["metadata"]["labels"].clone();

    // Probes on the fixed paths (docs/contract.md §8.3).
    for (probe, path) in [
        ("startupProbe", "/health/live"),
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
    ] {
        assert_eq!(worker_container[probe]["httpGet"]["path"], path, "{probe}");
    }

    // `--upstream-dns NAME:PORT`: NAME is the workers' headless Service, PORT its port, which
    // leads to the worker container's port.
    let args = argv(proxy_container, &image);
    let target = flag_value(&args, "--upstream-dns").expect("the proxy uses --upstream-dns");
    let (host, port) = target.rsplit_once(':').expect("HOST:PORT");
    let service = object(&objects, "Service", host);
    assert_eq!(
        service.doc["spec"]["clusterIP"],
        "None",
        "{} is not headless",
        service.what()
    );
    assert!(labels_match(
        &service.doc["spec"]["selector"],
        &labels(worker)
    ));
    let service_port = service.doc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"].as_u64() == port.parse().ok())
        .unwrap_or_else(|| panic!("{} has no port {port}", service.what()));
    let worker_args = argv(worker_container, &image);
    let listening = flag_value(&worker_args, "--port").expect("worker --port");
    assert_eq!(
        container_port(worker_container, &service_port["targetPort"]).map(|p| p.to_string()),
        Some(listening.to_owned()),
        "the headless Service's targetPort is not the worker's --port"
    );

    // The public Service leads to the proxy's listener and never to its admin port.
    let admin = flag_value(&args, "--admin-listen").expect("the proxy sets --admin-listen");
    assert!(
        admin.starts_with("0.0.0.0:"),
        "admin listener unreachable for the kubelet and Prometheus"
    );
    let admin_port: u16 = admin.rsplit_once(':').unwrap().1.parse().unwrap();
    let public: Vec<&Object> = objects
        .iter()
        .filter(|o| o.kind() == "Service" && o.doc["spec"]["clusterIP"] != "None")
        .filter(|o| labels_match(&o.doc["spec"]["selector"], &labels(proxy)))
        .collect();
    assert!(!public.is_empty(), "no Service in front of the proxy");
    for service in public {
        for port in service.doc["spec"]["ports"].as_array().unwrap() {
            let target = container_port(proxy_container, &port["targetPort"]);
            assert_ne!(
                target,
                Some(admin_port),
                "{} exposes the admin listener",
                service.what()
            );
        }
    }

    let hpa = objects
        .iter()
        .find(|o| o.kind() == "HorizontalPodAutoscaler")
        .expect("an HPA");
    assert_eq!(
        hpa.doc["spec"]["scaleTargetRef"]["name"],
        worker.name(),
        "the HPA scales workers"
    );
    for pdb in objects.iter().filter(|o| o.kind() == "PodDisruptionBudget") {
        let selector = &pdb.doc["spec"]["selector"]["matchLabels"];
        assert!(
            [worker, proxy]
                .iter()
                .any(|d| labels_match(selector, &labels(d))),
            "{} selects no taskd pods",
            pdb.what()
        );
    }
    let job = objects
        .iter()
        .find(|o| o.kind() == "Job")
        .expect("a migration Job");
    let job_args = argv(containers_of(job).next().unwrap(), &image);
    assert_eq!(subcommand(&job_args), ["migrate"], "{}", job.what());
}
