//! Audit trail (R8): builds `flow_events` and `links` rows. Payloads carry only
//! validated or escaped input, never tokens or connection URLs.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde_json::Value;
use uuid::Uuid;

use crate::{
    config::RefusalBudgetConfig,
    domain::{ApprovalRequest, CallContext, Principal},
    error::ServiceError,
    repository::{NewEvent, Repository},
};

/// What a call turned out to be about, learned as it passed its checks. A refusal is
/// recorded under it, so that an owner who lists a request's or a project's events also
/// sees the attempts that were refused. Filled only from validated values, and with a
/// project only when the caller's scope covers it (the row is visible to its actor).
#[derive(Debug, Default, Clone)]
pub struct RefusalSubject {
    pub request_id: Option<Uuid>,
    pub project_id: String,
    pub environment: String,
    pub database_name: String,
}

impl RefusalSubject {
    /// A stored request: its id always (the caller named it), its project, environment
    /// and database only when `covered` (the caller may read that project).
    pub fn request(&mut self, req: &ApprovalRequest, covered: bool) {
        self.request_id = Some(req.id);
        if covered {
            self.project_id = req.project_id.clone();
            self.environment = req.environment.clone();
            self.database_name = req.database_name.clone();
        }
    }
}

#[derive(Clone)]
pub struct Audit {
    repo: Repository,
    unauthenticated: Arc<Mutex<RefusalBudget>>,
}

/// Anyone can make calls without valid credentials, so their refusals are recorded
/// within a budget (a token bucket) and not one row per call: a flood cannot fill
/// the metadata database. The next row recorded says how many were left out.
#[derive(Debug)]
struct RefusalBudget {
    config: RefusalBudgetConfig,
    tokens: f64,
    refilled: Instant,
    left_out: u64,
}

impl RefusalBudget {
    fn new(config: RefusalBudgetConfig) -> Self {
        Self {
            config,
            tokens: f64::from(config.burst),
            refilled: Instant::now(),
            left_out: 0,
        }
    }

    /// Take one row from the budget: `Some(rows left out before it)`, or None.
    fn take(&mut self) -> Option<u64> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * f64::from(self.config.per_second))
            .min(f64::from(self.config.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.left_out))
        } else {
            self.left_out += 1;
            None
        }
    }
}

tokio::task_local! {
    /// Set once a refusal of the current call has been handled by `Audit::refusal`,
    /// so the wire layer knows which error responses nobody recorded.
    static REFUSAL_HANDLED: std::cell::Cell<bool>;
}

/// Run a call's future and say whether it recorded its own refusal.
pub async fn tracking_refusals<F: Future>(fut: F) -> (F::Output, bool) {
    REFUSAL_HANDLED
        .scope(std::cell::Cell::new(false), async move {
            let out = fut.await;
            (out, REFUSAL_HANDLED.with(|handled| handled.get()))
        })
        .await
}

tokio::task_local! {
    /// The principal a call runs as (set by the transport middleware for the whole
    /// call), so that events naming it as the actor also carry its run id.
    static CALLER: (String, Option<String>);
}

/// Run a call's future as `principal`: events recorded during it whose actor is that
/// principal get its run id (`payload.run_id`), wherever in the call they are built.
pub async fn as_caller<F: Future>(principal: &Principal, fut: F) -> F::Output {
    CALLER
        .scope((principal.id.clone(), principal.run_id.clone()), fut)
        .await
}

/// The run id of the current call's principal, when it is `actor_id`.
fn caller_run_id(actor_id: &str) -> Option<String> {
    CALLER
        .try_with(|(id, run)| if id == actor_id { run.clone() } else { None })
        .ok()
        .flatten()
}

impl Audit {
    pub fn new(repo: Repository, unauthenticated: RefusalBudgetConfig) -> Self {
        Self {
            repo,
            unauthenticated: Arc::new(Mutex::new(RefusalBudget::new(unauthenticated))),
        }
    }

    /// An `ok` event for a call, with actor and correlation id filled in.
    pub fn event(ctx: &CallContext, event_type: &'static str) -> NewEvent {
        NewEvent {
            correlation_id: ctx.correlation_id.clone(),
            event_type,
            actor_id: ctx.principal.id.clone(),
            actor_kind: ctx.principal.kind.as_str().to_string(),
            outcome: "ok",
            payload: Value::Object(Default::default()),
            run_id: ctx.principal.run_id.clone(),
            ..Default::default()
        }
    }

    /// An event about a stored request, under the request's own correlation id so
    /// that one id follows the request from the first call to the apply.
    pub fn request_event(
        req: &ApprovalRequest,
        event_type: &'static str,
        actor_id: &str,
        actor_kind: &str,
    ) -> NewEvent {
        NewEvent {
            correlation_id: req.correlation_id.clone(),
            request_id: Some(req.id),
            event_type,
            actor_id: actor_id.to_string(),
            actor_kind: actor_kind.to_string(),
            project_id: req.project_id.clone(),
            environment: req.environment.clone(),
            database_name: req.database_name.clone(),
            outcome: "ok",
            payload: Value::Object(Default::default()),
            run_id: caller_run_id(actor_id),
            ..Default::default()
        }
    }

    pub async fn record(&self, ev: &NewEvent) -> Result<(), ServiceError> {
        self.repo.insert_event(ev).await
    }

    pub async fn link(
        &self,
        correlation_id: &str,
        request_id: Option<Uuid>,
        project_id: &str,
        environment: &str,
        target: &str,
        database_name: &str,
    ) -> Result<(), ServiceError> {
        self.repo
            .insert_link(
                correlation_id,
                request_id,
                project_id,
                environment,
                target,
                database_name,
            )
            .await
    }

    /// Record a refused call. Best effort: if the metadata database is down the
    /// refusal is logged instead, and the caller still gets the original error.
    pub async fn refusal(
        &self,
        correlation_id: &str,
        principal: Option<&Principal>,
        rpc: &str,
        err: &ServiceError,
        input: Value,
        subject: RefusalSubject,
    ) {
        let _ = REFUSAL_HANDLED.try_with(|handled| handled.set(true));
        let mut payload = serde_json::json!({ "rpc": rpc, "input": input });
        if principal.is_none() {
            let budget = self
                .unauthenticated
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            match budget {
                None => return,
                Some(0) => {}
                Some(left_out) => {
                    tracing::warn!(
                        left_out,
                        "refusals of unauthenticated calls over the audit budget were not recorded"
                    );
                    payload["unrecorded_before"] = left_out.into();
                }
            }
        }
        let ev = NewEvent {
            correlation_id: correlation_id.to_string(),
            request_id: subject.request_id,
            project_id: subject.project_id,
            environment: subject.environment,
            database_name: subject.database_name,
            event_type: "call.refused",
            actor_id: principal.map(|p| p.id.clone()).unwrap_or_default(),
            actor_kind: principal
                .map(|p| p.kind.as_str().to_string())
                .unwrap_or_default(),
            outcome: if err.code() == tonic::Code::Unavailable
                || err.code() == tonic::Code::Internal
            {
                "error"
            } else {
                "refused"
            },
            status_code: crate::error::code_name(err.code()).to_string(),
            message: err.to_string(),
            payload,
            run_id: principal.and_then(|p| p.run_id.clone()),
        };
        if let Err(e) = self.repo.insert_event(&ev).await {
            tracing::warn!(rpc, error = %e, refusal = %err, "could not record refusal in flow_events");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_budget_counts_what_it_leaves_out() {
        let mut budget = RefusalBudget::new(RefusalBudgetConfig {
            per_second: 0,
            burst: 2,
        });
        assert_eq!(budget.take(), Some(0));
        assert_eq!(budget.take(), Some(0));
        assert_eq!(budget.take(), None);
        assert_eq!(budget.take(), None);
        budget.tokens = 1.0;
        assert_eq!(
            budget.take(),
            Some(2),
            "the next row says two were left out"
        );
        assert_eq!(budget.take(), None);
    }
}
