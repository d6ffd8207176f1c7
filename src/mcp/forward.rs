//! Forwarding tool calls to the `DatabaseLifecycle` gRPC service.
//!
//! The channel connects lazily and reconnects by itself, so the bridge starts (and
//! keeps running) while the service is down; such calls fail fast with UNAVAILABLE.
//! Every call carries the agent's bearer token and a correlation id the bridge
//! generates, so even a call that never reached the service has an id to quote.

use std::{path::PathBuf, time::Duration};

use tonic::{
    Code, Request, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    error::CORRELATION_HEADER,
    mcp::{
        outcome::{FailureSource, ToolFailure},
        settings::SecretToken,
    },
    proto::{self, database_lifecycle_client::DatabaseLifecycleClient},
};

#[derive(Debug, thiserror::Error)]
pub enum ForwardSetupError {
    #[error("service URL `{url}` is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{option}: {reason}")]
    BadTls {
        option: &'static str,
        reason: String,
    },
}

/// TLS to the service, for an `https://` service URL (a service with `[tls]`).
#[derive(Debug, Clone, Default)]
pub struct ServiceTls {
    /// PEM CA certificates to trust; unset: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), when the service requires mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Name to verify the service's certificate against, when it differs from the
    /// URL's host (e.g. connecting by IP).
    pub domain: Option<String>,
}

impl ServiceTls {
    fn is_configured(&self) -> bool {
        self.ca_file.is_some()
            || self.client_cert_file.is_some()
            || self.client_key_file.is_some()
            || self.domain.is_some()
    }

    fn client_config(&self) -> Result<ClientTlsConfig, ForwardSetupError> {
        let read = |option: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| ForwardSetupError::BadTls {
                option,
                reason: format!("cannot read {}: {e}", path.display()),
            })
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_file {
            Some(path) => {
                config.ca_certificate(Certificate::from_pem(read("--service-ca-file", path)?))
            }
            None => config.with_native_roots(),
        };
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("--client-cert-file", cert)?,
                    read("--client-key-file", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(ForwardSetupError::BadTls {
                    option: "--client-cert-file",
                    reason: "--client-cert-file and --client-key-file go together".into(),
                });
            }
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

/// Timeouts for talking to the service.
#[derive(Debug, Clone, Copy)]
pub struct ForwardTimeouts {
    /// Establishing a connection (per attempt).
    pub connect: Duration,
    /// One RPC, end to end.
    pub request: Duration,
}

impl Default for ForwardTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            request: Duration::from_secs(30),
        }
    }
}

/// A cheap-to-clone handle on the service.
#[derive(Clone)]
pub struct ServiceClient {
    channel: Channel,
    /// For messages only ("cannot reach the service at ...").
    url: String,
    timeouts: ForwardTimeouts,
}

/// A successful answer and the correlation id the service used for it.
pub struct Answer<T> {
    pub body: T,
    pub correlation_id: String,
}

/// A fresh correlation id for one tool call (the service accepts callers' ids).
pub fn new_correlation_id() -> String {
    format!("mcp-{}", uuid::Uuid::new_v4())
}

impl ServiceClient {
    pub fn new(
        url: &str,
        timeouts: ForwardTimeouts,
        tls: &ServiceTls,
    ) -> Result<Self, ForwardSetupError> {
        let bad = |reason: String| ForwardSetupError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(timeouts.connect)
            .tcp_nodelay(true);
        match parsed.scheme() {
            "http" if tls.is_configured() => {
                return Err(bad(
                    "TLS options are set but the URL is http://; use https://".into(),
                ));
            }
            "http" => {}
            "https" => {
                endpoint = endpoint
                    .tls_config(tls.client_config()?)
                    .map_err(|e| bad(crate::error::error_chain(&e)))?;
            }
            other => return Err(bad(format!("scheme `{other}`: use http:// or https://"))),
        }
        Ok(Self {
            channel: endpoint.connect_lazy(),
            url: url.to_string(),
            timeouts,
        })
    }

    fn client(&self) -> DatabaseLifecycleClient<Channel> {
        DatabaseLifecycleClient::new(self.channel.clone())
    }

    fn request<T>(
        &self,
        body: T,
        token: &SecretToken,
        correlation_id: &str,
    ) -> Result<Request<T>, ToolFailure> {
        let mut request = Request::new(body);
        // Tells the service how long the bridge waits; the bridge's own limit is
        // enforced in `within`.
        request.set_timeout(self.timeouts.request);
        let bearer =
            AsciiMetadataValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
                ToolFailure::new(
                    Code::Unauthenticated,
                    "the bearer token contains characters that cannot be sent in a header",
                    correlation_id,
                )
            })?;
        let metadata = request.metadata_mut();
        metadata.insert("authorization", bearer);
        if let Ok(id) = AsciiMetadataValue::try_from(correlation_id) {
            metadata.insert(CORRELATION_HEADER, id);
        }
        Ok(request)
    }

    /// Map a gRPC status to a tool failure. A status without the service's
    /// correlation header never reached the service (connect failure, deadline):
    /// say so plainly, and keep the bridge's own correlation id.
    fn failure(&self, status: Status, sent_correlation_id: &str) -> ToolFailure {
        match correlation_from(status.metadata()) {
            Some(correlation_id) => ToolFailure {
                code: status.code(),
                message: status.message().to_string(),
                correlation_id,
                origin: FailureSource::Service,
            },
            // The connection failed under the call (a TLS alert after the handshake,
            // such as a refused client certificate; a reset): the service is
            // unavailable to this bridge. The request may have been sent, but creates
            // and deletes are idempotent, so a retry is safe.
            None if !matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
                && std::error::Error::source(&status).is_some() =>
            {
                let cause = std::error::Error::source(&status)
                    .map(crate::error::error_chain)
                    .unwrap_or_default();
                let tls_hint = if self.url.starts_with("https://") {
                    "; with TLS, check --service-ca-file, --service-tls-name and the client \
                     certificate the service may require"
                } else {
                    "; if the service serves TLS, use an https:// service URL"
                };
                ToolFailure::new(
                    Code::Unavailable,
                    format!(
                        "service unavailable: the connection to the db-lifecycle service at {} \
                         failed ({cause}){tls_hint}; check with describe or request_status, then retry",
                        self.url,
                    ),
                    sent_correlation_id,
                )
            }
            None => {
                let message = match status.code() {
                    Code::Unavailable => format!(
                        "service unavailable: the db-lifecycle service at {} cannot be reached \
                         ({}); nothing was changed; retry later",
                        self.url,
                        status.message()
                    ),
                    Code::DeadlineExceeded | Code::Cancelled => format!(
                        "the db-lifecycle service at {} did not answer within {}s; the call may \
                         or may not have been processed; check with describe or request_status",
                        self.url,
                        self.timeouts.request.as_secs()
                    ),
                    _ => format!(
                        "calling the db-lifecycle service at {} failed: {}",
                        self.url,
                        status.message()
                    ),
                };
                // The service gives up at the deadline the bridge sent (CANCELLED):
                // for the agent that is the bridge's own timeout.
                let code = match status.code() {
                    Code::Cancelled => Code::DeadlineExceeded,
                    code => code,
                };
                ToolFailure::new(code, message, sent_correlation_id)
            }
        }
    }

    fn answer<T>(
        &self,
        result: Result<tonic::Response<T>, Status>,
        correlation_id: &str,
    ) -> Result<Answer<T>, ToolFailure> {
        match result {
            Ok(response) => {
                let correlation_id = correlation_from(response.metadata())
                    .unwrap_or_else(|| correlation_id.to_string());
                Ok(Answer {
                    body: response.into_inner(),
                    correlation_id,
                })
            }
            Err(status) => Err(self.failure(status, correlation_id)),
        }
    }

    /// Run one RPC with at most `limit` to answer. A call still running then is
    /// DEADLINE_EXCEEDED: it may or may not have been processed.
    async fn within<T>(
        &self,
        limit: Duration,
        correlation_id: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<Answer<T>, ToolFailure> {
        match tokio::time::timeout(limit, call).await {
            // tonic enforces the deadline sent with the call too; whichever fires
            // first, it is the same timeout.
            Ok(Err(status)) if !is_timeout(&status) => Err(self.failure(status, correlation_id)),
            Ok(Ok(response)) => self.answer(Ok(response), correlation_id),
            Ok(Err(_)) | Err(_) => Err(ToolFailure::new(
                Code::DeadlineExceeded,
                format!(
                    "the db-lifecycle service at {} did not answer within {}; the call may or may \
                     not have been processed; check with describe or request_status before \
                     retrying",
                    self.url,
                    humantime::format_duration(limit)
                ),
                correlation_id,
            )),
        }
    }

    pub async fn create(
        &self,
        token: &SecretToken,
        correlation_id: &str,
        body: proto::CreateDatabaseRequest,
    ) -> Result<Answer<proto::LifecycleResult>, ToolFailure> {
        let request = self.request(body, token, correlation_id)?;
        let mut client = self.client();
        self.within(
            self.timeouts.request,
            correlation_id,
            client.create(request),
        )
        .await
    }

    pub async fn delete(
        &self,
        token: &SecretToken,
        correlation_id: &str,
        body: proto::DeleteDatabaseRequest,
    ) -> Result<Answer<proto::LifecycleResult>, ToolFailure> {
        let request = self.request(body, token, correlation_id)?;
        let mut client = self.client();
        self.within(
            self.timeouts.request,
            correlation_id,
            client.delete(request),
        )
        .await
    }

    pub async fn describe(
        &self,
        token: &SecretToken,
        correlation_id: &str,
        body: proto::DescribeDatabaseRequest,
    ) -> Result<Answer<proto::LifecycleResult>, ToolFailure> {
        let request = self.request(body, token, correlation_id)?;
        let mut client = self.client();
        self.within(
            self.timeouts.request,
            correlation_id,
            client.describe(request),
        )
        .await
    }

    /// One request's state, answered within `limit` at most (and never later than
    /// the request timeout), so a wait for a decision ends when it promised to.
    pub async fn get_request(
        &self,
        token: &SecretToken,
        correlation_id: &str,
        request_id: &str,
        limit: Duration,
    ) -> Result<Answer<proto::ApprovalRequest>, ToolFailure> {
        let body = proto::GetRequestRequest {
            request_id: request_id.to_string(),
        };
        let limit = limit.min(self.timeouts.request);
        let mut request = self.request(body, token, correlation_id)?;
        request.set_timeout(limit);
        let mut client = self.client();
        self.within(limit, correlation_id, client.get_request(request))
            .await
    }

    /// Who the token is, according to the service (UNAUTHENTICATED for a bad one).
    pub async fn who_am_i(
        &self,
        token: &SecretToken,
        correlation_id: &str,
    ) -> Result<Answer<proto::WhoAmIResponse>, ToolFailure> {
        let request = self.request(proto::WhoAmIRequest {}, token, correlation_id)?;
        let mut client = self.client();
        self.within(
            self.timeouts.request,
            correlation_id,
            client.who_am_i(request),
        )
        .await
    }
}

/// A status made by tonic's own client-side deadline (`grpc-timeout`).
fn is_timeout(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn correlation_from(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}
