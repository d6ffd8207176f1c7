//! TLS and mutual TLS on the gRPC listener (issue 4, item 8), with a CA generated at
//! test time: a client trusting the CA gets the service, health and reflection; with
//! mTLS on, clients without a certificate or with one from another CA are refused
//! at the handshake, and one with a valid certificate is served.
mod common;
use common::*;

use std::{path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and its key, both PEM.
    fn leaf(&self, cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client_identity(&self, cn: &str) -> Identity {
        let (cert, key) = self.leaf(cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        Identity::from_pem(cert, key)
    }
}

/// A server certificate for localhost signed by `ca`, written as files; the `[tls]`
/// section pointing at them (with `client_ca` for mutual TLS).
fn tls_toml(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> String {
    let (cert, key) = ca.leaf(
        "db-lifecycle test server",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let cert_file = dir.join("server.crt");
    let key_file = dir.join("server.key");
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let mut toml = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert_file.display().to_string(),
        key_file.display().to_string()
    );
    if let Some(client_ca) = client_ca {
        let ca_file = dir.join("client-ca.crt");
        std::fs::write(&ca_file, client_ca.pem()).unwrap();
        toml.push_str(&format!(
            "client_ca_file = {:?}\n",
            ca_file.display().to_string()
        ));
    }
    toml
}

fn trusting(ca: &Ca) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost")
}

/// Connect and ask for health; Ok(status) or the transport error as text.
async fn probe(addr: &str, tls: Option<ClientTlsConfig>) -> Result<i32, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| format!("call: {:?} {}", s.code(), s.message()))
}

async fn reflected_services(channel: Channel) -> Vec<String> {
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    match resp.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn tls_serves_the_service_health_and_reflection_to_clients_trusting_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("db-lifecycle test CA");
    let server = TestServer::start_with(Options {
        extra_toml: tls_toml(dir.path(), &ca, None),
        client_tls: Some(trusting(&ca)),
        ..Default::default()
    })
    .await;
    // start_with already waited for SERVING over TLS; now the service itself.
    let agent = server.as_(&AGENT_A).await;
    let name = unique("tls");
    let created = agent.create("dev", &name).await.unwrap();
    assert_eq!(created.status, "approval_required", "{}", created.message);
    let applied = server
        .as_(&OWNER_A)
        .await
        .approve(&created.request_id)
        .await
        .unwrap();
    assert_eq!(applied.status, "applied");
    // TLS does not replace bearer tokens.
    expect_code(
        server.with_auth(None).await.describe("dev", &name).await,
        Code::Unauthenticated,
    );
    let services = reflected_services(server.channel().await).await;
    for want in ["dblifecycle.v1.DatabaseLifecycle", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == want), "{services:?}");
    }
    assert_eq!(probe(&server.addr, Some(trusting(&ca))).await, Ok(1));

    // A plaintext client, and a client that trusts another CA, get nothing.
    let plain = probe(&server.addr, None).await;
    assert!(plain.is_err(), "plaintext client served: {plain:?}");
    let other = Ca::new("some other CA");
    let wrong_ca = probe(&server.addr, Some(trusting(&other))).await;
    assert!(
        wrong_ca.is_err(),
        "client trusting another CA: {wrong_ca:?}"
    );
    assert!(server.log().contains("tls=tls"), "{}", server.log());
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_valid_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("db-lifecycle test CA");
    let clients_ca = Ca::new("db-lifecycle clients CA");
    let good_client = trusting(&ca).identity(clients_ca.client_identity("agent-sidecar"));
    let server = TestServer::start_with(Options {
        extra_toml: tls_toml(dir.path(), &ca, Some(&clients_ca)),
        client_tls: Some(good_client.clone()),
        ..Default::default()
    })
    .await;
    assert!(server.log().contains("tls=mutual-tls"), "{}", server.log());

    // A valid client certificate: service, health and reflection all work.
    let agent = server.as_(&AGENT_A).await;
    let name = unique("mtls");
    let created = agent.create("dev", &name).await.unwrap();
    assert_eq!(created.status, "approval_required");
    assert_eq!(probe(&server.addr, Some(good_client.clone())).await, Ok(1));
    let services = reflected_services(server.channel().await).await;
    assert!(
        services
            .iter()
            .any(|s| s == "dblifecycle.v1.DatabaseLifecycle"),
        "{services:?}"
    );
    // The certificate authenticates the connection, not the caller: no token, no call.
    expect_code(
        server.with_auth(None).await.describe("dev", &name).await,
        Code::Unauthenticated,
    );

    // Refused: no client certificate; a certificate from another CA; a certificate
    // from the server CA (trusted for servers, not for clients); plaintext.
    let rogue_ca = Ca::new("rogue CA");
    let cases = [
        ("no client certificate", Some(trusting(&ca))),
        (
            "certificate from another CA",
            Some(trusting(&ca).identity(rogue_ca.client_identity("agent-sidecar"))),
        ),
        (
            "certificate from the server CA",
            Some(trusting(&ca).identity(ca.client_identity("agent-sidecar"))),
        ),
        ("plaintext", None),
    ];
    for (label, tls) in cases {
        let r = probe(&server.addr, tls).await;
        assert!(r.is_err(), "{label}: served ({r:?})");
    }
    // The refused handshakes did not disturb the server.
    assert_eq!(probe(&server.addr, Some(good_client)).await, Ok(1));
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
}

#[tokio::test]
async fn bad_tls_files_stop_the_server_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-pem.key");
    std::fs::write(&not_pem, "this is not a key").unwrap();
    let ca = Ca::new("ca");
    let (cert, _) = ca.leaf("s", &["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let cert_file = dir.path().join("server.crt");
    std::fs::write(&cert_file, cert).unwrap();
    let cases = [
        (
            format!(
                "cert_file = {:?}\nkey_file = {:?}\n",
                "/nonexistent/server.crt", not_pem
            ),
            "tls.cert_file",
        ),
        (
            format!("cert_file = {cert_file:?}\nkey_file = {not_pem:?}\n"),
            "tls.key_file",
        ),
    ];
    for (tls, want) in cases {
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nmetadata_url = \"postgres://u@127.0.0.1:1/meta\"\nadmin_url = \"postgres://u@127.0.0.1:1/postgres\"\n[tls]\n{tls}"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_db-lifecycle"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("DB_LIFECYCLE_METADATA_URL")
            .env_remove("DB_LIFECYCLE_ADMIN_URL")
            .env_remove("DB_LIFECYCLE_LISTEN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{want}: server started");
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
}

/// The handshake deadline also covers what comes after the TLS handshake: a client
/// that completes it and then sends nothing (no HTTP/2 preface, over which hyper
/// would never ping it) is closed, like a silent plaintext one; the server keeps
/// serving. The listener offers HTTP/2 by ALPN.
#[tokio::test]
async fn a_client_silent_after_the_tls_handshake_is_closed() {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("db-lifecycle test CA");
    let server = TestServer::start_with(Options {
        extra_toml: tls_toml(dir.path(), &ca, None),
        client_tls: Some(trusting(&ca)),
        ..Default::default()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // Send nothing more: the server closes the connection (EOF or an error).
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 256];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a client silent after the TLS handshake was never closed"
    );
    assert_eq!(probe(&server.addr, Some(trusting(&ca))).await, Ok(1));
}
