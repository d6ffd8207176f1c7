//! `db-lifecycle`: serve, migrate, run a local dev stack, hash tokens, mint run tokens.

use std::{io::Read, net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use db_lifecycle::{
    config::{
        Config, DEFAULT_RUN_TOKEN_AUDIENCE, DEFAULT_RUN_TOKEN_ISSUER, Overrides, RunTokenConfig,
        RunTokenSecret, load_run_tokens, token_sha256_hex,
    },
    devcluster::TempCluster,
    domain::{PrincipalKind, Role},
    repository::migrate::migrate,
    server,
    transport::run_tokens::{MintRequest, mint},
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
    /// Mint a run token (HS256 JWT) for one agent run and print it on stdout.
    ///
    /// The secret comes from DB_LIFECYCLE_RUN_TOKEN_SECRET, --secret-file, or the
    /// `[run_tokens]` section of --config (in that order), never from an argument.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Config file whose `[run_tokens]` section (secret_file, issuer, audience,
    /// max_ttl, allowed_kinds) applies; the rest of the file is not needed.
    #[arg(long, short, env = "DB_LIFECYCLE_CONFIG")]
    config: Option<PathBuf>,
    /// File holding the signing secret (overrides the config's secret_file).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// `iss` claim (default: the config's, else "db-lifecycle").
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` claim (default: the config's, else "db-lifecycle").
    #[arg(long)]
    audience: Option<String>,
    /// Principal id (`sub`).
    #[arg(long)]
    subject: String,
    #[arg(long, value_enum)]
    kind: KindArg,
    /// Project in scope (repeat for several; `*` for every project).
    #[arg(long = "project", required = true)]
    projects: Vec<String>,
    /// Role (repeat for several).
    #[arg(long = "role", value_enum)]
    roles: Vec<RoleArg>,
    /// Agent run id, recorded in logs and audit rows.
    #[arg(long)]
    run_id: Option<String>,
    /// Lifetime, e.g. 15m (at most the configured max_ttl, default 1h).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Agent,
    Service,
    Human,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Requester,
    Owner,
    Delegate,
    Admin,
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("DB_LIFECYCLE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,hyper=warn"));
    // Colours only on a terminal: log files and collectors get plain text.
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
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
        Command::Token(args) => {
            println!("{}", mint_token(args)?);
            Ok(())
        }
    }
}

fn mint_token(args: TokenArgs) -> anyhow::Result<String> {
    let overrides = Overrides::from_env();
    let from_file = match &args.config {
        Some(path) => Some(
            load_run_tokens(Some(path), &overrides)?
                .ok_or_else(|| anyhow::anyhow!("{} has no [run_tokens] section", path.display()))?,
        ),
        None => None,
    };
    let secret = match (&overrides.run_token_secret, &args.secret_file, &from_file) {
        (Some(s), _, _) => s.clone(),
        (None, Some(path), _) => RunTokenSecret::from_file(path).map_err(anyhow::Error::msg)?,
        (None, None, Some(cfg)) => cfg.secret.clone(),
        (None, None, None) => anyhow::bail!(
            "no signing secret: set DB_LIFECYCLE_RUN_TOKEN_SECRET, or pass --secret-file or --config"
        ),
    };
    anyhow::ensure!(
        secret.expose().len() >= db_lifecycle::config::MIN_RUN_TOKEN_SECRET_BYTES,
        "the signing secret must be at least {} bytes",
        db_lifecycle::config::MIN_RUN_TOKEN_SECRET_BYTES
    );
    let base = from_file.unwrap_or_else(|| RunTokenConfig {
        secret: secret.clone(),
        issuer: DEFAULT_RUN_TOKEN_ISSUER.into(),
        audience: DEFAULT_RUN_TOKEN_AUDIENCE.into(),
        leeway: std::time::Duration::from_secs(30),
        max_ttl: std::time::Duration::from_secs(3600),
        allowed_kinds: vec![
            PrincipalKind::Agent,
            PrincipalKind::Service,
            PrincipalKind::Human,
        ],
    });
    let cfg = RunTokenConfig {
        secret,
        issuer: args.issuer.unwrap_or(base.issuer),
        audience: args.audience.unwrap_or(base.audience),
        ..base
    };
    let req = MintRequest {
        subject: args.subject,
        kind: match args.kind {
            KindArg::Agent => PrincipalKind::Agent,
            KindArg::Service => PrincipalKind::Service,
            KindArg::Human => PrincipalKind::Human,
        },
        projects: args.projects,
        roles: args
            .roles
            .into_iter()
            .map(|r| match r {
                RoleArg::Requester => Role::Requester,
                RoleArg::Owner => Role::Owner,
                RoleArg::Delegate => Role::Delegate,
                RoleArg::Admin => Role::Admin,
            })
            .collect(),
        run_id: args.run_id,
        ttl: args.ttl,
    };
    mint(&cfg, &req).map_err(|e| anyhow::anyhow!("cannot mint: {e}"))
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
    // ...and its tokens: a run-token secret in the environment does not apply here.
    overrides.run_token_secret = None;
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
        // Tokens and the superuser password: readable by this user only.
        use anyhow::Context;
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let _ = std::fs::remove_file(&path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&serde_json::to_vec_pretty(&state)?))
            .with_context(|| format!("writing the state file {}", path.display()))?;
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
