//! Domain types to wire types.

use chrono::{DateTime, Utc};

use crate::{
    domain::{Action, ApprovalRequest, ApprovalState, LifecycleOutcome, Ownership},
    proto,
    repository::FlowEventRow,
};

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn action(a: Action) -> proto::Action {
    match a {
        Action::Create => proto::Action::Create,
        Action::Delete => proto::Action::Delete,
        Action::Describe => proto::Action::Describe,
    }
}

pub fn state_from_proto(s: proto::ApprovalState) -> ApprovalState {
    match s {
        proto::ApprovalState::Approved => ApprovalState::Approved,
        proto::ApprovalState::Applied => ApprovalState::Applied,
        proto::ApprovalState::Failed => ApprovalState::Failed,
        proto::ApprovalState::Denied => ApprovalState::Denied,
        proto::ApprovalState::Expired => ApprovalState::Expired,
        proto::ApprovalState::Requested | proto::ApprovalState::Unspecified => {
            ApprovalState::Requested
        }
    }
}

pub fn result(o: LifecycleOutcome, correlation_id: &str) -> proto::LifecycleResult {
    proto::LifecycleResult {
        status: o.status.to_string(),
        request_id: o
            .request
            .as_ref()
            .map(|r| r.id.to_string())
            .unwrap_or_default(),
        approval_state: o
            .request
            .as_ref()
            .map(|r| proto::ApprovalState::from(r.state))
            .unwrap_or(proto::ApprovalState::Unspecified)
            .into(),
        environment: o.environment,
        action: action(o.action).into(),
        database_name: o.database_name,
        applied: o.applied,
        exists: o.exists,
        owned_by_project: o.owned_by_project,
        owner_project_id: o.owner_project_id,
        dry_run: o.dry_run,
        message: o.message,
        correlation_id: correlation_id.to_string(),
        project_id: o.project_id,
        registered_environment: o.registered_environment,
        facts: o.facts.map(|f| proto::DatabaseFacts {
            owner_role: f.owner_role,
            size_bytes: f.size_bytes,
            encoding: f.encoding,
            connection_count: f.connection_count,
            allows_connections: f.allows_connections,
        }),
    }
}

pub fn request(r: &ApprovalRequest) -> proto::ApprovalRequest {
    proto::ApprovalRequest {
        request_id: r.id.to_string(),
        action: action(r.action).into(),
        state: proto::ApprovalState::from(r.state).into(),
        environment: r.environment.clone(),
        database_name: r.database_name.clone(),
        project_id: r.project_id.clone(),
        target_cluster: r.target_cluster.clone(),
        requested_by: r.requested_by.clone(),
        approval_mode: r.approval_mode.as_str().to_string(),
        decided_by: r.decided_by.clone().unwrap_or_default(),
        decision_reason: r.decision_reason.clone().unwrap_or_default(),
        failure_reason: r.failure_reason.clone().unwrap_or_default(),
        correlation_id: r.correlation_id.clone(),
        created_at: Some(timestamp(r.created_at)),
        decided_at: r.decided_at.map(timestamp),
        finished_at: r.finished_at.map(timestamp),
        expires_at: Some(timestamp(r.expires_at)),
    }
}

pub fn event(e: &FlowEventRow) -> proto::FlowEvent {
    proto::FlowEvent {
        id: e.id,
        correlation_id: e.correlation_id.clone(),
        request_id: e.request_id.map(|u| u.to_string()).unwrap_or_default(),
        event_type: e.event_type.clone(),
        actor_id: e.actor_id.clone(),
        actor_kind: e.actor_kind.clone(),
        project_id: e.project_id.clone(),
        environment: e.environment.clone(),
        database_name: e.database_name.clone(),
        outcome: e.outcome.clone(),
        status_code: e.status_code.clone(),
        message: e.message.clone(),
        payload_json: e.payload.to_string(),
        created_at: Some(timestamp(e.created_at)),
    }
}

pub fn database(o: &Ownership) -> proto::ManagedDatabase {
    proto::ManagedDatabase {
        database_name: o.database_name.clone(),
        project_id: o.project_id.clone(),
        environment: o.environment.clone(),
        target_cluster: o.target_cluster.clone(),
        created_by: o.created_by.clone(),
        request_id: o.request_id.map(|u| u.to_string()).unwrap_or_default(),
        created_at: Some(timestamp(o.created_at)),
    }
}
