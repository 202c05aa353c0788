//! The command line: parses flags into configuration overrides and runs the chosen role.

use std::{
    io::BufRead,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::{
    config::{Config, LogFormat},
    worker::model::{Role, Tier},
};

/// taskd: task API server, load balancer and supervisor in one binary.
#[derive(Debug, Parser)]
#[command(name = "taskd", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file [default: ./config.toml when present].
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format (overrides telemetry.log_format).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level or filter, e.g. `debug` or `taskd=debug,sqlx=warn` (overrides telemetry.log_level).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One-command local cluster: migrations, N workers, the proxy and the admin listener;
    /// workers are probed, restarted, and rolled on SIGHUP.
    Serve(ServeArgs),
    /// Run the load balancer alone, in front of workers anywhere.
    Proxy(ProxyArgs),
    /// Run the API alone (default 0.0.0.0:3000); applies pending migrations first.
    Worker(WorkerArgs),
    /// Apply pending database migrations (creating the database when missing) and exit.
    Migrate,
    /// Manage users from the command line.
    #[command(subcommand)]
    User(UserCommand),
    /// Print the effective configuration (secrets redacted); exit non-zero when it is invalid.
    Config,
    /// Load realistic demo or benchmark data: users with categories and tasks.
    Seed(crate::seed::SeedArgs),
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address clients connect to (overrides proxy.listen) [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// An upstream worker, `http://host:port`, optionally with its share: "http://host:port
    /// weight=3"; repeat for each. Replaces proxy.upstreams.
    #[arg(long = "upstream", value_name = "URL", value_parser = parse_upstream)]
    pub upstreams: Vec<String>,
    /// A name whose every address is an upstream, `host:port` (e.g. a Kubernetes headless
    /// Service), resolved again every proxy.dns_interval; repeat for each. Replaces
    /// proxy.upstream_dns.
    #[arg(long = "upstream-dns", value_name = "HOST:PORT", value_parser = parse_dns)]
    pub upstream_dns: Vec<String>,
    /// Address of /status and /metrics (overrides admin.listen) [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// HTTPS flags of `serve` and `proxy`.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// PEM certificate chain for HTTPS, server certificate first, e.g. an ACME client's
    /// fullchain.pem (overrides proxy.tls.cert; needs --tls-key). Read again on SIGHUP and when
    /// the file changes.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (overrides proxy.tls.key).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Address of the HTTPS listener (overrides proxy.tls.listen) [default: 0.0.0.0:8443].
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,
}

impl TlsArgs {
    fn overrides(&self, proxy: &mut serde_json::Map<String, Value>) {
        let mut tls = serde_json::Map::new();
        if let Some(cert) = &self.tls_cert {
            tls.insert("cert".into(), json!(cert));
        }
        if let Some(key) = &self.tls_key {
            tls.insert("key".into(), json!(key));
        }
        if let Some(listen) = self.tls_listen {
            tls.insert("listen".into(), json!(listen));
        }
        if !tls.is_empty() {
            proxy.insert("tls".into(), Value::Object(tls));
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Worker processes (overrides supervisor.instances) [default: 4].
    #[arg(long, value_name = "N")]
    pub instances: Option<u16>,
    /// Address clients connect to (overrides proxy.listen) [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// First worker port; workers use 127.0.0.1 ports P..P+N-1, and P+N is kept spare for
    /// rolling restarts (overrides supervisor.base_port) [default: 3000].
    #[arg(long, value_name = "P")]
    pub base_port: Option<u16>,
    /// Address of the dashboard, /status and /metrics (overrides admin.listen)
    /// [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

fn parse_upstream(raw: &str) -> Result<String, String> {
    let (url, weight) = crate::config::parse_upstream(raw)?;
    Ok(if weight == 1 {
        url
    } else {
        format!("{url} weight={weight}")
    })
}

fn parse_dns(raw: &str) -> Result<String, String> {
    crate::config::parse_dns_target(raw).map(|_| raw.to_owned())
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Port to listen on (overrides worker.port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Address to bind (overrides worker.host).
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Name reported in X-Served-By and logs [default: <hostname>:<port>].
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Shut down gracefully when stdin reaches end of file: how `taskd serve` makes its workers
    /// exit when it is gone, even after SIGKILL (it holds the other end of a pipe).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password comes from TASKD_PASSWORD or the first line of stdin.
    Create {
        /// Email address (unique).
        #[arg(long)]
        email: String,
        /// Display name [default: the part of the email before @].
        #[arg(long)]
        name: Option<String>,
        /// `user` or `admin`.
        #[arg(long, default_value = "user", value_parser = parse_role)]
        role: Role,
        /// `free`, `pro` or `enterprise`.
        #[arg(long, default_value = "free", value_parser = parse_tier)]
        tier: Tier,
    },
}

fn parse_role(raw: &str) -> Result<Role, String> {
    Role::parse(raw).ok_or_else(|| format!("expected one of {}", Role::expected()))
}

fn parse_tier(raw: &str) -> Result<Tier, String> {
    Tier::parse(raw).ok_or_else(|| format!("expected one of {}", Tier::expected()))
}

impl Cli {
    /// The command-line flags as a configuration layer.
    fn overrides(&self) -> Value {
        let mut telemetry = serde_json::Map::new();
        if let Some(format) = self.log_format {
            telemetry.insert("log_format".into(), json!(format));
        }
        if let Some(level) = &self.log_level {
            telemetry.insert("log_level".into(), json!(level));
        }
        let mut worker = serde_json::Map::new();
        if let Command::Worker(args) = &self.command {
            if let Some(port) = args.port {
                worker.insert("port".into(), json!(port));
            }
            if let Some(host) = args.host {
                worker.insert("host".into(), json!(host));
            }
            if let Some(id) = &args.instance_id {
                worker.insert("instance_id".into(), json!(id));
            }
        }
        let mut proxy = serde_json::Map::new();
        let mut admin = serde_json::Map::new();
        let mut supervisor = serde_json::Map::new();
        if let Command::Serve(args) = &self.command {
            if let Some(instances) = args.instances {
                supervisor.insert("instances".into(), json!(instances));
            }
            if let Some(port) = args.base_port {
                supervisor.insert("base_port".into(), json!(port));
            }
            if let Some(listen) = args.listen {
                proxy.insert("listen".into(), json!(listen));
            }
            if let Some(listen) = args.admin_listen {
                admin.insert("listen".into(), json!(listen));
            }
            args.tls.overrides(&mut proxy);
        }
        if let Command::Proxy(args) = &self.command {
            if let Some(listen) = args.listen {
                proxy.insert("listen".into(), json!(listen));
            }
            if !args.upstreams.is_empty() {
                proxy.insert("upstreams".into(), json!(args.upstreams));
            }
            if !args.upstream_dns.is_empty() {
                proxy.insert("upstream_dns".into(), json!(args.upstream_dns));
            }
            if let Some(listen) = args.admin_listen {
                admin.insert("listen".into(), json!(listen));
            }
            args.tls.overrides(&mut proxy);
        }
        json!({
            "telemetry": telemetry,
            "worker": worker,
            "proxy": proxy,
            "admin": admin,
            "supervisor": supervisor,
        })
    }
}

/// Runs the parsed command line; the process exit code says whether it worked.
pub fn run(cli: Cli) -> ExitCode {
    let config = match Config::load(cli.config.as_deref(), cli.overrides()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("taskd: {error}");
            return ExitCode::from(2);
        }
    };
    if let Command::Config = cli.command {
        print!("{}", config.redacted_toml());
        // The TLS files are configuration too: a pair that would stop `serve` or `proxy` at
        // start-up fails here.
        if let Some((cert, key)) = config.proxy.tls.files()
            && let Err(error) = crate::proxy::tls::load(cert, key)
        {
            eprintln!("taskd: {error}");
            return ExitCode::from(2);
        }
        return ExitCode::SUCCESS;
    }
    crate::telemetry::init(&config.telemetry);
    let config_json = config.telemetry.log_format == crate::config::LogFormat::Json;
    // The proxy serves clients on threads of its own; its main runtime only runs health checks,
    // the admin listener and (under `serve`) the supervisor, so one thread is enough.
    let runtime = match &cli.command {
        Command::Proxy(_) | Command::Serve(_) => tokio::runtime::Builder::new_current_thread(),
        // One thread (what `serve` gives each worker when instances >= CPUs): the
        // single-threaded scheduler, which wakes tasks without cross-thread hand-offs.
        Command::Worker(_) if config.worker.threads == 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Command::Worker(_) if config.worker.threads > 1 => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(config.worker.threads);
            builder
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let reloader: crate::config::Reloader = {
        let (file, overrides) = (cli.config.clone(), cli.overrides());
        std::sync::Arc::new(move || Config::load(file.as_deref(), overrides.clone()))
    };
    let result = runtime.block_on(dispatch(
        cli.command,
        cli.config.as_deref(),
        config,
        reloader,
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // One line: a JSON log line for JSON logs (what a log pipeline reads), else plain text
        // on stderr.
        Err(error) => {
            if config_json {
                tracing::error!("{error:#}");
            } else {
                eprintln!("taskd: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(
    command: Command,
    config_path: Option<&Path>,
    config: Config,
    reloader: crate::config::Reloader,
) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => {
            let launch = crate::supervisor::Launch::current(config_path, &config)?;
            crate::supervisor::run(config, launch, reloader, crate::shutdown::on_signal()).await
        }
        Command::Worker(args) => {
            let shutdown = crate::shutdown::on_signal();
            if args.exit_on_stdin_eof {
                crate::shutdown::cancel_on_stdin_eof(shutdown.clone());
            }
            crate::worker::run(config, shutdown).await
        }
        Command::Proxy(_) => {
            crate::proxy::run(config, reloader, crate::shutdown::on_signal()).await
        }
        Command::Migrate => {
            crate::db::migrate(&config.database).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::User(UserCommand::Create {
            email,
            name,
            role,
            tier,
        }) => create_user(&config, &email, name.as_deref(), role, tier).await,
        Command::Seed(args) => crate::seed::run(&config, &args).await,
        Command::Config => Ok(()),
    }
}

/// `taskd user create`: the password from `TASKD_PASSWORD` or the first line of stdin; prints
/// the user as JSON.
async fn create_user(
    config: &Config,
    email: &str,
    name: Option<&str>,
    role: Role,
    tier: Tier,
) -> anyhow::Result<()> {
    let password = match std::env::var("TASKD_PASSWORD") {
        Ok(password) => password,
        Err(_) => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    let user =
        crate::worker::users::create_offline(config, email, name, &password, role, tier).await?;
    println!("{}", serde_json::to_string_pretty(&user)?);
    Ok(())
}
