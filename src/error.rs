//! Typed service errors, and their mapping to gRPC status codes (the only place).

use tonic::Code;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("missing credentials: send `authorization: Bearer <token>`")]
    MissingToken,
    #[error("invalid or expired bearer token")]
    InvalidToken,
    /// Several `authorization` headers: which one a proxy or the server would pick
    /// is not something a caller should rely on, so none is used.
    #[error("more than one authorization header; send exactly one `authorization: Bearer <token>`")]
    AmbiguousToken,
    /// A bearer token shaped like a run token (JWT) that was refused; the reason
    /// never contains the token.
    #[error("invalid run token: {reason}")]
    InvalidRunToken { reason: String },

    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },

    #[error(
        "environment `{environment}` is not allowed; allowed environments: {}",
        allowed.join(", ")
    )]
    EnvironmentNotAllowed {
        environment: String,
        allowed: Vec<String>,
    },
    #[error("database `{name}` is protected and can never be created or dropped by this service")]
    ProtectedDatabase { name: String },
    #[error("permission denied: {reason}")]
    Forbidden { reason: String },
    #[error(
        "database `{name}` belongs to another project; pick another name or ask that project's owners"
    )]
    OwnedByAnotherProject { name: String },

    #[error(
        "deleting database `{name}` needs confirm_delete=true; resend with confirm_delete=true if you really mean to drop it"
    )]
    ConfirmDeleteRequired { name: String },
    #[error(
        "database `{name}` already has an open {action} request {request_id} ({state}); {hint}"
    )]
    OpenRequestExists {
        name: String,
        request_id: uuid::Uuid,
        action: String,
        state: String,
        /// What the caller can do: differs when the open request is another project's.
        hint: &'static str,
    },
    #[error(
        "database `{name}` is registered to your project in environment `{registered}` on the same cluster; use environment `{registered}` or another name"
    )]
    RegisteredInOtherEnvironment { name: String, registered: String },
    #[error("request {request_id} is already {state}; {hint}")]
    RequestFinal {
        request_id: uuid::Uuid,
        state: String,
        hint: String,
    },

    #[error(
        "database `{name}` already exists but is not managed by this service; it will not be adopted; choose another name"
    )]
    UnmanagedDatabaseExists { name: String },

    #[error("no request with id {request_id}")]
    RequestNotFound { request_id: String },
    #[error(
        "database `{name}` exists but is not managed by this service, so it will not be dropped"
    )]
    UnmanagedDatabase { name: String },
    #[error("no managed database named `{name}` in environment `{environment}`")]
    DatabaseNotFound { name: String, environment: String },

    #[error("metadata database unavailable: {detail}; retry later")]
    MetadataUnavailable { detail: String },
    #[error("target cluster `{target}` unavailable: {detail}; retry later")]
    TargetUnavailable { target: String, detail: String },
    /// The metadata database did not answer within the bound (`database_timeout`):
    /// frozen, overloaded, or behind a network that stopped delivering.
    #[error("metadata database did not answer within {}; retry later", humantime::format_duration(*after))]
    MetadataTimedOut { after: std::time::Duration },
    /// A target cluster did not answer within the bound (`database_timeout`, or
    /// `ddl_timeout` for CREATE/ALTER/DROP DATABASE).
    #[error("target cluster `{target}` did not answer within {}; retry later", humantime::format_duration(*after))]
    TargetTimedOut {
        target: String,
        after: std::time::Duration,
    },
    /// A call had to wait for an apply of the same database that is still running.
    #[error("database `{name}` is being changed by an apply that is still running; retry later")]
    ApplyBusy { name: String },
    #[error("service is shutting down; retry on another replica")]
    ShuttingDown,

    /// A call the gRPC layer could not take as it was sent (an unknown method, an
    /// unsupported compression, a malformed frame), with the code the gRPC spec
    /// asks for.
    #[error("{message}")]
    Protocol { code: Code, message: String },

    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn code(&self) -> Code {
        use ServiceError::*;
        match self {
            MissingToken | InvalidToken | AmbiguousToken | InvalidRunToken { .. } => {
                Code::Unauthenticated
            }
            InvalidField { .. } => Code::InvalidArgument,
            EnvironmentNotAllowed { .. }
            | ProtectedDatabase { .. }
            | Forbidden { .. }
            | OwnedByAnotherProject { .. } => Code::PermissionDenied,
            ConfirmDeleteRequired { .. }
            | OpenRequestExists { .. }
            | RegisteredInOtherEnvironment { .. }
            | RequestFinal { .. } => Code::FailedPrecondition,
            UnmanagedDatabaseExists { .. } => Code::AlreadyExists,
            RequestNotFound { .. } | UnmanagedDatabase { .. } | DatabaseNotFound { .. } => {
                Code::NotFound
            }
            MetadataUnavailable { .. }
            | TargetUnavailable { .. }
            | MetadataTimedOut { .. }
            | TargetTimedOut { .. }
            | ApplyBusy { .. }
            | ShuttingDown => Code::Unavailable,
            Protocol { code, .. } => *code,
            Internal(_) => Code::Internal,
        }
    }

    /// Transient errors leave an approved request approved, to be retried.
    pub fn is_transient(&self) -> bool {
        self.code() == Code::Unavailable
    }

    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ServiceError::InvalidField {
            field,
            reason: reason.into(),
        }
    }

    pub fn forbidden(reason: impl Into<String>) -> Self {
        ServiceError::Forbidden {
            reason: reason.into(),
        }
    }

    /// Map a metadata-database error. Connection problems are UNAVAILABLE.
    pub fn metadata(err: impl Into<DbError>) -> Self {
        match err.into() {
            DbError::Unreachable(detail) => ServiceError::MetadataUnavailable { detail },
            DbError::TimedOut(after) => ServiceError::MetadataTimedOut { after },
            DbError::Other(detail) => ServiceError::Internal(detail),
        }
    }

    /// Map a target-cluster error. Connection problems are UNAVAILABLE.
    pub fn target(target: &str, err: impl Into<DbError>) -> Self {
        match err.into() {
            DbError::Unreachable(detail) => ServiceError::TargetUnavailable {
                target: target.to_string(),
                detail,
            },
            DbError::TimedOut(after) => ServiceError::TargetTimedOut {
                target: target.to_string(),
                after,
            },
            DbError::Other(detail) => ServiceError::Internal(detail),
        }
    }

    pub fn to_status(&self, correlation_id: &str) -> tonic::Status {
        let mut status = tonic::Status::new(self.code(), self.to_string());
        if let Ok(v) = correlation_id.parse() {
            status.metadata_mut().insert(CORRELATION_HEADER, v);
        }
        status
    }
}

pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// A database error classified as "cannot reach it" or "something else".
/// Messages come from the driver, which never includes the connection URL.
#[derive(Debug)]
pub enum DbError {
    Unreachable(String),
    /// No answer within this bound (see `crate::pg`).
    TimedOut(std::time::Duration),
    Other(String),
}

impl From<crate::pg::PgError> for DbError {
    fn from(e: crate::pg::PgError) -> Self {
        match e {
            crate::pg::PgError::Db(e) => e.into(),
            crate::pg::PgError::Pool(e) => e.into(),
            crate::pg::PgError::TimedOut(after) => DbError::TimedOut(after),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.is_closed() {
            return DbError::Unreachable("connection closed".into());
        }
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                // 28xxx: the cluster refused the service's own credentials. A
                // configuration problem the caller cannot fix; the message would name
                // the service's role, so it is replaced.
                if code.starts_with("28") {
                    return DbError::Unreachable(format!(
                        "the cluster refused the service's credentials ({code}); check its configured URL"
                    ));
                }
                // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
                // 08xxx connection exceptions, 53300 too_many_connections; and conditions
                // that pass by themselves: 55006 object_in_use (e.g. the template
                // database is busy), 40001/40P01 serialization failure and deadlock.
                if code.starts_with("08")
                    || code.starts_with("57P")
                    || matches!(code, "53300" | "55006" | "40001" | "40P01")
                {
                    DbError::Unreachable(db.message().to_string())
                } else {
                    DbError::Other(format!("{} ({})", db.message(), code))
                }
            }
            // No server error: I/O, TLS, timeouts while connecting.
            None => DbError::Unreachable(error_chain(&e)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Backend(e) => DbError::from(e),
            PoolError::Timeout(_) => {
                DbError::Unreachable(
                    "no connection within the wait timeout (all pooled connections busy, or the server is not answering)".into(),
                )
            }
            PoolError::Closed => DbError::Unreachable("connection pool closed".into()),
            other => DbError::Unreachable(other.to_string()),
        }
    }
}

/// An error and its causes, `: `-joined. The driver's own message is only its kind
/// ("error performing TLS handshake"); the cause says which certificate check failed.
/// None of these carry the connection string.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The canonical upper-case name of a gRPC code, as written in audit rows.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
