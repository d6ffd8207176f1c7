//! TLS to PostgreSQL: the metadata and admin connection strings take libpq's
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey`. The throwaway cluster gets a
//! certificate from a CA made here; a role that `pg_hba.conf` refuses without TLS, and
//! one that must present a client certificate, show each mode doing what libpq's does.
mod common;
use common::*;

use std::{path::Path, process::Command};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Superuser that `pg_hba.conf` refuses on a plain connection.
const TLS_ROLE: &str = "tls_only";
const TLS_ROLE_PASSWORD: &str = "tls-role-Pw-4711";
/// Superuser that authenticates by client certificate only (CN = role name).
const CERT_ROLE: &str = "cert_only";

struct Ca(CertifiedIssuer<'static, KeyPair>);

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
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

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
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn write(&self, name: &str, contents: &str) -> String {
        std::fs::write(self.dir.path().join(name), contents).unwrap();
        self.path(name)
    }
}

/// TLS on the shared test cluster: a server certificate valid for `localhost` only
/// (not for `127.0.0.1`, so host-name checking can be seen), client certificates
/// checked against a second CA, and the two roles above.
async fn tls_cluster() -> Pki {
    let server_ca = Ca::new("pg test server CA");
    let client_ca = Ca::new("pg test client CA");
    let other_ca = Ca::new("some other CA");
    let (server_cert, server_key) = server_ca.leaf(
        "pg test server",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        client_ca.leaf(CERT_ROLE, &[], ExtendedKeyUsagePurpose::ClientAuth);
    let (stranger_cert, stranger_key) =
        other_ca.leaf(CERT_ROLE, &[], ExtendedKeyUsagePurpose::ClientAuth);

    let pki = Pki {
        dir: tempfile::tempdir().unwrap(),
    };
    pki.write("server-ca.pem", &server_ca.0.pem());
    pki.write("other-ca.pem", &other_ca.0.pem());
    pki.write("client.crt", &client_cert);
    pki.write("client.key", &client_key);
    pki.write("stranger.crt", &stranger_cert);
    pki.write("stranger.key", &stranger_key);

    let c = cluster();
    c.enable_tls(&server_cert, &server_key, Some(&client_ca.0.pem()))
        .await
        .unwrap();
    c.connect("postgres")
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE ROLE {TLS_ROLE} LOGIN SUPERUSER PASSWORD '{TLS_ROLE_PASSWORD}';
             CREATE ROLE {CERT_ROLE} LOGIN SUPERUSER;"
        ))
        .await
        .unwrap();
    c.prepend_hba(&format!(
        "hostnossl all {TLS_ROLE} all reject\n\
         hostnossl all {CERT_ROLE} all reject\n\
         hostssl all {CERT_ROLE} all cert"
    ))
    .await
    .unwrap();
    pki
}

fn tls_url(host: &str, db: &str, params: &str) -> String {
    format!(
        "postgres://{TLS_ROLE}:{TLS_ROLE_PASSWORD}@{host}:{}/{db}?{params}",
        cluster().port()
    )
}

fn cert_url(db: &str, params: &str) -> String {
    format!(
        "postgres://{CERT_ROLE}@localhost:{}/{db}?{params}",
        cluster().port()
    )
}

/// `db-lifecycle migrate` against `url`: exit success, and stdout+stderr.
fn migrate(url: &str, dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_db-lifecycle"))
        .arg("migrate")
        .current_dir(dir)
        .env_remove("DB_LIFECYCLE_CONFIG")
        .env("DB_LIFECYCLE_METADATA_URL", url)
        .env("DB_LIFECYCLE_ADMIN_URL", url)
        .env("DB_LIFECYCLE_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains(TLS_ROLE_PASSWORD),
        "password in the output: {text}"
    );
    (out.status.success(), text)
}

/// One test, because it reconfigures the binary's shared cluster (roles, pg_hba.conf).
#[tokio::test]
async fn tls_to_postgresql() {
    let pki = tls_cluster().await;
    each_sslmode_behaves_as_in_libpq(&pki).await;
    the_service_runs_with_verified_tls_to_metadata_and_target(&pki).await;
}

async fn each_sslmode_behaves_as_in_libpq(pki: &Pki) {
    let meta = unique("tlsmeta");
    cluster().create_database(&meta).await.unwrap();
    let ca = pki.path("server-ca.pem");
    let dir = pki.dir.path();

    // Accepted: encrypted, with the certificate checked as far as the mode says.
    for params in [
        format!("sslmode=verify-full&sslrootcert={ca}"),
        "sslmode=require".to_string(),
        // The default (prefer) takes TLS when the server offers it.
        "application_name=db-lifecycle-migrate".to_string(),
    ] {
        let (ok, out) = migrate(&tls_url("localhost", &meta, &params), dir);
        assert!(ok, "{params}: {out}");
    }
    // verify-ca checks the chain but not the host name: 127.0.0.1 is not in the
    // certificate, and verify-ca still connects; verify-full does not.
    let (ok, out) = migrate(
        &tls_url(
            "127.0.0.1",
            &meta,
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ),
        dir,
    );
    assert!(ok, "verify-ca to 127.0.0.1: {out}");
    let (ok, out) = migrate(
        &tls_url(
            "127.0.0.1",
            &meta,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        dir,
    );
    assert!(!ok, "verify-full to a name outside the certificate: {out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");

    // Refused: a CA that did not sign the server's certificate.
    let (ok, out) = migrate(
        &tls_url(
            "localhost",
            &meta,
            &format!(
                "sslmode=verify-full&sslrootcert={}",
                pki.path("other-ca.pem")
            ),
        ),
        dir,
    );
    assert!(!ok, "wrong CA accepted: {out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    // Refused by the server: no TLS at all for a role pg_hba.conf keeps on TLS.
    let (ok, out) = migrate(&tls_url("localhost", &meta, "sslmode=disable"), dir);
    assert!(!ok, "plaintext accepted for {TLS_ROLE}: {out}");
    assert!(
        out.contains("no encryption") || out.contains("pg_hba"),
        "{out}"
    );

    // Refused before connecting, naming the key: unusable TLS parameters.
    for (params, needle) in [
        ("sslmode=verify-full".to_string(), "needs sslrootcert"),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".to_string(),
            "/nonexistent/ca.pem",
        ),
        ("sslmode=allow".to_string(), "not supported"),
        (
            format!("sslcert={}", pki.path("client.crt")),
            "sslkey go together",
        ),
    ] {
        let (ok, out) = migrate(&tls_url("localhost", &meta, &params), dir);
        assert!(!ok, "{params} accepted");
        assert!(
            out.contains("metadata_url") && out.contains(needle),
            "{params}: {out}"
        );
    }

    // Client certificates: a role that authenticates by certificate only.
    let with_cert = |crt: &str, key: &str| {
        format!(
            "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
            pki.path(crt),
            pki.path(key)
        )
    };
    let (ok, out) = migrate(
        &cert_url(&meta, &with_cert("client.crt", "client.key")),
        dir,
    );
    assert!(ok, "client certificate refused: {out}");
    let (ok, out) = migrate(
        &cert_url(&meta, &format!("sslmode=verify-full&sslrootcert={ca}")),
        dir,
    );
    assert!(!ok, "no client certificate accepted: {out}");
    let (ok, out) = migrate(
        &cert_url(&meta, &with_cert("stranger.crt", "stranger.key")),
        dir,
    );
    assert!(!ok, "certificate from another CA accepted: {out}");
}

/// The service itself over TLS: metadata on verify-full with a password, the target
/// cluster through a client certificate; a create is applied and every connection the
/// service holds is encrypted.
async fn the_service_runs_with_verified_tls_to_metadata_and_target(pki: &Pki) {
    let meta = unique("tlsmeta");
    cluster().create_database(&meta).await.unwrap();
    let ca = pki.path("server-ca.pem");
    let metadata_url = tls_url(
        "localhost",
        &meta,
        &format!("sslmode=verify-full&sslrootcert={ca}&application_name=dbl-tls-meta"),
    );
    let admin_url = cert_url(
        "postgres",
        &format!(
            "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}&application_name=dbl-tls-admin",
            pki.path("client.crt"),
            pki.path("client.key")
        ),
    );
    let server = TestServer::start_with(Options {
        metadata_db: Some(meta.clone()),
        extra_toml: "[approval]\ncreate = \"none\"\n".into(),
        env: vec![
            ("DB_LIFECYCLE_METADATA_URL".into(), metadata_url),
            ("DB_LIFECYCLE_ADMIN_URL".into(), admin_url),
        ],
        ..Default::default()
    })
    .await;

    let name = unique("tlsdb");
    let agent = server.as_(&AGENT_A).await;
    let created = agent.create("dev", &name).await.unwrap();
    assert!(created.applied, "{created:?}");
    assert!(db_exists(&name).await);
    let described = agent.describe("dev", &name).await.unwrap();
    assert!(described.exists && described.owned_by_project);

    // Every connection the service holds is TLS; the target's is the certificate role.
    let rows = target()
        .await
        .query(
            "SELECT a.application_name, a.usename::text, s.ssl, coalesce(s.client_dn, '') \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE 'dbl-tls-%'",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, String, bool, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(
        seen.iter().any(|s| s.0 == "dbl-tls-meta") && seen.iter().any(|s| s.0 == "dbl-tls-admin"),
        "{seen:?}"
    );
    for (app, user, ssl, dn) in &seen {
        assert!(ssl, "{app} connection without TLS: {seen:?}");
        if app == "dbl-tls-admin" {
            assert_eq!(user, CERT_ROLE);
            assert!(dn.contains(CERT_ROLE), "client DN {dn}");
        }
    }
    let log = server.log();
    assert!(!log.contains(TLS_ROLE_PASSWORD), "password in the log");
    assert!(
        log.contains("sslmode=verify-full"),
        "the redacted URL names the mode"
    );
}
