//! Run tokens: short-lived bearer tokens an agent control plane mints per agent run,
//! besides the static tokens of `[[principals]]`.
//!
//! A run token is a JWT signed with HS256 under the configured secret
//! (`[run_tokens]`). Its claims carry the whole principal — subject, kind, project
//! scope, roles, an optional run id — plus issuer, audience, issue time and expiry.
//! Signing and verifying are done by the `jsonwebtoken` crate; this module only
//! decides which tokens are acceptable:
//!
//! - algorithm HS256 only (`alg=none` and every other algorithm are refused);
//! - signature under the configured secret;
//! - `iss` and `aud` equal to the configured ones;
//! - `exp` in the future and `nbf` (when present) in the past, within `leeway`;
//!   `iat` not in the future; `exp - iat` at most `max_ttl`;
//! - `kind`, `roles` and `projects` by the same rules as static principals, `kind`
//!   among `allowed_kinds`; unknown claims are refused (so a typo such as `role`
//!   never silently drops a restriction).
//!
//! The authenticator (`middleware::Authenticator`) is the only caller of `verify`.

use std::{
    collections::BTreeSet,
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{
    config::RunTokenConfig,
    domain::{Principal, PrincipalKind, Role},
    policy::{printable, validate_principal_id, validate_project_format},
};

const MAX_SUBJECT_CHARS: usize = 128;
const MAX_RUN_ID_LEN: usize = 128;

/// `aud` may be one string or a list (RFC 7519 §4.1.3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims of a run token. Every field but `nbf`, `jti` and `run_id` is required.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunClaims {
    pub iss: String,
    pub aud: Audience,
    /// The principal id.
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    pub kind: PrincipalKind,
    pub projects: Vec<String>,
    pub roles: Vec<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// Why a run token was refused. The text goes back to the caller and into the audit
/// trail, so it never contains the token or the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTokenError(pub String);

impl fmt::Display for RunTokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse(reason: impl Into<String>) -> RunTokenError {
    RunTokenError(reason.into())
}

/// Does this bearer token have the shape of a JWT (three base64url parts)?
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A run id is written to logs and audit rows: short and plain, like a correlation id.
pub fn valid_run_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_RUN_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The rules shared by minting and verifying: what a principal in a token may be.
fn check_principal(
    cfg: &RunTokenConfig,
    sub: &str,
    kind: PrincipalKind,
    projects: &[String],
    run_id: Option<&str>,
) -> Result<(), RunTokenError> {
    if sub.chars().count() > MAX_SUBJECT_CHARS {
        return Err(refuse(format!(
            "subject `{}` is longer than {MAX_SUBJECT_CHARS} characters",
            printable(sub)
        )));
    }
    validate_principal_id(sub).map_err(|m| refuse(format!("subject {m}")))?;
    if !cfg.allowed_kinds.contains(&kind) {
        return Err(refuse(format!(
            "kind `{}` is not accepted in run tokens here (allowed_kinds)",
            kind.as_str()
        )));
    }
    for p in projects {
        if p != "*" {
            validate_project_format(p).map_err(|m| refuse(format!("projects: {m}")))?;
        }
    }
    if let Some(run) = run_id
        && !valid_run_id(run)
    {
        return Err(refuse(format!(
            "run_id `{}` must be 1..={MAX_RUN_ID_LEN} characters of letters, digits, `-_.:/`",
            printable(run)
        )));
    }
    Ok(())
}

/// Verifies run tokens against one configuration.
pub struct RunTokenVerifier {
    key: DecodingKey,
    validation: Validation,
    config: RunTokenConfig,
}

impl fmt::Debug for RunTokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunTokenVerifier")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .finish_non_exhaustive()
    }
}

impl RunTokenVerifier {
    /// Fails only for an empty secret (configuration refuses short ones earlier).
    pub fn new(config: &RunTokenConfig) -> Result<Self, RunTokenError> {
        let key = DecodingKey::from_secret(config.secret.expose())
            .map_err(|e| refuse(format!("unusable secret: {e}")))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(Self {
            key,
            validation,
            config: config.clone(),
        })
    }

    /// The principal a valid run token stands for.
    pub fn verify(&self, token: &str) -> Result<Principal, RunTokenError> {
        self.verify_at(token, now_secs())
    }

    fn verify_at(&self, token: &str, now: u64) -> Result<Principal, RunTokenError> {
        let data =
            jsonwebtoken::decode::<RunClaims>(token, &self.key, &self.validation).map_err(|e| {
                refuse(match e.kind() {
                    ErrorKind::ExpiredSignature => "expired".to_string(),
                    ErrorKind::ImmatureSignature => "not valid yet (nbf)".to_string(),
                    ErrorKind::InvalidSignature => "signature does not verify".to_string(),
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        "algorithm not accepted (HS256 only)".to_string()
                    }
                    ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
                    ErrorKind::InvalidAudience => "wrong audience".to_string(),
                    ErrorKind::MissingRequiredClaim(c) => format!("missing claim `{c}`"),
                    // Claims are only parsed after the signature verified, so this
                    // text comes from the secret's holder; still shorten and escape.
                    ErrorKind::Json(err) => {
                        format!("malformed claims: {}", printable(&err.to_string()))
                    }
                    _ => "malformed token".to_string(),
                })
            })?;
        let c = data.claims;
        let leeway = self.config.leeway.as_secs();
        if c.iat > now.saturating_add(leeway) {
            return Err(refuse("issued in the future (iat)"));
        }
        if c.exp <= c.iat {
            return Err(refuse("exp is not after iat"));
        }
        let ttl = c.exp - c.iat;
        if ttl > self.config.max_ttl.as_secs() {
            return Err(refuse(format!(
                "lifetime {ttl}s exceeds the accepted maximum of {}s (max_ttl)",
                self.config.max_ttl.as_secs()
            )));
        }
        check_principal(
            &self.config,
            &c.sub,
            c.kind,
            &c.projects,
            c.run_id.as_deref(),
        )?;
        Ok(Principal {
            id: c.sub,
            kind: c.kind,
            projects: c.projects,
            roles: c.roles.into_iter().collect::<BTreeSet<Role>>(),
            run_id: c.run_id,
        })
    }
}

/// What to put in a new run token.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub subject: String,
    pub kind: PrincipalKind,
    pub projects: Vec<String>,
    pub roles: Vec<Role>,
    pub run_id: Option<String>,
    pub ttl: Duration,
}

/// Sign a run token that `RunTokenVerifier` (same configuration) accepts for `ttl`.
pub fn mint(cfg: &RunTokenConfig, req: &MintRequest) -> Result<String, RunTokenError> {
    if req.ttl.as_secs() == 0 {
        return Err(refuse("ttl must be at least 1s"));
    }
    if req.ttl > cfg.max_ttl {
        return Err(refuse(format!(
            "ttl {} exceeds max_ttl {}",
            humantime::format_duration(req.ttl),
            humantime::format_duration(cfg.max_ttl)
        )));
    }
    check_principal(
        cfg,
        &req.subject,
        req.kind,
        &req.projects,
        req.run_id.as_deref(),
    )?;
    let iat = now_secs();
    let claims = RunClaims {
        iss: cfg.issuer.clone(),
        aud: Audience::One(cfg.audience.clone()),
        sub: req.subject.clone(),
        iat,
        exp: iat + req.ttl.as_secs(),
        nbf: None,
        jti: Some(uuid::Uuid::new_v4().to_string()),
        kind: req.kind,
        projects: req.projects.clone(),
        roles: req.roles.clone(),
        run_id: req.run_id.clone(),
    };
    let key = EncodingKey::from_secret(cfg.secret.expose())
        .map_err(|e| refuse(format!("unusable secret: {e}")))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .map_err(|e| refuse(format!("cannot sign: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunTokenSecret;

    fn cfg() -> RunTokenConfig {
        RunTokenConfig {
            secret: RunTokenSecret::new(b"0123456789abcdef0123456789abcdef".to_vec()),
            issuer: "cp".into(),
            audience: "db-lifecycle".into(),
            leeway: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
            allowed_kinds: vec![PrincipalKind::Agent, PrincipalKind::Human],
        }
    }

    fn req() -> MintRequest {
        MintRequest {
            subject: "agent-7".into(),
            kind: PrincipalKind::Agent,
            projects: vec!["alpha".into()],
            roles: vec![Role::Requester],
            run_id: Some("run-42".into()),
            ttl: Duration::from_secs(600),
        }
    }

    fn sign(claims: &serde_json::Value, secret: &[u8], alg: Algorithm) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    fn claims(now: u64) -> serde_json::Value {
        serde_json::json!({
            "iss": "cp", "aud": "db-lifecycle", "sub": "agent-7",
            "iat": now, "exp": now + 600,
            "kind": "agent", "projects": ["alpha"], "roles": ["requester"],
        })
    }

    #[test]
    fn minted_token_round_trips() {
        let v = RunTokenVerifier::new(&cfg()).unwrap();
        let t = mint(&cfg(), &req()).unwrap();
        assert!(looks_like_jwt(&t));
        let p = v.verify(&t).unwrap();
        assert_eq!(p.id, "agent-7");
        assert_eq!(p.kind, PrincipalKind::Agent);
        assert_eq!(p.projects, vec!["alpha"]);
        assert!(p.roles.contains(&Role::Requester));
        assert_eq!(p.run_id.as_deref(), Some("run-42"));
    }

    #[test]
    fn refusals() {
        let c = cfg();
        let v = RunTokenVerifier::new(&c).unwrap();
        let key = c.secret.expose();
        let now = now_secs();
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut cl = claims(now);
            f(&mut cl);
            sign(&cl, key, Algorithm::HS256)
        };
        let cases: Vec<(String, &str)> = vec![
            (
                with(&|c| {
                    c["iat"] = (now - 4000).into();
                    c["exp"] = (now - 100).into();
                }),
                "expired",
            ),
            (with(&|c| c["nbf"] = (now + 300).into()), "not valid yet"),
            (with(&|c| c["iat"] = (now + 300).into()), "future"),
            (with(&|c| c["exp"] = (now + 7200).into()), "max_ttl"),
            (with(&|c| c["iss"] = "someone-else".into()), "issuer"),
            (with(&|c| c["aud"] = "other".into()), "audience"),
            (with(&|c| c["kind"] = "robot".into()), "malformed claims"),
            (with(&|c| c["kind"] = "service".into()), "not accepted"),
            (
                with(&|c| c["roles"] = serde_json::json!(["god"])),
                "malformed",
            ),
            (
                with(&|c| c["projects"] = serde_json::json!(["a b"])),
                "project",
            ),
            (
                with(&|c| c["role"] = serde_json::json!(["admin"])),
                "malformed",
            ),
            (with(&|c| c["run_id"] = "bad run".into()), "run_id"),
            (with(&|c| c["sub"] = "".into()), "subject"),
            (
                with(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                "exp",
            ),
            (
                sign(
                    &claims(now),
                    b"another-secret-another-secret-xx",
                    Algorithm::HS256,
                ),
                "signature",
            ),
            (sign(&claims(now), key, Algorithm::HS512), "algorithm"),
        ];
        for (token, want) in cases {
            let err = v.verify(&token).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
        // alg=none, hand-assembled: header {"alg":"none"}, no signature.
        use base64_like::b64;
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(claims(now).to_string().as_bytes())
        );
        assert!(v.verify(&none).is_err());
        let none_sig = format!("{none}{}", b64(b"x"));
        assert!(v.verify(&none_sig).is_err());
    }

    #[test]
    fn minting_checks_the_same_rules() {
        let c = cfg();
        let mut r = req();
        r.ttl = Duration::from_secs(7200);
        assert!(mint(&c, &r).unwrap_err().0.contains("max_ttl"));
        let mut r = req();
        r.kind = PrincipalKind::Service;
        assert!(mint(&c, &r).is_err());
        let mut r = req();
        r.projects = vec!["no spaces".into()];
        assert!(mint(&c, &r).is_err());
    }

    /// Minimal base64url without padding, to forge tokens no library would sign.
    mod base64_like {
        pub fn b64(data: &[u8]) -> String {
            const T: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in data.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
                let chars = chunk.len() + 1;
                for i in 0..chars {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
