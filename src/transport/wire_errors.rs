//! Refusals the gRPC library makes before any handler runs: a request message over
//! the size limit, and bytes that do not decode as the RPC's message (invalid UTF-8
//! in a string field, a truncated field, garbage). tonic answers them with
//! OUT_OF_RANGE and INTERNAL, and since no handler sees the call, nothing would audit
//! it. This layer sits between the middleware (which has set the call context) and
//! the generated server, and turns them into INVALID_ARGUMENT — the code the service
//! uses for a malformed request — audited as `call.refused` like every refusal.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tonic::{Code, body::Body, server::NamedService};
use tower::Service;

use crate::{
    audit::Audit,
    domain::CallContext,
    error::{ServiceError, code_name},
    transport::middleware::new_correlation_id,
};

/// Wraps the generated server; see the module docs.
#[derive(Clone)]
pub struct WireErrors<S> {
    inner: S,
    audit: Audit,
}

impl<S> WireErrors<S> {
    pub fn new(inner: S, audit: Audit) -> Self {
        Self { inner, audit }
    }
}

impl<S: NamedService> NamedService for WireErrors<S> {
    const NAME: &'static str = S::NAME;
}

/// The service's own error for a status tonic raised while reading the request, or
/// None for any other status (those come from handlers, which audit their own).
pub fn library_refusal(status: &tonic::Status) -> Option<ServiceError> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("message length too large") => {
            Some(ServiceError::invalid(
                "request",
                format!(
                    "the request message is too large ({message}); database names are at most 63 bytes"
                ),
            ))
        }
        Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            Some(ServiceError::invalid(
                "request",
                format!("the request is not a valid protobuf message for this RPC ({message})"),
            ))
        }
        _ => None,
    }
}

impl<S> Service<http::Request<Body>> for WireErrors<S>
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

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // Keep the service that was polled ready (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let audit = self.audit.clone();
        let ctx = req.extensions().get::<CallContext>().cloned();
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let fut = inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // An error raised before the handler is a trailers-only response: its
            // status is in the headers.
            let Some(err) = tonic::Status::from_header_map(resp.headers())
                .as_ref()
                .and_then(library_refusal)
            else {
                return Ok(resp);
            };
            let correlation_id = ctx
                .as_ref()
                .map(|c| c.correlation_id.clone())
                .unwrap_or_else(new_correlation_id);
            let principal = ctx.as_ref().map(|c| &c.principal);
            tracing::info!(
                principal = principal.map(|p| p.id.as_str()).unwrap_or_default(),
                code = code_name(err.code()),
                "refused: {err}"
            );
            audit
                .refusal(
                    &correlation_id,
                    principal,
                    &method,
                    &err,
                    serde_json::Value::Null,
                    Default::default(),
                )
                .await;
            Ok(err.to_status(&correlation_id).into_http::<Body>())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_only_the_library_refusals() {
        let too_large = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 1048585 bytes, the limit is: 65536 bytes",
        );
        let err = library_refusal(&too_large).unwrap();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("65536"), "{err}");

        let undecodable = tonic::Status::internal(
            "failed to decode Protobuf message: CreateDatabaseRequest.database_name: invalid string value: data is not UTF-8 encoded",
        );
        let err = library_refusal(&undecodable).unwrap();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("not UTF-8"), "{err}");

        for other in [
            tonic::Status::internal("internal error: something else"),
            tonic::Status::out_of_range("page beyond the end"),
            tonic::Status::unavailable("metadata database unavailable"),
            tonic::Status::invalid_argument("invalid database_name"),
        ] {
            assert!(library_refusal(&other).is_none(), "{other:?}");
        }
    }
}
