//! Approval flow (R5, R6, design §3): queue requests, decide them exactly once, apply
//! them exactly once under a per-database lock, and drive stuck requests to a final
//! state after a crash.
//!
//! States: requested -> approved -> applied | failed; requested -> denied | expired.
//! Every transition is a conditional UPDATE; the terminal event is unique per request.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use serde_json::json;
use tracing::{Instrument, info, warn};
use uuid::Uuid;

use crate::{
    admin::{AdminClient, RenameOutcome},
    audit::Audit,
    domain::{
        Action, ApprovalMode, ApprovalRequest, ApprovalState, CallContext, DatabaseName,
        LifecycleOutcome,
    },
    error::ServiceError,
    ownership::{OwnedCall, Plan},
    policy::Policy,
    repository::{InsertOutcome, LockWait, NewRequest, Repository},
};

/// Test-only fault injection: named points between the steps of an apply, enabled
/// only through the `fault_points` configuration key (there is no other switch: no
/// environment variable, no RPC). In order, for create and delete alike:
///
/// * `after_claim`: the request is `approved` (claimed) and its apply lock is held;
///   nothing else was done.
/// * `after_intent`: the ownership intent is written (row `creating` / `deleting`);
///   the target cluster was not touched.
/// * `after_create`: create only; `CREATE DATABASE` of the request's staging name
///   committed on the target, its oid not yet recorded, nothing under the requested
///   name yet.
/// * `after_rename`: create only; the staging database renamed to the requested name;
///   the ownership row and the request state are not final.
/// * `after_drop`: delete only; `DROP DATABASE` committed on the target; the ownership
///   row and the request state are not final.
/// * `before_finalize`: inside the finalizing transaction, after the ownership change
///   was issued but before the final state and terminal event are written and
///   committed (so a crash here also proves that half-written finalize rolls back).
///
/// At a point the apply logs `fault point <name> reached` and parks forever, holding
/// what it holds (the apply lock, an open transaction at `before_finalize`). It does
/// not abort: the tests deliver a real SIGKILL once they read that line, so the crash
/// happens at a moment they chose, is a plain SIGKILL rather than a SIGABRT (which a
/// core-dump handler could intercept or slow down), and they can first observe the
/// intermediate state. The rest of the process keeps serving meanwhile (its recovery
/// loop skips the parked request, whose lock is held), like a replica whose apply hung.
pub const FAULT_POINTS: [&str; 6] = [
    "after_claim",
    "after_intent",
    "after_create",
    "after_rename",
    "after_drop",
    "before_finalize",
];

const SYSTEM_ACTOR: &str = crate::policy::SYSTEM_ACTOR_ID;
const SYSTEM_KIND: &str = "system";
/// How long an Approve waits for another apply of the same database to finish.
const APPLY_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Deny,
}

#[derive(Clone)]
pub struct Approvals {
    repo: Repository,
    admin: AdminClient,
    policy: Arc<Policy>,
    audit: Audit,
    request_ttl: Duration,
    faults: Arc<BTreeSet<String>>,
}

/// What an apply did on the target cluster.
enum Effect {
    Created {
        already_existed: bool,
        resumed: bool,
        database_oid: Option<i64>,
    },
    Dropped {
        already_gone: bool,
        resumed: bool,
        /// The re-check refused the request when it was resumed, after its earlier
        /// attempt had dropped the database: only the ownership row is removed.
        refused_at_resume: Option<String>,
        /// The database the row recorded no longer exists, and another database (this
        /// oid) holds the name: one the service did not create, left alone.
        name_held_by: Option<u32>,
    },
}

impl Approvals {
    pub fn new(
        repo: Repository,
        admin: AdminClient,
        policy: Arc<Policy>,
        audit: Audit,
        request_ttl: Duration,
        faults: BTreeSet<String>,
    ) -> Self {
        for point in &faults {
            if !FAULT_POINTS.contains(&point.as_str()) {
                warn!(point = %point, known = ?FAULT_POINTS, "unknown fault point ignored");
            }
        }
        let faults: BTreeSet<String> = faults
            .into_iter()
            .filter(|p| FAULT_POINTS.contains(&p.as_str()))
            .collect();
        Self {
            repo,
            admin,
            policy,
            audit,
            request_ttl,
            faults: Arc::new(faults),
        }
    }

    /// Test-only: park this apply forever at `point` if it is enabled (see
    /// [`FAULT_POINTS`]). The line is written straight to stderr so that it is out
    /// before anything else can happen.
    async fn fault(&self, point: &str, req: &ApprovalRequest) {
        if self.faults.contains(point) {
            eprintln!(
                "fault point {point} reached (request {}, {} of `{}`); parking this apply until the process is killed (test-only setting)",
                req.id, req.action, req.database_name
            );
            std::future::pending::<()>().await;
        }
    }

    /// Handle a create/delete that passed policy and ownership.
    pub async fn submit(
        &self,
        ctx: &CallContext,
        owned: OwnedCall,
    ) -> Result<LifecycleOutcome, ServiceError> {
        let call = &owned.call;
        let name = call.database.name.to_string();
        let base_event = || {
            let mut ev = Audit::event(ctx, "");
            ev.project_id = call.project_id.clone();
            ev.environment = call.environment.clone();
            ev.database_name = name.clone();
            ev
        };
        let own_outcome = |status: &'static str, message: String| LifecycleOutcome {
            status,
            request: None,
            action: call.action,
            environment: call.environment.clone(),
            database_name: name.clone(),
            project_id: call.project_id.clone(),
            applied: false,
            exists: owned.exists,
            owned_by_project: owned.ownership.is_some(),
            owner_project_id: owned
                .ownership
                .as_ref()
                .map(|o| o.project_id.clone())
                .unwrap_or_default(),
            registered_environment: owned
                .ownership
                .as_ref()
                .map(|o| o.environment.clone())
                .unwrap_or_default(),
            dry_run: call.dry_run,
            message,
            facts: None,
        };

        // An identical open request is returned; any other open request conflicts,
        // even for a create that would otherwise be a no-op: a delete of this database
        // may be open (and about to drop it), so "nothing to do" would be wrong.
        let open = self
            .repo
            .open_request_for(&call.database.target, &name)
            .await?;
        if let Some(open) = open.filter(|o| o.expires_at > chrono::Utc::now()) {
            return self.reuse_or_conflict(ctx, &owned, open).await;
        }

        // "Nothing to do" only if, now that no request is open, the database is still
        // there and still ours (a delete may have finished since ownership looked).
        if owned.plan == Plan::AlreadyPresent && self.still_present(call).await? {
            let message = format!(
                "database `{name}` already exists and is owned by project `{}`; nothing to do",
                call.project_id
            );
            let mut ev = base_event();
            ev.event_type = "database.unchanged";
            ev.message = message.clone();
            ev.payload = json!({ "dry_run": call.dry_run });
            self.audit.record(&ev).await?;
            self.audit
                .link(
                    &ctx.correlation_id,
                    None,
                    &call.project_id,
                    &call.environment,
                    &call.database.target,
                    &name,
                )
                .await?;
            return Ok(own_outcome("unchanged", message));
        }

        // A delete of a stale registration (the project's database was dropped outside
        // the service and another database took the name) drops nothing: say so.
        let stale_note = if owned.stale {
            format!(
                "; the database now under the name `{name}` is not the one this service created for project `{}` (that one was dropped outside the service), so this delete only removes the project's stale registration and drops nothing",
                call.project_id
            )
        } else {
            String::new()
        };

        if call.dry_run {
            let message = match call.approval_mode {
                ApprovalMode::None => format!(
                    "dry run: all checks passed; `{}` of `{name}` would be applied at once (approval mode none)",
                    call.action
                ),
                mode => format!(
                    "dry run: all checks passed; a `{}` request for `{name}` would be queued for approval (mode {})",
                    call.action,
                    mode.as_str()
                ),
            };
            let message = format!("{message}{stale_note}");
            let mut ev = base_event();
            ev.event_type = "dry_run.checked";
            ev.message = message.clone();
            ev.payload =
                json!({ "action": call.action, "approval_mode": call.approval_mode.as_str() });
            if owned.stale {
                ev.payload["stale_registration"] = true.into();
            }
            self.audit.record(&ev).await?;
            return Ok(own_outcome("dry_run", message));
        }

        let id = Uuid::now_v7();
        let immediate = call.approval_mode == ApprovalMode::None;
        let new = NewRequest {
            id,
            correlation_id: ctx.correlation_id.clone(),
            action: call.action,
            state: if immediate {
                ApprovalState::Approved
            } else {
                ApprovalState::Requested
            },
            environment: call.environment.clone(),
            target_cluster: call.database.target.clone(),
            database_name: name.clone(),
            project_id: call.project_id.clone(),
            requested_by: ctx.principal.id.clone(),
            requested_by_kind: ctx.principal.kind.as_str().to_string(),
            approval_mode: call.approval_mode,
            payload: json!({
                "action": call.action,
                "environment": call.environment,
                "database_name": name,
                "project_id": call.project_id,
                "target_cluster": call.database.target,
                "requested_by": ctx.principal.id,
            }),
            decided_by: immediate.then(|| crate::policy::POLICY_NONE_ACTOR_ID.to_string()),
            ttl_seconds: self.request_ttl.as_secs().max(1) as i64,
        };
        let mut created = base_event();
        created.event_type = "request.created";
        created.request_id = Some(id);
        created.message = format!(
            "{} of `{name}` requested by `{}` (approval mode {})",
            call.action,
            ctx.principal.id,
            call.approval_mode.as_str()
        );
        created.message.push_str(&stale_note);
        created.payload = json!({
            "action": call.action,
            "approval_mode": call.approval_mode.as_str(),
            "target_cluster": call.database.target,
            "database_existed": owned.exists,
        });
        if owned.stale {
            created.payload["stale_registration"] = true.into();
        }
        let mut events = vec![created];
        if immediate {
            let mut approved = base_event();
            approved.event_type = "request.approved";
            approved.request_id = Some(id);
            approved.actor_id = crate::policy::POLICY_NONE_ACTOR_ID.into();
            approved.actor_kind = SYSTEM_KIND.into();
            approved.message = "approval mode none: approved at once".into();
            events.push(approved);
        }

        match self.repo.insert_request(&new, &events).await? {
            InsertOutcome::OpenExists(open) => self.reuse_or_conflict(ctx, &owned, open).await,
            InsertOutcome::Inserted(req) if immediate => {
                info!(request_id = %req.id, action = %req.action, database = %req.database_name, "request approved at once (mode none); applying");
                self.apply(req, true).await
            }
            InsertOutcome::Inserted(req) => {
                info!(request_id = %req.id, action = %req.action, database = %req.database_name, "request queued for approval");
                let message = format!(
                    "{} request {} for `{name}` queued; it needs approval by {} of project `{}` (not the requester){stale_note}",
                    req.action,
                    req.id,
                    match req.approval_mode {
                        ApprovalMode::Delegated => "an owner or delegate",
                        _ => "an owner",
                    },
                    req.project_id
                );
                let mut out = LifecycleOutcome::for_request(&req, "approval_required", message);
                out.exists = owned.exists;
                out.owned_by_project = owned.ownership.is_some();
                out.owner_project_id = if out.owned_by_project {
                    req.project_id.clone()
                } else {
                    String::new()
                };
                Ok(out)
            }
        }
    }

    /// The call's database exists and its ownership row is active, ours, in this
    /// environment.
    async fn still_present(&self, call: &crate::policy::CheckedCall) -> Result<bool, ServiceError> {
        let target = &call.database.target;
        let row = self
            .repo
            .ownership(target, call.database.name.as_str())
            .await?;
        let Some(row) = row.filter(|o| {
            o.state == "active"
                && o.project_id == call.project_id
                && o.environment == call.environment
        }) else {
            return Ok(false);
        };
        // Present means: it exists, and it is the very database the service created.
        let current_oid = self.admin.oid(target, &call.database.name).await?;
        Ok(current_oid.is_some() && row.identifies(current_oid))
    }

    async fn reuse_or_conflict(
        &self,
        ctx: &CallContext,
        owned: &OwnedCall,
        open: ApprovalRequest,
    ) -> Result<LifecycleOutcome, ServiceError> {
        let call = &owned.call;
        let identical = open.action == call.action
            && open.project_id == call.project_id
            && open.environment == call.environment;
        if !identical {
            // Another project's request is named (one open request per database) but
            // neither its project nor a way to follow it that the caller lacks.
            let hint = if open.project_id == call.project_id {
                "wait for it to be decided, or follow it with GetRequest"
            } else {
                "it is another project's request; the name can be requested again only if that request is denied, expires or fails"
            };
            return Err(ServiceError::OpenRequestExists {
                name: call.database.name.to_string(),
                request_id: open.id,
                action: open.action.to_string(),
                state: open.state.to_string(),
                hint,
            });
        }
        if call.dry_run {
            // Nothing is stored or changed, as for any dry run: recorded under the
            // call's own correlation id with what it found, but not in the open
            // request's trail (a dry run is a question, like a read).
            let mut ev = Audit::event(ctx, "dry_run.checked");
            ev.project_id = call.project_id.clone();
            ev.environment = call.environment.clone();
            ev.database_name = call.database.name.to_string();
            ev.message = format!(
                "dry run: all checks passed; an identical {} request {} is already open ({}); the call would return it",
                open.action, open.id, open.state
            );
            ev.payload = json!({
                "action": call.action,
                "approval_mode": call.approval_mode.as_str(),
                "open_request_id": open.id,
                "open_request_state": open.state,
            });
            self.audit.record(&ev).await?;
        } else {
            let mut ev = Audit::request_event(
                &open,
                "request.repeated",
                &ctx.principal.id,
                ctx.principal.kind.as_str(),
            );
            ev.message = format!(
                "identical {} call returned the open request (call correlation id {})",
                call.action, ctx.correlation_id
            );
            ev.payload = json!({ "call_correlation_id": ctx.correlation_id });
            self.audit.record(&ev).await?;
            self.audit
                .link(
                    &ctx.correlation_id,
                    Some(open.id),
                    &open.project_id,
                    &open.environment,
                    &open.target_cluster,
                    &open.database_name,
                )
                .await?;
        }
        let status = if open.state == ApprovalState::Requested {
            "approval_required"
        } else {
            "in_progress"
        };
        let message = format!(
            "an identical {} request {} is already open ({}); returning it",
            open.action, open.id, open.state
        );
        let mut out = LifecycleOutcome::for_request(&open, status, message);
        out.dry_run = call.dry_run;
        Ok(out)
    }

    /// Approve or deny a request (the decider was checked by policy).
    pub async fn decide(
        &self,
        ctx: &CallContext,
        req: ApprovalRequest,
        decision: Decision,
        reason: &str,
    ) -> Result<LifecycleOutcome, ServiceError> {
        self.audit
            .link(
                &ctx.correlation_id,
                Some(req.id),
                &req.project_id,
                &req.environment,
                &req.target_cluster,
                &req.database_name,
            )
            .await?;
        let (event_type, verb) = match decision {
            Decision::Approve => ("request.approved", "approved"),
            Decision::Deny => ("request.denied", "denied"),
        };
        let mut ev = Audit::request_event(
            &req,
            event_type,
            &ctx.principal.id,
            ctx.principal.kind.as_str(),
        );
        ev.message = if reason.is_empty() {
            format!("{verb} by `{}`", ctx.principal.id)
        } else {
            format!("{verb} by `{}`: {reason}", ctx.principal.id)
        };
        ev.payload = json!({ "decision_correlation_id": ctx.correlation_id, "reason": reason });

        let decided = match decision {
            Decision::Approve => {
                self.repo
                    .claim_for_apply(req.id, &ctx.principal.id, reason, ev)
                    .await?
            }
            Decision::Deny => {
                self.repo
                    .deny(req.id, &ctx.principal.id, reason, ev)
                    .await?
            }
        };
        match (decided, decision) {
            (Some(claimed), Decision::Approve) => {
                info!(request_id = %claimed.id, approver = %ctx.principal.id, "request approved; applying");
                self.apply(claimed, true).await
            }
            (Some(denied), Decision::Deny) => {
                info!(request_id = %denied.id, approver = %ctx.principal.id, "request denied");
                Ok(LifecycleOutcome::for_request(
                    &denied,
                    "denied",
                    format!("request {} denied; nothing was changed", denied.id),
                ))
            }
            (None, _) => self.decided_elsewhere(ctx, req.id, decision, reason).await,
        }
    }

    /// The conditional UPDATE did not match: report the state the request is in,
    /// or refuse a decision that contradicts it (audited as `call.refused` by the
    /// transport). A decision that agrees with the state (approve of a request that
    /// is applied or being applied, deny of a denied one: a repeat, or the loser of a
    /// race) changes nothing and is answered OK; it is recorded as
    /// `decision.repeated` under the call's own correlation id and with the request's
    /// id, so the request's trail shows everyone who tried to decide it.
    async fn decided_elsewhere(
        &self,
        ctx: &CallContext,
        id: Uuid,
        decision: Decision,
        reason: &str,
    ) -> Result<LifecycleOutcome, ServiceError> {
        let mut current =
            self.repo
                .get_request(id)
                .await?
                .ok_or_else(|| ServiceError::RequestNotFound {
                    request_id: id.to_string(),
                })?;
        if current.state == ApprovalState::Requested {
            // Only an expired request fails the claim while still `requested`.
            self.repo.expire_due().await?;
            current.state = ApprovalState::Expired;
        }
        let final_err = |hint: &str| ServiceError::RequestFinal {
            request_id: id,
            state: current.state.to_string(),
            hint: hint.to_string(),
        };
        let (status, message) = match (current.state, decision) {
            (ApprovalState::Applied, Decision::Approve) => (
                "applied",
                format!("request {id} was already approved and applied"),
            ),
            (ApprovalState::Approved, Decision::Approve) => (
                "in_progress",
                format!("request {id} is already approved; its apply is in progress"),
            ),
            (ApprovalState::Denied, Decision::Deny) => {
                ("denied", format!("request {id} was already denied"))
            }
            (ApprovalState::Expired, _) => {
                return Err(final_err(
                    "it can no longer be decided; submit a new request",
                ));
            }
            (ApprovalState::Failed, _) => {
                return Err(final_err(&format!(
                    "apply failed ({}); submit a new request",
                    current.failure_reason.clone().unwrap_or_default()
                )));
            }
            (_, Decision::Deny) => {
                return Err(final_err("it was approved and cannot be denied now"));
            }
            (_, Decision::Approve) => {
                return Err(final_err("it was denied and cannot be approved now"));
            }
        };
        let verb = match decision {
            Decision::Approve => "approve",
            Decision::Deny => "deny",
        };
        let mut ev = Audit::event(ctx, "decision.repeated");
        ev.request_id = Some(current.id);
        ev.project_id = current.project_id.clone();
        ev.environment = current.environment.clone();
        ev.database_name = current.database_name.clone();
        ev.message = format!(
            "{verb} by `{}` found request {id} already {} (decided by `{}`); nothing was changed",
            ctx.principal.id,
            current.state,
            current.decided_by.as_deref().unwrap_or_default()
        );
        ev.payload = json!({
            "decision": verb,
            "found_state": current.state,
            "decided_by": current.decided_by,
            "reason": reason,
        });
        self.audit.record(&ev).await?;
        Ok(LifecycleOutcome::for_request(&current, status, message))
    }

    /// Apply an approved request. Runs in its own task so that a caller hanging up
    /// cannot cut an apply in half; `wait_for_lock=false` skips a database whose
    /// apply is running elsewhere (recovery).
    ///
    /// The request is already `approved` (the decision, or mode `none`'s storing, is
    /// committed), so a transient failure anywhere in the apply (no lock connection,
    /// the metadata database or target not answering, the apply lock held too long)
    /// is not reported as an error, which would read as "the decision failed": the
    /// answer is `in_progress` with the request approved, and the apply is deferred
    /// to the recovery loop (see [`Self::deferred`]).
    pub async fn apply(
        &self,
        req: ApprovalRequest,
        wait_for_lock: bool,
    ) -> Result<LifecycleOutcome, ServiceError> {
        let this = self.clone();
        let id = req.id;
        let claimed = req.clone();
        let result = tokio::spawn(
            async move { this.apply_locked(req, wait_for_lock).await }
                .instrument(tracing::Span::current()),
        )
        .await
        .map_err(|e| ServiceError::Internal(format!("apply task for {id} failed: {e}")))?;
        match result {
            Err(e) if e.is_transient() => Ok(self.deferred(&claimed, &e).await),
            other => other,
        }
    }

    /// An apply that could not run or finish for a transient reason: the request
    /// stays `approved`, `apply.deferred` is recorded, and the recovery loop of any
    /// replica applies it later. If the metadata database itself is what failed, the
    /// event may not be writable: that is logged, and the recovery loop picks the
    /// request up all the same (it looks for `approved` requests, not for events).
    async fn deferred(&self, req: &ApprovalRequest, cause: &ServiceError) -> LifecycleOutcome {
        // A failure while committing the final state may hide a commit that did
        // happen: then the final state is reported, and nothing is deferred.
        if let Ok(Some(current)) = self.repo.get_request(req.id).await
            && current.state != ApprovalState::Approved
        {
            return self.report(&current);
        }
        warn!(request_id = %req.id, error = %cause, "apply deferred; will retry");
        let _ = self.repo.note_apply_attempt(req.id).await;
        let mut ev = Audit::request_event(req, "apply.deferred", SYSTEM_ACTOR, SYSTEM_KIND);
        ev.outcome = "error";
        ev.status_code = crate::error::code_name(cause.code()).into();
        ev.message = format!("{cause}; the request stays approved and will be retried");
        if let Err(e) = self.audit.record(&ev).await {
            warn!(request_id = %req.id, error = %e, "could not record apply.deferred; the recovery loop retries the request all the same");
        }
        LifecycleOutcome::for_request(
            req,
            "in_progress",
            format!(
                "request {} is approved; its apply could not run yet ({cause}); the request stays approved and its apply will be retried automatically",
                req.id
            ),
        )
    }

    async fn apply_locked(
        &self,
        req: ApprovalRequest,
        wait_for_lock: bool,
    ) -> Result<LifecycleOutcome, ServiceError> {
        // Serialize applies of one database across replicas with a transaction-level
        // advisory lock on a connection of its own: a crash or a dropped connection
        // releases it, and it never leaks into the pool.
        let mut lock_conn = self.repo.lock_client().await?;
        let lock_tx = lock_conn
            .transaction()
            .await
            .map_err(ServiceError::metadata)?;
        let wait = if wait_for_lock {
            LockWait::Wait(APPLY_LOCK_TIMEOUT)
        } else {
            LockWait::Try
        };
        let locked = self
            .repo
            .take_apply_lock(&lock_tx, &req.target_cluster, &req.database_name, wait)
            .await?;
        if !locked && wait_for_lock {
            return Err(ServiceError::MetadataUnavailable {
                detail: format!(
                    "another apply of `{}` has held its lock for over {}",
                    req.database_name,
                    humantime::format_duration(APPLY_LOCK_TIMEOUT)
                ),
            });
        }
        if !locked {
            return Ok(LifecycleOutcome::for_request(
                &req,
                "in_progress",
                "apply running elsewhere".into(),
            ));
        }
        // Re-read under the lock: another replica may have finished it meanwhile.
        let current =
            self.repo
                .get_request(req.id)
                .await?
                .ok_or_else(|| ServiceError::RequestNotFound {
                    request_id: req.id.to_string(),
                })?;
        let outcome = if current.state == ApprovalState::Approved {
            self.fault("after_claim", &current).await;
            let mut started =
                Audit::request_event(&current, "apply.started", SYSTEM_ACTOR, SYSTEM_KIND);
            started.message = format!("applying {} of `{}`", current.action, current.database_name);
            self.audit.record(&started).await?;
            let result = self.apply_steps(&current).await;
            self.finish(&current, result).await
        } else {
            Ok(self.report(&current))
        };
        // Releases the advisory lock (nothing else was done in this transaction).
        let _ = lock_tx.rollback().await;
        outcome
    }

    /// The effects, each idempotent, in an order that keeps database and ownership row
    /// in agreement across a crash: the ownership intent is written first.
    async fn apply_steps(&self, req: &ApprovalRequest) -> Result<Effect, ServiceError> {
        let db = match self.policy.recheck_for_apply(req) {
            Ok(db) => db,
            Err(refused) => return self.refused_at_apply(req, refused).await,
        };
        let target = &db.target;
        let own = self.repo.ownership(target, db.name.as_str()).await?;
        // This request's intent is already written: an earlier attempt of this very
        // apply was interrupted (crash, outage) and this one resumes it.
        let resumed = own
            .as_ref()
            .is_some_and(|o| o.request_id == Some(req.id) && o.state != "active");
        if let Some(o) = &own {
            if o.project_id != req.project_id {
                return Err(ServiceError::OwnedByAnotherProject {
                    name: db.name.to_string(),
                });
            }
            if o.environment != req.environment {
                return Err(ServiceError::RegisteredInOtherEnvironment {
                    name: db.name.to_string(),
                    registered: o.environment.clone(),
                });
            }
        }
        match req.action {
            Action::Create => {
                let current_oid = self.admin.oid(target, &db.name).await?;
                if current_oid.is_some() {
                    if own.as_ref().is_some_and(|o| o.identifies(current_oid)) {
                        // Ours already: an interrupted attempt of this request renamed
                        // it into place, or it is the project's managed database.
                        return Ok(Effect::Created {
                            already_existed: true,
                            resumed,
                            database_oid: current_oid.map(i64::from),
                        });
                    }
                    self.abandon_create(req).await?;
                    return Err(ServiceError::UnmanagedDatabaseExists {
                        name: db.name.to_string(),
                    });
                }
                if self.repo.mark_creating(req).await?.is_none() {
                    return Err(ServiceError::OwnedByAnotherProject {
                        name: db.name.to_string(),
                    });
                }
                self.fault("after_intent", req).await;
                // Created under a name of this request's own, its oid recorded, then
                // renamed into place: a database that someone else puts under the
                // requested name meanwhile is never taken for the one created here.
                let staging = DatabaseName::staging_for(req.id);
                if let Err(e) = self.admin.ensure_database(target, &staging).await {
                    if !e.is_transient() {
                        self.abandon_create(req).await?;
                    }
                    return Err(e);
                }
                self.fault("after_create", req).await;
                let Some(staged_oid) = self.admin.oid(target, &staging).await? else {
                    // Dropped by someone right after it was made: start over next time.
                    return Err(ServiceError::TargetUnavailable {
                        target: target.clone(),
                        detail: format!("database `{staging}` vanished while being created"),
                    });
                };
                self.repo.record_creating_oid(req, staged_oid).await?;
                match self.admin.rename_database(target, &staging, &db.name).await {
                    Ok(RenameOutcome::Renamed) => {}
                    Ok(RenameOutcome::NameTaken) => {
                        self.abandon_create(req).await?;
                        return Err(ServiceError::UnmanagedDatabaseExists {
                            name: db.name.to_string(),
                        });
                    }
                    // Renamed meanwhile (a rename of an earlier attempt that timed out
                    // and that the server finished later) or dropped: the next attempt
                    // finds the database under its name by its recorded oid, or starts
                    // over.
                    Ok(RenameOutcome::SourceMissing) => {
                        return Err(ServiceError::TargetUnavailable {
                            target: target.clone(),
                            detail: format!("database `{staging}` vanished while being renamed"),
                        });
                    }
                    Err(e) => {
                        if !e.is_transient() {
                            self.abandon_create(req).await?;
                        }
                        return Err(e);
                    }
                }
                self.fault("after_rename", req).await;
                Ok(Effect::Created {
                    already_existed: false,
                    resumed,
                    database_oid: Some(i64::from(staged_oid)),
                })
            }
            Action::Delete => {
                let Some(own) = &own else {
                    return Err(ServiceError::DatabaseNotFound {
                        name: db.name.to_string(),
                        environment: req.environment.clone(),
                    });
                };
                let current_oid = self.admin.oid(target, &db.name).await?;
                if !own.identifies(current_oid) {
                    // Another database holds the name. When the one the row recorded
                    // exists nowhere on the cluster any more (dropped outside the
                    // service, or by an interrupted earlier attempt of this very
                    // request), nothing of the service's is left to drop: only its
                    // registration is removed, and the other database is left alone.
                    if self.recorded_database_gone(target, own).await? {
                        return Ok(Effect::Dropped {
                            already_gone: true,
                            resumed,
                            refused_at_resume: None,
                            name_held_by: current_oid,
                        });
                    }
                    return Err(ServiceError::UnmanagedDatabase {
                        name: db.name.to_string(),
                    });
                }
                self.repo.mark_deleting(req, current_oid).await?;
                self.fault("after_intent", req).await;
                let existed = self.admin.drop_database(target, &db.name).await?;
                self.fault("after_drop", req).await;
                Ok(Effect::Dropped {
                    already_gone: !existed,
                    resumed,
                    refused_at_resume: None,
                    name_held_by: None,
                })
            }
            Action::Describe => Err(ServiceError::Internal("describe is never queued".into())),
        }
    }

    /// The re-check at apply time refused the request (the configuration changed
    /// since it was approved: environment no longer allowed, name now protected or
    /// outside the name rules, environment moved to another target). Nothing more is
    /// done for it, and what this request's own interrupted earlier attempt left on
    /// the way is settled so that no database is left without an active ownership
    /// row and no row without its database:
    ///
    /// * create: the staging database, the database it renamed into place (the one
    ///   whose oid its `creating` row recorded) and the `creating` row are removed;
    ///   the request fails with the re-check's reason. A database under the name
    ///   that the row does not identify is someone else's and is left alone; an
    ///   `active` row (a re-create after drift) is left as it is.
    /// * delete: a database still there is never dropped now; its `deleting` row goes
    ///   back to `active` and the request fails. A database already dropped by the
    ///   earlier attempt cannot be brought back: its row is removed and the request
    ///   ends `applied`, saying so.
    ///
    /// When the earlier attempt touched nothing yet (no intent row of this request),
    /// the target is not contacted and the request fails. When the request's target
    /// is not configured on this replica, nothing can be checked or undone: the
    /// request stays `approved` (deferred) for a replica that has the target.
    async fn refused_at_apply(
        &self,
        req: &ApprovalRequest,
        refused: ServiceError,
    ) -> Result<Effect, ServiceError> {
        let target = &req.target_cluster;
        let own = self
            .repo
            .ownership(target, &req.database_name)
            .await?
            .filter(|o| o.request_id == Some(req.id) && o.project_id == req.project_id);
        let Some(own) = own else {
            return Err(refused);
        };
        if !self.admin.has_target(target) {
            return Err(ServiceError::TargetUnavailable {
                target: target.clone(),
                detail: format!(
                    "the target is not configured on this replica, and an interrupted earlier attempt of request {} left its `{}` intent there ({refused}); a replica configured with the target must finish or undo it",
                    req.id, own.state
                ),
            });
        }
        let name = self.policy.stored_name(req)?;
        match req.action {
            Action::Create => {
                let staging = DatabaseName::staging_for(req.id);
                let staging_dropped = self.admin.drop_database(target, &staging).await?;
                let mut renamed_dropped = false;
                let mut intent_removed = false;
                if own.state == "creating" {
                    let current = self.admin.oid(target, &name).await?;
                    if current.is_some() && own.database_oid == current.map(i64::from) {
                        // Renamed into place by this very request, never reported
                        // applied: its own database, identified by oid.
                        renamed_dropped = self.admin.drop_database(target, &name).await?;
                    }
                    self.repo.drop_creating_intent(req).await?;
                    intent_removed = true;
                }
                warn!(request_id = %req.id, database = %req.database_name, staging_dropped, renamed_dropped, intent_removed, "re-check at apply refused a resumed create ({refused}); its interrupted attempt is undone");
                let mut ev =
                    Audit::request_event(req, "apply.rolled_back", SYSTEM_ACTOR, SYSTEM_KIND);
                ev.message = format!(
                    "the re-check at apply refused this request ({refused}); what its interrupted earlier attempt made is removed"
                );
                ev.payload = json!({
                    "staging_database_dropped": staging_dropped,
                    "renamed_database_dropped": renamed_dropped,
                    "intent_removed": intent_removed,
                });
                self.audit.record(&ev).await?;
                Err(refused)
            }
            Action::Delete => {
                if own.state != "deleting" {
                    return Err(refused);
                }
                let current = self.admin.oid(target, &name).await?;
                let still_there = current.is_some()
                    && own
                        .database_oid
                        .is_none_or(|recorded| Some(recorded) == current.map(i64::from));
                if still_there {
                    // Not dropped yet, and not dropped now: `finish` puts the row
                    // back to `active`.
                    return Err(refused);
                }
                Ok(Effect::Dropped {
                    already_gone: true,
                    resumed: true,
                    refused_at_resume: Some(refused.to_string()),
                    name_held_by: current,
                })
            }
            Action::Describe => Err(ServiceError::Internal("describe is never queued".into())),
        }
    }

    /// Whether the database an ownership row recorded (by oid) no longer exists on
    /// the target under any name. False when the row records no oid: then nothing
    /// is known about its database.
    async fn recorded_database_gone(
        &self,
        target: &str,
        own: &crate::domain::Ownership,
    ) -> Result<bool, ServiceError> {
        match own.database_oid {
            Some(oid) => Ok(self.admin.name_of_oid(target, oid).await?.is_none()),
            None => Ok(false),
        }
    }

    /// Undo what a create that failed for good left behind: its staging database (if
    /// it was made) and its `creating` intent. A database under the requested name is
    /// never touched: it is not the service's.
    async fn abandon_create(&self, req: &ApprovalRequest) -> Result<(), ServiceError> {
        let staging = DatabaseName::staging_for(req.id);
        self.admin
            .drop_database(&req.target_cluster, &staging)
            .await?;
        self.repo.drop_creating_intent(req).await?;
        Ok(())
    }

    /// Write the final state, the ownership change and the terminal event in one
    /// transaction. A transient error is handed back as it is: the request stays
    /// approved, and [`Self::apply`] defers it.
    async fn finish(
        &self,
        req: &ApprovalRequest,
        result: Result<Effect, ServiceError>,
    ) -> Result<LifecycleOutcome, ServiceError> {
        let effect = match result {
            // Deferred by `apply`: the request stays approved for a retry.
            Err(e) if e.is_transient() => return Err(e),
            other => other,
        };
        let mut client = self.repo.client().await?;
        let tx = client.transaction().await.map_err(ServiceError::metadata)?;
        // The answer's message, when the request's state alone does not tell it.
        let mut answer = None;
        let (state, event) = match &effect {
            Ok(effect) => {
                let (message, payload) = match effect {
                    Effect::Created {
                        already_existed,
                        resumed,
                        database_oid,
                    } => {
                        self.repo
                            .activate_ownership(&tx, req, *database_oid)
                            .await?;
                        let message = if *already_existed {
                            format!(
                                "database `{}` is in place (created by an interrupted earlier attempt of this request, or already the project's) and owned by project `{}`",
                                req.database_name, req.project_id
                            )
                        } else {
                            format!(
                                "database `{}` created and owned by project `{}`",
                                req.database_name, req.project_id
                            )
                        };
                        (
                            message,
                            json!({ "effect": "created", "already_existed": already_existed, "resumed": resumed }),
                        )
                    }
                    Effect::Dropped {
                        already_gone,
                        resumed,
                        refused_at_resume,
                        name_held_by,
                    } => {
                        self.repo.remove_ownership(&tx, req).await?;
                        let mut message = if let Some(refused) = refused_at_resume {
                            format!(
                                "database `{}` had already been dropped by an interrupted earlier attempt of this request (or outside the service); its ownership row is removed. The re-check when resuming refused the request ({refused}), so nothing else was done",
                                req.database_name
                            )
                        } else if *already_gone && *resumed {
                            format!(
                                "database `{}` was already gone (an interrupted earlier attempt of this request dropped it, or it was dropped outside the service); ownership row removed",
                                req.database_name
                            )
                        } else if *already_gone {
                            format!(
                                "database `{}` was already gone (dropped outside the service); ownership row removed",
                                req.database_name
                            )
                        } else {
                            format!(
                                "database `{}` dropped; ownership row removed",
                                req.database_name
                            )
                        };
                        let mut payload = json!({ "effect": "dropped", "already_gone": already_gone, "resumed": resumed, "refused_at_resume": refused_at_resume });
                        if let Some(oid) = name_held_by {
                            message.push_str(&format!(
                                ". Another database now holds the name `{}` (oid {oid}); this service did not create it, so it was not dropped and is not managed",
                                req.database_name
                            ));
                            payload["unmanaged_database_oid_left_alone"] = (*oid).into();
                            answer = Some(message.clone());
                        }
                        (message, payload)
                    }
                };
                let mut ev =
                    Audit::request_event(req, "request.applied", SYSTEM_ACTOR, SYSTEM_KIND);
                ev.message = message;
                ev.payload = payload;
                (ApprovalState::Applied, ev)
            }
            Err(e) => {
                // A delete that failed for good leaves the database in place: its row
                // goes back to `active` instead of staying `deleting`.
                if req.action == Action::Delete {
                    self.repo.revert_deleting(&tx, req).await?;
                }
                let mut ev = Audit::request_event(req, "request.failed", SYSTEM_ACTOR, SYSTEM_KIND);
                ev.outcome = "error";
                ev.status_code = crate::error::code_name(e.code()).into();
                ev.message = e.to_string();
                (ApprovalState::Failed, ev)
            }
        };
        let failure = effect.as_ref().err().map(|e| e.to_string());
        self.fault("before_finalize", req).await;
        let finished = self
            .repo
            .finish(&tx, req.id, state, failure.as_deref(), &event)
            .await?;
        if finished {
            tx.commit().await.map_err(ServiceError::metadata)?;
        } else {
            drop(tx);
        }
        // Give the connection back before taking another one.
        drop(client);
        let current =
            self.repo
                .get_request(req.id)
                .await?
                .ok_or_else(|| ServiceError::RequestNotFound {
                    request_id: req.id.to_string(),
                })?;
        match (&failure, finished) {
            // Failed for good: an operator needs to see this without debug logging.
            (Some(reason), true) => warn!(
                request_id = %req.id,
                state = %current.state,
                action = %req.action,
                database = %req.database_name,
                "apply failed: {reason}"
            ),
            _ => info!(request_id = %req.id, state = %current.state, "apply finished"),
        }
        let mut out = self.report(&current);
        if let (true, ApprovalState::Applied, Some(message)) = (finished, current.state, answer) {
            // A delete that removed only a stale registration: a database (someone
            // else's) still exists under the name, and nothing was dropped.
            out.message = message;
            out.exists = true;
        }
        Ok(out)
    }

    fn report(&self, req: &ApprovalRequest) -> LifecycleOutcome {
        let (status, message) = match req.state {
            ApprovalState::Applied => (
                "applied",
                match req.action {
                    Action::Create => format!(
                        "database `{}` exists and is owned by project `{}`",
                        req.database_name, req.project_id
                    ),
                    _ => format!(
                        "database `{}` dropped and its ownership removed",
                        req.database_name
                    ),
                },
            ),
            ApprovalState::Failed => (
                "failed",
                format!(
                    "request {} failed: {}",
                    req.id,
                    req.failure_reason.clone().unwrap_or_default()
                ),
            ),
            ApprovalState::Denied => ("denied", format!("request {} was denied", req.id)),
            ApprovalState::Expired => ("expired", format!("request {} expired", req.id)),
            ApprovalState::Approved => (
                "in_progress",
                format!("request {} is being applied", req.id),
            ),
            ApprovalState::Requested => (
                "approval_required",
                format!("request {} is waiting for approval", req.id),
            ),
        };
        LifecycleOutcome::for_request(req, status, message)
    }

    /// Expire due requests and drive approved ones to a final state (crash recovery).
    /// `grace` skips requests approved very recently (their apply is likely running).
    pub async fn recover_once(&self, grace: Duration) -> Result<usize, ServiceError> {
        let expired = self.repo.expire_due().await?;
        for r in &expired {
            info!(request_id = %r.id, correlation_id = %r.correlation_id, "request expired");
        }
        let mut driven = 0;
        for req in self.repo.approved_requests(grace.as_secs() as i64).await? {
            let span = tracing::info_span!("recovery", correlation_id = %req.correlation_id, request_id = %req.id);
            match self.apply(req, false).instrument(span).await {
                Ok(out) if out.status != "in_progress" => driven += 1,
                Ok(_) => {}
                Err(e) => warn!(error = %e, "recovery apply failed; will retry"),
            }
        }
        Ok(driven)
    }
}
