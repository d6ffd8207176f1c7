//! TLS to PostgreSQL (the metadata database and every target cluster), configured the
//! libpq way, in the connection string: `sslmode`, `sslrootcert`, `sslcert`, `sslkey`.
//!
//! tokio-postgres knows only `disable | prefer | require` and none of the file
//! parameters, so they are taken off the string here and turned into a rustls client
//! configuration. Semantics follow libpq:
//!
//! | sslmode | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `prefer` (default) | if the server offers it | no |
//! | `require` | yes | no; chain against `sslrootcert` when one is given |
//! | `verify-ca` | yes | chain against `sslrootcert` |
//! | `verify-full` | yes | chain against `sslrootcert`, and the host name |
//!
//! `sslrootcert=system` uses the operating system's trust store. `sslcert` + `sslkey`
//! present a client certificate (for `hostssl … cert` in `pg_hba.conf`).

use std::{path::PathBuf, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(raw: &str) -> Result<Self, String> {
        match raw {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            "allow" => Err(
                "sslmode=allow is not supported (use prefer, require, verify-ca or verify-full)"
                    .into(),
            ),
            other => Err(format!(
                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trust store.
    System,
}

/// The TLS parameters of one connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl PgTls {
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "sslmode" => self.mode = SslMode::parse(value)?,
            "sslrootcert" if value == "system" => self.root_cert = Some(RootCert::System),
            "sslrootcert" => self.root_cert = Some(RootCert::File(non_empty_path(key, value)?)),
            "sslcert" => self.client_cert = Some(non_empty_path(key, value)?),
            "sslkey" => self.client_key = Some(non_empty_path(key, value)?),
            _ => unreachable!("only TLS_KEYS are set"),
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        if matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.root_cert.is_none()
        {
            return Err(format!(
                "sslmode={} needs sslrootcert (a PEM file of the CA certificates to trust, or `system`)",
                self.mode.as_str()
            ));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err("sslcert and sslkey go together: give both or neither".into());
        }
        Ok(())
    }

    /// Whether the server's certificate chain is checked.
    pub fn verifies_server(&self) -> bool {
        match self.mode {
            SslMode::Disable | SslMode::Prefer => false,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        }
    }

    /// The driver's own mode: it negotiates; checking the certificate is ours.
    pub fn driver_mode(&self) -> DriverSslMode {
        match self.mode {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            _ => DriverSslMode::Require,
        }
    }

    /// The connector for tokio-postgres. Reads the certificate files now, so a missing
    /// or unreadable file is reported at start, not at the first call.
    pub fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match (&self.root_cert, self.verifies_server())
        {
            (Some(root), true) => {
                let roots = Arc::new(load_roots(root)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("sslrootcert: {e}"))?;
                if self.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
            _ => Arc::new(EncryptOnly(provider)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
                if chain.is_empty() {
                    return Err(format!("sslcert {}: no certificate in it", cert.display()));
                }
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("sslcert/sslkey: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }
}

fn non_empty_path(key: &str, value: &str) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err(format!("{key} is empty"));
    }
    Ok(PathBuf::from(value))
}

fn load_roots(root: &RootCert) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert {}: no usable CA certificate in it",
                    path.display()
                ));
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "sslrootcert=system: no CA certificate found in the system trust store".into(),
                );
            }
        }
    }
    Ok(store)
}

/// `verify-ca` (and `require` with a root certificate): the chain must lead to a
/// trusted CA; the host name is not compared, as in libpq.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: encrypted, the certificate is
/// not checked (libpq's behaviour; the service warns at start for `require`). The
/// handshake signatures are still verified.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Take the TLS parameters off a connection string (URL or `key=value` form): the
/// rest, for tokio-postgres, and the TLS settings.
pub fn split_tls_params(conn: &str) -> Result<(String, PgTls), String> {
    let mut tls = PgTls::default();
    let rest = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        split_url(conn, &mut tls)?
    } else {
        split_key_values(conn, &mut tls)?
    };
    tls.validate()?;
    Ok((rest, tls))
}

/// URL form: query parameters are `&`-separated, percent-encoded; the ones kept are
/// passed on exactly as written.
fn split_url(conn: &str, tls: &mut PgTls) -> Result<String, String> {
    let Some((base, query)) = conn.split_once('?') else {
        return Ok(conn.to_string());
    };
    let mut kept = Vec::new();
    for segment in query.split('&') {
        let (raw_key, raw_value) = segment.split_once('=').unwrap_or((segment, ""));
        let key = percent_decode(raw_key);
        if TLS_KEYS.contains(&key.as_str()) {
            tls.set(&key, &percent_decode(raw_value))?;
        } else {
            kept.push(segment);
        }
    }
    Ok(if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

fn percent_decode(raw: &str) -> String {
    url::form_urlencoded::parse(format!("x={raw}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// `key=value` form (`host=db port=5432 sslmode='verify-full'`): values may be
/// single-quoted with backslash escapes, as in libpq.
fn split_key_values(conn: &str, tls: &mut PgTls) -> Result<String, String> {
    let mut kept: Vec<&str> = Vec::new();
    let bytes = conn.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &conn[start..i];
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            // Not ours to judge: tokio-postgres reports the syntax error.
            return Ok(conn.to_string());
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Ok(conn.to_string()),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        let c = conn[i + 1..].chars().next().unwrap_or_default();
                        value.push(c);
                        i += 1 + c.len_utf8();
                    }
                    Some(_) => {
                        let c = conn[i..].chars().next().unwrap_or_default();
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                let c = conn[i..].chars().next().unwrap_or_default();
                value.push(c);
                i += c.len_utf8();
            }
        }
        if TLS_KEYS.contains(&key) {
            tls.set(key, &value)?;
        } else {
            kept.push(&conn[start..i]);
        }
    }
    Ok(kept.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_off_and_the_rest_kept_verbatim() {
        let (rest, tls) = split_tls_params(
            "postgres://u:p%40ss@db:5432/meta?application_name=x%20y&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db:5432/meta?application_name=x%20y&connect_timeout=3"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(
            tls.root_cert,
            Some(RootCert::File(PathBuf::from("/etc/ca.pem")))
        );
        let (rest, tls) = split_tls_params("postgres://db/meta?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://db/meta");
        assert_eq!(tls.driver_mode(), DriverSslMode::Require);
        assert!(!tls.verifies_server());
        let (rest, tls) = split_tls_params("postgresql://db/meta").unwrap();
        assert_eq!(rest, "postgresql://db/meta");
        assert_eq!(tls, PgTls::default());
    }

    #[test]
    fn key_value_parameters_are_taken_off() {
        let (rest, tls) = split_tls_params(
            "host=db  password='a b\\' c' sslmode = 'verify-ca' sslrootcert=/a\\ b.pem dbname=meta",
        )
        .unwrap();
        assert_eq!(rest, "host=db password='a b\\' c' dbname=meta");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(
            tls.root_cert,
            Some(RootCert::File(PathBuf::from("/a b.pem")))
        );
        let (_, tls) = split_tls_params("host=db sslrootcert=system sslmode=verify-full").unwrap();
        assert_eq!(tls.root_cert, Some(RootCert::System));
    }

    #[test]
    fn bad_tls_parameters_are_refused_with_the_reason() {
        let err = |s| split_tls_params(s).unwrap_err();
        assert!(err("postgres://db/x?sslmode=verify-full").contains("needs sslrootcert"));
        assert!(err("postgres://db/x?sslmode=allow").contains("not supported"));
        assert!(err("postgres://db/x?sslmode=bogus").contains("`bogus`"));
        assert!(err("postgres://db/x?sslcert=/c.pem").contains("sslkey go together"));
        assert!(err("postgres://db/x?sslmode=require&sslrootcert=").contains("empty"));
    }

    #[test]
    fn missing_certificate_files_are_reported_when_the_connector_is_built() {
        let (_, tls) =
            split_tls_params("postgres://db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .unwrap();
        let e = tls.connector().err().unwrap();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let (_, tls) = split_tls_params("postgres://db/x?sslmode=require").unwrap();
        assert!(tls.connector().is_ok());
    }
}
