//! gRPC handlers for `dblifecycle.v1.DatabaseLifecycle`. Each lifecycle RPC runs
//! policy, then ownership, then the handler; a refusal at any step is audited and
//! mapped to its status in one place (`ServiceError::to_status`).

use std::sync::Arc;

use serde_json::{Value, json};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    approvals::{Approvals, Decision},
    audit::{Audit, RefusalSubject},
    domain::{Action, ApprovalState, CallContext, LifecycleOutcome},
    error::{ServiceError, code_name},
    ownership::Ownerships,
    policy::{Policy, RawCall, printable},
    proto::{self, database_lifecycle_server::DatabaseLifecycle},
    repository::{Repository, RequestFilter},
    transport::convert,
};

const DEFAULT_PAGE_SIZE: i32 = 50;
const MAX_PAGE_SIZE: i32 = 500;
const MAX_REASON_CHARS: usize = 1000;

#[derive(Clone)]
pub struct LifecycleService {
    pub policy: Arc<Policy>,
    pub ownership: Ownerships,
    pub approvals: Approvals,
    pub repo: Repository,
    pub audit: Audit,
}

fn context<T>(req: &Request<T>) -> Result<CallContext, Status> {
    req.extensions()
        .get::<CallContext>()
        .cloned()
        .ok_or_else(|| Status::internal("call context missing: middleware not installed"))
}

fn page_size(raw: i32) -> Result<i64, ServiceError> {
    match raw {
        0 => Ok(DEFAULT_PAGE_SIZE as i64),
        1..=MAX_PAGE_SIZE => Ok(raw as i64),
        _ => Err(ServiceError::invalid(
            "page_size",
            format!("must be between 1 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})"),
        )),
    }
}

fn parse_request_id(raw: &str) -> Result<Uuid, ServiceError> {
    Uuid::parse_str(raw.trim()).map_err(|_| {
        ServiceError::invalid(
            "request_id",
            format!("`{}` is not a request id (a UUID)", printable(raw)),
        )
    })
}

/// Opaque page tokens: hex of a prefix and the keyset position.
fn encode_token(kind: &str, pos: &str) -> String {
    hex::encode(format!("{kind}:{pos}"))
}

fn decode_token(kind: &str, raw: &str) -> Result<Option<String>, ServiceError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let bad = || ServiceError::invalid("page_token", "not a token returned by this RPC");
    let bytes = hex::decode(raw).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix(&format!("{kind}:"))
        .map(|s| Some(s.to_string()))
        .ok_or_else(bad)
}

/// Untrusted input as it may appear in an audit payload: escaped and shortened.
fn input_summary(pairs: &[(&str, &str)], flags: &[(&str, bool)]) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in pairs {
        m.insert(k.to_string(), Value::String(printable(v)));
    }
    for (k, v) in flags {
        m.insert(k.to_string(), Value::Bool(*v));
    }
    Value::Object(m)
}

impl LifecycleService {
    /// Log, audit refusals, attach the correlation id, and map errors to a status.
    async fn respond<T>(
        &self,
        ctx: &CallContext,
        rpc: &str,
        input: Value,
        subject: RefusalSubject,
        result: Result<T, ServiceError>,
    ) -> Result<Response<T>, Status> {
        match result {
            Ok(body) => {
                tracing::info!(principal = %ctx.principal.id, "ok");
                Ok(Response::new(body))
            }
            Err(err) => {
                let code = code_name(err.code());
                if err.code() == tonic::Code::Internal {
                    tracing::error!(principal = %ctx.principal.id, code, "failed: {err}");
                } else {
                    tracing::info!(principal = %ctx.principal.id, code, "refused: {err}");
                }
                self.audit
                    .refusal(
                        &ctx.correlation_id,
                        Some(&ctx.principal),
                        rpc,
                        &err,
                        input,
                        subject,
                    )
                    .await;
                Err(err.to_status(&ctx.correlation_id))
            }
        }
    }

    /// A read-only query (WhoAmI, GetRequest, the List RPCs): answered, and recorded
    /// as `query.answered` under the call's own correlation id. The event names no
    /// request or project of its own (what was asked is in the payload), so reads
    /// never show up in a request's trail, however often an agent polls it.
    async fn answer_query<T>(
        &self,
        ctx: &CallContext,
        rpc: &'static str,
        input: Value,
        subject: RefusalSubject,
        result: Result<T, ServiceError>,
        returned: impl FnOnce(&T) -> usize,
    ) -> Result<Response<T>, Status> {
        let result = match result {
            Ok(body) => {
                let mut ev = Audit::event(ctx, "query.answered");
                ev.message = format!("{rpc} answered");
                ev.payload =
                    json!({ "rpc": rpc, "input": input.clone(), "returned": returned(&body) });
                self.audit.record(&ev).await.map(|()| body)
            }
            Err(err) => Err(err),
        };
        self.respond(ctx, rpc, input, subject, result).await
    }

    /// policy -> ownership -> handler, for create/delete/describe.
    async fn lifecycle(
        &self,
        ctx: &CallContext,
        action: Action,
        raw: RawCall<'_>,
        subject: &mut RefusalSubject,
    ) -> Result<proto::LifecycleResult, ServiceError> {
        let checked = self.policy.check_call(&ctx.principal, action, &raw)?;
        // Past policy: project, environment and name are validated and the caller's own.
        subject.project_id = checked.project_id.clone();
        subject.environment = checked.environment.clone();
        subject.database_name = checked.database.name.to_string();
        let owned = self.ownership.check(checked).await?;
        let outcome = match action {
            Action::Describe => {
                let out = self.ownership.describe(&owned).await?;
                let mut ev = Audit::event(ctx, "database.described");
                ev.project_id = out.project_id.clone();
                ev.environment = out.environment.clone();
                ev.database_name = out.database_name.clone();
                ev.message = out.message.clone();
                ev.payload =
                    json!({ "exists": out.exists, "owned_by_project": out.owned_by_project });
                self.audit.record(&ev).await?;
                self.audit
                    .link(
                        &ctx.correlation_id,
                        None,
                        &out.project_id,
                        &out.environment,
                        &owned.call.database.target,
                        &out.database_name,
                    )
                    .await?;
                out
            }
            _ => self.approvals.submit(ctx, owned).await?,
        };
        Ok(convert::result(outcome, &ctx.correlation_id))
    }

    async fn approve_inner(
        &self,
        ctx: &CallContext,
        msg: &proto::ApproveRequest,
        subject: &mut RefusalSubject,
    ) -> Result<LifecycleOutcome, ServiceError> {
        let id = parse_request_id(&msg.request_id)?;
        let decision = match proto::Decision::try_from(msg.decision) {
            Ok(proto::Decision::Approve) => Decision::Approve,
            Ok(proto::Decision::Deny) => Decision::Deny,
            _ => {
                return Err(ServiceError::invalid(
                    "decision",
                    "must be DECISION_APPROVE or DECISION_DENY",
                ));
            }
        };
        let reason = msg.reason.trim();
        if reason.chars().count() > MAX_REASON_CHARS {
            return Err(ServiceError::invalid(
                "reason",
                format!("at most {MAX_REASON_CHARS} characters"),
            ));
        }
        if reason
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(ServiceError::invalid(
                "reason",
                "must not contain control characters",
            ));
        }
        // Bidi overrides and invisible characters would let a reason show a reader
        // something other than what is stored (or pass for "no reason" as text).
        if reason.chars().any(crate::policy::is_invisible_or_bidi) {
            return Err(ServiceError::invalid(
                "reason",
                "must not contain invisible or text-direction characters (zero-width, bidi overrides, ...)",
            ));
        }
        // The contract (proto): a reason is required when denying.
        if decision == Decision::Deny && reason.is_empty() {
            return Err(ServiceError::invalid(
                "reason",
                "required when denying: say why, it is recorded in the audit trail",
            ));
        }
        let req =
            self.repo
                .get_request(id)
                .await?
                .ok_or_else(|| ServiceError::RequestNotFound {
                    request_id: id.to_string(),
                })?;
        subject.request(&req, ctx.principal.covers_project(&req.project_id));
        self.policy.check_decider(&ctx.principal, &req)?;
        self.approvals.decide(ctx, req, decision, reason).await
    }

    async fn get_request_inner(
        &self,
        ctx: &CallContext,
        raw_id: &str,
        subject: &mut RefusalSubject,
    ) -> Result<proto::ApprovalRequest, ServiceError> {
        let id = parse_request_id(raw_id)?;
        self.policy.check_reader(&ctx.principal)?;
        let req =
            self.repo
                .get_request(id)
                .await?
                .ok_or_else(|| ServiceError::RequestNotFound {
                    request_id: id.to_string(),
                })?;
        let covered = ctx.principal.covers_project(&req.project_id);
        subject.request(&req, covered);
        if !covered {
            return Err(ServiceError::forbidden(format!(
                "request {id} belongs to a project outside the scope of principal `{}`",
                ctx.principal.id
            )));
        }
        Ok(convert::request(&req))
    }

    async fn list_requests_inner(
        &self,
        ctx: &CallContext,
        msg: &proto::ListRequestsRequest,
    ) -> Result<proto::ListRequestsResponse, ServiceError> {
        let limit = page_size(msg.page_size)?;
        let state = match proto::ApprovalState::try_from(msg.state) {
            Ok(proto::ApprovalState::Unspecified) => None,
            Ok(s) => Some(convert::state_from_proto(s)),
            Err(_) => return Err(ServiceError::invalid("state", "unknown approval state")),
        };
        self.policy.check_reader(&ctx.principal)?;
        let project_id = match msg.project_id.trim() {
            "" => None,
            p => Some(self.policy.resolve_project(&ctx.principal, p)?),
        };
        let environment = match msg.environment.trim() {
            "" => None,
            e => {
                let e = e.to_lowercase();
                crate::policy::validate_environment_format(&e)
                    .map_err(|m| ServiceError::invalid("environment", m))?;
                Some(e)
            }
        };
        let before_id = decode_token("r", &msg.page_token)?
            .map(|s| Uuid::parse_str(&s))
            .transpose()
            .map_err(|_| ServiceError::invalid("page_token", "not a token returned by this RPC"))?;
        let rows = self
            .repo
            .list_requests(&RequestFilter {
                state,
                project_id,
                environment,
                projects_in_scope: self.policy.readable_projects(&ctx.principal),
                before_id,
                limit: limit + 1,
            })
            .await?;
        let more = rows.len() as i64 > limit;
        let rows: Vec<_> = rows.into_iter().take(limit as usize).collect();
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => encode_token("r", &last.id.to_string()),
            _ => String::new(),
        };
        Ok(proto::ListRequestsResponse {
            requests: rows.iter().map(convert::request).collect(),
            next_page_token,
        })
    }

    async fn list_events_inner(
        &self,
        ctx: &CallContext,
        msg: &proto::ListFlowEventsRequest,
        subject: &mut RefusalSubject,
    ) -> Result<proto::ListFlowEventsResponse, ServiceError> {
        let limit = page_size(msg.page_size)?;
        let after_id = decode_token("e", &msg.page_token)?
            .map(|s| s.parse::<i64>())
            .transpose()
            .map_err(|_| ServiceError::invalid("page_token", "not a token returned by this RPC"))?
            .unwrap_or(0);
        let (cid, rid) = (msg.correlation_id.trim(), msg.request_id.trim());
        if cid.is_empty() == rid.is_empty() {
            return Err(ServiceError::invalid(
                "correlation_id",
                "give exactly one of correlation_id or request_id",
            ));
        }
        self.policy.check_reader(&ctx.principal)?;
        let rows =
            if !cid.is_empty() {
                if !crate::transport::middleware::valid_correlation_id(cid) {
                    return Err(ServiceError::invalid(
                        "correlation_id",
                        "not a correlation id",
                    ));
                }
                self.repo
                    .events_by_correlation(
                        cid,
                        after_id,
                        limit + 1,
                        self.policy.readable_projects(&ctx.principal).as_deref(),
                        &ctx.principal.id,
                    )
                    .await?
            } else {
                let id = parse_request_id(rid)?;
                let req = self.repo.get_request(id).await?.ok_or_else(|| {
                    ServiceError::RequestNotFound {
                        request_id: id.to_string(),
                    }
                })?;
                let covered = ctx.principal.covers_project(&req.project_id);
                subject.request(&req, covered);
                if !covered {
                    return Err(ServiceError::forbidden(format!(
                        "request {id} belongs to a project outside the scope of principal `{}`",
                        ctx.principal.id
                    )));
                }
                self.repo.events_by_request(id, after_id, limit + 1).await?
            };
        let more = rows.len() as i64 > limit;
        let rows: Vec<_> = rows.into_iter().take(limit as usize).collect();
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => encode_token("e", &last.id.to_string()),
            _ => String::new(),
        };
        Ok(proto::ListFlowEventsResponse {
            events: rows.iter().map(convert::event).collect(),
            next_page_token,
        })
    }

    async fn list_databases_inner(
        &self,
        ctx: &CallContext,
        msg: &proto::ListDatabasesRequest,
    ) -> Result<proto::ListDatabasesResponse, ServiceError> {
        let limit = page_size(msg.page_size)?;
        self.policy.check_reader(&ctx.principal)?;
        let project = self
            .policy
            .resolve_project(&ctx.principal, &msg.project_id)?;
        let environment = match msg.environment.trim() {
            "" => None,
            e => Some(self.policy.environment(e)?),
        };
        let after = decode_token("d", &msg.page_token)?
            .map(|pos| {
                // `target/name` as this RPC wrote it; anything else (NUL bytes, which
                // PostgreSQL text cannot hold, included) was not made here.
                let well_formed = pos.split_once('/').is_some_and(|(target, name)| {
                    !target.is_empty()
                        && target.len() <= 128
                        && !name.is_empty()
                        && name.len() <= 63
                        && !pos.chars().any(char::is_control)
                });
                well_formed.then_some(pos).ok_or_else(|| {
                    ServiceError::invalid("page_token", "not a token returned by this RPC")
                })
            })
            .transpose()?;
        let rows = self
            .repo
            .list_databases(
                &project,
                environment.as_deref(),
                after.as_deref(),
                limit + 1,
            )
            .await?;
        let more = rows.len() as i64 > limit;
        let rows: Vec<_> = rows.into_iter().take(limit as usize).collect();
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => encode_token(
                "d",
                &format!("{}/{}", last.target_cluster, last.database_name),
            ),
            _ => String::new(),
        };
        Ok(proto::ListDatabasesResponse {
            databases: rows.iter().map(convert::database).collect(),
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl DatabaseLifecycle for LifecycleService {
    async fn create(
        &self,
        request: Request<proto::CreateDatabaseRequest>,
    ) -> Result<Response<proto::LifecycleResult>, Status> {
        let ctx = context(&request)?;
        let m = request.into_inner();
        let raw = RawCall {
            environment: &m.environment,
            database_name: &m.database_name,
            project_id: &m.project_id,
            confirm_delete: false,
            dry_run: m.dry_run,
        };
        let mut subject = RefusalSubject::default();
        let result = self
            .lifecycle(&ctx, Action::Create, raw, &mut subject)
            .await;
        let input = input_summary(
            &[
                ("environment", &m.environment),
                ("database_name", &m.database_name),
                ("project_id", &m.project_id),
            ],
            &[("dry_run", m.dry_run)],
        );
        self.respond(&ctx, "Create", input, subject, result).await
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteDatabaseRequest>,
    ) -> Result<Response<proto::LifecycleResult>, Status> {
        let ctx = context(&request)?;
        let m = request.into_inner();
        let raw = RawCall {
            environment: &m.environment,
            database_name: &m.database_name,
            project_id: &m.project_id,
            confirm_delete: m.confirm_delete,
            dry_run: m.dry_run,
        };
        let mut subject = RefusalSubject::default();
        let result = self
            .lifecycle(&ctx, Action::Delete, raw, &mut subject)
            .await;
        let input = input_summary(
            &[
                ("environment", &m.environment),
                ("database_name", &m.database_name),
                ("project_id", &m.project_id),
            ],
            &[("confirm_delete", m.confirm_delete), ("dry_run", m.dry_run)],
        );
        self.respond(&ctx, "Delete", input, subject, result).await
    }

    async fn describe(
        &self,
        request: Request<proto::DescribeDatabaseRequest>,
    ) -> Result<Response<proto::LifecycleResult>, Status> {
        let ctx = context(&request)?;
        let m = request.into_inner();
        let raw = RawCall {
            environment: &m.environment,
            database_name: &m.database_name,
            project_id: &m.project_id,
            confirm_delete: false,
            dry_run: false,
        };
        let mut subject = RefusalSubject::default();
        let result = self
            .lifecycle(&ctx, Action::Describe, raw, &mut subject)
            .await;
        let input = input_summary(
            &[
                ("environment", &m.environment),
                ("database_name", &m.database_name),
                ("project_id", &m.project_id),
            ],
            &[],
        );
        self.respond(&ctx, "Describe", input, subject, result).await
    }

    async fn approve(
        &self,
        request: Request<proto::ApproveRequest>,
    ) -> Result<Response<proto::LifecycleResult>, Status> {
        let ctx = context(&request)?;
        let m = request.into_inner();
        let mut subject = RefusalSubject::default();
        let result = self
            .approve_inner(&ctx, &m, &mut subject)
            .await
            .map(|o| convert::result(o, &ctx.correlation_id));
        let input = json!({
            "request_id": printable(&m.request_id),
            "decision": m.decision,
            "reason": printable(&m.reason),
        });
        self.respond(&ctx, "Approve", input, subject, result).await
    }

    async fn get_request(
        &self,
        request: Request<proto::GetRequestRequest>,
    ) -> Result<Response<proto::ApprovalRequest>, Status> {
        let ctx = context(&request)?;
        let m = request.into_inner();
        let mut subject = RefusalSubject::default();
        let result = self
            .get_request_inner(&ctx, &m.request_id, &mut subject)
            .await;
        let input = json!({ "request_id": printable(&m.request_id) });
        self.answer_query(&ctx, "GetRequest", input, subject, result, |_| 1)
            .await
    }

    async fn list_requests(
        &self,
        request: Request<proto::ListRequestsRequest>,
    ) -> Result<Response<proto::ListRequestsResponse>, Status> {
        let ctx = context(&request)?;
        let m = request.into_inner();
        let result = self.list_requests_inner(&ctx, &m).await;
        let input = input_summary(
            &[
                ("project_id", &m.project_id),
                ("environment", &m.environment),
            ],
            &[],
        );
        self.answer_query(
            &ctx,
            "ListRequests",
            input,
            RefusalSubject::default(),
            result,
            |r| r.requests.len(),
        )
        .await
    }

    async fn list_flow_events(
        &self,
        request: Request<proto::ListFlowEventsRequest>,
    ) -> Result<Response<proto::ListFlowEventsResponse>, Status> {
        let ctx = context(&request)?;
        let m = request.into_inner();
        let mut subject = RefusalSubject::default();
        let result = self.list_events_inner(&ctx, &m, &mut subject).await;
        let input = input_summary(
            &[
                ("correlation_id", &m.correlation_id),
                ("request_id", &m.request_id),
            ],
            &[],
        );
        self.answer_query(&ctx, "ListFlowEvents", input, subject, result, |r| {
            r.events.len()
        })
        .await
    }

    async fn list_databases(
        &self,
        request: Request<proto::ListDatabasesRequest>,
    ) -> Result<Response<proto::ListDatabasesResponse>, Status> {
        let ctx = context(&request)?;
        let m = request.into_inner();
        let result = self.list_databases_inner(&ctx, &m).await;
        let input = input_summary(
            &[
                ("project_id", &m.project_id),
                ("environment", &m.environment),
            ],
            &[],
        );
        self.answer_query(
            &ctx,
            "ListDatabases",
            input,
            RefusalSubject::default(),
            result,
            |r| r.databases.len(),
        )
        .await
    }

    async fn who_am_i(
        &self,
        request: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::WhoAmIResponse>, Status> {
        // Authentication (the middleware) is the whole check: any valid token may ask.
        let ctx = context(&request)?;
        let p = &ctx.principal;
        let body = proto::WhoAmIResponse {
            principal_id: p.id.clone(),
            kind: p.kind.as_str().to_string(),
            projects: p.projects.clone(),
            roles: p.roles.iter().map(|r| r.as_str().to_string()).collect(),
            run_id: p.run_id.clone().unwrap_or_default(),
            correlation_id: ctx.correlation_id.clone(),
        };
        self.answer_query(
            &ctx,
            "WhoAmI",
            Value::Null,
            RefusalSubject::default(),
            Ok(body),
            |_| 1,
        )
        .await
    }
}

impl From<ApprovalState> for proto::ApprovalState {
    fn from(s: ApprovalState) -> Self {
        match s {
            ApprovalState::Requested => proto::ApprovalState::Requested,
            ApprovalState::Approved => proto::ApprovalState::Approved,
            ApprovalState::Applied => proto::ApprovalState::Applied,
            ApprovalState::Failed => proto::ApprovalState::Failed,
            ApprovalState::Denied => proto::ApprovalState::Denied,
            ApprovalState::Expired => proto::ApprovalState::Expired,
        }
    }
}
