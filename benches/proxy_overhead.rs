//! Proxy overhead (docs/contract.md §7): a request straight to an upstream vs the same request through
//! `taskd proxy`, both in this process over real loopback sockets.
//!
//!   cargo bench --bench proxy_overhead
//!
//! - upstream: a minimal hyper HTTP/1.1 server on 127.0.0.1:0, on a thread of its own, answering
//!   every request with the same small JSON body (its health probes included);
//! - proxy: [`Proxy`] with the default configuration (one serving thread per CPU, round-robin,
//!   pooled keep-alive upstream connections) in front of it; `BENCH_PROXY_THREADS=N` sets its
//!   serving threads instead;
//! - client: hyper's low-level HTTP/1.1 client (`client::conn::http1`) on a current-thread
//!   runtime, so the client costs as little as possible.
//!
//! Two groups, each with `direct` and `proxy`:
//! - `sequential`: one keep-alive connection, one request at a time: the latency a proxy adds;
//! - `concurrent_64`: 64 keep-alive connections, one request on each per iteration (64 in
//!   flight): criterion's time is per batch of 64 and its throughput is requests/s; divided by
//!   64 it is the machine's cost per request, so the difference is the CPU a proxy hop costs.
//!
//! After criterion's own report, the per-request figures and the overhead (proxy − direct) are
//! printed from the medians of the measured batches.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, measurement::WallTime};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    Request, Response, StatusCode,
    client::conn::http1::SendRequest,
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use taskd::{
    config::ProxyConfig,
    proxy::{Listeners, Proxy},
};
use tokio::{net::TcpStream, runtime::Runtime};
use tokio_util::sync::CancellationToken;

/// What the upstream answers to everything.
const BODY: &[u8] = br#"{"status":"ok","service":"bench-upstream"}"#;
/// Client connections (and requests in flight) of the concurrent group.
const CONCURRENCY: usize = 64;

/// Per-request nanoseconds of every measured batch, by benchmark id.
static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Starts the upstream on a thread of its own; returns its address.
fn start_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("upstream address");
    std::thread::Builder::new()
        .name("bench-upstream".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("upstream runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("register");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let service = service_fn(|_request| async {
                            let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
                            response.headers_mut().insert(
                                header::CONTENT_TYPE,
                                HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, Infallible>(response)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })
        .expect("spawn the upstream thread");
    addr
}

/// Starts the proxy in front of `upstream`, its health checks on `control`; returns its address.
fn start_proxy(control: &Runtime, upstream: SocketAddr, shutdown: CancellationToken) -> SocketAddr {
    let _entered = control.enter();
    let config = ProxyConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        upstreams: vec![format!("http://{upstream}")],
        threads: std::env::var("BENCH_PROXY_THREADS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        ..ProxyConfig::default()
    };
    let proxy = Proxy::new(config).expect("proxy");
    let listeners = Listeners::bind(proxy.config().listen, proxy.threads()).expect("bind proxy");
    let addr = listeners.local_addr();
    control.spawn(async move { proxy.serve(listeners, shutdown).await });
    addr
}

type Sender = SendRequest<Empty<Bytes>>;

/// A new keep-alive client connection; its driver runs on the current (client) runtime.
async fn connect(addr: SocketAddr) -> Sender {
    let mut last = None;
    for _ in 0..100 {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true).expect("nodelay");
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .expect("handshake");
                tokio::spawn(connection);
                return sender;
            }
            Err(error) => last = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot connect to {addr}: {last:?}");
}

/// One GET, its body read to the end (so the connection can carry the next one).
async fn get(sender: &mut Sender, host: &HeaderValue) {
    sender.ready().await.expect("connection ready");
    let request = Request::builder()
        .uri("/bench")
        .header(header::HOST, host)
        .body(Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body.len(), BODY.len());
}

fn record(id: &str, elapsed: Duration, requests: u64) {
    if requests == 0 {
        return;
    }
    let per_request = elapsed.as_nanos() as f64 / requests as f64;
    SAMPLES
        .lock()
        .unwrap()
        .entry(id.to_owned())
        .or_default()
        .push(per_request);
}

fn sequential(
    group: &mut BenchmarkGroup<'_, WallTime>,
    client: &Runtime,
    name: &str,
    addr: SocketAddr,
) {
    let host = HeaderValue::from_str(&addr.to_string()).expect("host");
    let mut sender = client.block_on(connect(addr));
    let id = format!("sequential/{name}");
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            client.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    get(&mut sender, &host).await;
                }
                let elapsed = started.elapsed();
                record(&id, elapsed, iters);
                elapsed
            })
        })
    });
}

fn concurrent(
    group: &mut BenchmarkGroup<'_, WallTime>,
    client: &Runtime,
    name: &str,
    addr: SocketAddr,
) {
    let host = HeaderValue::from_str(&addr.to_string()).expect("host");
    let mut senders: Vec<Sender> = client.block_on(async {
        futures_util::future::join_all((0..CONCURRENCY).map(|_| connect(addr))).await
    });
    let id = format!("concurrent_{CONCURRENCY}/{name}");
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            client.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    futures_util::future::join_all(senders.iter_mut().map(|s| get(s, &host))).await;
                }
                let elapsed = started.elapsed();
                record(&id, elapsed, iters * CONCURRENCY as u64);
                elapsed
            })
        })
    });
}

fn proxy_overhead(c: &mut Criterion) {
    let upstream = start_upstream();
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("control runtime");
    let shutdown = CancellationToken::new();
    let proxy = start_proxy(&control, upstream, shutdown.clone());
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");

    let mut group = c.benchmark_group("sequential");
    group.throughput(Throughput::Elements(1));
    sequential(&mut group, &client, "direct", upstream);
    sequential(&mut group, &client, "proxy", proxy);
    group.finish();

    let mut group = c.benchmark_group(format!("concurrent_{CONCURRENCY}"));
    group.throughput(Throughput::Elements(CONCURRENCY as u64));
    group.sample_size(30);
    concurrent(&mut group, &client, "direct", upstream);
    concurrent(&mut group, &client, "proxy", proxy);
    group.finish();

    shutdown.cancel();
    drop(client);
    control.shutdown_timeout(Duration::from_secs(2));
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Per-request time of each benchmark and the proxy's overhead, from the medians of its batches.
fn report_overhead() {
    let samples = SAMPLES.lock().unwrap();
    if samples.is_empty() {
        return;
    }
    println!("\nproxy overhead per request (medians of the measured batches):");
    for group in ["sequential".to_owned(), format!("concurrent_{CONCURRENCY}")] {
        let direct = samples.get(&format!("{group}/direct")).map(|v| median(v));
        let proxied = samples.get(&format!("{group}/proxy")).map(|v| median(v));
        match (direct, proxied) {
            (Some(direct), Some(proxied)) => println!(
                "  {group:<14} direct {:>8.1} µs   proxy {:>8.1} µs   overhead {:>+8.1} µs ({:.2}x)",
                direct / 1e3,
                proxied / 1e3,
                (proxied - direct) / 1e3,
                proxied / direct
            ),
            _ => println!("  {group:<14} (not run: both direct and proxy are needed)"),
        }
    }
}

criterion_group! {
    name = benches;
    // Four benchmarks in well under two minutes.
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = proxy_overhead
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report_overhead();
}
