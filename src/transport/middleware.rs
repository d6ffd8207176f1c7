//! Middleware in front of the DatabaseLifecycle handlers: correlation id (taken from
//! `x-correlation-id` or generated, echoed on every response, attached to every log
//! line through a tracing span) and authentication (bearer token to principal).
//! A refused call is audited before the error goes back.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use tonic::{body::Body, server::NamedService};
use tower::Service;
use tracing::Instrument;

use crate::{
    audit::Audit,
    config::PrincipalConfig,
    domain::{CallContext, Principal},
    error::{CORRELATION_HEADER, ServiceError},
};

const MAX_CORRELATION_LEN: usize = 128;

/// Accept a caller's correlation id only if it is short and plain, so it is safe
/// in logs, headers and audit rows.
pub fn valid_correlation_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CORRELATION_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

pub fn new_correlation_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Resolves bearer tokens to principals. Only SHA-256 digests are held.
pub struct Authenticator {
    by_digest: HashMap<[u8; 32], Principal>,
}

impl Authenticator {
    pub fn new(principals: &[PrincipalConfig]) -> Self {
        let by_digest = principals
            .iter()
            .map(|p| {
                (
                    p.token_sha256,
                    Principal {
                        id: p.id.clone(),
                        kind: p.kind,
                        projects: p.projects.clone(),
                        roles: p.roles.clone(),
                    },
                )
            })
            .collect();
        Self { by_digest }
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ServiceError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(ServiceError::MissingToken)?;
        let value = value.to_str().map_err(|_| ServiceError::InvalidToken)?;
        let (scheme, token) = value
            .trim()
            .split_once(' ')
            .ok_or(ServiceError::InvalidToken)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ServiceError::InvalidToken);
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(ServiceError::MissingToken);
        }
        use sha2::{Digest, Sha256};
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Looking up a digest leaks nothing useful through timing.
        self.by_digest
            .get(&digest)
            .cloned()
            .ok_or(ServiceError::InvalidToken)
    }
}

/// Wraps a generated gRPC server so every call passes the middleware first.
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    auth: Arc<Authenticator>,
    audit: Audit,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, auth: Arc<Authenticator>, audit: Audit) -> Self {
        Self { inner, auth, audit }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

fn error_response(err: &ServiceError, correlation_id: &str) -> http::Response<Body> {
    let mut resp = err.to_status(correlation_id).into_http::<Body>();
    if let Ok(v) = HeaderValue::from_str(correlation_id) {
        resp.headers_mut().insert(CORRELATION_HEADER, v);
    }
    resp
}

impl<S> Service<http::Request<Body>> for Guarded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone is not ready; keep the one that was polled (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let audit = self.audit.clone();
        Box::pin(async move {
            let method = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            let supplied = req
                .headers()
                .get(CORRELATION_HEADER)
                .map(|v| v.to_str().unwrap_or("").to_string());
            let (correlation_id, bad_correlation) = match supplied {
                Some(id) if valid_correlation_id(&id) => (id, false),
                Some(_) => (new_correlation_id(), true),
                None => (new_correlation_id(), false),
            };
            let span =
                tracing::info_span!("rpc", correlation_id = %correlation_id, method = %method);
            async move {
                if bad_correlation {
                    let err = ServiceError::invalid(
                        "x-correlation-id",
                        format!("must be 1..={MAX_CORRELATION_LEN} characters of letters, digits, `-_.:/`"),
                    );
                    tracing::info!(code = "INVALID_ARGUMENT", "refused: {err}");
                    audit
                        .refusal(&correlation_id, None, &method, &err, serde_json::Value::Null)
                        .await;
                    return Ok(error_response(&err, &correlation_id));
                }
                let principal = match auth.authenticate(req.headers()) {
                    Ok(p) => p,
                    Err(err) => {
                        tracing::info!(code = "UNAUTHENTICATED", "refused: {err}");
                        audit
                            .refusal(&correlation_id, None, &method, &err, serde_json::Value::Null)
                            .await;
                        return Ok(error_response(&err, &correlation_id));
                    }
                };
                req.extensions_mut().insert(CallContext {
                    correlation_id: correlation_id.clone(),
                    principal,
                });
                let mut resp = inner.call(req).await?;
                if let Ok(v) = HeaderValue::from_str(&correlation_id) {
                    resp.headers_mut().insert(CORRELATION_HEADER, v);
                }
                Ok(resp)
            }
            .instrument(span)
            .await
        })
    }
}
