//! SIGHUP to `taskd proxy`: the configuration file is read again and applied in place under
//! load — upstreams, timeouts, the admin token — without a failed request.

use super::{
    binary::{output_of, proxy_command},
    *,
};

fn write_config(dir: &std::path::Path, listen: &str, admin: &str, upstreams: &[&str], token: &str) {
    let upstreams: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "[proxy]\nlisten = {listen:?}\nupstreams = [{}]\nresponse_timeout = \"10s\"\n\
             [proxy.health]\ninterval = \"200ms\"\n[admin]\nlisten = {admin:?}\ntoken = {token:?}\n",
            upstreams.join(", ")
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_upstreams_and_token_under_load_without_a_failure() {
    let (a, b, c) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
        TestUpstream::start("c").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_addr().to_string(), free_addr().to_string());
    write_config(dir.path(), &listen, &admin, &[&a.url, &b.url], "first");
    let mut child = proxy_command(dir.path(), &["--config", "config.toml"])
        .spawn()
        .unwrap();
    let client = client();
    let deadline = Instant::now() + WAIT;
    while client
        .get(format!("http://{listen}/echo"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "{}", output_of(dir.path()));
        assert!(
            child.try_wait().unwrap().is_none(),
            "{}",
            output_of(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let (client, stop, url) = (
                client.clone(),
                stop.clone(),
                format!("http://{listen}/echo"),
            );
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, Vec::new());
                let mut n = 0;
                while !stop.load(SeqCst) {
                    n += 1;
                    let request = if n % 3 == 0 {
                        client
                            .post(&url)
                            .header("idempotency-key", format!("{i}-{n}"))
                            .body("x")
                    } else {
                        client.get(&url)
                    };
                    match request.send().await {
                        Ok(response) if response.status() == 200 => ok += 1,
                        Ok(response) => failed.push(response.status().to_string()),
                        Err(error) => failed.push(error.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;

    write_config(dir.path(), &listen, &admin, &[&b.url, &c.url], "second");
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status_url = format!("http://{admin}/status");
    let deadline = Instant::now() + WAIT;
    loop {
        let status = json_of(client.get(&status_url)).await;
        let urls: Vec<&str> = status["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["state"] == "healthy")
            .map(|u| u["url"].as_str().unwrap())
            .collect();
        if urls == [b.url.as_str(), c.url.as_str()]
            && status["upstreams"].as_array().unwrap().len() == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{status}\n{}",
            output_of(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_hits = a.hits();
    let c_before = c.hits();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for task in load {
        let (o, f) = task.await.unwrap();
        ok += o;
        failed.extend(f);
    }

    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "too little load: {ok}");
    assert_eq!(a.hits(), a_hits, "a removed upstream still got requests");
    assert!(c.hits() > c_before, "the added upstream got no requests");
    let logs = output_of(dir.path());
    assert!(logs.contains("proxy configuration reloaded"), "{logs}");

    // The admin token was reloaded too.
    let delete = |token: &str| {
        client
            .delete(format!("http://{admin}/upstreams"))
            .bearer_auth(token)
            .json(&json!({"url": "http://127.0.0.1:9"}))
            .send()
    };
    assert_eq!(delete("first").await.unwrap().status(), 401);
    assert_eq!(delete("second").await.unwrap().status(), 404);

    // A configuration that does not load leaves the running one as it is.
    std::fs::write(
        dir.path().join("config.toml"),
        "[proxy]\nretries = \"many\"\n",
    )
    .unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + WAIT;
    while !output_of(dir.path()).contains("the configuration does not load") {
        assert!(Instant::now() < deadline, "{}", output_of(dir.path()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        client
            .get(format!("http://{listen}/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        child.try_wait().unwrap(),
        None,
        "the proxy exited on a bad reload"
    );
}
