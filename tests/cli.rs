//! The binary as an operator meets it: config errors, migrate, hash-token, logs,
//! graceful shutdown.
mod common;

use std::process::{Command, Stdio};

use common::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_db-lifecycle"));
    c.env_remove("DB_LIFECYCLE_METADATA_URL")
        .env_remove("DB_LIFECYCLE_ADMIN_URL")
        .env_remove("DB_LIFECYCLE_CONFIG")
        .env_remove("CODEXK8S_PROJECT_DB_LIFECYCLE_ALLOWED_ENVS");
    c
}

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn bad_config_fails_at_start_naming_the_key() {
    let cases = [
        (
            "metadata_url = \"postgres://u:pw@127.0.0.1:1/m\"\nadmin_url = \"postgres://u:pw@127.0.0.1:1/p\"\nlisten_adress = \"x\"\n",
            "listen_adress",
        ),
        (
            "metadata_url = \"postgres://u:pw@127.0.0.1:1/m\"\nadmin_url = \"postgres://u:pw@127.0.0.1:1/p\"\nrequest_ttl = 5\n",
            "request_ttl",
        ),
        (
            "metadata_url = \"postgres://u:pw@127.0.0.1:1/m\"\nadmin_url = \"postgres://u:pw@127.0.0.1:1/p\"\n[approval]\ncreate = \"sometimes\"\n",
            "approval.create",
        ),
        (
            "metadata_url = \"postgres://u:pw@127.0.0.1:1/m\"\nadmin_url = \"postgres://u:pw@127.0.0.1:1/p\"\n[names]\npattern = \"([a-z\"\n",
            "names.pattern",
        ),
        (
            "admin_url = \"postgres://u:pw@127.0.0.1:1/p\"\n",
            "metadata_url",
        ),
        (
            "metadata_url = \"postgres://u:pw@127.0.0.1:1/m\"\nadmin_url = \"postgres://u:pw@127.0.0.1:1/p\"\nprotected_databases = [\"Billing\"]\n",
            "protected_databases",
        ),
        (
            "metadata_url = \"postgres://u:pw@127.0.0.1:1/m\"\nadmin_url = \"postgres://u:pw@127.0.0.1:1/p\"\nprotected_databases = [\" ledger \"]\n",
            "protected_databases",
        ),
        (
            "metadata_url = \"postgres://u:pw@127.0.0.1:1/m\"\nadmin_url = \"postgres://u:pw@127.0.0.1:1/p\"\n[environments.dev]\ntarget = \"nowhere\"\n",
            "environments.dev.target",
        ),
    ];
    for (text, key) in cases {
        let f = write_config(text);
        let out = bin()
            .args(["serve", "--config"])
            .arg(f.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "config with bad `{key}` was accepted"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(key),
            "error does not name `{key}`: {stderr}"
        );
        assert!(!stderr.contains(":pw@"), "password leaked: {stderr}");
    }
}

#[tokio::test]
async fn migrate_is_idempotent_and_creates_the_tables() {
    let db = unique("migr");
    cluster().create_database(&db).await.unwrap();
    let f = write_config(&format!(
        "metadata_url = \"{}\"\nadmin_url = \"{}\"\n",
        cluster().url(&db),
        cluster().url("postgres")
    ));
    for expected in ["V1__core", "up to date"] {
        let out = bin()
            .args(["migrate", "--config"])
            .arg(f.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(expected), "{stdout}");
    }
    let meta = cluster().connect(&db).await.unwrap();
    for table in [
        "project_databases",
        "approval_requests",
        "flow_events",
        "links",
    ] {
        let n: i64 = meta
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{table} missing");
    }
}

#[test]
fn hash_token_reads_stdin() {
    use std::io::Write;
    let mut child = bin()
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"secret-token\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        db_lifecycle::config::token_sha256_hex("secret-token")
    );
}

#[tokio::test]
async fn log_lines_carry_the_correlation_id_and_never_the_token() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let mut client = agent.client.clone();
    let name = unique("logs");
    let r = client
        .create(agent.request_with_correlation(
            db_lifecycle::proto::CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                ..Default::default()
            },
            "trace-me-42",
        ))
        .await
        .unwrap();
    assert_eq!(
        r.metadata()
            .get("x-correlation-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "trace-me-42"
    );
    assert_eq!(r.get_ref().correlation_id, "trace-me-42");
    // A refused call also logs under its id.
    let _ = client
        .create(agent.request_with_correlation(
            db_lifecycle::proto::CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: "Bad Name".into(),
                ..Default::default()
            },
            "trace-me-43",
        ))
        .await
        .unwrap_err();
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("trace-me-42")).collect();
    assert!(lines.iter().any(|l| l.contains("queued")), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("trace-me-43") && l.contains("INVALID_ARGUMENT")),
        "{log}"
    );
    for p in ALL {
        assert!(
            !log.contains(p.token),
            "token of {} leaked into the log",
            p.id
        );
    }
    assert!(
        !log.contains(cluster().password()),
        "PostgreSQL password leaked into the log"
    );
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let mut server = TestServer::start().await;
    let pid = server.pid();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Wait off the runtime: the harness's client connections must stay serviced.
    let code = tokio::task::spawn_blocking(move || {
        let code = server.wait_exit();
        (code, server)
    })
    .await
    .unwrap();
    let (code, server) = code;
    assert_eq!(code, Some(0), "log:\n{}", server.log());
    assert!(server.log().contains("db-lifecycle stopped"));
}
