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

/// The service's own error for a status tonic raised while reading the request.
/// Malformed requests become INVALID_ARGUMENT, the code the service uses for them;
/// where the gRPC spec fixes another code (an unknown method, an unsupported
/// compression, a compressed flag without an encoding) it is kept, with a message
/// that says what to do.
pub fn library_refusal(method: &str, status: &tonic::Status) -> Option<ServiceError> {
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
        Code::ResourceExhausted if message.contains("exceeded while decompressing") => {
            Some(ServiceError::invalid(
                "request",
                format!("the request message is too large once decompressed ({message})"),
            ))
        }
        Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            Some(ServiceError::invalid(
                "request",
                format!("the request is not a valid protobuf message for this RPC ({message})"),
            ))
        }
        Code::Internal if message.starts_with("Missing request message") => {
            Some(ServiceError::invalid(
                "request",
                "the call carried no request message; send exactly one",
            ))
        }
        Code::Internal if message.starts_with("Unexpected EOF decoding stream") => {
            Some(ServiceError::invalid(
                "request",
                "the request message was cut off (its frame is shorter than its length prefix)",
            ))
        }
        Code::Internal if message.starts_with("Error decompressing") => {
            Some(ServiceError::invalid(
                "request",
                format!("the request message does not decompress ({message})"),
            ))
        }
        Code::Internal if message.starts_with("protocol error:") => Some(ServiceError::Protocol {
            code: Code::Internal,
            message: format!("{message}; send the message uncompressed or set grpc-encoding"),
        }),
        Code::Unimplemented if message.starts_with("Content is compressed with") => {
            Some(ServiceError::Protocol {
                code: Code::Unimplemented,
                message: format!("{message}; send it uncompressed or gzip-compressed"),
            })
        }
        Code::Unimplemented if message.is_empty() => Some(ServiceError::Protocol {
            code: Code::Unimplemented,
            message: format!(
                "unknown method `{}` of dblifecycle.v1.DatabaseLifecycle; `grpcurl describe` lists them",
                crate::policy::printable(method)
            ),
        }),
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
        let fut = crate::audit::tracking_refusals(inner.call(req));
        Box::pin(async move {
            let (resp, recorded) = fut.await;
            let resp = resp?;
            if recorded {
                return Ok(resp);
            }
            // An error raised before the handler is a trailers-only response: its
            // status is in the headers.
            let Some(status) =
                tonic::Status::from_header_map(resp.headers()).filter(|s| s.code() != Code::Ok)
            else {
                return Ok(resp);
            };
            let mapped = library_refusal(&method, &status);
            let err = mapped.clone().unwrap_or_else(|| ServiceError::Protocol {
                code: status.code(),
                message: status.message().to_string(),
            });
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
            match mapped {
                Some(err) => Ok(err.to_status(&correlation_id).into_http::<Body>()),
                // Recorded, but answered as the library answered (its metadata, such
                // as grpc-accept-encoding, included).
                None => Ok(resp),
            }
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
        let err = library_refusal("Create", &too_large).unwrap();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("65536"), "{err}");

        let undecodable = tonic::Status::internal(
            "failed to decode Protobuf message: CreateDatabaseRequest.database_name: invalid string value: data is not UTF-8 encoded",
        );
        let err = library_refusal("Create", &undecodable).unwrap();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("not UTF-8"), "{err}");

        for (status, code) in [
            (
                tonic::Status::internal("Missing request message."),
                Code::InvalidArgument,
            ),
            (
                tonic::Status::internal("Unexpected EOF decoding stream."),
                Code::InvalidArgument,
            ),
            (
                tonic::Status::internal(
                    "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                ),
                Code::Internal,
            ),
            (
                tonic::Status::unimplemented(
                    "Content is compressed with `br` which isn't supported",
                ),
                Code::Unimplemented,
            ),
            (tonic::Status::unimplemented(""), Code::Unimplemented),
        ] {
            let err = library_refusal("Nope", &status).unwrap();
            assert_eq!(err.code(), code, "{status:?}");
        }
        let unknown = library_refusal("Nope", &tonic::Status::unimplemented("")).unwrap();
        assert!(unknown.to_string().contains("`Nope`"), "{unknown}");

        for other in [
            tonic::Status::internal("internal error: something else"),
            tonic::Status::out_of_range("page beyond the end"),
            tonic::Status::unavailable("metadata database unavailable"),
            tonic::Status::invalid_argument("invalid database_name"),
        ] {
            assert!(library_refusal("Create", &other).is_none(), "{other:?}");
        }
    }
}
