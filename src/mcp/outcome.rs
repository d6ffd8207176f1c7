//! Tool results: the service's answers as structured content (plus the same JSON as
//! text, for clients that only read text), and failures as `isError` results that
//! carry the gRPC code, an actionable message and the correlation id.

use rmcp::model::{CallToolResult, ContentBlock};
use serde::Serialize;
use serde_json::Value;
use tonic::Code;

use crate::{error::code_name, proto};

/// The seed's result of `database.lifecycle` (design §6), enums as lowercase strings
/// and "not applicable" as `null`.
#[derive(Debug, Clone, Serialize)]
pub struct LifecycleView {
    /// approval_required | applied | unchanged | described | dry_run | denied |
    /// failed | in_progress | expired (as decided by the service).
    pub status: String,
    pub request_id: Option<String>,
    pub approval_state: Option<&'static str>,
    pub environment: String,
    pub action: Option<&'static str>,
    pub database_name: String,
    pub applied: bool,
    pub exists: bool,
    pub owned_by_project: bool,
    pub owner_project_id: Option<String>,
    pub dry_run: bool,
    pub message: String,
    pub correlation_id: String,
    /// The project the service acted for (from the token's scope).
    pub project_id: Option<String>,
    /// What the agent can do next, when there is an obvious next step.
    pub next_step: Option<String>,
}

/// One approval request as reported by the request-following tool.
#[derive(Debug, Clone, Serialize)]
pub struct RequestView {
    pub request_id: String,
    /// requested | approved | applied | failed | denied | expired
    pub state: &'static str,
    /// true once the state can no longer change (applied, failed, denied, expired).
    pub is_final: bool,
    pub action: Option<&'static str>,
    pub environment: String,
    pub database_name: String,
    pub project_id: String,
    pub requested_by: String,
    pub approval_mode: String,
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: Option<String>,
    pub decided_at: Option<String>,
    pub finished_at: Option<String>,
    pub expires_at: Option<String>,
    /// Seconds this call waited for the state to change (0 without `wait_seconds`).
    pub waited_seconds: u64,
    /// true when `wait_seconds` ran out while the request was still open.
    pub wait_timed_out: bool,
    pub message: String,
    /// The request's correlation id, as recorded by the service: it reconstructs the
    /// whole story (call, decision, apply) in the audit trail.
    pub correlation_id: String,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub fn action_name(raw: i32) -> Option<&'static str> {
    match proto::Action::try_from(raw).ok()? {
        proto::Action::Create => Some("create"),
        proto::Action::Delete => Some("delete"),
        proto::Action::Describe => Some("describe"),
        proto::Action::Unspecified => None,
    }
}

pub fn state_name(raw: i32) -> Option<&'static str> {
    match proto::ApprovalState::try_from(raw).ok()? {
        proto::ApprovalState::Requested => Some("requested"),
        proto::ApprovalState::Approved => Some("approved"),
        proto::ApprovalState::Applied => Some("applied"),
        proto::ApprovalState::Failed => Some("failed"),
        proto::ApprovalState::Denied => Some("denied"),
        proto::ApprovalState::Expired => Some("expired"),
        proto::ApprovalState::Unspecified => None,
    }
}

/// Requested and approved requests may still change; everything else is final.
pub fn is_open_state(state: &str) -> bool {
    matches!(state, "requested" | "approved")
}

fn timestamp(t: Option<prost_types::Timestamp>) -> Option<String> {
    let t = t?;
    let at = chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)?;
    Some(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

impl LifecycleView {
    pub fn from_proto(r: proto::LifecycleResult, request_tool: &str) -> Self {
        let approval_state = state_name(r.approval_state);
        let request_id = non_empty(r.request_id);
        let next_step = match (&request_id, approval_state) {
            (Some(id), Some(state)) if is_open_state(state) => Some(format!(
                "a person must approve request {id}; call {request_tool} with request_id \
                 \"{id}\" and wait_seconds (up to 300) to wait until it is applied"
            )),
            _ => None,
        };
        Self {
            status: r.status,
            request_id,
            approval_state,
            environment: r.environment,
            action: action_name(r.action),
            database_name: r.database_name,
            applied: r.applied,
            exists: r.exists,
            owned_by_project: r.owned_by_project,
            owner_project_id: non_empty(r.owner_project_id),
            dry_run: r.dry_run,
            message: r.message,
            correlation_id: r.correlation_id,
            project_id: non_empty(r.project_id),
            next_step,
        }
    }
}

impl RequestView {
    pub fn from_proto(r: proto::ApprovalRequest, waited_seconds: u64) -> Self {
        let state = state_name(r.state).unwrap_or("requested");
        let is_final = !is_open_state(state);
        let message = match state {
            "requested" => format!(
                "waiting for approval: a person must approve this {} request",
                action_name(r.action).unwrap_or("lifecycle")
            ),
            "approved" => "approved; the service is applying it".to_string(),
            "applied" => "applied".to_string(),
            "failed" => format!("approved but failed to apply: {}", r.failure_reason),
            "denied" => format!("denied by {}: {}", r.decided_by, r.decision_reason),
            "expired" => "expired before anyone decided; submit it again if still needed".into(),
            other => other.to_string(),
        };
        Self {
            request_id: r.request_id,
            state,
            is_final,
            action: action_name(r.action),
            environment: r.environment,
            database_name: r.database_name,
            project_id: r.project_id,
            requested_by: r.requested_by,
            approval_mode: r.approval_mode,
            decided_by: non_empty(r.decided_by),
            decision_reason: non_empty(r.decision_reason),
            failure_reason: non_empty(r.failure_reason),
            created_at: timestamp(r.created_at),
            decided_at: timestamp(r.decided_at),
            finished_at: timestamp(r.finished_at),
            expires_at: timestamp(r.expires_at),
            waited_seconds,
            wait_timed_out: false,
            message,
            correlation_id: r.correlation_id,
        }
    }
}

/// A successful tool result: structured content plus the same JSON as text.
pub fn success(view: &impl Serialize) -> CallToolResult {
    match serde_json::to_value(view) {
        Ok(value) => CallToolResult::structured(value),
        // Serialising these plain structs cannot fail; if it ever did, say so
        // rather than crash the bridge.
        Err(e) => {
            ToolFailure::new(Code::Internal, format!("cannot encode result: {e}"), "").into_result()
        }
    }
}

/// Why a tool call did not succeed: a refusal from the service, the service being
/// unreachable, or a refusal by the bridge itself (narrowing, confirmation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ToolFailure {
    pub code: Code,
    pub message: String,
    pub correlation_id: String,
    /// Who refused: "service" or "bridge".
    pub origin: FailureSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureSource {
    /// The db-lifecycle service answered with this status.
    Service,
    /// The bridge refused or could not reach the service.
    Bridge,
}

/// The JSON an agent reads from a failed call (in the text content, since an
/// `isError` result is not bound to the tool's output schema).
#[derive(Debug, Serialize)]
struct FailureView<'a> {
    status: &'static str,
    code: &'static str,
    message: &'a str,
    correlation_id: &'a str,
    retryable: bool,
    origin: FailureSource,
    hint: &'static str,
}

impl ToolFailure {
    /// A refusal by the bridge itself.
    pub fn new(code: Code, message: impl Into<String>, correlation_id: &str) -> Self {
        Self {
            code,
            message: message.into(),
            correlation_id: correlation_id.to_string(),
            origin: FailureSource::Bridge,
        }
    }

    /// Transient: the same call may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(
            self.code,
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
        )
    }

    /// What an agent should do about a failure of this class.
    fn hint(&self) -> &'static str {
        match self.code {
            Code::Unauthenticated => {
                "the service did not accept this agent's token; the person running the agent \
                 must configure a valid token (nothing was changed)"
            }
            Code::InvalidArgument => "fix the argument named in the message and call again",
            Code::PermissionDenied => {
                "not allowed for this agent's project or by this bridge's configuration; do not \
                 retry with the same arguments, ask a person if it is really needed"
            }
            Code::FailedPrecondition => {
                "the call is valid but cannot proceed in the current state; follow the message \
                 (e.g. confirm the delete, or wait for the open request to be decided)"
            }
            Code::AlreadyExists => "choose another database name",
            Code::NotFound => "check the request id or database name and environment",
            Code::Unavailable => {
                "transient: retry the same call later (create and delete are idempotent: a \
                 repeat returns the request already made, if any)"
            }
            Code::DeadlineExceeded => {
                "the call may or may not have been processed: check with describe or \
                 request_status, then retry the same call if needed (it is idempotent)"
            }
            Code::ResourceExhausted => {
                "too many calls of this agent at once: let one finish (or cancel it), then retry"
            }
            _ => "unexpected error; report it with the correlation id",
        }
    }

    pub fn into_result(self) -> CallToolResult {
        let view = FailureView {
            status: "error",
            code: code_name(self.code),
            message: &self.message,
            correlation_id: &self.correlation_id,
            retryable: self.retryable(),
            origin: self.origin,
            hint: self.hint(),
        };
        let text = serde_json::to_string(&view)
            .unwrap_or_else(|_| format!("{}: {}", code_name(self.code), self.message));
        CallToolResult::error(vec![ContentBlock::text(text)])
    }
}

/// Output schema of `database.lifecycle` (what `LifecycleView` serialises to).
pub fn lifecycle_output_schema() -> Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "status": {"type": "string", "description": "Outcome decided by the service: approval_required, applied, unchanged, described, dry_run, denied, failed, in_progress or expired."},
            "request_id": {"type": ["string", "null"], "description": "Id of the approval request (create/delete); null for describe and dry runs."},
            "approval_state": {"type": ["string", "null"], "enum": ["requested", "approved", "applied", "failed", "denied", "expired", null], "description": "State of the approval request; null when there is none."},
            "environment": {"type": "string"},
            "action": {"type": ["string", "null"], "enum": ["create", "delete", "describe", null]},
            "database_name": {"type": "string"},
            "applied": {"type": "boolean", "description": "true once the change has been made."},
            "exists": {"type": "boolean", "description": "Whether the database exists (describe), or will exist once applied."},
            "owned_by_project": {"type": "boolean", "description": "Whether the caller's project owns the database."},
            "owner_project_id": {"type": ["string", "null"], "description": "Owning project when it is the caller's; null otherwise (another project's ownership is not revealed)."},
            "dry_run": {"type": "boolean"},
            "message": {"type": "string", "description": "What happened, in words."},
            "correlation_id": {"type": "string", "description": "Audit correlation id of this call."},
            "project_id": {"type": ["string", "null"], "description": "The project the service acted for (from the token)."},
            "next_step": {"type": ["string", "null"], "description": "What to do next, when there is an obvious next step."}
        },
        "required": ["status", "request_id", "approval_state", "environment", "action", "database_name", "applied", "exists", "owned_by_project", "owner_project_id", "dry_run", "message", "correlation_id"]
    })
}

/// Output schema of `database.request_status` (what `RequestView` serialises to).
pub fn request_output_schema() -> Value {
    let nullable = |d: &str| serde_json::json!({"type": ["string", "null"], "description": d});
    serde_json::json!({
        "type": "object",
        "properties": {
            "request_id": {"type": "string"},
            "state": {"type": "string", "enum": ["requested", "approved", "applied", "failed", "denied", "expired"], "description": "requested and approved may still change; the others are final."},
            "is_final": {"type": "boolean", "description": "true once the state can no longer change."},
            "action": {"type": ["string", "null"], "enum": ["create", "delete", "describe", null]},
            "environment": {"type": "string"},
            "database_name": {"type": "string"},
            "project_id": {"type": "string"},
            "requested_by": {"type": "string"},
            "approval_mode": {"type": "string", "description": "none, owner or delegated: who may approve."},
            "decided_by": nullable("Who approved or denied it."),
            "decision_reason": nullable("Why, as given by the person who decided."),
            "failure_reason": nullable("Why applying it failed (state failed)."),
            "created_at": nullable("RFC 3339."),
            "decided_at": nullable("RFC 3339."),
            "finished_at": nullable("RFC 3339."),
            "expires_at": nullable("RFC 3339: an undecided request expires then."),
            "waited_seconds": {"type": "integer", "minimum": 0},
            "wait_timed_out": {"type": "boolean", "description": "true when wait_seconds ran out while the request was still open; call again to keep waiting."},
            "message": {"type": "string"},
            "correlation_id": {"type": "string", "description": "The request's audit correlation id."}
        },
        "required": ["request_id", "state", "is_final", "action", "environment", "database_name", "project_id", "waited_seconds", "wait_timed_out", "message", "correlation_id"]
    })
}
