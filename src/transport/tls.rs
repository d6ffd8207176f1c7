//! TLS and mutual TLS for the gRPC listener (`[tls]`), through tonic's rustls
//! support (ring provider). Files are read once at start; a missing or malformed
//! file stops the server with the file's path in the message.
//!
//! - `cert_file` + `key_file`: the server's certificate chain and private key (PEM).
//! - `client_ca_file` set: every client must present a certificate that chains to
//!   one of these CAs (mutual TLS); connections without one fail the handshake.
//!
//! Health and reflection share the listener, so they are behind the same TLS.

use std::{path::Path, time::Duration};

use anyhow::{Context, bail};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::TlsConfig;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read_pem(path: &Path, what: &str, marker: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("tls.{what}: cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(marker) {
        bail!(
            "tls.{what}: {} is not a PEM file with a {marker} block",
            path.display()
        );
    }
    Ok(bytes)
}

/// The tonic server TLS configuration for `[tls]`.
pub fn server_tls_config(cfg: &TlsConfig) -> anyhow::Result<ServerTlsConfig> {
    let cert = read_pem(&cfg.cert_file, "cert_file", "CERTIFICATE")?;
    let key = read_pem(&cfg.key_file, "key_file", "PRIVATE KEY")?;
    let mut tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = &cfg.client_ca_file {
        let ca = read_pem(ca, "client_ca_file", "CERTIFICATE")?;
        // Client certificates are required, not optional.
        tls = tls
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false);
    }
    Ok(tls)
}

/// How the listener is secured, for the start-up log line.
pub fn mode(cfg: Option<&TlsConfig>) -> &'static str {
    match cfg {
        None => "plaintext",
        Some(TlsConfig {
            client_ca_file: Some(_),
            ..
        }) => "mutual-tls",
        Some(_) => "tls",
    }
}
