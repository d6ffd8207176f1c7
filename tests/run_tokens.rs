//! Run tokens (issue 4, item 7): short-lived HS256 JWTs minted per agent run, through
//! the real server. Good tokens become principals with a run id that reaches logs and
//! audit rows; every kind of bad token is UNAUTHENTICATED and audited without the
//! token; the `token` subcommand mints tokens the server accepts.
mod common;
use common::*;

use std::time::{SystemTime, UNIX_EPOCH};

use db_lifecycle::error::code_name;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::Code;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims the test server accepts; tests bend one thing at a time.
fn good_claims() -> Value {
    let now = now();
    json!({
        "iss": RUN_TOKEN_ISSUER,
        "aud": RUN_TOKEN_AUDIENCE,
        "sub": "agent-run-x",
        "iat": now,
        "exp": now + 600,
        "kind": "agent",
        "projects": ["alpha"],
        "roles": ["requester"],
        "run_id": "run-x-1",
    })
}

fn sign_with(claims: &Value, secret: &[u8], alg: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

fn sign(claims: &Value) -> String {
    sign_with(claims, RUN_TOKEN_SECRET.as_bytes(), Algorithm::HS256)
}

fn b64url(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An unsigned token (`alg=none`), which no library will produce for us.
fn alg_none(claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    )
}

fn with(f: impl FnOnce(&mut Value)) -> Value {
    let mut c = good_claims();
    f(&mut c);
    c
}

#[tokio::test]
async fn run_tokens_authenticate_and_their_run_id_reaches_audit_and_logs() {
    let server = TestServer::start_with(run_token_options("")).await;
    let agent_token = run_token(
        "agent-run-7",
        "agent",
        &["alpha"],
        &["requester"],
        Some("run-7f3a"),
    );
    let owner_token = run_token("olga", "human", &["alpha"], &["owner"], Some("ui-sess-9"));
    let agent = server.with_token(&agent_token).await;
    let owner = server.with_token(&owner_token).await;
    let name = unique("runtok");

    let created = agent.create("dev", &name).await.unwrap();
    assert_eq!(created.status, "approval_required", "{}", created.message);
    let stored = agent.get_request(&created.request_id).await.unwrap();
    assert_eq!(
        stored.requested_by, "agent-run-7",
        "principal id is the subject"
    );
    let applied = owner.approve(&created.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(db_exists(&name).await);

    // Static tokens still work next to run tokens.
    let d = server
        .as_(&AGENT_A)
        .await
        .describe("dev", &name)
        .await
        .unwrap();
    assert!(d.owned_by_project);

    // The run id is in the payload of the events the run's principal acted in.
    let rows = server
        .meta()
        .await
        .query(
            "SELECT event_type, actor_id, payload->>'run_id' FROM flow_events \
             WHERE request_id = $1::text::uuid ORDER BY id",
            &[&created.request_id],
        )
        .await
        .unwrap();
    let by_type: Vec<(String, String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let find = |t: &str| {
        by_type
            .iter()
            .find(|(ty, _, _)| ty == t)
            .unwrap_or_else(|| panic!("no {t} event in {by_type:?}"))
            .clone()
    };
    assert_eq!(
        find("request.created"),
        (
            "request.created".into(),
            "agent-run-7".into(),
            Some("run-7f3a".into())
        )
    );
    assert_eq!(
        find("request.approved"),
        (
            "request.approved".into(),
            "olga".into(),
            Some("ui-sess-9".into())
        )
    );
    // System events during the apply carry no caller's run id.
    assert_eq!(find("request.applied").2, None, "{by_type:?}");

    // A refused call by a run-token principal carries the run id too.
    let s = expect_code(
        agent.approve(&created.request_id).await,
        Code::PermissionDenied,
    );
    let row = assert_refusal_recorded(&server, &s, "PERMISSION_DENIED").await;
    assert_eq!(row.actor_id, "agent-run-7");
    let payload: Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(payload["run_id"], "run-7f3a", "{payload}");

    // Log lines of the run's calls name the run; the tokens never appear.
    let log = server.log();
    assert!(log.contains("run_id=run-7f3a"), "run id not in log:\n{log}");
    assert!(
        log.contains("run_id=ui-sess-9"),
        "run id not in log:\n{log}"
    );
    for t in [&agent_token, &owner_token] {
        assert!(!log.contains(t.as_str()), "token in log");
        for row in audit_dump(&server).await {
            assert!(!row.contains(t.as_str()), "token in audit row {row}");
        }
    }
}

#[tokio::test]
async fn bad_run_tokens_are_unauthenticated_and_audited_without_the_token() {
    let server = TestServer::start_with(run_token_options("")).await;
    let now = now();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            sign(&with(|c| {
                c["iat"] = (now - 1200).into();
                c["exp"] = (now - 60).into();
            })),
            "expired",
        ),
        (
            "not yet valid",
            sign(&with(|c| c["nbf"] = (now + 120).into())),
            "not valid yet",
        ),
        (
            "issued in the future",
            sign(&with(|c| {
                c["iat"] = (now + 120).into();
                c["exp"] = (now + 600).into();
            })),
            "future",
        ),
        (
            "wrong secret",
            sign_with(
                &good_claims(),
                b"some-other-secret-some-other-secret!!",
                Algorithm::HS256,
            ),
            "signature",
        ),
        (
            "tampered claims",
            {
                let good = sign(&good_claims());
                let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
                parts[1] = b64url(
                    with(|c| c["roles"] = json!(["admin"]))
                        .to_string()
                        .as_bytes(),
                );
                parts.join(".")
            },
            "signature",
        ),
        (
            "alg=none",
            alg_none(&good_claims(), ""),
            "invalid run token",
        ),
        (
            "alg=none with a signature",
            alg_none(&good_claims(), "c2lnbmF0dXJl"),
            "invalid run token",
        ),
        (
            "HS512 under the right secret",
            sign_with(
                &good_claims(),
                RUN_TOKEN_SECRET.as_bytes(),
                Algorithm::HS512,
            ),
            "algorithm",
        ),
        (
            "wrong issuer",
            sign(&with(|c| c["iss"] = "someone-else".into())),
            "issuer",
        ),
        (
            "subject of a configured principal",
            sign(&with(|c| c["sub"] = OWNER_A.id.into())),
            "configured principal",
        ),
        (
            "subject of a configured principal in other case",
            sign(&with(|c| c["sub"] = OWNER_A.id.to_uppercase().into())),
            "configured principal",
        ),
        (
            "the service's own actor id",
            sign(&with(|c| c["sub"] = "db-lifecycle".into())),
            "reserved",
        ),
        (
            "the actor of approval mode none",
            sign(&with(|c| c["sub"] = "policy:none".into())),
            "reserved",
        ),
        (
            "a zero-width space in the subject",
            sign(&with(|c| c["sub"] = "agent\u{200b}".into())),
            "ASCII",
        ),
        (
            "a Cyrillic look-alike of a configured principal",
            sign(&with(|c| c["sub"] = "\u{0430}lice".into())),
            "ASCII",
        ),
        (
            "a fullwidth look-alike",
            sign(&with(|c| c["sub"] = "\u{FF52}oot".into())),
            "ASCII",
        ),
        (
            "wrong audience",
            sign(&with(|c| c["aud"] = "another-service".into())),
            "audience",
        ),
        (
            "no expiry",
            sign(&with(|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            "exp",
        ),
        (
            "lifetime over max_ttl",
            sign(&with(|c| c["exp"] = (now + 2 * 3600).into())),
            "max_ttl",
        ),
        (
            "unknown kind",
            sign(&with(|c| c["kind"] = "robot".into())),
            "malformed claims",
        ),
        (
            "unknown role",
            sign(&with(|c| c["roles"] = json!(["requester", "superuser"]))),
            "malformed claims",
        ),
        (
            "misspelled claim",
            sign(&with(|c| c["role"] = json!(["admin"]))),
            "malformed claims",
        ),
        (
            "no roles claim",
            sign(&with(|c| {
                c.as_object_mut().unwrap().remove("roles");
            })),
            "malformed claims",
        ),
        (
            "bad project",
            sign(&with(|c| c["projects"] = json!(["alpha; drop"]))),
            "project",
        ),
        (
            "bad run id",
            sign(&with(|c| c["run_id"] = "run id with spaces".into())),
            "run_id",
        ),
        (
            "empty subject",
            sign(&with(|c| c["sub"] = "".into())),
            "subject",
        ),
        ("garbage", "aaaa.bbbb.cccc".to_string(), "invalid run token"),
    ];
    let name = unique("badrun");
    let mut report = Vec::new();
    for (label, token, want) in &cases {
        let caller = server.with_token(token).await;
        match caller.create("dev", &name).await {
            Ok(r) => report.push(format!("{label}: accepted ({})", r.status)),
            Err(s) if s.code() != Code::Unauthenticated => {
                report.push(format!("{label}: {:?} {}", s.code(), s.message()))
            }
            Err(s) => {
                if !s.message().contains(want) {
                    report.push(format!("{label}: message {:?} lacks {want:?}", s.message()));
                }
                let row =
                    assert_refusal_recorded(&server, &s, code_name(Code::Unauthenticated)).await;
                assert_eq!(row.actor_id, "", "{label}");
                for part in token.split('.').filter(|p| p.len() > 8) {
                    assert!(
                        !row.payload.contains(part) && !row.message.contains(part),
                        "{label}: token in audit row {row:?}"
                    );
                    assert!(!s.message().contains(part), "{label}: token echoed");
                }
            }
        }
    }
    assert!(
        report.is_empty(),
        "bad run tokens not refused as expected:\n{}",
        report.join("\n")
    );
    assert_eq!(request_count(&server).await, 0);
    assert!(!db_exists(&name).await);
    let log = server.log();
    for (label, token, _) in &cases {
        if token.len() > 20 {
            assert!(!log.contains(token.as_str()), "{label}: token in log");
        }
    }
}

#[tokio::test]
async fn run_tokens_are_refused_when_not_configured_and_kinds_can_be_restricted() {
    // Without [run_tokens] a perfectly signed token is just an unknown bearer token.
    let plain = TestServer::start().await;
    let token = sign(&good_claims());
    let s = expect_code(
        plain.with_token(&token).await.describe("dev", "x").await,
        Code::Unauthenticated,
    );
    assert!(
        s.message().contains("invalid or expired bearer token"),
        "{}",
        s.message()
    );

    // allowed_kinds = ["agent"]: the control plane cannot mint approvers.
    let mut opts = run_token_options("");
    opts.extra_toml.push_str("allowed_kinds = [\"agent\"]\n");
    let server = TestServer::start_with(opts).await;
    let agent = server
        .with_token(&run_token("a1", "agent", &["alpha"], &["requester"], None))
        .await;
    let name = unique("kinds");
    let created = agent.create("dev", &name).await.unwrap();
    let human = server
        .with_token(&run_token("h1", "human", &["alpha"], &["owner"], None))
        .await;
    let s = expect_code(
        human.approve(&created.request_id).await,
        Code::Unauthenticated,
    );
    assert!(s.message().contains("kind `human`"), "{}", s.message());
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
}

fn token_cmd(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_db-lifecycle"));
    cmd.arg("token")
        .args(args)
        .env_remove("DB_LIFECYCLE_RUN_TOKEN_SECRET")
        .env_remove("DB_LIFECYCLE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[tokio::test]
async fn the_token_subcommand_mints_tokens_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let secret_path = dir.path().join("run-token.key");
    std::fs::write(&secret_path, format!("{RUN_TOKEN_SECRET}\n")).unwrap();
    // The server reads the same secret from a file this time.
    let server = TestServer::start_with(Options {
        extra_toml: format!(
            "[run_tokens]\nsecret_file = {:?}\nissuer = \"{RUN_TOKEN_ISSUER}\"\naudience = \"{RUN_TOKEN_AUDIENCE}\"\nmax_ttl = \"1h\"\n",
            secret_path.display().to_string()
        ),
        ..Default::default()
    })
    .await;
    let config = server.config_path().to_str().unwrap().to_string();
    let out = token_cmd(
        &[
            "--config",
            &config,
            "--subject",
            "agent-cli",
            "--kind",
            "agent",
            "--project",
            "alpha",
            "--role",
            "requester",
            "--run-id",
            "run-cli-1",
            "--ttl",
            "5m",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let agent = server.with_token(&token).await;
    let name = unique("clitok");
    let created = agent.create("dev", &name).await.unwrap();
    assert_eq!(created.status, "approval_required");
    let payload: String = server
        .meta()
        .await
        .query_one(
            "SELECT payload::text FROM flow_events WHERE event_type = 'request.created' \
             AND request_id = $1::text::uuid",
            &[&created.request_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(payload.contains("run-cli-1"), "{payload}");

    // Without a config: secret from the environment, issuer/audience by flag.
    let out = token_cmd(
        &[
            "--issuer",
            RUN_TOKEN_ISSUER,
            "--audience",
            RUN_TOKEN_AUDIENCE,
            "--subject",
            "svc-cli",
            "--kind",
            "service",
            "--project",
            "alpha",
            "--role",
            "requester",
        ],
        &[("DB_LIFECYCLE_RUN_TOKEN_SECRET", RUN_TOKEN_SECRET)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let svc = server.with_token(&token).await;
    assert_eq!(
        svc.describe("dev", &name).await.unwrap().status,
        "described"
    );

    // Refusals: a lifetime over max_ttl, no secret, a secret on the command line,
    // an unknown role.
    let common = [
        "--subject",
        "x",
        "--kind",
        "agent",
        "--project",
        "alpha",
        "--role",
        "requester",
    ];
    let ttl_args: Vec<&str> = ["--config", config.as_str(), "--ttl", "2h"]
        .into_iter()
        .chain(common)
        .collect();
    let out = token_cmd(&ttl_args, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_ttl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = token_cmd(&common, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DB_LIFECYCLE_RUN_TOKEN_SECRET"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret_arg: Vec<&str> = ["--secret", RUN_TOKEN_SECRET]
        .into_iter()
        .chain(common)
        .collect();
    let out = token_cmd(&secret_arg, &[]);
    assert!(!out.status.success(), "a --secret argument must not exist");
    let bad_role: Vec<&str> = ["--config", config.as_str()]
        .into_iter()
        .chain(common)
        .chain(["--role", "superuser"])
        .collect();
    assert!(!token_cmd(&bad_role, &[]).status.success());

    // Once expired, a token is refused.
    let expired = sign(&with(|c| {
        c["iat"] = (now() - 7200).into();
        c["exp"] = (now() - 3600).into();
    }));
    expect_code(
        server
            .with_token(&expired)
            .await
            .describe("dev", &name)
            .await,
        Code::Unauthenticated,
    );
}
