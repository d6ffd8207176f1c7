//! TLS and mutual TLS for the gRPC listener (`[tls]`), over rustls (ring provider).
//! Files are read once at start; a missing or malformed file stops the server with
//! the file's path in the message.
//!
//! - `cert_file` + `key_file`: the server's certificate chain and private key (PEM).
//! - `client_ca_file` set: every client must present a certificate that chains to
//!   one of these CAs (mutual TLS); connections without one fail the handshake.
//!
//! Health and reflection share the listener, so they are behind the same TLS. The
//! handshake itself runs in [`crate::transport::incoming`] rather than in tonic, so
//! the connection's deadline also covers what the client sends after it (the
//! HTTP/2 preface, counted in decrypted bytes).

use std::{path::Path, sync::Arc};

use anyhow::{Context, bail};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::config::TlsConfig;

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

fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path, what, "CERTIFICATE")?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("tls.{what}: {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("tls.{what}: {} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The rustls server configuration for `[tls]`, offering HTTP/2 (ALPN `h2`) only.
pub fn server_tls_config(cfg: &TlsConfig) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = read_certs(&cfg.cert_file, "cert_file")?;
    let key_pem = read_pem(&cfg.key_file, "key_file", "PRIVATE KEY")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow::anyhow!("tls.key_file: {}: {e}", cfg.key_file.display()))?;
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("tls: no usable protocol versions")?;
    let builder = match &cfg.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "client_ca_file")? {
                roots.add(cert).with_context(|| {
                    format!("tls.client_ca_file: {}: unusable CA", ca.display())
                })?;
            }
            // Client certificates are required, not optional.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("tls.client_ca_file: {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "tls.key_file: {} cannot be used with tls.cert_file {}",
            cfg.key_file.display(),
            cfg.cert_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
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
