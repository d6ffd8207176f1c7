//! Policy: everything decidable from the request and the configuration alone —
//! field formats, database name rules, environment allowlist, protected databases,
//! roles and project scope, approval modes. Runs before ownership and handlers.

use std::collections::BTreeSet;

use regex::Regex;

use crate::{
    config::Config,
    domain::{
        Action, ApprovalMode, ApprovalRequest, DatabaseName, DatabaseRef, Principal, PrincipalKind,
        Role,
    },
    error::ServiceError,
};

/// Always protected, whatever the configuration says.
pub const BUILTIN_PROTECTED: [&str; 3] = ["postgres", "template0", "template1"];

const MAX_ENVIRONMENT_LEN: usize = 32;
const MAX_PROJECT_LEN: usize = 63;

pub fn validate_environment_format(env: &str) -> Result<(), String> {
    let ok = !env.is_empty()
        && env.len() <= MAX_ENVIRONMENT_LEN
        && env.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && env
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not an environment name (letters, digits, `-`, `_`; at most {MAX_ENVIRONMENT_LEN} characters)",
            printable(env)
        ))
    }
}

pub fn validate_project_format(project: &str) -> Result<(), String> {
    let ok = !project.is_empty()
        && project.len() <= MAX_PROJECT_LEN
        && project.starts_with(|c: char| c.is_ascii_alphanumeric())
        && project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a project id (letters, digits, `-`, `_`, `.`; at most {MAX_PROJECT_LEN} characters)",
            printable(project)
        ))
    }
}

/// Actor ids the service writes into the audit trail itself. No principal may carry
/// one: it would pose as the service there, and read the service's events as its own.
pub const SYSTEM_ACTOR_ID: &str = "db-lifecycle";
/// The actor of decisions taken by approval mode `none`.
pub const POLICY_NONE_ACTOR_ID: &str = "policy:none";
const MAX_PRINCIPAL_ID_CHARS: usize = 128;

/// A principal id (configured, or a run token's subject): ASCII letters, digits and
/// `-_.@:+/` (so that no id can look like another in the audit trail: no spaces, no
/// invisible characters, no look-alike letters from other scripts), and not one of
/// the service's own actor ids (compared case-insensitively, as a reader of the
/// trail would).
pub fn validate_principal_id(id: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.@:+/".contains(c);
    if id.is_empty() || id.len() > MAX_PRINCIPAL_ID_CHARS || !id.chars().all(allowed) {
        return Err(format!(
            "`{}` must be 1..={MAX_PRINCIPAL_ID_CHARS} ASCII letters, digits and `-_.@:+/` (no spaces, no look-alike letters from other scripts)",
            printable(id)
        ));
    }
    let folded = id.to_lowercase();
    if folded == SYSTEM_ACTOR_ID || folded.starts_with("policy:") || folded.starts_with("system:") {
        return Err(format!(
            "`{}` is reserved for the service's own entries in the audit trail (`{SYSTEM_ACTOR_ID}`, `policy:*`, `system:*`)",
            printable(id)
        ));
    }
    Ok(())
}

/// A short, printable rendering of untrusted input for messages and audit payloads:
/// control characters escaped, at most 80 characters.
pub fn printable(raw: &str) -> String {
    let mut out = String::new();
    for (i, c) in raw.chars().enumerate() {
        if i >= 80 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Unicode format characters (category Cf) and other invisible code points: they
/// make two different names look identical or reorder what a reader sees.
pub fn is_invisible_or_bidi(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}'
        | '\u{17B5}' | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}'
        | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{110BD}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E007F}')
}

/// Database name rules: a hard floor that no configuration can lower (non-empty,
/// no control characters, at most 63 bytes) plus the configured pattern.
#[derive(Debug, Clone)]
pub struct NameRules {
    pattern: Regex,
    pattern_src: String,
    max_bytes: usize,
    hint: String,
    default_pattern: bool,
}

impl NameRules {
    pub fn new(pattern: &str, max_bytes: usize, hint: &str) -> Result<Self, regex::Error> {
        // Anchor whatever was configured: the whole name must match.
        let anchored = format!(
            "^(?:{})$",
            pattern.trim_start_matches('^').trim_end_matches('$')
        );
        Ok(Self {
            pattern: Regex::new(&anchored)?,
            pattern_src: pattern.to_string(),
            max_bytes: max_bytes.min(63),
            hint: hint.to_string(),
            default_pattern: pattern == crate::config::DEFAULT_NAME_PATTERN,
        })
    }

    pub fn validate(&self, raw: &str) -> Result<DatabaseName, ServiceError> {
        let bad = |reason: String| ServiceError::invalid("database_name", reason);
        if raw.is_empty() {
            return Err(bad("must not be empty".into()));
        }
        if raw.len() > self.max_bytes {
            return Err(bad(format!(
                "`{}` is {} bytes; the limit is {} bytes (PostgreSQL would silently truncate longer names)",
                printable(raw),
                raw.len(),
                self.max_bytes
            )));
        }
        if raw.chars().any(is_invisible_or_bidi) {
            return Err(bad(format!(
                "`{}` contains invisible or text-direction characters (zero-width, bidi overrides, ...) that make one name look like another",
                raw.escape_unicode()
            )));
        }
        if raw.chars().any(|c| c.is_control()) {
            return Err(bad(format!(
                "`{}` contains control characters (NUL, newline, tab, ...)",
                printable(raw)
            )));
        }
        if !self.pattern.is_match(raw) {
            // Explain case folding only when lowercasing is the whole fix; otherwise
            // the suggested name would itself be refused.
            let folded = raw.to_lowercase();
            let why = if self.default_pattern
                && raw.chars().any(|c| c.is_ascii_uppercase())
                && self.pattern.is_match(&folded)
            {
                format!(
                    "`{}` has uppercase letters; names are lowercase because PostgreSQL folds unquoted identifiers to lowercase (try `{}`)",
                    printable(raw),
                    printable(&folded)
                )
            } else {
                format!(
                    "`{}` does not match {}; {}",
                    printable(raw),
                    self.pattern_src,
                    self.hint
                )
            };
            return Err(bad(why));
        }
        Ok(DatabaseName::new_checked(raw.to_string()))
    }
}

/// A lifecycle call that passed policy. Only `Policy` constructs it.
#[derive(Debug, Clone)]
pub struct CheckedCall {
    pub principal: Principal,
    pub action: Action,
    pub environment: String,
    pub project_id: String,
    pub database: DatabaseRef,
    pub approval_mode: ApprovalMode,
    pub dry_run: bool,
}

/// The raw fields of a lifecycle call, as received.
#[derive(Debug, Clone, Default)]
pub struct RawCall<'a> {
    pub environment: &'a str,
    pub database_name: &'a str,
    pub project_id: &'a str,
    pub confirm_delete: bool,
    pub dry_run: bool,
}

#[derive(Debug)]
pub struct Policy {
    allowed_environments: Vec<String>,
    names: NameRules,
    protected: BTreeSet<String>,
    config: std::sync::Arc<Config>,
}

impl Policy {
    pub fn new(config: std::sync::Arc<Config>) -> Result<Self, String> {
        let names = NameRules::new(
            &config.names.pattern,
            config.names.max_bytes,
            &config.names.hint,
        )
        .map_err(|e| format!("names.pattern: {e}"))?;
        let mut protected: BTreeSet<String> =
            BUILTIN_PROTECTED.iter().map(|s| s.to_string()).collect();
        protected.extend(config.protected_databases.iter().cloned());
        // The service's own metadata database, whichever cluster it is on.
        if let Some(db) = config
            .metadata_url
            .pg_config()
            .ok()
            .and_then(|c| c.get_dbname().map(str::to_string))
        {
            protected.insert(db);
        }
        Ok(Self {
            allowed_environments: config.allowed_environments.clone(),
            names,
            protected,
            config,
        })
    }

    pub fn names(&self) -> &NameRules {
        &self.names
    }

    pub fn allowed_environments(&self) -> &[String] {
        &self.allowed_environments
    }

    /// Configured and built-in protected names, and the staging names of applies.
    pub fn is_protected(&self, name: &str) -> bool {
        self.protected.contains(name) || name.starts_with(crate::domain::STAGING_PREFIX)
    }

    /// Normalize (trim, lowercase) and check an environment against the allowlist.
    pub fn environment(&self, raw: &str) -> Result<String, ServiceError> {
        let env = self.environment_format(raw)?;
        self.environment_allowed(&env)?;
        Ok(env)
    }

    fn environment_format(&self, raw: &str) -> Result<String, ServiceError> {
        let env = raw.trim().to_lowercase();
        if env.is_empty() {
            return Err(ServiceError::invalid("environment", "must not be empty"));
        }
        validate_environment_format(&env).map_err(|m| ServiceError::invalid("environment", m))?;
        Ok(env)
    }

    fn environment_allowed(&self, env: &str) -> Result<(), ServiceError> {
        if self.allowed_environments.iter().any(|e| e == env) {
            Ok(())
        } else {
            Err(ServiceError::EnvironmentNotAllowed {
                environment: env.to_string(),
                allowed: self.allowed_environments.clone(),
            })
        }
    }

    /// The project a call acts for: the request's, which must be inside the token's
    /// scope, or the token's only project when the request names none.
    pub fn resolve_project(
        &self,
        principal: &Principal,
        raw: &str,
    ) -> Result<String, ServiceError> {
        let raw = raw.trim();
        if raw.is_empty() {
            let concrete: Vec<&String> = principal.projects.iter().filter(|p| *p != "*").collect();
            return match (concrete.as_slice(), principal.covers_all_projects()) {
                ([only], false) => Ok((*only).clone()),
                ([], false) => Err(ServiceError::forbidden(format!(
                    "principal `{}` has no project in its scope",
                    principal.id
                ))),
                _ => Err(ServiceError::invalid(
                    "project_id",
                    "required: your token covers several projects",
                )),
            };
        }
        validate_project_format(raw).map_err(|m| ServiceError::invalid("project_id", m))?;
        if principal.covers_project(raw) {
            Ok(raw.to_string())
        } else {
            Err(ServiceError::forbidden(format!(
                "project `{raw}` is outside the scope of principal `{}`",
                principal.id
            )))
        }
    }

    /// All request-level checks for create/delete/describe. Format errors
    /// (INVALID_ARGUMENT) come first, then permission checks, then preconditions.
    pub fn check_call(
        &self,
        principal: &Principal,
        action: Action,
        raw: &RawCall<'_>,
    ) -> Result<CheckedCall, ServiceError> {
        let environment = self.environment_format(raw.environment)?;
        let name = self.names.validate(raw.database_name)?;
        if !raw.project_id.trim().is_empty() {
            validate_project_format(raw.project_id.trim())
                .map_err(|m| ServiceError::invalid("project_id", m))?;
        }
        self.environment_allowed(&environment)?;
        if action != Action::Describe && self.is_protected(name.as_str()) {
            return Err(ServiceError::ProtectedDatabase {
                name: name.to_string(),
            });
        }
        let needed: &[Role] = match action {
            Action::Describe => &[Role::Requester, Role::Owner, Role::Delegate, Role::Admin],
            Action::Create | Action::Delete => &[Role::Requester, Role::Owner, Role::Admin],
        };
        if !principal.has_any_role(needed) {
            return Err(ServiceError::forbidden(format!(
                "principal `{}` needs one of the roles {} to {action}",
                principal.id,
                role_list(needed)
            )));
        }
        let project_id = self.resolve_project(principal, raw.project_id)?;
        if action == Action::Delete && !raw.confirm_delete {
            return Err(ServiceError::ConfirmDeleteRequired {
                name: name.to_string(),
            });
        }
        let target = self.config.target_for(&environment).to_string();
        Ok(CheckedCall {
            principal: principal.clone(),
            action,
            approval_mode: self.config.approval_mode(&environment, action),
            environment,
            project_id,
            database: DatabaseRef { target, name },
            dry_run: raw.dry_run,
        })
    }

    /// Re-check, at apply time, what may have changed since the request was queued:
    /// configuration (allowlist, name rules, protected list, target) and the payload.
    pub fn recheck_for_apply(&self, req: &ApprovalRequest) -> Result<DatabaseRef, ServiceError> {
        self.environment_allowed(&req.environment)?;
        let name = self.names.validate(&req.database_name)?;
        if self.is_protected(name.as_str()) {
            return Err(ServiceError::ProtectedDatabase {
                name: name.to_string(),
            });
        }
        let payload_project = req.payload.get("project_id").and_then(|v| v.as_str());
        if payload_project != Some(req.project_id.as_str()) {
            return Err(ServiceError::forbidden(format!(
                "stored payload project {:?} does not match the request's project `{}`",
                payload_project, req.project_id
            )));
        }
        let target = self.config.target_for(&req.environment);
        if target != req.target_cluster {
            return Err(ServiceError::forbidden(format!(
                "environment `{}` now points at target `{target}`, not `{}` where the request was made",
                req.environment, req.target_cluster
            )));
        }
        Ok(DatabaseRef {
            target: req.target_cluster.clone(),
            name,
        })
    }

    /// The name of a stored request whose apply re-check failed, for undoing what
    /// that request's own interrupted apply made under it. The name passed the rules
    /// in force when it was requested; the rules may have changed since, so only
    /// what keeps it one safe SQL identifier is checked again (non-empty, at most 63
    /// bytes, no control or invisible characters), and never a staging name.
    pub fn stored_name(&self, req: &ApprovalRequest) -> Result<DatabaseName, ServiceError> {
        let raw = req.database_name.as_str();
        if raw.is_empty()
            || raw.len() > 63
            || raw
                .chars()
                .any(|c| c.is_control() || is_invisible_or_bidi(c))
            || raw.starts_with(crate::domain::STAGING_PREFIX)
        {
            return Err(ServiceError::Internal(format!(
                "request {} has the stored name `{}`, which is not a database name this service makes",
                req.id,
                printable(raw)
            )));
        }
        Ok(DatabaseName::new_checked(raw.to_string()))
    }

    /// May this principal decide (approve or deny) this request?
    pub fn check_decider(
        &self,
        principal: &Principal,
        req: &ApprovalRequest,
    ) -> Result<(), ServiceError> {
        if principal.kind != PrincipalKind::Human {
            return Err(ServiceError::forbidden(format!(
                "only people approve: principal `{}` is of kind `{}`",
                principal.id,
                principal.kind.as_str()
            )));
        }
        if !principal.covers_project(&req.project_id) {
            return Err(ServiceError::forbidden(format!(
                "request {} belongs to a project outside the scope of principal `{}`",
                req.id, principal.id
            )));
        }
        let roles = req.approval_mode.approver_roles();
        if !principal.has_any_role(roles) {
            return Err(ServiceError::forbidden(format!(
                "approval mode `{}` needs one of the roles {}; principal `{}` has none",
                req.approval_mode.as_str(),
                role_list(roles),
                principal.id
            )));
        }
        if principal.id == req.requested_by {
            return Err(ServiceError::forbidden(format!(
                "four-eyes rule: `{}` requested {} and cannot decide it",
                principal.id, req.id
            )));
        }
        Ok(())
    }

    /// Query RPCs (GetRequest, ListRequests, ListFlowEvents, ListDatabases) need one of
    /// the roles, as Describe does (design §5: a missing role is PERMISSION_DENIED): a
    /// principal without any role may not read the project's requests and audit trail.
    pub fn check_reader(&self, principal: &Principal) -> Result<(), ServiceError> {
        const READ_ROLES: &[Role] = &[Role::Requester, Role::Owner, Role::Delegate, Role::Admin];
        if principal.has_any_role(READ_ROLES) {
            Ok(())
        } else {
            Err(ServiceError::forbidden(format!(
                "principal `{}` needs one of the roles {} to read requests, events or databases",
                principal.id,
                role_list(READ_ROLES)
            )))
        }
    }

    /// Projects a principal may read (None = every project).
    pub fn readable_projects(&self, principal: &Principal) -> Option<Vec<String>> {
        if principal.covers_all_projects() {
            None
        } else {
            Some(principal.projects.clone())
        }
    }
}

fn role_list(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> NameRules {
        NameRules::new(crate::config::DEFAULT_NAME_PATTERN, 63, "hint").unwrap()
    }

    #[test]
    fn default_rules() {
        let r = rules();
        assert!(r.validate("my-service-db").is_ok());
        assert!(r.validate("_x").is_ok());
        assert!(r.validate(&"a".repeat(63)).is_ok());
        for bad in [
            "",
            "1abc",
            "a b",
            "a\"b",
            "a;b",
            "pTest12",
            "é",
            "a\0b",
            "a\nb",
            &"a".repeat(64),
        ] {
            assert!(r.validate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn uppercase_message_explains_folding() {
        let err = rules().validate("pTest12").unwrap_err().to_string();
        assert!(err.contains("lowercase"), "{err}");
        assert!(err.contains("folds"), "{err}");
    }

    #[test]
    fn byte_limit_counts_bytes_not_chars() {
        let r = NameRules::new(".+", 63, "").unwrap();
        // 32 two-byte characters = 64 bytes.
        assert!(r.validate(&"é".repeat(32)).is_err());
        assert!(r.validate(&"é".repeat(31)).is_ok());
    }

    #[test]
    fn invisible_and_bidi_characters_are_refused_even_by_a_permissive_pattern() {
        let r = NameRules::new(".+", 63, "").unwrap();
        for bad in [
            "ab\u{202E}cd",
            "a\u{200B}b",
            "a\u{200D}b",
            "\u{FEFF}x",
            "a\u{2066}b",
        ] {
            assert!(r.validate(bad).is_err(), "{bad:?} accepted");
        }
        assert!(r.validate("données").is_ok());
    }

    #[test]
    fn configured_pattern_is_anchored() {
        let r = NameRules::new("[a-z]+", 63, "").unwrap();
        assert!(r.validate("abc").is_ok());
        assert!(r.validate("abc;drop").is_err());
    }
}
