//! The one-shot commands: `migrate`, `config`, `user create`, `--help`.

use sqlx::{Connection, PgConnection};

use super::*;

#[tokio::test]
async fn migrate_creates_the_database_and_is_idempotent() {
    let h = Harness::new();
    assert!(!h.db.exists().await, "fresh name already taken");

    let first = h.run(&["migrate"]).await;
    assert_success(&first);
    assert!(h.db.exists().await, "migrate did not create the database");

    let mut conn = PgConnection::connect(&h.db.url).await.expect("connect");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .expect("list tables");
    for table in ["users", "categories", "tasks", "refresh_tokens", "settings"] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing: {tables:?}"
        );
    }
    let applied =
        || sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success");
    let before = applied().fetch_one(&mut conn).await.expect("count");
    assert!(before >= 1);

    let second = h.run(&["migrate"]).await;
    assert_success(&second);
    let after = applied().fetch_one(&mut conn).await.expect("count");
    assert_eq!(before, after, "a second migrate applied something again");
    conn.close().await.ok();
}

#[tokio::test]
async fn config_prints_redacted_toml_and_rejects_bad_values_by_name() {
    let h = Harness::new();
    let secret = "s3cr3t-0123456789-abcdefghij-0123456789x";
    assert_eq!(secret.len(), 40);

    let mut command = h.command(&["config"]);
    command
        .env("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x")
        .env("TASKD_AUTH__JWT_SECRET", secret);
    let output = h.output(command, None).await;
    assert_success(&output);
    let stdout = text(&output.stdout);
    assert!(stdout.contains("[database]"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "password leaked: {stdout}");
    assert!(!stdout.contains(secret), "JWT secret leaked: {stdout}");
    let shown: toml::Table = stdout.parse().expect("config prints TOML");
    assert_eq!(
        shown["database"]["url"].as_str().map(|u| u.contains("u:")),
        Some(true)
    );
    assert_eq!(
        shown["redis"]["key_prefix"].as_str(),
        Some(h.prefix.as_str())
    );

    // The printed configuration (without redacted values) is itself a valid config file.
    std::fs::write(h.dir.join("printed.toml"), h.run(&["config"]).await.stdout).unwrap();
    assert_success(&h.run(&["--config", "printed.toml", "config"]).await);

    // Precedence: flag > environment > config.toml > default.
    let level = |output: &Output| -> String {
        assert_success(output);
        let shown: toml::Table = text(&output.stdout).parse().expect("TOML");
        shown["telemetry"]["log_level"].as_str().unwrap().to_owned()
    };
    assert_eq!(level(&h.run(&["config"]).await), "info");
    std::fs::write(
        h.dir.join("config.toml"),
        "[telemetry]\nlog_level = \"error\"\n",
    )
    .unwrap();
    assert_eq!(level(&h.run(&["config"]).await), "error");
    let with_env = || {
        let mut command = h.command(&["config"]);
        command.env("TASKD_TELEMETRY__LOG_LEVEL", "warn");
        command
    };
    assert_eq!(level(&h.output(with_env(), None).await), "warn");
    let mut command = with_env();
    command.args(["--log-level", "debug"]);
    assert_eq!(level(&h.output(command, None).await), "debug");
    std::fs::remove_file(h.dir.join("config.toml")).unwrap();

    // Invalid values and unknown keys: non-zero, and the message names the key.
    for (key, value, named) in [
        ("TASKD_WORKER__PORT", "notaport", "worker.port"),
        ("TASKD_REDIS__POOL_SIZE", "0", "redis.pool_size"),
        ("TASKD_WORKER__PROT", "1", "prot"),
    ] {
        let mut command = h.command(&["config"]);
        command.env(key, value);
        let output = h.output(command, None).await;
        assert_failure_mentions(&output, named);
    }
    std::fs::write(h.dir.join("config.toml"), "[database]\nbogus = 1\n").unwrap();
    let output = h.run(&["config"]).await;
    assert_failure_mentions(&output, "bogus");
    assert_failure_mentions(&output, "config.toml");
    std::fs::remove_file(h.dir.join("config.toml")).unwrap();

    let output = h.run(&["--config", "/nonexistent.toml", "config"]).await;
    assert_failure_mentions(&output, "/nonexistent.toml");
}

#[tokio::test]
async fn user_create_makes_an_admin_who_can_log_in() {
    let h = Harness::new();

    // Password from TASKD_PASSWORD.
    let mut command = h.command(&[
        "user",
        "create",
        "--email",
        "admin@example.com",
        "--role",
        "admin",
    ]);
    command.env("TASKD_PASSWORD", PASSWORD);
    let output = h.output(command, None).await;
    assert_success(&output);
    let stdout = text(&output.stdout);
    assert!(!stdout.contains(PASSWORD), "password echoed: {stdout}");
    let user = printed_json(&stdout);
    assert_eq!(user["role"], "admin");
    assert_eq!(user["email"], "admin@example.com");
    assert_eq!(user["name"], "admin");
    assert!(user.get("password").is_none() && user.get("passwordHash").is_none());

    // Password from stdin (no TASKD_PASSWORD in the environment).
    let stdin_password = "another long passphrase";
    let command = h.command(&[
        "user",
        "create",
        "--email",
        "Ops@Example.com",
        "--name",
        "Ops",
        "--role",
        "admin",
        "--tier",
        "pro",
    ]);
    let output = h
        .output(command, Some(&format!("{stdin_password}\n")))
        .await;
    assert_success(&output);
    let ops = printed_json(&text(&output.stdout));
    assert_eq!(ops["role"], "admin");
    assert_eq!(ops["tier"], "pro");
    assert_eq!(ops["email"], "ops@example.com");

    // Too short: refused with a message saying why.
    let mut command = h.command(&["user", "create", "--email", "short@example.com"]);
    command.env("TASKD_PASSWORD", "short");
    let output = h.output(command, None).await;
    assert_failure_mentions(&output, "at least 8 characters");

    // Duplicate email (any case): refused.
    let mut command = h.command(&["user", "create", "--email", "ADMIN@example.com"]);
    command.env("TASKD_PASSWORD", PASSWORD);
    let output = h.output(command, None).await;
    assert_failure_mentions(&output, "already exists");

    // Both admins log in through a real worker and may list users.
    let client = client();
    let mut worker = h.spawn_worker(&[], "e2e-users");
    worker.wait_ready(&client).await;
    for (email, password) in [
        ("admin@example.com", PASSWORD),
        ("ops@example.com", stdin_password),
    ] {
        let token = login(&client, &worker, email, password).await;
        let response = client
            .get(worker.url("/api/v1/users"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET /users as {email}");
        let users: Value = response.json().await.unwrap();
        let emails: Vec<&str> = users["data"]
            .as_array()
            .expect("data array")
            .iter()
            .filter_map(|u| u["email"].as_str())
            .collect();
        assert!(emails.contains(&"admin@example.com"), "{users}");
        assert!(!emails.contains(&"short@example.com"), "{users}");
    }
    worker.sigterm();
    assert!(worker.wait_exit(EXIT_TIMEOUT).await.success());
}

#[tokio::test]
async fn help_describes_every_flag() {
    let h = Harness::new();
    let help = |output: Output| -> String {
        assert_success(&output);
        text(&output.stdout)
    };
    let top = help(h.run(&["--help"]).await);
    for flag in ["--config", "--log-format", "--log-level"] {
        assert!(top.contains(flag), "taskd --help lacks {flag}:\n{top}");
    }
    for command in ["serve", "worker", "migrate", "user", "config"] {
        assert!(
            top.contains(command),
            "taskd --help lacks {command}:\n{top}"
        );
    }

    let worker = help(h.run(&["worker", "--help"]).await);
    for flag in [
        "--config",
        "--log-format",
        "--log-level",
        "--port",
        "--host",
        "--instance-id",
    ] {
        assert!(
            worker.contains(flag),
            "taskd worker --help lacks {flag}:\n{worker}"
        );
    }

    let serve = help(h.run(&["serve", "--help"]).await);
    for flag in [
        "--config",
        "--log-format",
        "--instances",
        "--listen",
        "--base-port",
        "--admin-listen",
    ] {
        assert!(
            serve.contains(flag),
            "taskd serve --help lacks {flag}:\n{serve}"
        );
    }

    let create = help(h.run(&["user", "create", "--help"]).await);
    for flag in ["--email", "--name", "--role", "--tier", "--config"] {
        assert!(
            create.contains(flag),
            "taskd user create --help lacks {flag}:\n{create}"
        );
    }
    for args in [
        ["migrate", "--help"],
        ["config", "--help"],
        ["user", "--help"],
    ] {
        let text = help(h.run(&args).await);
        assert!(text.contains("--log-format"), "{args:?}:\n{text}");
    }
}
