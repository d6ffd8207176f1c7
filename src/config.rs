//! Configuration: a TOML file plus environment variables.
//!
//! Precedence (highest first): environment variables, the file, built-in defaults.
//! Unknown keys and wrong types fail at start with the key path in the message.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::Deserialize;

use crate::domain::{Action, ApprovalMode, PrincipalKind, Role};

/// The exact variable name from the seed.
pub const ALLOWED_ENVS_VAR: &str = "CODEXK8S_PROJECT_DB_LIFECYCLE_ALLOWED_ENVS";
/// Used when the variable (and the file key) is unset or empty.
pub const FALLBACK_ALLOWED_ENVS: &str = "dev,staging,ai-staging,prod";
pub const DEFAULT_NAME_PATTERN: &str = "^[a-z_][a-z0-9_-]*$";
pub const DEFAULT_TARGET: &str = "default";
/// Environment variable holding the run-token signing secret (wins over `secret_file`).
pub const RUN_TOKEN_SECRET_VAR: &str = "DB_LIFECYCLE_RUN_TOKEN_SECRET";
/// Default `iss` and `aud` of run tokens.
pub const DEFAULT_RUN_TOKEN_ISSUER: &str = "db-lifecycle";
pub const DEFAULT_RUN_TOKEN_AUDIENCE: &str = "db-lifecycle";
/// HS256 keys shorter than the hash output weaken the MAC (RFC 7518 §3.2).
pub const MIN_RUN_TOKEN_SECRET_BYTES: usize = 32;
/// Upper bounds of the size settings.
const MAX_POOL_SIZE: usize = 1_000;
const MAX_CONNECTIONS_LIMIT: usize = 100_000;

/// Default `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default `max_connections_per_peer` (lowered to `max_connections` when that is
/// smaller): one host cannot take more than an eighth of the default cap.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 64;
/// Default `database_timeout`: connecting, waiting for a pooled connection, and each
/// statement on the metadata database and each catalog statement on a target.
pub const DEFAULT_DATABASE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `ddl_timeout`: each CREATE/ALTER/DROP DATABASE on a target.
pub const DEFAULT_DDL_TIMEOUT: Duration = Duration::from_secs(300);
/// Bounds of `database_timeout` (a bound of minutes would be no bound for a caller).
const DATABASE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(600));
/// Upper bound of `ddl_timeout`.
const MAX_DDL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: key `{key}`: {message}")]
    Key {
        path: String,
        key: String,
        message: String,
    },
    #[error("config: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A PostgreSQL URL whose password never reaches logs, errors or audit payloads.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The full URL, for handing to the PostgreSQL driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced, safe to print.
    pub fn redacted(&self) -> String {
        // Rebuilt from the parsed parts, so no spelling of the password (userinfo,
        // `?password=`, `password = '...'`) can survive; the password is never read.
        let Ok(cfg) = self.pg_config() else {
            return "<unparsable connection string>".to_string();
        };
        let hosts: Vec<String> = cfg
            .get_hosts()
            .iter()
            .zip(cfg.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(h, p)| match h {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
                tokio_postgres::config::Host::Unix(path) => format!("{}:{p}", path.display()),
            })
            .collect();
        let password = if cfg.get_password().is_some() {
            ":***"
        } else {
            ""
        };
        let tls = match self.tls() {
            Ok(t) if t.mode != crate::admin::tls::SslMode::Prefer => {
                format!("?sslmode={}", t.mode.as_str())
            }
            _ => String::new(),
        };
        format!(
            "postgres://{}{password}@{}/{}{tls}",
            cfg.get_user().unwrap_or(""),
            hosts.join(","),
            cfg.get_dbname().unwrap_or("")
        )
    }
    /// The driver's configuration (TLS negotiation mode included); the certificate
    /// parameters are in `tls()`.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, String> {
        let (rest, tls) = crate::admin::tls::split_tls_params(&self.0)?;
        let mut cfg = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| format!("not a valid PostgreSQL URL ({e})"))?;
        cfg.ssl_mode(tls.driver_mode());
        Ok(cfg)
    }
    /// The libpq TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
    pub fn tls(&self) -> Result<crate::admin::tls::PgTls, String> {
        crate::admin::tls::split_tls_params(&self.0).map(|(_, tls)| tls)
    }
}

/// A connection string that parses, with TLS settings whose files can be read.
fn check_pg_url(url: &SecretUrl) -> Result<(), String> {
    url.pg_config()?;
    url.tls()?.connector()?;
    Ok(())
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

// ---------- the file format ----------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    metadata_url: Option<SecretUrl>,
    admin_url: Option<SecretUrl>,
    allowed_environments: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde::option")]
    request_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    recovery_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    shutdown_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    database_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    ddl_timeout: Option<Duration>,
    migrate_on_start: Option<bool>,
    admin_pool_size: Option<usize>,
    metadata_pool_size: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_peer: Option<usize>,
    #[serde(default)]
    names: NamesFile,
    #[serde(default)]
    protected_databases: Vec<String>,
    #[serde(default)]
    approval: ApprovalFile,
    #[serde(default)]
    targets: BTreeMap<String, TargetFile>,
    #[serde(default)]
    environments: BTreeMap<String, EnvironmentFile>,
    #[serde(default)]
    principals: Vec<PrincipalFile>,
    #[serde(default)]
    fault_points: Vec<String>,
    run_tokens: Option<RunTokensFile>,
    tls: Option<TlsFile>,
    #[serde(default)]
    audit: AuditFile,
}

/// `[audit]`: how many refusals of calls without valid credentials are recorded.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    unauthenticated_refusals_per_second: Option<u32>,
    unauthenticated_refusal_burst: Option<u32>,
}

/// `[run_tokens]`: short-lived HS256 JWTs minted per agent run (see docs/security.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunTokensFile {
    secret_file: Option<PathBuf>,
    issuer: Option<String>,
    audience: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    leeway: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    max_ttl: Option<Duration>,
    allowed_kinds: Option<Vec<PrincipalKind>>,
}

/// `[tls]`: PEM files for the gRPC listener; `client_ca_file` turns on mutual TLS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamesFile {
    pattern: Option<String>,
    max_bytes: Option<usize>,
    hint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalFile {
    create: Option<ApprovalMode>,
    delete: Option<ApprovalMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    admin_url: SecretUrl,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvironmentFile {
    target: Option<String>,
    create_approval: Option<ApprovalMode>,
    delete_approval: Option<ApprovalMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalFile {
    id: String,
    kind: PrincipalKind,
    #[serde(default)]
    projects: Vec<String>,
    #[serde(default)]
    roles: Vec<Role>,
    /// Hex SHA-256 of the bearer token; the token itself is never stored.
    token_sha256: String,
}

// ---------- the resolved configuration ----------

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metadata_url: SecretUrl,
    pub allowed_environments: Vec<String>,
    pub request_ttl: Duration,
    pub recovery_interval: Duration,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Bound of connecting to PostgreSQL, waiting for a pooled connection, and of
    /// each statement on the metadata database and each catalog statement on a
    /// target (a lock wait gets its own wait on top).
    pub database_timeout: Duration,
    /// Bound of each CREATE/ALTER/DROP DATABASE on a target; at least
    /// `database_timeout`.
    pub ddl_timeout: Duration,
    pub migrate_on_start: bool,
    pub admin_pool_size: usize,
    pub metadata_pool_size: usize,
    /// Open gRPC connections accepted at once (more are closed on accept).
    pub max_connections: usize,
    /// Open gRPC connections accepted at once from one peer IP address (more from
    /// that address are closed on accept); at most `max_connections`.
    pub max_connections_per_peer: usize,
    pub names: NameRulesConfig,
    /// Configured extra protected names (the built-in ones are added by policy).
    pub protected_databases: Vec<String>,
    pub targets: BTreeMap<String, SecretUrl>,
    pub environments: BTreeMap<String, EnvironmentConfig>,
    pub default_approval: ApprovalModes,
    pub principals: Vec<PrincipalConfig>,
    /// Test-only: names of apply steps at which the process aborts (fault injection).
    pub fault_points: BTreeSet<String>,
    /// Signed per-run bearer tokens, accepted besides static tokens (None = off).
    pub run_tokens: Option<RunTokenConfig>,
    /// TLS (and mutual TLS) for the gRPC listener (None = plaintext).
    pub tls: Option<TlsConfig>,
    /// Budget for recording refusals of unauthenticated calls (anyone can make them).
    pub unauthenticated_audit: RefusalBudgetConfig,
}

/// A token bucket: `burst` rows at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalBudgetConfig {
    pub per_second: u32,
    pub burst: u32,
}

/// The HS256 signing secret of run tokens. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RunTokenSecret(Vec<u8>);

impl RunTokenSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }
    /// The key bytes, for signing and verifying only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    /// Read a secret file: its bytes with surrounding ASCII whitespace (a trailing
    /// newline) removed.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let raw = std::fs::read(path)
            .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
        Ok(Self(raw.trim_ascii().to_vec()))
    }
    fn check(&self, key: &str) -> Result<(), ConfigError> {
        if self.0.len() < MIN_RUN_TOKEN_SECRET_BYTES {
            return Err(invalid(
                key,
                format!(
                    "the run-token secret must be at least {MIN_RUN_TOKEN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for RunTokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunTokenSecret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct RunTokenConfig {
    pub secret: RunTokenSecret,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Longest accepted lifetime (`exp - iat`).
    pub max_ttl: Duration,
    /// Principal kinds a run token may carry.
    pub allowed_kinds: Vec<PrincipalKind>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Set: clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct NameRulesConfig {
    pub pattern: String,
    pub max_bytes: usize,
    pub hint: String,
}

#[derive(Debug, Clone, Copy)]
pub struct ApprovalModes {
    pub create: ApprovalMode,
    pub delete: ApprovalMode,
}

impl ApprovalModes {
    pub fn for_action(&self, action: Action) -> ApprovalMode {
        match action {
            Action::Delete => self.delete,
            _ => self.create,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EnvironmentConfig {
    pub target: String,
    pub approval: ApprovalModes,
}

#[derive(Clone)]
pub struct PrincipalConfig {
    pub id: String,
    pub kind: PrincipalKind,
    pub projects: Vec<String>,
    pub roles: BTreeSet<Role>,
    pub token_sha256: [u8; 32],
}

impl fmt::Debug for PrincipalConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrincipalConfig")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("projects", &self.projects)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// Values that come from the command line or environment rather than the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub metadata_url: Option<String>,
    pub admin_url: Option<String>,
    /// The raw value of `CODEXK8S_PROJECT_DB_LIFECYCLE_ALLOWED_ENVS` (None when unset).
    pub allowed_envs_var: Option<String>,
    /// `DB_LIFECYCLE_RUN_TOKEN_SECRET` (None when unset or empty).
    pub run_token_secret: Option<RunTokenSecret>,
}

impl Overrides {
    pub fn from_env() -> Self {
        Self {
            listen: std::env::var("DB_LIFECYCLE_LISTEN").ok(),
            metadata_url: std::env::var("DB_LIFECYCLE_METADATA_URL").ok(),
            admin_url: std::env::var("DB_LIFECYCLE_ADMIN_URL").ok(),
            allowed_envs_var: std::env::var(ALLOWED_ENVS_VAR).ok(),
            run_token_secret: std::env::var(RUN_TOKEN_SECRET_VAR)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .map(RunTokenSecret::new),
        }
    }
}

/// Only the `[run_tokens]` section of a config file (None = no file), for minting
/// tokens where the rest of the service's configuration is not at hand.
pub fn load_run_tokens(
    path: Option<&Path>,
    overrides: &Overrides,
) -> Result<Option<RunTokenConfig>, ConfigError> {
    let file = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?;
            parse_file(&text, &p.display().to_string())?
        }
        None => FileConfig::default(),
    };
    resolve_run_tokens(file.run_tokens, overrides)
}

fn resolve_run_tokens(
    file: Option<RunTokensFile>,
    ov: &Overrides,
) -> Result<Option<RunTokenConfig>, ConfigError> {
    let Some(file) = file else {
        if ov.run_token_secret.is_some() {
            return Err(invalid(
                RUN_TOKEN_SECRET_VAR,
                "is set but run tokens are not configured: add a [run_tokens] section",
            ));
        }
        return Ok(None);
    };
    let secret = match (&ov.run_token_secret, &file.secret_file) {
        (Some(s), _) => {
            s.check(RUN_TOKEN_SECRET_VAR)?;
            s.clone()
        }
        (None, Some(path)) => {
            let s = RunTokenSecret::from_file(path)
                .map_err(|m| invalid("run_tokens.secret_file", m))?;
            s.check("run_tokens.secret_file")?;
            s
        }
        (None, None) => {
            return Err(invalid(
                "run_tokens.secret_file",
                format!("required (or set {RUN_TOKEN_SECRET_VAR})"),
            ));
        }
    };
    let text = |key: &str, v: Option<String>, default: &str| -> Result<String, ConfigError> {
        let v = v.unwrap_or_else(|| default.to_string());
        if v.trim().is_empty() || v.chars().any(char::is_control) {
            return Err(invalid(
                format!("run_tokens.{key}"),
                "must be non-empty printable text",
            ));
        }
        Ok(v)
    };
    let issuer = text("issuer", file.issuer, DEFAULT_RUN_TOKEN_ISSUER)?;
    let audience = text("audience", file.audience, DEFAULT_RUN_TOKEN_AUDIENCE)?;
    let leeway = file.leeway.unwrap_or(Duration::from_secs(30));
    if leeway > Duration::from_secs(300) {
        return Err(invalid("run_tokens.leeway", "at most 5m"));
    }
    let max_ttl = file.max_ttl.unwrap_or(Duration::from_secs(3600));
    if max_ttl.as_secs() == 0 || max_ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err(invalid("run_tokens.max_ttl", "must be 1s..=7d"));
    }
    let allowed_kinds = file.allowed_kinds.unwrap_or_else(|| {
        vec![
            PrincipalKind::Agent,
            PrincipalKind::Service,
            PrincipalKind::Human,
        ]
    });
    if allowed_kinds.is_empty() {
        return Err(invalid(
            "run_tokens.allowed_kinds",
            "must name at least one kind (remove [run_tokens] to turn run tokens off)",
        ));
    }
    Ok(Some(RunTokenConfig {
        secret,
        issuer,
        audience,
        leeway,
        max_ttl,
        allowed_kinds,
    }))
}

/// Parse a comma separated environment list: trimmed, lower-cased, empties dropped.
pub fn parse_env_list(raw: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in raw.split(',') {
        let env = item.trim().to_lowercase();
        if !env.is_empty() && !out.contains(&env) {
            out.push(env);
        }
    }
    out
}

/// Hex SHA-256 of a bearer token, the form principals are configured with.
pub fn token_sha256_hex(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Config {
    /// Load from an optional TOML file, then apply overrides.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (file, path_label) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                (
                    parse_file(&text, &p.display().to_string())?,
                    p.display().to_string(),
                )
            }
            None => (FileConfig::default(), "<none>".to_string()),
        };
        let _ = path_label;
        resolve(file, overrides)
    }

    /// Parse TOML text (used by tests and by `dev`).
    pub fn from_toml(text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        resolve(parse_file(text, "<inline>")?, overrides)
    }

    pub fn environment(&self, env: &str) -> Option<&EnvironmentConfig> {
        self.environments.get(env)
    }

    /// Approval mode for an allowed environment and action.
    pub fn approval_mode(&self, env: &str, action: Action) -> ApprovalMode {
        self.environments
            .get(env)
            .map(|e| e.approval)
            .unwrap_or(self.default_approval)
            .for_action(action)
    }

    /// The target cluster an environment's databases live on.
    pub fn target_for(&self, env: &str) -> &str {
        self.environments
            .get(env)
            .map(|e| e.target.as_str())
            .unwrap_or(DEFAULT_TARGET)
    }
}

fn parse_file(text: &str, path: &str) -> Result<FileConfig, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Key {
        path: path.to_string(),
        key: "<syntax>".into(),
        message: e.to_string(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Key {
        path: path.to_string(),
        key: e.path().to_string(),
        message: e.inner().message().to_string(),
    })
}

fn resolve(file: FileConfig, ov: &Overrides) -> Result<Config, ConfigError> {
    let listen_raw = ov
        .listen
        .clone()
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:50051".to_string());
    let listen = listen_raw
        .parse::<SocketAddr>()
        .map_err(|e| invalid("listen", format!("`{listen_raw}` is not host:port ({e})")))?;

    for (var, value) in [
        ("DB_LIFECYCLE_METADATA_URL", &ov.metadata_url),
        ("DB_LIFECYCLE_ADMIN_URL", &ov.admin_url),
        ("DB_LIFECYCLE_LISTEN", &ov.listen),
    ] {
        // Set but empty is a deployment mistake (an empty secret, say), not "unset".
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(invalid(
                var,
                "is set but empty; give it a value or unset it",
            ));
        }
    }
    let metadata_url = ov
        .metadata_url
        .clone()
        .map(SecretUrl::new)
        .or(file.metadata_url)
        .ok_or_else(|| {
            invalid(
                "metadata_url",
                "required (or set DB_LIFECYCLE_METADATA_URL)",
            )
        })?;
    check_pg_url(&metadata_url).map_err(|m| invalid("metadata_url", m))?;

    // Seed rule: the variable wins when set and non-empty; unset or empty falls back.
    let file_environments = match file
        .allowed_environments
        .as_ref()
        .map(|l| parse_env_list(&l.join(",")))
    {
        Some(list) if !list.is_empty() => list,
        _ => parse_env_list(FALLBACK_ALLOWED_ENVS),
    };
    let allowed_environments = match ov.allowed_envs_var.as_deref().map(parse_env_list) {
        Some(list) if !list.is_empty() => list,
        _ => file_environments.clone(),
    };
    for env in &allowed_environments {
        crate::policy::validate_environment_format(env)
            .map_err(|m| invalid("allowed_environments", m))?;
    }

    let mut targets: BTreeMap<String, SecretUrl> = BTreeMap::new();
    for (name, t) in file.targets {
        check_pg_url(&t.admin_url).map_err(|m| invalid(format!("targets.{name}.admin_url"), m))?;
        targets.insert(name, t.admin_url);
    }
    let admin_url = ov.admin_url.clone().map(SecretUrl::new).or(file.admin_url);
    if let Some(url) = admin_url {
        check_pg_url(&url).map_err(|m| invalid("admin_url", m))?;
        targets.insert(DEFAULT_TARGET.to_string(), url);
    }

    let default_approval = ApprovalModes {
        create: file.approval.create.unwrap_or(ApprovalMode::Owner),
        delete: file.approval.delete.unwrap_or(ApprovalMode::Owner),
    };

    // A section must name an environment the service knows: the file's list (or the
    // built-in one) or the variable's. A misspelt section would otherwise leave the
    // real environment on the default approval modes without a word. Sections for
    // environments the variable leaves out are fine: narrowing the variable is how
    // an operator takes an environment away.
    let known: BTreeSet<&String> = file_environments
        .iter()
        .chain(allowed_environments.iter())
        .collect();
    let mut environments = BTreeMap::new();
    for (raw_name, e) in file.environments {
        let name = raw_name.trim().to_lowercase();
        let key = format!("environments.{raw_name}");
        crate::policy::validate_environment_format(&name).map_err(|m| invalid(key.clone(), m))?;
        if !known.contains(&name) {
            return Err(invalid(
                key,
                format!(
                    "`{name}` is not an environment of this service (known: {}); a misspelt \
                     section would leave the environment on the default approval modes",
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if environments.contains_key(&name) {
            return Err(invalid(
                key,
                format!("a second section for environment `{name}` (names are case-insensitive)"),
            ));
        }
        let target = e.target.unwrap_or_else(|| DEFAULT_TARGET.to_string());
        if !targets.contains_key(&target) {
            return Err(invalid(
                format!("environments.{raw_name}.target"),
                format!("unknown target `{target}` (define [targets.{target}] or admin_url)"),
            ));
        }
        environments.insert(
            name,
            EnvironmentConfig {
                target,
                approval: ApprovalModes {
                    create: e.create_approval.unwrap_or(default_approval.create),
                    delete: e.delete_approval.unwrap_or(default_approval.delete),
                },
            },
        );
    }
    if !targets.contains_key(DEFAULT_TARGET)
        && allowed_environments
            .iter()
            .any(|env| !environments.contains_key(env))
    {
        return Err(invalid(
            "admin_url",
            "required (or set DB_LIFECYCLE_ADMIN_URL): some allowed environments have no target",
        ));
    }

    let names = NameRulesConfig {
        pattern: file
            .names
            .pattern
            .unwrap_or_else(|| DEFAULT_NAME_PATTERN.to_string()),
        max_bytes: file.names.max_bytes.unwrap_or(63),
        hint: file.names.hint.unwrap_or_else(|| {
            "use lowercase letters, digits, `_` and `-`, starting with a letter or `_` \
             (PostgreSQL folds unquoted names to lowercase, so mixed case would be \
             ambiguous)"
                .to_string()
        }),
    };
    if names.max_bytes == 0 || names.max_bytes > 63 {
        return Err(invalid(
            "names.max_bytes",
            "must be 1..=63 (PostgreSQL truncates identifiers at 63 bytes)",
        ));
    }
    let rules = crate::policy::NameRules::new(&names.pattern, names.max_bytes, &names.hint)
        .map_err(|e| invalid("names.pattern", e.to_string()))?;
    // An entry no valid name can equal (a typo, stray spaces, wrong case under a
    // lowercase rule) would silently protect nothing.
    for entry in &file.protected_databases {
        rules.validate(entry).map_err(|e| {
            invalid(
                "protected_databases",
                format!("`{entry}` can never match a database name this service accepts ({e})"),
            )
        })?;
    }

    let mut principals = Vec::new();
    let mut seen_ids = BTreeSet::new();
    let mut seen_tokens = std::collections::HashMap::new();
    for (i, p) in file.principals.into_iter().enumerate() {
        let key = format!("principals[{i}]");
        crate::policy::validate_principal_id(&p.id).map_err(|m| invalid(format!("{key}.id"), m))?;
        if !seen_ids.insert(p.id.to_lowercase()) {
            return Err(invalid(
                format!("{key}.id"),
                format!("duplicate id `{}`", p.id),
            ));
        }
        let raw = hex::decode(p.token_sha256.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                invalid(
                    format!("{key}.token_sha256"),
                    "must be 64 hex characters (SHA-256 of the token)",
                )
            })?;
        // One token, two principals: whichever the lookup kept would silently win
        // (an agent's token turning into an owner's, or the reverse).
        if let Some(first) = seen_tokens.insert(raw, p.id.clone()) {
            return Err(invalid(
                format!("{key}.token_sha256"),
                format!(
                    "the same token as principal `{first}`; every principal needs its own token"
                ),
            ));
        }
        for project in &p.projects {
            if project != "*" {
                crate::policy::validate_project_format(project)
                    .map_err(|m| invalid(format!("{key}.projects"), m))?;
            }
        }
        principals.push(PrincipalConfig {
            id: p.id,
            kind: p.kind,
            projects: p.projects,
            roles: p.roles.into_iter().collect(),
            token_sha256: raw,
        });
    }

    let run_tokens = resolve_run_tokens(file.run_tokens, ov)?;
    let tls = file.tls.map(|t| TlsConfig {
        cert_file: t.cert_file,
        key_file: t.key_file,
        client_ca_file: t.client_ca_file,
    });

    let recovery_interval = file.recovery_interval.unwrap_or(Duration::from_secs(5));
    if recovery_interval < Duration::from_millis(100) {
        return Err(invalid("recovery_interval", "must be at least 100ms"));
    }
    const HOUR: Duration = Duration::from_secs(3600);
    for (key, value, limit, limit_text) in [
        ("recovery_interval", file.recovery_interval, HOUR, "1h"),
        ("shutdown_grace", file.shutdown_grace, HOUR, "1h"),
        ("request_ttl", file.request_ttl, 365 * 24 * HOUR, "365 days"),
    ] {
        if value.is_some_and(|v| v > limit) {
            return Err(invalid(key, format!("must be at most {limit_text}")));
        }
    }
    for (key, size) in [
        ("admin_pool_size", file.admin_pool_size),
        ("metadata_pool_size", file.metadata_pool_size),
        ("max_connections", file.max_connections),
        ("max_connections_per_peer", file.max_connections_per_peer),
    ] {
        if size == Some(0) {
            return Err(invalid(key, "must be at least 1"));
        }
        // Far above any real deployment, far below what would exhaust memory or
        // overflow the limits of the pools and semaphores built from them.
        let limit = if key.starts_with("max_connections") {
            MAX_CONNECTIONS_LIMIT
        } else {
            MAX_POOL_SIZE
        };
        if size.is_some_and(|n| n > limit) {
            return Err(invalid(key, format!("must be at most {limit}")));
        }
    }
    let max_connections = file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    // Unset, the per-peer cap follows a lower `max_connections` down; set, it must
    // fit under it (a larger value would be a cap that never applies).
    let max_connections_per_peer = match file.max_connections_per_peer {
        None => DEFAULT_MAX_CONNECTIONS_PER_PEER.min(max_connections),
        Some(n) if n > max_connections => {
            return Err(invalid(
                "max_connections_per_peer",
                format!("must not exceed max_connections ({max_connections}), got {n}"),
            ));
        }
        Some(n) => n,
    };
    let request_ttl = file.request_ttl.unwrap_or(Duration::from_secs(24 * 3600));
    if request_ttl.is_zero() {
        return Err(invalid("request_ttl", "must be positive"));
    }
    let database_timeout = file.database_timeout.unwrap_or(DEFAULT_DATABASE_TIMEOUT);
    let (low, high) = DATABASE_TIMEOUT_RANGE;
    if database_timeout < low || database_timeout > high {
        return Err(invalid(
            "database_timeout",
            format!(
                "must be between {} and {}, got {}",
                humantime::format_duration(low),
                humantime::format_duration(high),
                humantime::format_duration(database_timeout)
            ),
        ));
    }
    let ddl_timeout = file
        .ddl_timeout
        .unwrap_or(DEFAULT_DDL_TIMEOUT.max(database_timeout));
    if ddl_timeout < database_timeout || ddl_timeout > MAX_DDL_TIMEOUT {
        return Err(invalid(
            "ddl_timeout",
            format!(
                "must be between database_timeout ({}) and {}, got {}",
                humantime::format_duration(database_timeout),
                humantime::format_duration(MAX_DDL_TIMEOUT),
                humantime::format_duration(ddl_timeout)
            ),
        ));
    }

    Ok(Config {
        listen,
        metadata_url,
        allowed_environments,
        request_ttl,
        recovery_interval,
        shutdown_grace: file.shutdown_grace.unwrap_or(Duration::from_secs(20)),
        database_timeout,
        ddl_timeout,
        migrate_on_start: file.migrate_on_start.unwrap_or(true),
        admin_pool_size: file.admin_pool_size.unwrap_or(8),
        metadata_pool_size: file.metadata_pool_size.unwrap_or(24),
        max_connections,
        max_connections_per_peer,
        names,
        protected_databases: file.protected_databases,
        targets,
        environments,
        default_approval,
        principals,
        fault_points: file.fault_points.into_iter().collect(),
        run_tokens,
        tls,
        unauthenticated_audit: RefusalBudgetConfig {
            per_second: file.audit.unauthenticated_refusals_per_second.unwrap_or(20),
            burst: file.audit.unauthenticated_refusal_burst.unwrap_or(100),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> &'static str {
        "metadata_url = \"postgres://u:secretpw@127.0.0.1:5432/meta\"\nadmin_url = \"postgres://u:secretpw@127.0.0.1:5432/postgres\"\n"
    }

    #[test]
    fn allowlist_variable_is_trimmed_and_case_folded() {
        let ov = Overrides {
            allowed_envs_var: Some(" DEV , staging ".into()),
            ..Default::default()
        };
        let c = Config::from_toml(base(), &ov).unwrap();
        assert_eq!(c.allowed_environments, vec!["dev", "staging"]);
    }

    #[test]
    fn empty_or_unset_allowlist_falls_back() {
        for var in [None, Some(String::new()), Some(" , ".to_string())] {
            let ov = Overrides {
                allowed_envs_var: var,
                ..Default::default()
            };
            let c = Config::from_toml(base(), &ov).unwrap();
            assert_eq!(
                c.allowed_environments,
                vec!["dev", "staging", "ai-staging", "prod"]
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{}[names]\npatern = \"x\"\n", base());
        let err = Config::from_toml(&text, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("names"), "{err}");
        assert!(err.contains("patern"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = format!(
            "{}[[principals]]\nid = \"a\"\nkind = \"robot\"\ntoken_sha256 = \"00\"\n",
            base()
        );
        let err = Config::from_toml(&text, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("principals[0].kind") || err.contains("principals.0.kind"),
            "{err}"
        );
    }

    fn config_error(text: &str, ov: &Overrides) -> String {
        Config::from_toml(text, ov).unwrap_err().to_string()
    }

    #[test]
    fn environment_sections_must_name_a_known_environment_once() {
        let none = Overrides::default();
        // A typo: staging would silently keep the default modes.
        let typo = format!(
            "{}[approval]\ncreate = \"none\"\n[environments.stagin]\ncreate_approval = \"owner\"\n",
            base()
        );
        let err = config_error(&typo, &none);
        assert!(err.contains("environments.stagin"), "{err}");
        assert!(err.contains("not an environment of this service"), "{err}");
        // Two sections for one environment, differing in case.
        let twice = format!(
            "{}[environments.prod]\ncreate_approval = \"none\"\n[environments.PROD]\ncreate_approval = \"owner\"\n",
            base()
        );
        let err = config_error(&twice, &none);
        assert!(err.contains("a second section"), "{err}");
        // A section for an environment the variable takes away is fine (that is how
        // an environment is taken away), and one only the variable adds too.
        let narrowed = Overrides {
            allowed_envs_var: Some("dev,qa".into()),
            ..Default::default()
        };
        let text = format!(
            "{}[environments.prod]\ncreate_approval = \"owner\"\n[environments.qa]\ncreate_approval = \"none\"\n",
            base()
        );
        let c = Config::from_toml(&text, &narrowed).unwrap();
        assert_eq!(c.allowed_environments, vec!["dev", "qa"]);
        assert!(c.environment("qa").is_some() && c.environment("prod").is_some());
    }

    #[test]
    fn sizes_and_durations_are_bounded_and_empty_variables_refused() {
        let none = Overrides::default();
        for (line, key) in [
            ("request_ttl = \"300000y\"", "request_ttl"),
            ("recovery_interval = \"2h\"", "recovery_interval"),
            ("shutdown_grace = \"2h\"", "shutdown_grace"),
            ("metadata_pool_size = 100000000000", "metadata_pool_size"),
            ("admin_pool_size = 5000", "admin_pool_size"),
            ("max_connections = 18446744073709551615", "max_connections"),
        ] {
            let err = config_error(&format!("{}{line}\n", base()), &none);
            assert!(err.contains(key), "{line}: {err}");
        }
        for (var, ov) in [
            (
                "DB_LIFECYCLE_ADMIN_URL",
                Overrides {
                    admin_url: Some(String::new()),
                    ..Default::default()
                },
            ),
            (
                "DB_LIFECYCLE_METADATA_URL",
                Overrides {
                    metadata_url: Some(" ".into()),
                    ..Default::default()
                },
            ),
        ] {
            let err = config_error(base(), &ov);
            assert!(err.contains(var) && err.contains("empty"), "{err}");
        }
    }

    #[test]
    fn principals_need_their_own_token_and_an_id_of_their_own() {
        let principal = |id: &str, hash: &str| {
            format!("[[principals]]\nid = \"{id}\"\nkind = \"human\"\ntoken_sha256 = \"{hash}\"\n")
        };
        let one = "11".repeat(32);
        let two = "22".repeat(32);
        let text = format!(
            "{}{}{}",
            base(),
            principal("alice", &one),
            principal("ci-bot", &one)
        );
        let err = Config::from_toml(&text, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("principals[1].token_sha256"), "{err}");
        assert!(err.contains("`alice`"), "{err}");
        // Case-insensitive duplicates and the service's own actor ids are refused.
        for (second, key) in [
            ("ALICE", "principals[1].id"),
            ("db-lifecycle", "principals[1].id"),
            ("DB-Lifecycle", "principals[1].id"),
            ("policy:none", "principals[1].id"),
            ("system:x", "principals[1].id"),
            ("bob\u{200b}", "principals[1].id"),
            (" bob", "principals[1].id"),
            ("\u{0430}lice", "principals[1].id"),
            ("bob smith", "principals[1].id"),
        ] {
            let text = format!(
                "{}{}{}",
                base(),
                principal("alice", &one),
                principal(second, &two)
            );
            let err = Config::from_toml(&text, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{second:?}: {err}");
        }
        let text = format!(
            "{}{}{}",
            base(),
            principal("alice", &one),
            principal("bob", &two)
        );
        assert_eq!(
            Config::from_toml(&text, &Overrides::default())
                .unwrap()
                .principals
                .len(),
            2
        );
    }

    #[test]
    fn secret_url_is_redacted() {
        let u = SecretUrl::new("postgres://u:secretpw@h:5432/db");
        assert!(!format!("{u:?}").contains("secretpw"));
        assert!(!u.redacted().contains("secretpw"));
        for form in [
            "host=h password=secretpw dbname=x",
            "host=h password = secretpw dbname=x",
            "host=h password='secretpw xx' dbname=x",
            "postgres://u@h:5432/db?password=secretpw",
            "postgresql://u:secretpw@h1:1,h2:2/db",
        ] {
            let redacted = SecretUrl::new(form).redacted();
            assert!(!redacted.contains("secretpw"), "{form} -> {redacted}");
            assert!(!redacted.contains("xx"), "{form} -> {redacted}");
        }
    }

    #[test]
    fn run_tokens_need_a_long_secret_and_never_print_it() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "tooshort\n").unwrap();
        let text = format!(
            "{}[run_tokens]\nsecret_file = {:?}\n",
            base(),
            short.display().to_string()
        );
        let err = Config::from_toml(&text, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("run_tokens.secret_file"), "{err}");

        let long = dir.path().join("long");
        let secret = "s3cr3t-".repeat(8);
        std::fs::write(&long, format!("{secret}\n")).unwrap();
        let text = format!(
            "{}[run_tokens]\nsecret_file = {:?}\nmax_ttl = \"15m\"\n",
            base(),
            long.display().to_string()
        );
        let c = Config::from_toml(&text, &Overrides::default()).unwrap();
        let rt = c.run_tokens.as_ref().unwrap();
        assert_eq!(rt.secret.expose(), secret.as_bytes(), "newline trimmed");
        assert_eq!(rt.max_ttl, Duration::from_secs(900));
        assert_eq!(rt.issuer, DEFAULT_RUN_TOKEN_ISSUER);
        assert!(!format!("{c:?}").contains("s3cr3t"));

        // The variable wins over the file.
        let ov = Overrides {
            run_token_secret: Some(RunTokenSecret::new("v".repeat(40))),
            ..Default::default()
        };
        let c = Config::from_toml(&text, &ov).unwrap();
        assert_eq!(
            c.run_tokens.unwrap().secret.expose(),
            "v".repeat(40).as_bytes()
        );
        // ...but does not turn run tokens on by itself.
        let err = Config::from_toml(base(), &ov).unwrap_err().to_string();
        assert!(err.contains(RUN_TOKEN_SECRET_VAR), "{err}");
        assert!(!format!("{ov:?}").contains("vvvv"));
    }

    #[test]
    fn max_connections_per_peer_defaults_and_bounds() {
        let parse =
            |extra: &str| Config::from_toml(&format!("{}{extra}", base()), &Overrides::default());
        let c = parse("").unwrap();
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.max_connections_per_peer, DEFAULT_MAX_CONNECTIONS_PER_PEER);
        // Unset, it follows a lower max_connections down.
        let c = parse("max_connections = 3\n").unwrap();
        assert_eq!(c.max_connections_per_peer, 3);
        let c = parse("max_connections = 100\nmax_connections_per_peer = 100\n").unwrap();
        assert_eq!(c.max_connections_per_peer, 100);
        let c = parse("max_connections_per_peer = 1\n").unwrap();
        assert_eq!(c.max_connections_per_peer, 1);
        for (extra, want) in [
            ("max_connections_per_peer = 0\n", "must be at least 1"),
            (
                "max_connections = 10\nmax_connections_per_peer = 11\n",
                "must not exceed max_connections (10)",
            ),
            (
                "max_connections_per_peer = 513\n",
                "must not exceed max_connections (512)",
            ),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains("max_connections_per_peer"), "{extra}: {err}");
            assert!(err.contains(want), "{extra}: {err}");
        }
        let err = parse("max_connections_per_peer = -1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_connections_per_peer"), "{err}");
    }

    #[test]
    fn database_and_ddl_timeouts_default_and_bounds() {
        let parse =
            |extra: &str| Config::from_toml(&format!("{}{extra}", base()), &Overrides::default());
        let c = parse("").unwrap();
        assert_eq!(c.database_timeout, DEFAULT_DATABASE_TIMEOUT);
        assert_eq!(c.ddl_timeout, DEFAULT_DDL_TIMEOUT);
        let c = parse("database_timeout = \"2s\"\nddl_timeout = \"2s\"\n").unwrap();
        assert_eq!(c.database_timeout, Duration::from_secs(2));
        assert_eq!(c.ddl_timeout, Duration::from_secs(2));
        // A database_timeout above the default DDL bound raises the DDL bound with it.
        let c = parse("database_timeout = \"10m\"\n").unwrap();
        assert_eq!(c.ddl_timeout, Duration::from_secs(600));
        for (extra, key, want) in [
            (
                "database_timeout = \"0s\"\n",
                "database_timeout",
                "between 100ms and 10m",
            ),
            (
                "database_timeout = \"50ms\"\n",
                "database_timeout",
                "got 50ms",
            ),
            (
                "database_timeout = \"11m\"\n",
                "database_timeout",
                "got 11m",
            ),
            (
                "ddl_timeout = \"1s\"\n",
                "ddl_timeout",
                "database_timeout (5s)",
            ),
            ("ddl_timeout = \"2d\"\n", "ddl_timeout", "got 2days"),
            ("database_timeout = \"soon\"\n", "database_timeout", ""),
            ("ddl_timeout = 30\n", "ddl_timeout", ""),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    #[test]
    fn bad_token_hash_is_named() {
        let text = format!(
            "{}[[principals]]\nid = \"a\"\nkind = \"human\"\ntoken_sha256 = \"nothex\"\n",
            base()
        );
        let err = Config::from_toml(&text, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("principals[0].token_sha256"), "{err}");
    }
}
