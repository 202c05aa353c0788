//! A small HTTP load generator for `scripts/chaos.sh`: `--connections` client loops against the
//! task API for `--duration`, GETs of `/api/v1/tasks` and, every `--post-every`th request, a
//! `POST /api/v1/tasks` with a fresh `Idempotency-Key` (its title is `chaos <key>`, so the script
//! can count duplicates in PostgreSQL). Prints one JSON summary: answers and failures by method,
//! failure samples, latency percentiles.
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080 --token "$TOKEN"
//! ```
//!
//! Requests are not retried by the client: a failure here is a failure a user would have seen.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Base URL of the proxy.
    #[arg(long)]
    url: String,
    /// Bearer token of the user whose tasks are read and created.
    #[arg(long)]
    token: String,
    /// Concurrent keep-alive connections (one request at a time each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long to send requests, e.g. `30s`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// One request in this many is a POST (0: GETs only).
    #[arg(long, default_value_t = 5)]
    post_every: u64,
    /// Send POSTs without `Idempotency-Key` (the proxy then never retries one that reached a
    /// worker: what a rolling restart must survive).
    #[arg(long)]
    no_idempotency_key: bool,
    /// File to write the `Idempotency-Key` of every POST answered 2xx to, one per line.
    #[arg(long)]
    accepted_keys: Option<std::path::PathBuf>,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Default)]
struct Tally {
    ok: BTreeMap<&'static str, u64>,
    failed: BTreeMap<&'static str, u64>,
    samples: Vec<String>,
    latencies_us: Vec<u64>,
    replayed: u64,
    accepted_keys: Vec<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(args.timeout)
        .pool_max_idle_per_host(args.connections)
        .build()
        .expect("HTTP client");
    let started = Instant::now();
    let deadline = started + args.duration;
    let list = format!("{}/api/v1/tasks?limit=20", args.url);
    let create = format!("{}/api/v1/tasks", args.url);
    let loops: Vec<_> = (0..args.connections)
        .map(|i| {
            let (client, list, create, token) = (
                client.clone(),
                list.clone(),
                create.clone(),
                args.token.clone(),
            );
            let (post_every, plain) = (args.post_every, args.no_idempotency_key);
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut n = i as u64;
                while Instant::now() < deadline {
                    n += 1;
                    let post = post_every > 0 && n % post_every == 0;
                    let key = uuid::Uuid::new_v4().to_string();
                    let (method, request) = if post {
                        let mut request = client
                            .post(&create)
                            .json(&json!({ "title": format!("chaos {key}") }));
                        if !plain {
                            request = request.header("idempotency-key", &key);
                        }
                        ("POST", request)
                    } else {
                        ("GET", client.get(&list))
                    };
                    let sent = Instant::now();
                    let outcome = match request.bearer_auth(&token).send().await {
                        Ok(response) => {
                            let status = response.status();
                            let replayed = response.headers().contains_key("idempotent-replayed");
                            match response.bytes().await {
                                Ok(_) if status.is_success() => {
                                    tally.replayed += u64::from(replayed);
                                    Ok(())
                                }
                                Ok(body) => Err(format!(
                                    "{status}: {}",
                                    String::from_utf8_lossy(&body[..body.len().min(200)])
                                )),
                                Err(e) => Err(format!("body cut short: {e}")),
                            }
                        }
                        Err(e) => Err(format!("{e:?}").chars().take(200).collect()),
                    };
                    tally.latencies_us.push(sent.elapsed().as_micros() as u64);
                    match outcome {
                        Ok(()) => {
                            *tally.ok.entry(method).or_default() += 1;
                            if post {
                                tally.accepted_keys.push(key);
                            }
                        }
                        Err(why) => {
                            *tally.failed.entry(method).or_default() += 1;
                            if tally.samples.len() < 5 {
                                tally.samples.push(format!("{method} {why}"));
                            }
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for handle in loops {
        let tally = handle.await.expect("load loop");
        for (method, n) in tally.ok {
            *total.ok.entry(method).or_default() += n;
        }
        for (method, n) in tally.failed {
            *total.failed.entry(method).or_default() += n;
        }
        total.samples.extend(tally.samples);
        total.latencies_us.extend(tally.latencies_us);
        total.replayed += tally.replayed;
        total.accepted_keys.extend(tally.accepted_keys);
    }
    if let Some(path) = &args.accepted_keys {
        let mut text = total.accepted_keys.join("\n");
        text.push('\n');
        std::fs::write(path, text).expect("write the accepted keys");
    }
    let elapsed = started.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        let v = &total.latencies_us;
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    };
    let requests = total.latencies_us.len();
    total.samples.truncate(10);
    let summary = json!({
        "seconds": (elapsed * 10.0).round() / 10.0,
        "connections": args.connections,
        "requests": requests,
        "rps": (requests as f64 / elapsed).round(),
        "ok": total.ok,
        "failed": total.failed,
        "failureSamples": total.samples,
        "replayed": total.replayed,
        "latencyMs": { "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": pct(1.0) },
    });
    println!("{summary}");
}
