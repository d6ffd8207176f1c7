//! Streamable HTTP transport at `/mcp`, for the bridge as a sidecar in a pod.
//!
//! Each HTTP request must carry exactly one `Authorization: Bearer <token>` of a sane
//! size (else 401); a session is opened only for a token the service accepts (WhoAmI;
//! else 401, or 503 while the service cannot be asked),
//! within a limit per token and overall; and an MCP session is used only with the
//! token that opened it (else 404); that
//! token, not any token of the bridge, is what the service sees for the calls the
//! request makes. Host (and optionally Origin) validation and the request body limit
//! are enforced by the SDK's service.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use rmcp::transport::{
    common::server_side_http::SessionId,
    streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
        session::{SessionManager, local::LocalSessionManager},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::mcp::{
    LifecycleBridge,
    forward::{ServiceClient, new_correlation_id},
    settings::{SecretToken, TokenShapeError},
};

pub const MCP_PATH: &str = "/mcp";
pub const HEALTH_PATH: &str = "/healthz";

#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// `Host` values accepted (host or host:port). Empty: the SDK default (loopback).
    pub allowed_hosts: Vec<String>,
    /// `Origin` values accepted from browsers. Empty: Origin is not checked.
    pub allowed_origins: Vec<String>,
    /// Largest accepted POST body; larger ones get 413.
    pub max_body_bytes: usize,
}

/// The MCP session header (streamable HTTP).
const SESSION_HEADER: &str = "mcp-session-id";
/// MCP sessions open at once, over all tokens. Beyond it a new session gets 503:
/// open sessions are never pushed out by other callers.
const MAX_SESSIONS: usize = 2_000;
/// MCP sessions one token may hold; opening one more closes that token's oldest (an
/// agent that restarts without ending its sessions only ever displaces its own).
const MAX_SESSIONS_PER_TOKEN: usize = 16;

/// Which token opened each MCP session (SHA-256 of it), so that a session is used,
/// and ended, only with the token that opened it.
#[derive(Default)]
struct SessionOwners {
    owners: HashMap<String, [u8; 32]>,
    /// Each token's sessions, oldest first.
    by_token: HashMap<[u8; 32], VecDeque<String>>,
}

impl SessionOwners {
    /// Record `session` for `owner`; returns that token's sessions over its limit.
    fn insert(&mut self, session: String, owner: [u8; 32]) -> Vec<String> {
        if self.owners.insert(session.clone(), owner).is_some() {
            return Vec::new();
        }
        let own = self.by_token.entry(owner).or_default();
        own.push_back(session);
        let mut over = Vec::new();
        while own.len() > MAX_SESSIONS_PER_TOKEN {
            if let Some(oldest) = own.pop_front() {
                self.owners.remove(&oldest);
                over.push(oldest);
            }
        }
        over
    }

    fn remove(&mut self, session: &str) {
        if let Some(owner) = self.owners.remove(session)
            && let Some(own) = self.by_token.get_mut(&owner)
        {
            own.retain(|s| s != session);
            if own.is_empty() {
                self.by_token.remove(&owner);
            }
        }
    }

    /// Forget sessions the SDK no longer has (ended by their idle timeout).
    fn retain_live(&mut self, live: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self.owners.keys().filter(|s| !live(s)).cloned().collect();
        for session in gone {
            self.remove(&session);
        }
    }
}

/// What the HTTP gate needs: session owners, the SDK's sessions (to count and close
/// them) and the service (to check a token before a session is opened for it).
#[derive(Clone)]
struct Gate {
    owners: Arc<Mutex<SessionOwners>>,
    sessions: Arc<LocalSessionManager>,
    service: ServiceClient,
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn retry_later(message: &'static str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        message,
    )
        .into_response()
}

fn unauthorized(message: String) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        message,
    )
        .into_response()
}

/// What the service said about a token a new session would be opened for.
enum TokenCheck {
    /// The service accepts it.
    Accepted,
    /// The service could not be asked (down, or too slow). A stateless call may go
    /// on (its tool call then reports the outage), but no session is kept for it.
    Unverified,
}

impl Gate {
    /// Before a session is opened: room for it, and a token the service accepts.
    /// Only a token the service accepted gets a session: anything else could fill
    /// the bridge with sessions of made-up tokens.
    async fn admit_new_session(&self, token: &SecretToken) -> Result<TokenCheck, Response> {
        let open = self.sessions.sessions.read().await.len();
        if open >= MAX_SESSIONS {
            warn!(
                open,
                limit = MAX_SESSIONS,
                "MCP session refused: too many open"
            );
            return Err(retry_later(
                "too many MCP sessions are open on this bridge; retry later\n",
            ));
        }
        match self.service.who_am_i(token, &new_correlation_id()).await {
            Ok(_) => Ok(TokenCheck::Accepted),
            Err(failure) if failure.retryable() => {
                info!(correlation_id = %failure.correlation_id, code = ?failure.code, "token not verified: the service cannot be asked");
                Ok(TokenCheck::Unverified)
            }
            Err(failure) => {
                info!(correlation_id = %failure.correlation_id, code = ?failure.code, "MCP session refused: the service does not accept the token");
                Err(unauthorized(format!(
                    "the db-lifecycle service does not accept this token: {} (correlation id {})\n",
                    failure.message, failure.correlation_id
                )))
            }
        }
    }

    /// Remember who opened `session`, closing that token's sessions over its limit.
    async fn opened(&self, session: String, digest: [u8; 32]) {
        let over = {
            let live = self.sessions.sessions.read().await;
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            owners.retain_live(|s| live.contains_key(s));
            owners.insert(session, digest)
        };
        for old in over {
            info!(
                "closing the oldest MCP session of a token over its limit of {MAX_SESSIONS_PER_TOKEN}"
            );
            let _ = self.sessions.close_session(&SessionId::from(old)).await;
        }
    }
}

/// Refuse requests without exactly one bearer token before they reach the MCP layer
/// (with several, which one counts would depend on who reads them), tokens the
/// service refuses before a session is opened for them, and requests on a session
/// that another token opened (404, as for a session that does not exist: whether it
/// does is not revealed).
async fn require_bearer(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let first = values.next();
    let token = if values.next().is_some() {
        Err(
            "more than one Authorization header: send exactly one `Authorization: Bearer <token>`\n"
                .to_string(),
        )
    } else {
        first
            .and_then(|v| v.to_str().ok())
            .ok_or(TokenShapeError::Missing)
            .and_then(SecretToken::from_authorization_header)
            .map_err(|reason| format!("{reason}\n"))
    };
    let token = match token {
        Ok(token) => token,
        Err(refusal) => return unauthorized(refusal),
    };
    let digest = token.digest();
    let session = session_id(request.headers());
    let mut verified = true;
    match &session {
        Some(session) => {
            let owner = gate
                .owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .owners
                .get(session)
                .copied();
            if owner != Some(digest) {
                return (
                    StatusCode::NOT_FOUND,
                    "session not found: initialize a new session (with your own token)\n",
                )
                    .into_response();
            }
        }
        // Only a POST without a session opens one (initialize).
        None if request.method() == Method::POST => match gate.admit_new_session(&token).await {
            Ok(check) => verified = matches!(check, TokenCheck::Accepted),
            Err(refusal) => return refusal,
        },
        None => {}
    }
    let ends_session = request.method() == Method::DELETE;
    let response = next.run(request).await;
    match &session {
        // A new session opened by this request: it belongs to this token.
        None => {
            if let Some(opened) = session_id(response.headers()) {
                if !verified {
                    // The service could not vouch for the token: keep no session.
                    let _ = gate.sessions.close_session(&SessionId::from(opened)).await;
                    return retry_later(
                        "the db-lifecycle service cannot be reached to check this token, so no \
                         MCP session is opened; retry later\n",
                    );
                }
                gate.opened(opened, digest).await;
            }
        }
        Some(session) if ends_session && response.status().is_success() => gate
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(session),
        Some(_) => {}
    }
    response
}

/// The HTTP application: `/mcp` (authenticated MCP) and `/healthz` (liveness).
pub fn router(
    bridge: LifecycleBridge,
    options: &HttpOptions,
    shutdown: CancellationToken,
) -> Router {
    let mut config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown)
        .with_max_request_body_bytes(options.max_body_bytes);
    if !options.allowed_hosts.is_empty() {
        config = config.with_allowed_hosts(options.allowed_hosts.clone());
    }
    if !options.allowed_origins.is_empty() {
        config = config.with_allowed_origins(options.allowed_origins.clone());
    }
    let sessions = Arc::new(LocalSessionManager::default());
    let gate = Gate {
        owners: Arc::default(),
        sessions: sessions.clone(),
        service: bridge.service().clone(),
    };
    let service = StreamableHttpService::new(move || Ok(bridge.clone()), sessions, config);
    Router::new()
        .route_service(MCP_PATH, service)
        .route_layer(middleware::from_fn_with_state(gate, require_bearer))
        .route(HEALTH_PATH, get(|| async { "ok\n" }))
}

/// Serve until `shutdown` is cancelled; `ready` receives the bound address.
pub async fn serve(
    bridge: LifecycleBridge,
    listen: SocketAddr,
    options: HttpOptions,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    if let Some(ready) = ready {
        let _ = ready.send(local);
    }
    let app = router(bridge, &options, shutdown.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
