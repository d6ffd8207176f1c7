//! Streamable HTTP transport at `/mcp`, for the bridge as a sidecar in a pod.
//!
//! Each HTTP request must carry `Authorization: Bearer <token>` (else 401); that
//! token, not any token of the bridge, is what the service sees for the calls the
//! request makes. Host (and optionally Origin) validation and the request body limit
//! are enforced by the SDK's service.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::Request,
    http::{StatusCode, header},
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

/// Refuse requests without exactly one bearer token before they reach the MCP layer
/// (with several, which one counts would depend on who reads them).
async fn require_bearer(request: Request, next: Next) -> Response {
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let first = values.next();
    let refusal = if values.next().is_some() {
        "more than one Authorization header: send exactly one `Authorization: Bearer <token>`\n"
    } else if first
        .and_then(|v| v.to_str().ok())
        .and_then(SecretToken::from_authorization_header)
        .is_some()
    {
        return next.run(request).await;
    } else {
        "missing bearer token: send `Authorization: Bearer <your db-lifecycle token>`\n"
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        refusal,
    )
        .into_response()
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
        .route_layer(middleware::from_fn(require_bearer))
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
