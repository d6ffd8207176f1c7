//! gRPC transport: middleware (correlation id, authentication), handlers, conversion.

pub mod convert;
pub mod grpc;
pub mod incoming;
pub mod middleware;
pub mod run_tokens;
pub mod tls;
pub mod wire_errors;
