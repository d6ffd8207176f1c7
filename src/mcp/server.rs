//! The MCP server: lists the tools and turns each call into gRPC calls.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListToolsResult,
        PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
};
use tokio::time::Instant;
use tonic::Code;

use crate::{
    mcp::{
        confirm::{self, ConfirmationChannel},
        forward::{ServiceClient, new_correlation_id},
        outcome::{LifecycleView, RequestView, ToolFailure, is_open_state, state_name, success},
        settings::{BridgeSettings, Credentials, SecretToken},
        tools::{LifecycleAction, LifecycleArgs, RequestStatusArgs, ToolKind, ToolSet},
    },
    proto,
};

/// One bridge: its narrowing, its tools, the service it forwards to, and whose
/// identity it forwards. Cheap to clone (one clone per HTTP session or request).
#[derive(Clone)]
pub struct LifecycleBridge {
    settings: Arc<BridgeSettings>,
    tools: Arc<ToolSet>,
    service: ServiceClient,
    credentials: Credentials,
    /// Waits in progress per token (SHA-256 of it), shared by every session.
    waits: Arc<Mutex<HashMap<[u8; 32], usize>>>,
}

/// Waits for a decision one token may have running at once. A client that goes away
/// without cancelling leaves its wait polling until its deadline; the cap keeps one
/// agent from multiplying that load on the service.
pub const MAX_WAITS_PER_TOKEN: usize = 8;

/// A running wait, counted against its token until dropped.
struct WaitSlot {
    waits: Arc<Mutex<HashMap<[u8; 32], usize>>>,
    token: [u8; 32],
}

impl WaitSlot {
    fn take(waits: &Arc<Mutex<HashMap<[u8; 32], usize>>>, token: &SecretToken) -> Option<Self> {
        let digest = token.digest();
        let mut map = waits.lock().unwrap_or_else(|e| e.into_inner());
        let running = map.entry(digest).or_default();
        if *running >= MAX_WAITS_PER_TOKEN {
            return None;
        }
        *running += 1;
        Some(Self {
            waits: waits.clone(),
            token: digest,
        })
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let mut map = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = map.get_mut(&self.token) {
            *running -= 1;
            if *running == 0 {
                map.remove(&self.token);
            }
        }
    }
}

const INSTRUCTIONS: &str = "Manage PostgreSQL databases per environment through the \
db-lifecycle service, as the project of your token. create and delete queue a request that a \
person must approve; follow it with the request-status tool (it can wait for the decision). \
Errors come back as tool results with a gRPC code, a message and a correlation id.";

/// What a tool call produced: a final result, or (2026-07-28 clients) a request for
/// the person's confirmation before the call is made again.
enum Reply {
    Done(CallToolResult),
    AskPerson(rmcp::model::InputRequiredResult),
}

impl From<Result<CallToolResult, ToolFailure>> for Reply {
    fn from(r: Result<CallToolResult, ToolFailure>) -> Self {
        Reply::Done(r.unwrap_or_else(ToolFailure::into_result))
    }
}

impl LifecycleBridge {
    pub fn new(settings: BridgeSettings, service: ServiceClient, credentials: Credentials) -> Self {
        let tools = Arc::new(ToolSet::new(&settings));
        Self {
            settings: Arc::new(settings),
            tools,
            service,
            credentials,
            waits: Arc::default(),
        }
    }

    pub fn tools(&self) -> Vec<Tool> {
        self.tools.list()
    }

    /// The gRPC client the bridge forwards with.
    pub fn service(&self) -> &ServiceClient {
        &self.service
    }

    /// The agent's token: the bridge's own (stdio) or this HTTP request's.
    fn token(
        &self,
        context: &RequestContext<RoleServer>,
        correlation_id: &str,
    ) -> Result<SecretToken, ToolFailure> {
        match &self.credentials {
            Credentials::Fixed(token) => Ok(token.clone()),
            Credentials::PerRequestBearer => context
                .extensions
                .get::<http::request::Parts>()
                .and_then(|parts| parts.headers.get(http::header::AUTHORIZATION))
                .and_then(|value| value.to_str().ok())
                .and_then(|value| SecretToken::from_authorization_header(value).ok())
                // The HTTP layer already answers 401 without a token; this is a
                // second line, so a missing token can never fall back to anything.
                .ok_or_else(|| {
                    ToolFailure::new(
                        Code::Unauthenticated,
                        "no bearer token on this HTTP request: send `Authorization: Bearer <token>`",
                        correlation_id,
                    )
                }),
        }
    }

    fn refuse_narrowed(
        &self,
        args: &LifecycleArgs,
        correlation_id: &str,
    ) -> Result<(), ToolFailure> {
        if self.settings.read_only && args.action != LifecycleAction::Describe {
            return Err(ToolFailure::new(
                Code::PermissionDenied,
                format!(
                    "this bridge is read-only: it offers only describe, so {} is refused here \
                     (nothing was sent to the service)",
                    args.action.as_str()
                ),
                correlation_id,
            ));
        }
        if !self.settings.offers_environment(&args.environment) {
            let offered = self
                .settings
                .environments
                .clone()
                .unwrap_or_default()
                .join(", ");
            return Err(ToolFailure::new(
                Code::PermissionDenied,
                format!(
                    "environment `{}` is not offered by this bridge; it offers: {offered}",
                    crate::policy::printable(args.environment.trim())
                ),
                correlation_id,
            ));
        }
        Ok(())
    }

    async fn lifecycle(
        &self,
        params: &CallToolRequestParams,
        context: &RequestContext<RoleServer>,
    ) -> Reply {
        let correlation_id = new_correlation_id();
        let args = match LifecycleArgs::parse(params.arguments.as_ref(), &correlation_id) {
            Ok(args) => args,
            Err(failure) => return Reply::from(Err(failure)),
        };
        if let Err(failure) = self.refuse_narrowed(&args, &correlation_id) {
            return Reply::from(Err(failure));
        }
        let token = match self.token(context, &correlation_id) {
            Ok(token) => token,
            Err(failure) => return Reply::from(Err(failure)),
        };
        tracing::info!(
            correlation_id = %correlation_id,
            action = args.action.as_str(),
            environment = %crate::policy::printable(&args.environment),
            database_name = %crate::policy::printable(&args.database_name),
            "forwarding database.lifecycle"
        );
        match args.action {
            LifecycleAction::Describe => {
                let body = proto::DescribeDatabaseRequest {
                    environment: args.environment.clone(),
                    database_name: args.database_name.clone(),
                    project_id: args.project_id.clone(),
                };
                let answer = self.service.describe(&token, &correlation_id, body).await;
                Reply::from(answer.map(|a| self.lifecycle_success(a.body)))
            }
            LifecycleAction::Create => {
                let body = proto::CreateDatabaseRequest {
                    environment: args.environment.clone(),
                    database_name: args.database_name.clone(),
                    project_id: args.project_id.clone(),
                    dry_run: args.dry_run,
                };
                let answer = self.service.create(&token, &correlation_id, body).await;
                Reply::from(answer.map(|a| self.lifecycle_success(a.body)))
            }
            LifecycleAction::Delete => {
                self.delete(params, context, &args, &token, &correlation_id)
                    .await
            }
        }
    }

    fn lifecycle_success(&self, result: proto::LifecycleResult) -> CallToolResult {
        success(&LifecycleView::from_proto(
            result,
            self.tools.request_status_name(),
        ))
    }

    async fn send_delete(
        &self,
        args: &LifecycleArgs,
        token: &SecretToken,
        correlation_id: &str,
        confirm_delete: bool,
        dry_run: bool,
    ) -> Result<CallToolResult, ToolFailure> {
        let body = proto::DeleteDatabaseRequest {
            environment: args.environment.clone(),
            database_name: args.database_name.clone(),
            project_id: args.project_id.clone(),
            confirm_delete,
            dry_run,
        };
        self.service
            .delete(token, correlation_id, body)
            .await
            .map(|a| self.lifecycle_success(a.body))
    }

    /// A delete: forwarded as is when confirmed or a dry run; otherwise the person
    /// behind the client confirms it first, if the client can ask them.
    async fn delete(
        &self,
        params: &CallToolRequestParams,
        context: &RequestContext<RoleServer>,
        args: &LifecycleArgs,
        token: &SecretToken,
        correlation_id: &str,
    ) -> Reply {
        if args.confirm_delete || args.dry_run {
            return Reply::from(
                self.send_delete(
                    args,
                    token,
                    correlation_id,
                    args.confirm_delete,
                    args.dry_run,
                )
                .await,
            );
        }
        let channel = confirm::channel(context);
        if channel == ConfirmationChannel::Unavailable {
            // Fail closed: the service refuses an unconfirmed delete (and audits it).
            return Reply::from(
                self.send_delete(args, token, correlation_id, false, false)
                    .await
                    .map_err(|mut failure| {
                        if failure.code == Code::FailedPrecondition {
                            failure.message.push_str(
                                " (this MCP client cannot ask its user to confirm, so \
                                 confirm_delete=true is required)",
                            );
                        }
                        failure
                    }),
            );
        }
        // A retried call (2026-07-28) carries the person's answer.
        let answer = match confirm::answer_from_retry(
            params.request_state.as_deref(),
            params.input_responses.as_ref(),
            &args.environment,
            &args.database_name,
            correlation_id,
        ) {
            Ok(answer) => answer,
            Err(failure) => return Reply::from(Err(failure)),
        };
        if let Some(answer) = answer {
            if let Err(failure) = confirm::judge(&answer, &args.database_name, correlation_id) {
                return Reply::from(Err(failure));
            }
            return Reply::from(
                self.send_delete(args, token, correlation_id, true, false)
                    .await,
            );
        }
        // Before bothering a person, check the delete would be accepted at all: a dry
        // run runs every check of the service and changes nothing.
        if let Err(failure) = self
            .send_delete(args, token, correlation_id, true, true)
            .await
        {
            return Reply::from(Err(failure));
        }
        tracing::info!(
            correlation_id,
            ?channel,
            "asking the person to confirm the delete"
        );
        match channel {
            ConfirmationChannel::InputRequired => Reply::AskPerson(confirm::input_required(
                &args.environment,
                &args.database_name,
            )),
            _ => {
                let asked = context
                    .peer
                    .create_elicitation_with_timeout(
                        confirm::elicitation(&args.environment, &args.database_name),
                        Some(self.settings.confirmation_timeout),
                    )
                    .await;
                let answer = match asked {
                    Ok(answer) => answer,
                    Err(e) => {
                        tracing::info!(correlation_id, "delete confirmation failed: {e}");
                        return Reply::from(Err(ToolFailure::new(
                            Code::FailedPrecondition,
                            format!(
                                "could not get the user's confirmation ({e}); nothing was \
                                 deleted; confirm_delete=true is required to delete without it"
                            ),
                            correlation_id,
                        )));
                    }
                };
                if let Err(failure) = confirm::judge(&answer, &args.database_name, correlation_id) {
                    return Reply::from(Err(failure));
                }
                Reply::from(
                    self.send_delete(args, token, correlation_id, true, false)
                        .await,
                )
            }
        }
    }

    async fn request_status(
        &self,
        params: &CallToolRequestParams,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ToolFailure> {
        let correlation_id = new_correlation_id();
        let args = RequestStatusArgs::parse(params.arguments.as_ref(), &correlation_id)?;
        let token = self.token(context, &correlation_id)?;
        let progress_token = context.meta.get_progress_token();
        let _slot = if args.wait_seconds > 0 {
            Some(WaitSlot::take(&self.waits, &token).ok_or_else(|| {
                ToolFailure::new(
                    Code::ResourceExhausted,
                    format!(
                        "this token already has {MAX_WAITS_PER_TOKEN} waits running; let one \
                         finish (or cancel it), or call with wait_seconds=0 to read the state now"
                    ),
                    &correlation_id,
                )
            })?)
        } else {
            None
        };
        let started = Instant::now();
        let deadline = started + Duration::from_secs(args.wait_seconds);
        let mut polls: u64 = 0;
        loop {
            polls += 1;
            // A poll may not push the answer far past the promised wait.
            let poll_limit = if args.wait_seconds == 0 {
                Duration::MAX
            } else {
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1))
            };
            let polled = self
                .service
                .get_request(&token, &correlation_id, &args.request_id, poll_limit)
                .await;
            let waited = started.elapsed().as_secs();
            let now = Instant::now();
            let out_of_time = now >= deadline || context.ct.is_cancelled();
            let request = match polled {
                Ok(answer) => answer.body,
                // A service restart while waiting is not the agent's problem: keep
                // polling until the deadline, then report the outage.
                Err(failure) if failure.retryable() && !out_of_time => {
                    let reachable = self
                        .progress(
                            context,
                            progress_token.as_ref(),
                            waited,
                            args.wait_seconds,
                            format!("waiting: the service is unreachable ({})", failure.message),
                        )
                        .await;
                    if !reachable {
                        tracing::info!(correlation_id = %correlation_id, polls, "client gone: wait ended");
                        return Err(failure);
                    }
                    self.sleep_until_next_poll(context, deadline).await;
                    continue;
                }
                Err(failure) => return Err(failure),
            };
            if let Some(environment) = self.narrowed_away(&request.environment) {
                return Err(ToolFailure::new(
                    Code::PermissionDenied,
                    format!(
                        "request {} is in environment `{environment}`, which this bridge does not offer",
                        args.request_id
                    ),
                    &correlation_id,
                ));
            }
            let state = state_name(request.state).unwrap_or("requested");
            let open = is_open_state(state);
            if !open || out_of_time {
                let mut view = RequestView::from_proto(request, waited);
                view.wait_timed_out = open && args.wait_seconds > 0;
                if view.wait_timed_out {
                    view.message = format!(
                        "{}; still {state} after waiting {waited}s: call again to keep waiting",
                        view.message
                    );
                }
                tracing::info!(correlation_id = %correlation_id, polls, state, "request status");
                return Ok(success(&view));
            }
            let view = RequestView::from_proto(request, waited);
            let reachable = self
                .progress(
                    context,
                    progress_token.as_ref(),
                    waited,
                    args.wait_seconds,
                    view.message.clone(),
                )
                .await;
            if !reachable {
                // Nobody is listening any more: answer (to no one) and stop polling.
                tracing::info!(correlation_id = %correlation_id, polls, state, "client gone: wait ended");
                return Ok(success(&view));
            }
            self.sleep_until_next_poll(context, deadline).await;
        }
    }

    fn narrowed_away(&self, environment: &str) -> Option<String> {
        (!self.settings.offers_environment(environment)).then(|| environment.to_string())
    }

    async fn sleep_until_next_poll(&self, context: &RequestContext<RoleServer>, deadline: Instant) {
        let next = (Instant::now() + self.settings.poll_interval).min(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            // The client cancelled the call: stop waiting, answer with the last state.
            _ = context.ct.cancelled() => {}
        }
    }

    /// A progress notification, when the client asked for them with a progress token.
    /// False when it could not be delivered: the client is gone.
    async fn progress(
        &self,
        context: &RequestContext<RoleServer>,
        token: Option<&rmcp::model::ProgressToken>,
        waited: u64,
        total: u64,
        message: String,
    ) -> bool {
        let Some(token) = token else { return true };
        let mut param = ProgressNotificationParam::new(token.clone(), waited as f64);
        param.total = Some(total as f64);
        param.message = Some(message);
        match context.peer.notify_progress(param).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("progress notification not delivered: {e}");
                false
            }
        }
    }
}

impl ServerHandler for LifecycleBridge {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("db-lifecycle-mcp", env!("CARGO_PKG_VERSION"))
                    .with_title("db-lifecycle MCP bridge"),
            )
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools.get(name).map(|(_, tool)| tool.clone())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let Some((kind, _)) = self.tools.get(&request.name) else {
            // An unknown tool (including any "approve") is a protocol error, as MCP asks.
            return Err(McpError::invalid_params(
                format!(
                    "unknown tool `{}`; this bridge offers: {}",
                    crate::policy::printable(&request.name),
                    self.tools()
                        .iter()
                        .map(|t| t.name.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None,
            ));
        };
        let reply = match kind {
            ToolKind::Lifecycle => self.lifecycle(&request, &context).await,
            ToolKind::RequestStatus => Reply::from(self.request_status(&request, &context).await),
        };
        Ok(match reply {
            Reply::Done(result) => CallToolResponse::Complete(result),
            Reply::AskPerson(input) => CallToolResponse::InputRequired(input),
        })
    }
}
