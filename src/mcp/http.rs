//! Streamable HTTP transport at `/mcp`, for the bridge as a sidecar in a pod.
//!
//! Each HTTP request must carry exactly one `Authorization: Bearer <token>` (else
//! 401), and an MCP session is used only with the token that opened it (else 404); that
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
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use tokio_util::sync::CancellationToken;

use crate::mcp::{LifecycleBridge, settings::SecretToken};

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
/// Sessions remembered at once; the oldest are forgotten beyond it (their clients
/// get 404 and initialize again, as the protocol expects).
const MAX_TRACKED_SESSIONS: usize = 10_000;

/// Which token opened each MCP session (SHA-256 of it), so that a session is used,
/// and ended, only with the token that opened it.
#[derive(Default)]
struct SessionOwners {
    owners: HashMap<String, [u8; 32]>,
    order: VecDeque<String>,
}

impl SessionOwners {
    fn insert(&mut self, session: String, owner: [u8; 32]) {
        if self.owners.insert(session.clone(), owner).is_none() {
            self.order.push_back(session);
        }
        while self.order.len() > MAX_TRACKED_SESSIONS {
            if let Some(oldest) = self.order.pop_front() {
                self.owners.remove(&oldest);
            }
        }
    }

    fn remove(&mut self, session: &str) {
        if self.owners.remove(session).is_some() {
            self.order.retain(|s| s != session);
        }
    }
}

type SharedSessionOwners = Arc<Mutex<SessionOwners>>;

fn token_digest(token: &SecretToken) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.expose().as_bytes()).into()
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Refuse requests without exactly one bearer token before they reach the MCP layer
/// (with several, which one counts would depend on who reads them), and requests on
/// a session that another token opened (404, as for a session that does not exist:
/// whether it does is not revealed).
async fn require_bearer(
    State(sessions): State<SharedSessionOwners>,
    request: Request,
    next: Next,
) -> Response {
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let first = values.next();
    let token = if values.next().is_some() {
        Err(
            "more than one Authorization header: send exactly one `Authorization: Bearer <token>`\n",
        )
    } else {
        first
            .and_then(|v| v.to_str().ok())
            .and_then(SecretToken::from_authorization_header)
            .ok_or("missing bearer token: send `Authorization: Bearer <your db-lifecycle token>`\n")
    };
    let token = match token {
        Ok(token) => token,
        Err(refusal) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                refusal,
            )
                .into_response();
        }
    };
    let digest = token_digest(&token);
    let session = session_id(request.headers());
    if let Some(session) = &session {
        let owner = sessions
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
    let ends_session = request.method() == Method::DELETE;
    let response = next.run(request).await;
    let mut owners = sessions.lock().unwrap_or_else(|e| e.into_inner());
    match &session {
        // A new session opened by this request: it belongs to this token.
        None => {
            if let Some(opened) = session_id(response.headers()) {
                owners.insert(opened, digest);
            }
        }
        Some(session) if ends_session && response.status().is_success() => owners.remove(session),
        Some(_) => {}
    }
    drop(owners);
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
    let service = StreamableHttpService::new(
        move || Ok(bridge.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    Router::new()
        .route_service(MCP_PATH, service)
        .route_layer(middleware::from_fn_with_state(
            SharedSessionOwners::default(),
            require_bearer,
        ))
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
