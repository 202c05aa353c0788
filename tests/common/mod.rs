//! The API test harness: [`spawn_app`] serves a real worker on port 0 over a fresh PostgreSQL
//! database (dropped again with the [`TestApp`]) and real Redis under a per-test key prefix.
//! [`TestApp::spawn_peer`] adds a second worker of the same deployment (same database and
//! prefix). Private servers live in their own files: Redis ([`redis`]: standalone, cluster,
//! Sentinel), PostgreSQL and PgBouncer ([`postgres`]), TLS ones ([`tls`]); [`flows`] holds
//! steps of the core flows the data-tier tests share.
//!
//! Every test binary includes this module and uses a different part of it.
#![allow(dead_code)]

pub mod binary;
pub mod codings;
pub mod expect;
pub mod flows;
pub mod ports;
pub mod postgres;
pub mod redis;
pub mod tls;
pub mod walkthrough;

// Not every test binary uses every server.
#[allow(unused_imports)]
pub use redis::{RedisCluster, RedisSentinel, RedisServer};

use std::{
    net::SocketAddr,
    sync::{Once, mpsc},
    time::Duration,
};

use reqwest::{
    Method, StatusCode,
    header::{CONTENT_TYPE, HeaderMap},
};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use taskd::{config::Config, worker::AppState};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The password [`TestApp::register`] gives every user.
pub const PASSWORD: &str = "correct horse battery";

/// `X-Served-By` of every test worker.
pub const INSTANCE: &str = "test";

/// The PostgreSQL server tests create their databases on.
fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Logs of the app under test go to the test output when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// A uniquely named database on the test server, dropped (`WITH (FORCE)`) with this guard, also
/// when the test panics.
pub struct TestDb {
    pub name: String,
    /// URL of this database.
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// A fresh name and its URL; the database itself is not created.
    pub fn reserve() -> Self {
        let admin_url = admin_url();
        let name = format!("taskd_test_{}", Uuid::new_v4().simple());
        let mut url = url::Url::parse(&admin_url).expect("TEST_DATABASE_URL is a URL");
        url.set_path(&name);
        Self {
            name,
            url: url.to_string(),
            admin_url,
        }
    }

    /// A fresh, empty database.
    pub async fn create() -> Self {
        let db = Self::reserve();
        let mut admin = PgConnection::connect(&db.admin_url)
            .await
            .expect("connecting to the PostgreSQL server in TEST_DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE \"{}\"", db.name))
            .execute(&mut admin)
            .await
            .expect("creating the test database");
        let _ = admin.close().await;
        db
    }

    pub async fn exists(&self) -> bool {
        let mut admin = PgConnection::connect(&self.admin_url).await.unwrap();
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(&self.name)
            .fetch_optional(&mut admin)
            .await
            .unwrap();
        found.is_some()
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    let _ = admin.close().await;
    Ok(())
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on: do the work on a
        // thread with its own small runtime, and never wait for it forever.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|runtime| {
                    runtime.block_on(async {
                        let mut error = String::new();
                        for attempt in 1..=5 {
                            match drop_database(&admin_url, &name).await {
                                Ok(()) => return Ok(()),
                                Err(e) => error = e.to_string(),
                            }
                            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                        }
                        Err(error)
                    })
                });
            let _ = done.send(outcome);
        });
        match result.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("warning: could not drop database {}: {error}", self.name),
            Err(_) => eprintln!("warning: timed out dropping database {}", self.name),
        }
    }
}

/// A running worker and what tests need to talk to it.
pub struct TestApp {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    pub client: reqwest::Client,
    /// The worker's own pool on the test database, for checks and set-up behind the API.
    pub db: PgPool,
    pub state: AppState,
    /// This test's `redis.key_prefix`.
    pub redis_prefix: String,
    shutdown: CancellationToken,
    /// Declared last: the database is dropped after the server is told to stop.
    _database: Option<TestDb>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The configuration of a test worker on `database_url`: fast password hashing, its own Redis
/// key prefix.
pub fn test_config(database_url: &str) -> Config {
    let mut config = Config::default();
    config.database.url = database_url.to_owned();
    config.redis.url = redis_url();
    config.redis.key_prefix = format!("test:{}:", Uuid::new_v4().simple());
    config.auth.argon2_memory_kib = 64;
    config.auth.argon2_iterations = 1;
    config.worker.instance_id = Some(INSTANCE.into());
    config
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// [`spawn_app`] with `tweak` applied to the configuration first.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let database = TestDb::create().await;
    let mut config = test_config(&database.url);
    tweak(&mut config);
    serve_app(config, Some(database), true).await
}

/// Serves a worker built from `config` exactly as given (`migrate`: apply migrations first).
/// `database`, when given, is dropped with the app.
pub async fn serve_app(config: Config, database: Option<TestDb>, migrate: bool) -> TestApp {
    init_tracing();
    let redis_prefix = config.redis.key_prefix.clone();
    let shutdown = CancellationToken::new();
    let state = AppState::new(config, shutdown.clone(), migrate)
        .await
        .expect("building the app state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(taskd::worker::serve(listener, state.clone()));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    TestApp {
        addr,
        base_url: format!("http://{addr}"),
        client,
        db: state.db.pool().clone(),
        state,
        redis_prefix,
        shutdown,
        _database: database,
    }
}

impl TestApp {
    /// A second worker of the same deployment: same database and Redis key prefix (it shares
    /// the cache, rate limits and idempotency keys), its own pool, Redis client and port.
    pub async fn spawn_peer(&self) -> TestApp {
        self.spawn_peer_with(|_| {}).await
    }

    /// [`TestApp::spawn_peer`] with `tweak` applied to a copy of this worker's configuration.
    pub async fn spawn_peer_with(&self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = (*self.state.config).clone();
        tweak(&mut config);
        serve_app(config, None, false).await
    }
}

/// A response, read completely.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    /// The body as JSON; `Null` when empty or not JSON.
    pub body: Value,
}

impl Resp {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("reading the response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            text,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Panics (showing the body) unless the status is `expected`.
    #[track_caller]
    pub fn expect(&self, expected: u16) -> &Value {
        assert_eq!(
            self.status.as_u16(),
            expected,
            "unexpected status; body: {}",
            self.text
        );
        &self.body
    }
}

/// A signed-in user.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: Uuid,
    pub email: String,
    pub user: Value,
    pub access: String,
    pub refresh: String,
}

impl Session {
    pub fn from_auth(body: &Value) -> Self {
        Self {
            id: uuid(&body["user"]["id"]),
            email: body["user"]["email"].as_str().unwrap().to_owned(),
            user: body["user"].clone(),
            access: body["accessToken"].as_str().unwrap().to_owned(),
            refresh: body["refreshToken"].as_str().unwrap().to_owned(),
        }
    }

    pub fn token(&self) -> &str {
        &self.access
    }
}

/// The UUID in a JSON string.
#[track_caller]
pub fn uuid(value: &Value) -> Uuid {
    value
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("expected a UUID, got {value}"))
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A request to `path`, with `Authorization: Bearer <token>` when a token is given.
    pub fn request<'a>(
        &self,
        method: Method,
        path: &str,
        token: impl Into<Option<&'a str>>,
    ) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, self.url(path));
        match token.into() {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    pub async fn send(&self, builder: reqwest::RequestBuilder) -> Resp {
        Resp::read(builder.send().await.expect("sending the request")).await
    }

    pub async fn get<'a>(&self, path: &str, token: impl Into<Option<&'a str>>) -> Resp {
        self.send(self.request(Method::GET, path, token)).await
    }

    pub async fn delete<'a>(&self, path: &str, token: impl Into<Option<&'a str>>) -> Resp {
        self.send(self.request(Method::DELETE, path, token)).await
    }

    pub async fn post<'a>(
        &self,
        path: &str,
        token: impl Into<Option<&'a str>>,
        body: &Value,
    ) -> Resp {
        self.send(self.request(Method::POST, path, token).json(body))
            .await
    }

    pub async fn patch<'a>(
        &self,
        path: &str,
        token: impl Into<Option<&'a str>>,
        body: &Value,
    ) -> Resp {
        self.send(self.request(Method::PATCH, path, token).json(body))
            .await
    }

    /// Sends `body` verbatim with the given `Content-Type`.
    pub async fn send_raw<'a>(
        &self,
        method: Method,
        path: &str,
        token: impl Into<Option<&'a str>>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Resp {
        self.send(
            self.request(method, path, token)
                .header(CONTENT_TYPE, content_type)
                .body(body),
        )
        .await
    }

    pub async fn register_with(&self, email: &str, password: &str, name: &str) -> Resp {
        self.post(
            "/api/v1/auth/register",
            None,
            &json!({"email": email, "password": password, "name": name}),
        )
        .await
    }

    /// Registers `email` with [`PASSWORD`]; panics unless it answers 201.
    pub async fn register(&self, email: &str) -> Session {
        let resp = self.register_with(email, PASSWORD, "Test User").await;
        Session::from_auth(resp.expect(201))
    }

    pub async fn login(&self, email: &str, password: &str) -> Resp {
        self.post(
            "/api/v1/auth/login",
            None,
            &json!({"email": email, "password": password}),
        )
        .await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Resp {
        self.post(
            "/api/v1/auth/refresh",
            None,
            &json!({"refreshToken": refresh_token}),
        )
        .await
    }

    /// Registers `email`, makes it an admin in the database and signs in again, so the access
    /// token carries the admin role.
    pub async fn register_admin(&self, email: &str) -> Session {
        let session = self.register(email).await;
        sqlx::query("UPDATE users SET role = 'admin' WHERE id = $1")
            .bind(session.id)
            .execute(&self.db)
            .await
            .unwrap();
        let resp = self.login(email, PASSWORD).await;
        let admin = Session::from_auth(resp.expect(200));
        assert_eq!(admin.user["role"], "admin");
        admin
    }

    /// Creates a task; panics unless it answers 201.
    pub async fn create_task(&self, token: &str, body: &Value) -> Value {
        self.post("/api/v1/tasks", token, body)
            .await
            .expect(201)
            .clone()
    }

    /// Creates a category; panics unless it answers 201.
    pub async fn create_category(&self, token: &str, name: &str) -> Value {
        self.post("/api/v1/categories", token, &json!({"name": name}))
            .await
            .expect(201)
            .clone()
    }

    pub async fn count(&self, sql: &str, id: Uuid) -> i64 {
        sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }
}

/// Asserts `resp` is an RFC 9457 problem with `status` as every error must be: problem+json with
/// `type, title, status, detail, requestId`, the request id equal to `X-Request-Id`, and
/// `X-Served-By` set. Returns the body.
#[track_caller]
pub fn assert_problem(resp: &Resp, status: u16) -> &Value {
    let body = resp.expect(status);
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/problem+json"),
        "content-type {content_type:?} for {}",
        resp.text
    );
    for field in ["type", "title", "detail", "requestId"] {
        assert!(
            body[field].as_str().is_some_and(|s| !s.is_empty()),
            "problem field {field} missing in {}",
            resp.text
        );
    }
    assert_eq!(body["status"], status, "{}", resp.text);
    let request_id = resp.header("x-request-id").expect("X-Request-Id header");
    assert_eq!(body["requestId"], request_id);
    assert_eq!(resp.header("x-served-by"), Some(INSTANCE));
    if status == 401 {
        let challenge = resp.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer"),
            "WWW-Authenticate {challenge:?}"
        );
    }
    body
}

/// Asserts a 422 (or a 400 with `errors`) names `field` among its `errors`.
#[track_caller]
pub fn assert_field_error(resp: &Resp, status: u16, field: &str) {
    let body = assert_problem(resp, status);
    let errors = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in {}", resp.text));
    assert!(
        errors
            .iter()
            .all(|e| e["field"].is_string() && e["message"].as_str().is_some_and(|m| !m.is_empty())),
        "{}",
        resp.text
    );
    assert!(
        errors.iter().any(|e| e["field"] == field),
        "no error on {field} in {}",
        resp.text
    );
}

/// The keys of a JSON object, sorted.
pub fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .unwrap_or_else(|| panic!("expected an object, got {value}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}
