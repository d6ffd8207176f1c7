//! `db-lifecycle`: serve, migrate, run a local dev stack, hash tokens.

use std::{io::Read, net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use db_lifecycle::{
    config::{Config, Overrides, token_sha256_hex},
    devcluster::TempCluster,
    repository::migrate::migrate,
    server,
};
use rand::Rng;

#[derive(Parser)]
#[command(
    name = "db-lifecycle",
    version,
    about = "PostgreSQL database lifecycle over gRPC, behind policy, ownership, approvals and audit"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "DB_LIFECYCLE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve {
        /// TOML configuration file.
        #[arg(long, short, env = "DB_LIFECYCLE_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address (overrides the file), e.g. 0.0.0.0:50051.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Apply database migrations to the metadata database and exit.
    Migrate {
        #[arg(long, short, env = "DB_LIFECYCLE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Start a throwaway local PostgreSQL and the service with dev tokens.
    Dev {
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: String,
        /// Also write address, tokens and URLs as JSON to this file (for scripts).
        #[arg(long)]
        state_file: Option<PathBuf>,
    },
    /// Print the SHA-256 of a bearer token (read from stdin) for `token_sha256`.
    HashToken,
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("DB_LIFECYCLE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,hyper=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("db-lifecycle: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, listen } => {
            let mut overrides = Overrides::from_env();
            if listen.is_some() {
                overrides.listen = listen;
            }
            let config = Config::load(config.as_deref(), &overrides)?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                if let Ok(addr) = rx.await {
                    // A stable line on stdout that scripts and tests wait for.
                    println!("db-lifecycle listening on {addr}");
                }
            });
            server::run(config, server::shutdown_signal(), Some(tx)).await
        }
        Command::Migrate { config } => {
            let config = Config::load(config.as_deref(), &Overrides::from_env())?;
            let applied = migrate(&config.metadata_url).await?;
            println!(
                "migrations applied: {}",
                if applied.is_empty() {
                    "none (up to date)".to_string()
                } else {
                    applied.join(", ")
                }
            );
            Ok(())
        }
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin().read_to_string(&mut token)?;
            let token = token.trim();
            anyhow::ensure!(!token.is_empty(), "no token on stdin");
            println!("{}", token_sha256_hex(token));
            Ok(())
        }
        Command::Dev { listen, state_file } => dev(listen, state_file).await,
    }
}

fn random_token(prefix: &str) -> String {
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("{prefix}_{suffix}")
}

/// A throwaway cluster plus the service, with one principal of each useful kind.
async fn dev(listen: String, state_file: Option<PathBuf>) -> anyhow::Result<()> {
    let listen_addr: SocketAddr = listen.parse()?;
    eprintln!("starting a throwaway PostgreSQL cluster...");
    let cluster = TempCluster::start().await?;
    cluster.create_database("db_lifecycle_meta").await?;
    let agent = random_token("agent");
    let owner = random_token("owner");
    let other = random_token("other");
    let other_agent = random_token("agent");
    let admin = random_token("admin");
    let text = format!(
        r#"
metadata_url = "{meta}"
admin_url = "{admin_url}"

[[principals]]
id = "demo-agent"
kind = "agent"
projects = ["demo"]
roles = ["requester"]
token_sha256 = "{agent_h}"

[[principals]]
id = "alice"
kind = "human"
projects = ["demo"]
roles = ["owner", "requester"]
token_sha256 = "{owner_h}"

[[principals]]
id = "bob"
kind = "human"
projects = ["other"]
roles = ["owner", "requester"]
token_sha256 = "{other_h}"

[[principals]]
id = "other-agent"
kind = "agent"
projects = ["other"]
roles = ["requester"]
token_sha256 = "{other_agent_h}"

[[principals]]
id = "root"
kind = "human"
projects = ["*"]
roles = ["admin"]
token_sha256 = "{admin_h}"
"#,
        meta = cluster.url("db_lifecycle_meta"),
        admin_url = cluster.url("postgres"),
        agent_h = token_sha256_hex(&agent),
        owner_h = token_sha256_hex(&owner),
        other_h = token_sha256_hex(&other),
        other_agent_h = token_sha256_hex(&other_agent),
        admin_h = token_sha256_hex(&admin),
    );
    let mut overrides = Overrides::from_env();
    overrides.listen = Some(listen_addr.to_string());
    // `dev` owns its URLs: ignore DB_LIFECYCLE_*_URL from the environment.
    overrides.metadata_url = None;
    overrides.admin_url = None;
    let config = Config::from_toml(&text, &overrides)?;
    let envs = config.allowed_environments.join(",");

    let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let server = tokio::spawn(server::run(config, server::shutdown_signal(), Some(tx)));
    let addr = match rx.await {
        Ok(a) => a,
        Err(_) => return server.await?,
    };
    if let Some(path) = state_file {
        let state = serde_json::json!({
            "address": addr.to_string(),
            "tokens": {
                "requester": agent,
                "approver": owner,
                "other_project": other,
                "other_agent": other_agent,
                "admin": admin,
            },
            "admin_url": cluster.url("postgres"),
            "metadata_url": cluster.url("db_lifecycle_meta"),
            "pg_port": cluster.port(),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&state)?)?;
    }
    println!(
        r#"
db-lifecycle (dev) is listening on {addr}
  PostgreSQL (throwaway): 127.0.0.1:{port}, data in {dir}
  allowed environments:   {envs}

Dev tokens (valid for this run only):
  requester  demo-agent (agent, project demo):  {agent}
  approver   alice (human, owner of demo):       {owner}
  other      bob (human, owner of other):        {other}
  agent 2    other-agent (agent, project other): {other_agent}
  admin      root (human, admin of *):           {admin}

Try it (grpcurl uses reflection; no proto files needed):
  grpcurl -plaintext -H 'authorization: Bearer {agent}' \
    -d '{{"environment":"dev","database_name":"orders"}}' \
    {addr} dblifecycle.v1.DatabaseLifecycle/Create

Stop with Ctrl-C; the cluster and its data are removed."#,
        port = cluster.port(),
        dir = cluster.dir().display(),
    );
    let result = server.await?;
    drop(cluster);
    result
}
