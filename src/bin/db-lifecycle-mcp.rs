//! `db-lifecycle-mcp`: the MCP bridge sidecar. Speaks MCP to agents (stdio or
//! streamable HTTP) and forwards every tool call to the db-lifecycle gRPC service.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use db_lifecycle::mcp::{
    BridgeSettings, Credentials, LifecycleBridge, SecretToken, TokenShapeError, ToolNaming,
    forward::{ForwardTimeouts, ServiceClient, ServiceTls},
    http::{self, HttpOptions, MCP_PATH},
};
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "db-lifecycle-mcp",
    version,
    about = "MCP bridge to the db-lifecycle gRPC service: agents create, delete, describe and \
             follow PostgreSQL databases through tools; the service decides"
)]
struct Cli {
    /// gRPC address of the db-lifecycle service.
    #[arg(
        long,
        env = "DB_LIFECYCLE_MCP_SERVICE_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    service_url: String,
    /// CA certificates (PEM) to verify an https:// service with; default: the system's.
    #[arg(long, env = "DB_LIFECYCLE_MCP_SERVICE_CA_FILE")]
    service_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a service with mutual TLS; with --client-key-file.
    #[arg(long, env = "DB_LIFECYCLE_MCP_CLIENT_CERT_FILE")]
    client_cert_file: Option<PathBuf>,
    /// Key (PEM) of --client-cert-file.
    #[arg(long, env = "DB_LIFECYCLE_MCP_CLIENT_KEY_FILE")]
    client_key_file: Option<PathBuf>,
    /// Name the service's certificate must carry, when it is not the URL's host.
    #[arg(long, env = "DB_LIFECYCLE_MCP_SERVICE_TLS_NAME")]
    service_tls_name: Option<String>,
    /// stdio: one local agent starts the bridge as a child process. http: streamable
    /// HTTP at /mcp, each request's bearer token forwarded.
    #[arg(
        long,
        value_enum,
        env = "DB_LIFECYCLE_MCP_TRANSPORT",
        default_value = "stdio"
    )]
    transport: Transport,
    /// Listen address for --transport http.
    #[arg(
        long,
        env = "DB_LIFECYCLE_MCP_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: SocketAddr,
    /// Name of the environment variable holding the agent's token (--transport stdio).
    #[arg(
        long,
        env = "DB_LIFECYCLE_MCP_TOKEN_ENV",
        default_value = "DB_LIFECYCLE_TOKEN"
    )]
    token_env: String,
    /// Offer only `describe` (the lifecycle tool is marked read-only). The variable
    /// takes true/false, yes/no, on/off or 1/0.
    #[arg(long, env = "DB_LIFECYCLE_MCP_READ_ONLY", value_parser = clap::builder::BoolishValueParser::new())]
    read_only: bool,
    /// Comma separated environments to offer (others are refused by the bridge).
    /// Unset: any environment is forwarded and the service's allowlist decides.
    #[arg(long, env = "DB_LIFECYCLE_MCP_ENVIRONMENTS")]
    environments: Option<String>,
    /// Tool names: dotted (database.lifecycle), underscore (database_lifecycle), or both.
    #[arg(
        long,
        value_enum,
        env = "DB_LIFECYCLE_MCP_TOOL_NAMES",
        default_value = "dotted"
    )]
    tool_names: ToolNaming,
    /// Comma separated Host values accepted over HTTP (host or host:port), e.g. the
    /// pod's service name. Default: loopback only (localhost, 127.0.0.1, ::1).
    #[arg(long, env = "DB_LIFECYCLE_MCP_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Comma separated browser Origins accepted over HTTP (scheme://host[:port]).
    /// Default: Origin is not checked (agents are not browsers).
    #[arg(long, env = "DB_LIFECYCLE_MCP_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Largest HTTP request body accepted (bytes); larger ones get 413.
    #[arg(long, env = "DB_LIFECYCLE_MCP_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    max_body_bytes: usize,
    /// Timeout for connecting to the service.
    #[arg(long, env = "DB_LIFECYCLE_MCP_CONNECT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Timeout for one call to the service.
    #[arg(long, env = "DB_LIFECYCLE_MCP_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Log format on stderr (stdout carries MCP in stdio mode).
    #[arg(
        long,
        value_enum,
        env = "DB_LIFECYCLE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    Stdio,
    Http,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(
        "no token: set the environment variable {0} to this agent's db-lifecycle token \
         (or name another variable with --token-env)"
    )]
    MissingToken(String),
    #[error("the token in {0} is not usable: {1}")]
    BadToken(String, TokenShapeError),
    #[error(
        "--environments (DB_LIFECYCLE_MCP_ENVIRONMENTS) is set but names no environment; \
         unset it to offer every environment the service allows, or list the ones to offer"
    )]
    EmptyEnvironments,
    #[error("--max-body-bytes must be at least 1024")]
    BodyLimitTooSmall,
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("DB_LIFECYCLE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rmcp=warn,h2=warn,tower=warn,hyper=warn"));
    // Logs go to stderr: in stdio mode stdout is the MCP channel.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in an MCP client's log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("db-lifecycle-mcp: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Cancelled on SIGTERM or Ctrl-C.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        cancel.cancel();
    });
    token
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let environments = match cli.environments.as_deref() {
        None => None,
        // Set but empty is refused: silently offering every environment is the
        // opposite of what whoever set the variable meant.
        Some(raw) => Some(
            BridgeSettings::parse_environments(Some(raw)).ok_or(StartError::EmptyEnvironments)?,
        ),
    };
    let settings = BridgeSettings {
        read_only: cli.read_only,
        environments,
        tool_naming: cli.tool_names,
        ..BridgeSettings::default()
    };
    let service = ServiceClient::new(
        &cli.service_url,
        ForwardTimeouts {
            connect: cli.connect_timeout,
            request: cli.request_timeout,
        },
        &ServiceTls {
            ca_file: cli.service_ca_file.clone(),
            client_cert_file: cli.client_cert_file.clone(),
            client_key_file: cli.client_key_file.clone(),
            domain: cli.service_tls_name.clone(),
        },
    )?;
    let shutdown = shutdown_on_signal();
    tracing::info!(
        service_url = %cli.service_url,
        read_only = settings.read_only,
        environments = ?settings.environments,
        tool_names = ?settings.tool_naming,
        "db-lifecycle-mcp starting"
    );
    match cli.transport {
        Transport::Stdio => {
            let raw = std::env::var(&cli.token_env)
                .map_err(|_| StartError::MissingToken(cli.token_env.clone()))?;
            let token = SecretToken::new(raw).map_err(|reason| match reason {
                TokenShapeError::Missing => StartError::MissingToken(cli.token_env.clone()),
                _ => StartError::BadToken(cli.token_env.clone(), reason),
            })?;
            let bridge = LifecycleBridge::new(settings, service, Credentials::Fixed(token));
            let running = bridge
                .serve_with_ct(rmcp::transport::stdio_pipes(), shutdown.clone())
                .await?;
            let reason = running.waiting().await?;
            tracing::info!(?reason, "stdio session ended");
            Ok(())
        }
        Transport::Http => {
            if cli.max_body_bytes < 1024 {
                return Err(StartError::BodyLimitTooSmall.into());
            }
            if std::env::var_os(&cli.token_env).is_some() {
                tracing::warn!(
                    "{} is set but ignored over HTTP: each request's own bearer token is used",
                    cli.token_env
                );
            }
            let bridge = LifecycleBridge::new(settings, service, Credentials::PerRequestBearer);
            let options = HttpOptions {
                allowed_hosts: cli
                    .allowed_hosts
                    .into_iter()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .collect(),
                allowed_origins: cli
                    .allowed_origins
                    .into_iter()
                    .map(|o| o.trim().to_string())
                    .filter(|o| !o.is_empty())
                    .collect(),
                max_body_bytes: cli.max_body_bytes,
            };
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                if let Ok(addr) = ready_rx.await {
                    // A stable line on stdout that scripts and tests wait for.
                    println!("db-lifecycle-mcp listening on http://{addr}{MCP_PATH}");
                }
            });
            http::serve(bridge, cli.listen, options, shutdown, Some(ready_tx)).await?;
            Ok(())
        }
    }
}
