//! Middleware in front of the DatabaseLifecycle handlers: correlation id (taken from
//! `x-correlation-id` or generated, echoed on every response, attached to every log
//! line through a tracing span) and authentication (bearer token to principal: a
//! static token from `[[principals]]`, or a signed run token when `[run_tokens]` is
//! configured). A refused call is audited before the error goes back.

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
    audit::{self, Audit},
    config::{PrincipalConfig, RunTokenConfig},
    domain::{CallContext, Principal},
    error::{CORRELATION_HEADER, ServiceError},
    transport::run_tokens::{RunTokenVerifier, looks_like_jwt},
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

/// Resolves bearer tokens to principals: the one place a token becomes a principal.
/// Of static tokens only SHA-256 digests are held; run tokens are verified by
/// signature and claims.
pub struct Authenticator {
    by_digest: HashMap<[u8; 32], Principal>,
    run_tokens: Option<RunTokenVerifier>,
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
                        run_id: None,
                    },
                )
            })
            .collect();
        Self {
            by_digest,
            run_tokens: None,
        }
    }

    /// Also accept run tokens signed under this configuration.
    pub fn with_run_tokens(mut self, config: Option<&RunTokenConfig>) -> Result<Self, String> {
        self.run_tokens = config
            .map(RunTokenVerifier::new)
            .transpose()
            .map_err(|e| format!("run_tokens: {e}"))?;
        Ok(self)
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ServiceError> {
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let value = values.next().ok_or(ServiceError::MissingToken)?;
        if values.next().is_some() {
            return Err(ServiceError::AmbiguousToken);
        }
        let value = value.to_str().map_err(|_| ServiceError::InvalidToken)?;
        if value.trim().eq_ignore_ascii_case("bearer") {
            return Err(ServiceError::MissingToken);
        }
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
        if let Some(p) = self.by_digest.get(&digest) {
            return Ok(p.clone());
        }
        match &self.run_tokens {
            Some(verifier) if looks_like_jwt(token) => {
                let principal =
                    verifier
                        .verify(token)
                        .map_err(|e| ServiceError::InvalidRunToken {
                            reason: e.to_string(),
                        })?;
                // A run must not pass for a configured principal (a person, say): the
                // audit trail and the four-eyes rule go by principal id.
                // Compared case-insensitively: `ROOT` must not pass for `root` in
                // the eyes of whoever reads the trail.
                let run_id = principal.id.to_lowercase();
                if self
                    .by_digest
                    .values()
                    .any(|p| p.id.to_lowercase() == run_id)
                {
                    return Err(ServiceError::InvalidRunToken {
                        reason: format!(
                            "subject `{}` is the id of a configured principal; run tokens need ids of their own",
                            crate::policy::printable(&principal.id)
                        ),
                    });
                }
                Ok(principal)
            }
            _ => Err(ServiceError::InvalidToken),
        }
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
            // Several ids are refused like a malformed one: which one a reader
            // takes would decide whose trail the call lands in.
            let mut values = req.headers().get_all(CORRELATION_HEADER).iter();
            let supplied = match (values.next(), values.next()) {
                (Some(_), Some(_)) => Some(String::new()),
                (first, _) => first.map(|v| v.to_str().unwrap_or("").to_string()),
            };
            let authenticated = auth.authenticate(req.headers());
            // A caller's own id is adopted only once it has proved who it is: an
            // unauthenticated call must not write into another call's audit trail.
            // Its refusal gets an id of the service's, and the claimed one is noted.
            let (correlation_id, bad_correlation, claimed) = match supplied {
                Some(id) if !valid_correlation_id(&id) => (new_correlation_id(), true, None),
                Some(id) if authenticated.is_err() => (new_correlation_id(), false, Some(id)),
                Some(id) => (id, false, None),
                None => (new_correlation_id(), false, None),
            };
            let span = tracing::info_span!(
                "rpc",
                correlation_id = %correlation_id,
                method = %method,
                run_id = tracing::field::Empty
            );
            async move {
                if bad_correlation {
                    let err = ServiceError::invalid(
                        "x-correlation-id",
                        format!("send one, of 1..={MAX_CORRELATION_LEN} characters of letters, digits, `-_.:/`"),
                    );
                    tracing::info!(code = "INVALID_ARGUMENT", "refused: {err}");
                    // Recorded as the caller's when its token is good: such a refusal
                    // is not an anonymous one and does not count against their budget.
                    audit
                        .refusal(
                            &correlation_id,
                            authenticated.as_ref().ok(),
                            &method,
                            &err,
                            serde_json::Value::Null,
                            Default::default(),
                        )
                        .await;
                    return Ok(error_response(&err, &correlation_id));
                }
                let principal = match authenticated {
                    Ok(p) => {
                        if let Some(run) = &p.run_id {
                            tracing::Span::current()
                                .record("run_id", tracing::field::display(run));
                        }
                        p
                    }
                    Err(err) => {
                        tracing::info!(code = "UNAUTHENTICATED", "refused: {err}");
                        let input = match &claimed {
                            Some(id) => serde_json::json!({ "claimed_correlation_id": id }),
                            None => serde_json::Value::Null,
                        };
                        audit
                            .refusal(
                                &correlation_id,
                                None,
                                &method,
                                &err,
                                input,
                                Default::default(),
                            )
                            .await;
                        return Ok(error_response(&err, &correlation_id));
                    }
                };
                req.extensions_mut().insert(CallContext {
                    correlation_id: correlation_id.clone(),
                    principal: principal.clone(),
                });
                let mut resp = audit::as_caller(&principal, inner.call(req)).await?;
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
