//! Domain types shared by policy, ownership, approvals, repository and transport.

use std::{collections::BTreeSet, fmt};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Delete,
    Describe,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Delete => "delete",
            Action::Describe => "describe",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(Action::Create),
            "delete" => Some(Action::Delete),
            "describe" => Some(Action::Describe),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalState {
    Requested,
    Approved,
    Applied,
    Failed,
    Denied,
    Expired,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Requested => "requested",
            ApprovalState::Approved => "approved",
            ApprovalState::Applied => "applied",
            ApprovalState::Failed => "failed",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "requested" => ApprovalState::Requested,
            "approved" => ApprovalState::Approved,
            "applied" => ApprovalState::Applied,
            "failed" => ApprovalState::Failed,
            "denied" => ApprovalState::Denied,
            "expired" => ApprovalState::Expired,
            _ => return None,
        })
    }
    /// Requested or approved: the database is "taken" by this request.
    pub fn is_open(self) -> bool {
        matches!(self, ApprovalState::Requested | ApprovalState::Approved)
    }
}

impl fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who must approve a create/delete in an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    /// Applied at once; still stored as an (applied) request.
    None,
    /// A project owner (or admin) approves.
    Owner,
    /// An owner, a delegate or an admin approves.
    Delegated,
}

impl ApprovalMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalMode::None => "none",
            ApprovalMode::Owner => "owner",
            ApprovalMode::Delegated => "delegated",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(ApprovalMode::None),
            "owner" => Some(ApprovalMode::Owner),
            "delegated" => Some(ApprovalMode::Delegated),
            _ => None,
        }
    }
    /// Roles that may decide a request in this mode.
    pub fn approver_roles(self) -> &'static [Role] {
        match self {
            ApprovalMode::None => &[Role::Admin],
            ApprovalMode::Owner => &[Role::Owner, Role::Admin],
            ApprovalMode::Delegated => &[Role::Owner, Role::Delegate, Role::Admin],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    Agent,
    Service,
    Human,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Agent => "agent",
            PrincipalKind::Service => "service",
            PrincipalKind::Human => "human",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Requester,
    Owner,
    Delegate,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Requester => "requester",
            Role::Owner => "owner",
            Role::Delegate => "delegate",
            Role::Admin => "admin",
        }
    }
}

/// An authenticated caller. Project scope `*` means every project.
#[derive(Debug, Clone)]
pub struct Principal {
    pub id: String,
    pub kind: PrincipalKind,
    pub projects: Vec<String>,
    pub roles: BTreeSet<Role>,
    /// The agent run a run token was minted for (None for static tokens). Written to
    /// logs and audit payloads so one run's calls can be told apart; never a secret.
    pub run_id: Option<String>,
}

impl Principal {
    pub fn has_any_role(&self, roles: &[Role]) -> bool {
        roles.iter().any(|r| self.roles.contains(r))
    }
    pub fn covers_project(&self, project: &str) -> bool {
        self.projects.iter().any(|p| p == "*" || p == project)
    }
    pub fn covers_all_projects(&self) -> bool {
        self.projects.iter().any(|p| p == "*")
    }
}

/// Names of this prefix are the service's own (see [`DatabaseName::staging_for`]):
/// callers can never create or drop them.
pub const STAGING_PREFIX: &str = "dbl_staging_";

/// A database name that passed the name rules. Only `policy` constructs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DatabaseName(String);

impl DatabaseName {
    pub(crate) fn new_checked(s: String) -> Self {
        Self(s)
    }
    /// The name under which the apply of `request_id` creates its database before
    /// renaming it into place. Tied to the request, so an interrupted apply finds its
    /// own database again, and a database that appears under the requested name in
    /// the meantime can never be mistaken for it. 44 bytes, within PostgreSQL's 63.
    pub fn staging_for(request_id: uuid::Uuid) -> Self {
        Self(format!("{STAGING_PREFIX}{}", request_id.simple()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The name as a double-quoted SQL identifier. Safe for any validated name:
    /// embedded quotes are doubled, and validation already refused NUL.
    pub fn quoted(&self) -> String {
        quote_identifier(&self.0)
    }
}

impl fmt::Display for DatabaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quote an SQL identifier (PostgreSQL rules: wrap in `"`, double any `"`).
pub fn quote_identifier(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Where a database lives: target cluster plus name. Ownership is unique per this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRef {
    pub target: String,
    pub name: DatabaseName,
}

/// A row of `project_databases`.
#[derive(Debug, Clone)]
pub struct Ownership {
    pub target_cluster: String,
    pub database_name: String,
    pub project_id: String,
    pub environment: String,
    pub state: String,
    pub created_by: String,
    pub request_id: Option<uuid::Uuid>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// pg_database oid of the database the service created (None while unknown).
    pub database_oid: Option<i64>,
}

impl Ownership {
    /// Is the database now under this name the one the service created? An apply
    /// records the oid before the database appears under its name, so a `creating`
    /// row without one identifies no database: one already there was made by
    /// someone else. Only `active` rows from before oids were recorded (migration
    /// V2) are taken on trust. True when no database has the name.
    pub fn identifies(&self, current_oid: Option<u32>) -> bool {
        match (self.database_oid, current_oid) {
            (_, None) => true,
            (Some(recorded), Some(current)) => recorded == i64::from(current),
            (None, Some(_)) => self.state == "active",
        }
    }
}

/// A row of `approval_requests`.
#[derive(Debug, Clone)]
pub struct ApprovalRequest {
    pub id: uuid::Uuid,
    pub correlation_id: String,
    pub action: Action,
    pub state: ApprovalState,
    pub environment: String,
    pub target_cluster: String,
    pub database_name: String,
    pub project_id: String,
    pub requested_by: String,
    pub requested_by_kind: String,
    pub approval_mode: ApprovalMode,
    pub payload: serde_json::Value,
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub decided_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// Facts about a database from the target cluster's catalog.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DatabaseFacts {
    pub owner_role: String,
    pub size_bytes: i64,
    pub encoding: String,
    pub connection_count: i32,
    pub allows_connections: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_identifier("my-db"), "\"my-db\"");
    }
}

/// Who is calling, under which correlation id. Built by the transport middleware.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub correlation_id: String,
    pub principal: Principal,
}

/// The seed's result of `database.lifecycle`, before the transport adds the
/// correlation id and converts it to the wire type.
#[derive(Debug, Clone)]
pub struct LifecycleOutcome {
    /// approval_required | applied | unchanged | described | dry_run | denied |
    /// failed | in_progress
    pub status: &'static str,
    pub request: Option<ApprovalRequest>,
    pub action: Action,
    pub environment: String,
    pub database_name: String,
    pub project_id: String,
    pub applied: bool,
    pub exists: bool,
    pub owned_by_project: bool,
    pub owner_project_id: String,
    pub registered_environment: String,
    pub dry_run: bool,
    pub message: String,
    pub facts: Option<DatabaseFacts>,
}

impl LifecycleOutcome {
    /// An outcome describing a stored request in its current state.
    pub fn for_request(req: &ApprovalRequest, status: &'static str, message: String) -> Self {
        let applied = req.state == ApprovalState::Applied;
        let exists = match req.action {
            Action::Create => applied,
            _ => !applied,
        };
        Self {
            status,
            request: Some(req.clone()),
            action: req.action,
            environment: req.environment.clone(),
            database_name: req.database_name.clone(),
            project_id: req.project_id.clone(),
            applied,
            exists,
            owned_by_project: exists,
            owner_project_id: if exists {
                req.project_id.clone()
            } else {
                String::new()
            },
            registered_environment: if exists {
                req.environment.clone()
            } else {
                String::new()
            },
            dry_run: false,
            message,
            facts: None,
        }
    }
}
