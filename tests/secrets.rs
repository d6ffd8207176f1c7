//! No secrets leak (issue 4, item 10): a realistic session — static-token and
//! run-token calls, refused calls with wrong tokens, create/approve/deny/delete, an
//! unreachable target whose URL has a password — then every line the server logged
//! (at debug level) and every row of flow_events, links, approval_requests and
//! project_databases is searched for every token, the run-token secret and every
//! password used. None may appear.
mod common;
use common::*;

use db_lifecycle::proto;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::Code;

const DEAD_TARGET_PASSWORD: &str = "dead-target-pw-Zq81x";
const BASIC_PASSWORD: &str = "basic-auth-pw-Kk29";
const WRONG_STATIC_TOKEN: &str = "tok-wrong-but-plausible-0123456789";

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn forged(secret: &[u8], exp_offset: i64) -> String {
    let now = now() as i64;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({
            "iss": RUN_TOKEN_ISSUER, "aud": RUN_TOKEN_AUDIENCE, "sub": "mallory",
            "iat": now - 600, "exp": now + exp_offset,
            "kind": "human", "projects": ["*"], "roles": ["admin"],
        }),
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn no_token_secret_or_password_reaches_logs_or_the_audit_trail() {
    let mut opts = run_token_options(&format!(
        "[targets.dead]\nadmin_url = \"postgres://postgres:{DEAD_TARGET_PASSWORD}@127.0.0.1:1/postgres\"\n\n[environments.dead]\ntarget = \"dead\"\n"
    ));
    opts.allowed_envs_var = Some("dev,staging,dead".into());
    // Everything the service logs at debug level, not only the default.
    opts.env.push(("DB_LIFECYCLE_LOG".into(), "debug".into()));
    let server = TestServer::start_with(opts).await;

    let run_agent = run_token(
        "agent-run-s",
        "agent",
        &["alpha"],
        &["requester"],
        Some("run-secrets-1"),
    );
    let run_owner = run_token("oscar", "human", &["alpha"], &["owner"], Some("ui-1"));
    let wrong_secret_token = forged(b"not-the-secret-not-the-secret-0123", 600);
    let expired_token = forged(RUN_TOKEN_SECRET.as_bytes(), -300);
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#).trim_end_matches('='),
        b64(br#"{"sub":"mallory","kind":"human","roles":["admin"]}"#).trim_end_matches('=')
    );
    let basic = b64(format!("mallory:{BASIC_PASSWORD}").as_bytes());

    // --- static tokens: create, approve, describe, query RPCs ---
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let db1 = unique("sec_static");
    let r = agent.create("dev", &db1).await.unwrap();
    assert_eq!(
        owner.approve(&r.request_id).await.unwrap().status,
        "applied"
    );
    agent.describe("dev", &db1).await.unwrap();
    agent.get_request(&r.request_id).await.unwrap();
    agent.events_by_request(&r.request_id).await.unwrap();
    let mut c = agent.client.clone();
    c.list_requests(agent.request(proto::ListRequestsRequest::default()))
        .await
        .unwrap();
    c.list_databases(agent.request(proto::ListDatabasesRequest::default()))
        .await
        .unwrap();

    // --- run tokens: create, deny, create again, approve, delete, approve ---
    let ragent = server.with_token(&run_agent).await;
    let rowner = server.with_token(&run_owner).await;
    let db2 = unique("sec_run");
    let r = ragent.create("dev", &db2).await.unwrap();
    rowner.deny(&r.request_id, "not yet").await.unwrap();
    let r = ragent.create("dev", &db2).await.unwrap();
    assert_eq!(
        rowner.approve(&r.request_id).await.unwrap().status,
        "applied"
    );
    let d = ragent.delete("dev", &db2, true).await.unwrap();
    assert_eq!(
        owner.approve(&d.request_id).await.unwrap().status,
        "applied"
    );
    ragent
        .events_by_correlation(&d.correlation_id)
        .await
        .unwrap();
    // A dry run and a refused delete without confirmation.
    let mut rc = ragent.client.clone();
    rc.create(ragent.request(proto::CreateDatabaseRequest {
        environment: "staging".into(),
        database_name: unique("sec_dry"),
        dry_run: true,
        ..Default::default()
    }))
    .await
    .unwrap();
    expect_code(
        ragent.delete("dev", &db1, false).await,
        Code::FailedPrecondition,
    );

    // --- refused: wrong tokens of every kind ---
    let bad_headers = [
        format!("Bearer {WRONG_STATIC_TOKEN}"),
        format!("Bearer {wrong_secret_token}"),
        format!("Bearer {expired_token}"),
        format!("Bearer {alg_none}"),
        format!("Basic {basic}"),
        // A real token under the wrong scheme, and a token without a scheme.
        format!("Token {}", OWNER_A.token),
        OWNER_B.token.to_string(),
    ];
    for h in &bad_headers {
        let caller = server.with_auth(Some(h)).await;
        expect_code(caller.create("dev", &db1).await, Code::Unauthenticated);
        expect_code(caller.approve(&r.request_id).await, Code::Unauthenticated);
    }

    // --- unreachable target with a password in its URL ---
    for r in [
        agent.describe("dead", &db1).await,
        agent.create("dead", &unique("sec_dead")).await,
        ragent.delete("dead", &db1, true).await,
    ] {
        expect_code(r, Code::Unavailable);
    }

    // The secret never reached the process's command line either (ps shows it).
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.pid())).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).to_string();

    // --- the search ---
    let mut secrets: Vec<(String, String)> = vec![
        ("run-token secret".into(), RUN_TOKEN_SECRET.into()),
        (
            "metadata/target password".into(),
            cluster().password().into(),
        ),
        ("dead target password".into(), DEAD_TARGET_PASSWORD.into()),
        ("basic-auth password".into(), BASIC_PASSWORD.into()),
        ("basic-auth credentials".into(), basic.clone()),
        ("wrong static token".into(), WRONG_STATIC_TOKEN.into()),
    ];
    for p in ALL {
        secrets.push((format!("static token of {}", p.id), p.token.into()));
    }
    for (label, t) in [
        ("agent run token", &run_agent),
        ("owner run token", &run_owner),
        ("wrongly signed token", &wrong_secret_token),
        ("expired token", &expired_token),
    ] {
        secrets.push((label.into(), t.clone()));
        let sig = t.rsplit('.').next().unwrap().to_string();
        secrets.push((format!("{label} signature"), sig));
    }
    secrets.push(("alg=none token".into(), alg_none.clone()));

    let log = server.log();
    let audit = audit_dump(&server).await;
    assert!(
        audit.len() > 40,
        "the session should have left a real audit trail"
    );
    assert!(
        log.lines().count() > 40,
        "the session should have left a real log"
    );
    let mut leaks = Vec::new();
    for (label, secret) in &secrets {
        assert!(secret.len() >= 12, "{label} too short to search for");
        for (i, line) in log.lines().enumerate() {
            if line.contains(secret.as_str()) {
                leaks.push(format!(
                    "{label} in log line {}: {}",
                    i + 1,
                    line.replace(secret.as_str(), "<SECRET>")
                ));
            }
        }
        for row in &audit {
            if row.contains(secret.as_str()) {
                leaks.push(format!(
                    "{label} in audit row: {}",
                    row.replace(secret.as_str(), "<SECRET>")
                ));
            }
        }
        if cmdline.contains(secret.as_str()) {
            leaks.push(format!("{label} in the server's command line"));
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));

    // The search looked at what it should: refusals and the run id are there.
    assert!(audit.iter().any(|r| r.contains("call.refused")));
    assert!(audit.iter().any(|r| r.contains("run-secrets-1")));
    assert!(log.contains("run_id=run-secrets-1"));
    assert!(log.contains("DEBUG"), "debug logging was on");
}
