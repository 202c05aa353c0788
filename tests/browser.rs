//! CORS and compression in a real browser: headless Chromium (Debian's `chromium`) opens a page
//! that this test serves on another origin (another port of 127.0.0.1), whose script calls the
//! API through the real `taskd proxy` binary with a Bearer token, writes what it read into the
//! page, and posts the page's text back to the test. The allowed origin reads the task list (a
//! compressed cache variant, decoded by the browser) and the exposed headers; a page of an origin
//! not in `worker.cors.allowed_origins` sees its fetch rejected by the browser.
//!
//! Without Chromium the test says so and passes, except under `CI=true`, where it fails:
//! scripts/test.sh installs it.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{TestApp, ports::free_port, spawn_app_with};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};

const BIN: &str = env!("CARGO_BIN_EXE_taskd");
/// Upper bound for the browser to load a page and report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Chromium's path, or `None` (after saying why) when the test cannot run here.
fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is missing under CI=true: scripts/test.sh installs it (apt-get install chromium)"
        );
        eprintln!(
            "SKIPPED: no chromium at /usr/bin/chromium; `apt-get install chromium` (scripts/test.sh does) to run the browser test"
        );
    }
    found
}

/// The page of one origin: on GET it serves `html`; what its script POSTs to `/report` comes
/// out of the returned channel.
async fn serve_page(listener: TcpListener, html: String) -> mpsc::Receiver<String> {
    let (reports, received) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (html, reports) = (html.clone(), reports.clone());
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let (html, reports) = (html.clone(), reports.clone());
                async move {
                    let is_report = request.uri().path() == "/report";
                    let body = request.into_body().collect().await.map(|b| b.to_bytes());
                    let response = if is_report {
                        let text = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
                        let _ = reports.send(text).await;
                        Response::new(Full::new(Bytes::new()))
                    } else {
                        let mut response = Response::new(Full::new(Bytes::from(html)));
                        response
                            .headers_mut()
                            .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
                        response
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    received
}

/// A page whose script runs `calls` (JavaScript statements that fill `result`), writes
/// `result` into the page as JSON, then posts the page's text to `/report`.
fn page(calls: &str) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="result">pending</pre><script>
(async () => {{
  const result = {{}};
  try {{ {calls} }} catch (e) {{ result.error = String(e); }}
  document.getElementById("result").textContent = JSON.stringify(result);
  await fetch("/report", {{ method: "POST", body: document.getElementById("result").textContent }});
}})();
</script></body></html>"#
    )
}

/// Chromium showing `url` until dropped (its whole process group is killed then).
struct Browser {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(chromium: &Path, url: &str) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--no-proxy-server",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromium");
        Self {
            child,
            _profile: profile,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // The browser's helpers (zygote, renderers) share its process group.
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
        }
    }
}

/// `taskd proxy` (the binary) in front of `upstream`; killed when dropped.
async fn start_proxy(upstream: &str, dir: &Path) -> (tokio::process::Child, SocketAddr) {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = tokio::process::Command::new(BIN)
        .args(["proxy", "--listen", &listen.to_string()])
        .args(["--admin-listen", &admin.to_string(), "--upstream", upstream])
        .env_clear()
        .env("TASKD_PROXY__THREADS", "1")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("proxy.log")).unwrap(),
        ))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    while client
        .get(format!("http://{listen}/health/live"))
        .send()
        .await
        .is_err()
    {
        assert!(child.try_wait().unwrap().is_none(), "the proxy exited");
        assert!(Instant::now() < deadline, "the proxy never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, listen)
}

async fn report(received: &mut mpsc::Receiver<String>) -> Value {
    let text = tokio::time::timeout(REPORT_TIMEOUT, received.recv())
        .await
        .expect("the page reported within a minute")
        .expect("a report");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_an_allowed_origin_reads_tasks_and_another_origin_is_refused() {
    let Some(chromium) = chromium() else { return };
    let allowed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let allowed_origin = format!("http://{}", allowed.local_addr().unwrap());
    let refused_origin = format!("http://{}", refused.local_addr().unwrap());
    let app: TestApp = spawn_app_with(|c| {
        c.worker.cors.allowed_origins = vec![allowed_origin.clone()];
    })
    .await;
    let ada = app.register("ada@example.com").await;
    let mut titles = Vec::new();
    for i in 0..12 {
        let title = format!("Quarterly report {i:02}, figures and charts for the board");
        app.create_task(ada.token(), &json!({ "title": title }))
            .await;
        titles.push(title);
    }
    let dir = tempfile::tempdir().unwrap();
    let (_proxy, proxy) = start_proxy(&app.base_url, dir.path()).await;
    let api = format!("http://{proxy}/api/v1/tasks?sort=title");
    let bearer = format!("Bearer {}", ada.token());

    let read = format!(
        r#"
        const headers = {{ Authorization: "{bearer}" }};
        const first = await fetch("{api}", {{ headers }});
        result.status = first.status;
        result.titles = (await first.json()).data.map((t) => t.title);
        result.etag = first.headers.get("etag");
        result.requestId = first.headers.get("x-request-id");
        result.remaining = first.headers.get("ratelimit-remaining");
        const again = await fetch("{api}", {{ headers }});
        result.again = (await again.json()).data.length;
        result.againEtag = again.headers.get("etag");
        "#
    );
    let mut reports = serve_page(allowed, page(&read)).await;
    let browser = Browser::open(&chromium, &format!("{allowed_origin}/"));
    let seen = report(&mut reports).await;
    drop(browser);
    // Shown with --nocapture: what the page on the allowed origin read.
    eprintln!("{allowed_origin} (allowed) reported: {seen}");
    assert_eq!(seen["status"], 200, "{seen}");
    assert_eq!(seen["titles"], json!(titles), "{seen}");
    assert_eq!(seen["again"], 12, "{seen}");
    // Exposed headers are readable. Chromium accepts br: the listing came as the cache's brotli
    // variant (its ETag says so), and the browser decoded it.
    assert!(
        seen["requestId"].as_str().is_some_and(|id| !id.is_empty()),
        "{seen}"
    );
    assert!(seen["remaining"].as_str().is_some(), "{seen}");
    assert!(
        seen["etag"]
            .as_str()
            .is_some_and(|tag| tag.ends_with("-br\"")),
        "{seen}"
    );
    assert_eq!(seen["againEtag"], seen["etag"], "{seen}");

    // Another origin: the server answers (an opaque no-cors request goes through), but the
    // browser refuses the page a CORS read.
    let refuse = format!(
        r#"
        const opaque = await fetch("{api}", {{ mode: "no-cors" }});
        result.opaque = opaque.type;
        try {{
          await fetch("{api}", {{ headers: {{ Authorization: "{bearer}" }} }});
          result.read = true;
        }} catch (e) {{
          result.refused = e.name;
        }}
        "#
    );
    let mut reports = serve_page(refused, page(&refuse)).await;
    let browser = Browser::open(&chromium, &format!("{refused_origin}/"));
    let seen = report(&mut reports).await;
    drop(browser);
    eprintln!("{refused_origin} (not allowed) reported: {seen}");
    assert_eq!(seen["opaque"], "opaque", "{seen}");
    assert_eq!(seen["refused"], "TypeError", "{seen}");
    assert_eq!(seen.get("read"), None, "{seen}");
}
