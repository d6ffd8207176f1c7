//! What a bridge instance offers (narrowing, tool names) and whose identity it uses.

use std::{fmt, time::Duration};

use crate::config::parse_env_list;

/// Longest `wait_seconds` the request-following tool accepts.
pub const MAX_WAIT_SECONDS: u64 = 300;

/// Which names the tools are listed under. Some model APIs reject dots in tool
/// names, so the same tools can also (or instead) be offered with underscores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolNaming {
    /// `database.lifecycle`, `database.request_status` (the canonical names).
    Dotted,
    /// `database_lifecycle`, `database_request_status`.
    Underscore,
    /// Both sets; each underscore tool is an alias of its dotted twin.
    Both,
}

impl ToolNaming {
    pub fn offers_dotted(self) -> bool {
        matches!(self, ToolNaming::Dotted | ToolNaming::Both)
    }
    pub fn offers_underscore(self) -> bool {
        matches!(self, ToolNaming::Underscore | ToolNaming::Both)
    }
}

/// Server-side narrowing and behaviour of one bridge.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    /// Offer only `describe`; refuse `create` and `delete` even if a client sends them.
    pub read_only: bool,
    /// When set, the only environments offered (lower-cased, trimmed); others are
    /// refused by the bridge. When unset, any environment is forwarded and the
    /// service's own allowlist decides.
    pub environments: Option<Vec<String>>,
    pub tool_naming: ToolNaming,
    /// How often the request-following tool polls `GetRequest` while waiting.
    pub poll_interval: Duration,
    /// How long a person has to answer a delete confirmation (legacy clients, where
    /// the bridge waits for the answer inside the tool call).
    pub confirmation_timeout: Duration,
}

impl Default for BridgeSettings {
    fn default() -> Self {
        Self {
            read_only: false,
            environments: None,
            tool_naming: ToolNaming::Dotted,
            poll_interval: Duration::from_secs(1),
            confirmation_timeout: Duration::from_secs(300),
        }
    }
}

impl BridgeSettings {
    /// Parse `--environments`: comma separated, trimmed, case-folded like the
    /// service does; an empty list means "no narrowing".
    pub fn parse_environments(raw: Option<&str>) -> Option<Vec<String>> {
        raw.map(parse_env_list).filter(|list| !list.is_empty())
    }

    /// Is this environment offered? Compared the way the service normalises names.
    pub fn offers_environment(&self, environment: &str) -> bool {
        match &self.environments {
            None => true,
            Some(list) => {
                let wanted = environment.trim().to_lowercase();
                list.contains(&wanted)
            }
        }
    }
}

/// Longest bearer token the bridge forwards. Real tokens (static ones, run-token
/// JWTs) are well under 1 KiB; a huge one would make the service's HTTP/2 layer
/// refuse the header, or close the connection every agent shares.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a bearer token was not taken (never quoting the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenShapeError {
    #[error("missing bearer token: send `Authorization: Bearer <your db-lifecycle token>`")]
    Missing,
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("the token has characters other than visible ASCII")]
    BadCharacters,
}

/// A bearer token. Never printed: `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(String);

impl SecretToken {
    /// A token as given (surrounding whitespace trimmed): non-empty, at most
    /// [`MAX_TOKEN_BYTES`], visible ASCII only (what a header can carry unchanged).
    pub fn new(raw: impl Into<String>) -> Result<Self, TokenShapeError> {
        let raw = raw.into();
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(TokenShapeError::Missing);
        }
        if trimmed.len() > MAX_TOKEN_BYTES {
            return Err(TokenShapeError::TooLong);
        }
        if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenShapeError::BadCharacters);
        }
        Ok(Self(trimmed.to_string()))
    }
    /// The token itself, for the `authorization` metadata of a gRPC call only.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// SHA-256 of the token: what the bridge keeps to tell tokens apart.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.0.as_bytes()).into()
    }
    /// Parse an `Authorization` header value: `Bearer <token>` (scheme case-insensitive).
    pub fn from_authorization_header(value: &str) -> Result<Self, TokenShapeError> {
        let (scheme, token) = value
            .trim()
            .split_once(' ')
            .ok_or(TokenShapeError::Missing)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(TokenShapeError::Missing);
        }
        Self::new(token)
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken(***)")
    }
}

/// Whose identity the bridge forwards to the service.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// stdio: one local agent, its token read once from an environment variable.
    Fixed(SecretToken),
    /// Streamable HTTP: each HTTP request's own `Authorization: Bearer` token, so
    /// every agent behind one sidecar acts as itself.
    PerRequestBearer,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parsing() {
        let t = SecretToken::from_authorization_header("Bearer abc").unwrap();
        assert_eq!(t.expose(), "abc");
        assert!(SecretToken::from_authorization_header("bearer  abc ").is_ok());
        assert!(SecretToken::from_authorization_header("Basic abc").is_err());
        assert!(SecretToken::from_authorization_header("Bearer ").is_err());
        assert!(SecretToken::from_authorization_header("Bearer").is_err());
        let longest = "t".repeat(MAX_TOKEN_BYTES);
        assert!(SecretToken::from_authorization_header(&format!("Bearer {longest}")).is_ok());
        assert_eq!(
            SecretToken::from_authorization_header(&format!("Bearer {longest}x")),
            Err(TokenShapeError::TooLong)
        );
        assert_eq!(
            SecretToken::new("ab\u{7f}c"),
            Err(TokenShapeError::BadCharacters)
        );
        assert_eq!(
            SecretToken::new("ab c"),
            Err(TokenShapeError::BadCharacters)
        );
    }

    #[test]
    fn tokens_are_never_printed() {
        let t = SecretToken::new("very-secret").unwrap();
        assert!(!format!("{t:?}").contains("very-secret"));
    }

    #[test]
    fn environment_narrowing_normalises_like_the_service() {
        let settings = BridgeSettings {
            environments: BridgeSettings::parse_environments(Some(" Dev, staging ,")),
            ..BridgeSettings::default()
        };
        assert!(settings.offers_environment("DEV "));
        assert!(settings.offers_environment("staging"));
        assert!(!settings.offers_environment("prod"));
        assert!(BridgeSettings::parse_environments(Some(" , ")).is_none());
    }
}
