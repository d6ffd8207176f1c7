//! Database name rules and the environment allowlist (R2), through the real server.
mod common;
use common::*;

use db_lifecycle::proto::{self, CreateDatabaseRequest};
use tonic::{Code, Status};

async fn refused<T: std::fmt::Debug>(
    server: &TestServer,
    r: Result<T, Status>,
    code: Code,
) -> Status {
    let status = expect_code(r, code);
    assert_refusal_recorded(server, &status, db_lifecycle::error::code_name(code)).await;
    status
}

/// `base` padded with `x` to exactly `len` bytes.
fn padded(base: &str, len: usize) -> String {
    assert!(base.len() < len);
    format!("{base}{}", "x".repeat(len - base.len()))
}

/// Create, approve, and check the database exists under exactly `name`.
async fn create_approved(server: &TestServer, name: &str) -> proto::LifecycleResult {
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let created = agent.create("dev", name).await.unwrap();
    assert_eq!(created.status, "approval_required", "{}", created.message);
    assert_eq!(created.database_name, name);
    let applied = owner.approve(&created.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert_eq!(applied.database_name, name);
    assert!(
        db_exists(name).await,
        "`{name}` not created under exactly that name"
    );
    applied
}

async fn delete_approved(server: &TestServer, name: &str) {
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let del = agent.delete("dev", name, true).await.unwrap();
    let done = owner.approve(&del.request_id).await.unwrap();
    assert_eq!(done.status, "applied", "{}", done.message);
    assert!(!db_exists(name).await);
}

// ---------- names ----------

#[tokio::test]
async fn malformed_names_are_invalid_argument_before_any_sql() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let base = unique("v");
    // Would be dropped if the name reached SQL unquoted.
    let sentinel = unique("sentinel");
    create_by_hand(&sentinel).await;

    let cases: Vec<(String, &str)> = vec![
        (String::new(), "must not be empty"),
        (format!("9{base}"), "does not match"),
        (format!("{base} x"), "does not match"),
        (format!("{base}\"q"), "does not match"),
        (format!("{base};x"), "does not match"),
        (
            format!("{base}\";DROP DATABASE {sentinel};--"),
            "does not match",
        ),
        (format!("a\";DROP DATABASE {sentinel};--"), "does not match"),
        (format!("{base}\0x"), "control characters"),
        (format!("{base}\nx"), "control characters"),
        (format!("{base}\tx"), "control characters"),
        (format!("{base}é"), "does not match"),
        (format!("{base}データ"), "does not match"),
        ("データ".to_string(), "does not match"),
        (padded(&base, 64), "64 bytes"),
    ];
    for (name, why) in &cases {
        let s = refused(
            &server,
            agent.create("dev", name).await,
            Code::InvalidArgument,
        )
        .await;
        assert!(
            s.message().contains("invalid database_name"),
            "{name:?}: {}",
            s.message()
        );
        assert!(
            s.message().contains(why),
            "{name:?}: expected {why:?} in {}",
            s.message()
        );
        // The message is printable: control characters escaped, nothing raw.
        assert!(
            !s.message().contains('\0') && !s.message().contains('\n'),
            "{:?}",
            s.message()
        );
        refused(
            &server,
            agent.describe("dev", name).await,
            Code::InvalidArgument,
        )
        .await;
        refused(
            &server,
            agent.delete("dev", name, true).await,
            Code::InvalidArgument,
        )
        .await;
    }
    assert_eq!(request_count(&server).await, 0);
    assert_eq!(
        database_count_like(&base).await,
        0,
        "a database was created from a bad name"
    );
    assert!(db_exists(&sentinel).await, "injection reached SQL");
    drop_by_hand(&sentinel).await;
}

#[tokio::test]
async fn uppercase_name_is_refused_with_an_explanation_of_lowercase_folding() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("pTest12");
    let s = refused(
        &server,
        agent.create("dev", &name).await,
        Code::InvalidArgument,
    )
    .await;
    let m = s.message();
    assert!(m.contains("lowercase") && m.contains("folds"), "{m}");
    assert!(
        m.contains(&format!("`{}`", name.to_lowercase())),
        "suggests the lowercase name: {m}"
    );
    refused(
        &server,
        agent.create("dev", "pTest12").await,
        Code::InvalidArgument,
    )
    .await;
    // Uppercase plus other faults: no "try `...`" suggestion that would itself be refused.
    for bad in ["a\";DROP DATABASE x;--", "My DB", "Über"] {
        let s = refused(
            &server,
            agent.create("dev", bad).await,
            Code::InvalidArgument,
        )
        .await;
        assert!(!s.message().contains("try `"), "{bad:?}: {}", s.message());
        assert!(
            s.message().contains("does not match"),
            "{bad:?}: {}",
            s.message()
        );
    }
    assert_eq!(request_count(&server).await, 0);
    assert!(!db_exists(&name).await && !db_exists(&name.to_lowercase()).await);
}

#[tokio::test]
async fn hyphenated_name_is_created_under_exactly_that_name() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("my-service-db");
    create_approved(&server, &name).await;
    assert!(!db_exists(&name.replace('-', "_")).await);
    let d = agent.describe("dev", &name).await.unwrap();
    assert!(d.exists && d.owned_by_project, "{d:?}");
    assert_eq!(d.database_name, name);
    assert_eq!(
        ownership_rows(&server, &name).await,
        vec![("alpha".into(), "dev".into(), "active".into())]
    );
    delete_approved(&server, &name).await;
    assert!(ownership_rows(&server, &name).await.is_empty());
}

#[tokio::test]
async fn name_of_exactly_63_bytes_is_created_and_found_by_its_full_name() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let base = unique("len63");
    let name = padded(&base, 63);
    assert_eq!(name.len(), 63);
    create_approved(&server, &name).await;
    assert_eq!(
        database_count_like(&base).await,
        1,
        "exactly one database, not a truncated twin"
    );
    let d = agent.describe("dev", &name).await.unwrap();
    assert!(d.exists && d.owned_by_project, "{d:?}");
    assert_eq!(d.database_name, name);
    // A 62-byte prefix is another name, not the same database.
    let shorter = agent.describe("dev", &name[..62]).await.unwrap();
    assert!(!shorter.exists && !shorter.owned_by_project, "{shorter:?}");
    delete_approved(&server, &name).await;
}

#[tokio::test]
async fn name_of_64_bytes_is_refused_and_never_truncated() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let base = unique("len64");
    let name = padded(&base, 64);
    let s = refused(
        &server,
        agent.create("dev", &name).await,
        Code::InvalidArgument,
    )
    .await;
    assert!(
        s.message().contains("64 bytes") && s.message().contains("63"),
        "{}",
        s.message()
    );
    assert!(s.message().contains("truncate"), "{}", s.message());
    // Also as a dry run: still refused, and refused by the same rule.
    let r = agent
        .create_req(CreateDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            dry_run: true,
            ..Default::default()
        })
        .await;
    refused(&server, r, Code::InvalidArgument).await;
    assert_eq!(request_count(&server).await, 0);
    assert_eq!(
        database_count_like(&base).await,
        0,
        "no database, truncated or not"
    );
}

#[tokio::test]
async fn configured_case_sensitive_pattern_creates_describes_and_deletes_mixed_case() {
    let server = TestServer::start_with(Options {
        extra_toml: "[names]\npattern = \"^[A-Za-z_][A-Za-z0-9_]*$\"\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("pTest12");
    let lower = name.to_lowercase();
    create_approved(&server, &name).await;
    assert!(!db_exists(&lower).await, "case folded on create");

    let d = agent.describe("dev", &name).await.unwrap();
    assert!(d.exists && d.owned_by_project, "{d:?}");
    assert_eq!(d.database_name, name);
    let other = agent.describe("dev", &lower).await.unwrap();
    assert!(!other.exists && !other.owned_by_project, "{other:?}");
    // Deleting the lowercase twin finds nothing; the mixed-case one stays.
    refused(
        &server,
        agent.delete("dev", &lower, true).await,
        Code::NotFound,
    )
    .await;
    assert!(db_exists(&name).await);

    delete_approved(&server, &name).await;
    assert!(ownership_rows(&server, &name).await.is_empty());

    // The configured pattern is enforced: it has no `-`.
    let s = refused(
        &server,
        agent.create("dev", "my-service-db").await,
        Code::InvalidArgument,
    )
    .await;
    assert!(
        s.message().contains("^[A-Za-z_][A-Za-z0-9_]*$"),
        "{}",
        s.message()
    );
}

// ---------- environment allowlist ----------

#[tokio::test]
async fn allowlist_from_the_variable_is_trimmed_and_case_insensitive() {
    let server = TestServer::start_with(Options {
        allowed_envs_var: Some(" DEV , staging ".into()),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("allow");
    let created = agent.create(" Dev ", &name).await.unwrap();
    assert_eq!(created.status, "approval_required", "{}", created.message);
    assert_eq!(created.environment, "dev");
    assert_eq!(
        agent
            .get_request(&created.request_id)
            .await
            .unwrap()
            .environment,
        "dev"
    );
    let d = agent.describe("STAGING", &unique("allow")).await.unwrap();
    assert_eq!(d.environment, "staging");

    for env in ["prod", "ai-staging", "Prod"] {
        let s = refused(
            &server,
            agent.create(env, &unique("allow")).await,
            Code::PermissionDenied,
        )
        .await;
        assert!(
            s.message().contains("allowed environments: dev, staging"),
            "{}",
            s.message()
        );
    }
    assert_eq!(request_count(&server).await, 1);
}

async fn assert_fallback_allowlist(server: &TestServer) {
    let agent = server.as_(&AGENT_A).await;
    for env in ["dev", "staging", "ai-staging", "prod", " PROD "] {
        let d = agent.describe(env, &unique("fallback")).await.unwrap();
        assert_eq!(d.status, "described");
        assert_eq!(d.environment, env.trim().to_lowercase());
    }
    let name = unique("fallback");
    let created = agent.create("ai-staging", &name).await.unwrap();
    assert_eq!(created.environment, "ai-staging");
    let s = refused(
        server,
        agent.create("qa", &unique("fallback")).await,
        Code::PermissionDenied,
    )
    .await;
    assert!(
        s.message()
            .contains("allowed environments: dev, staging, ai-staging, prod"),
        "{}",
        s.message()
    );
    assert_eq!(request_count(server).await, 1);
}

#[tokio::test]
async fn empty_allowlist_variable_falls_back_to_the_seed_default() {
    let server = TestServer::start_with(Options {
        allowed_envs_var: Some(String::new()),
        ..Default::default()
    })
    .await;
    assert_fallback_allowlist(&server).await;
}

#[tokio::test]
async fn blank_allowlist_variable_falls_back_to_the_seed_default() {
    let server = TestServer::start_with(Options {
        allowed_envs_var: Some(" , ".into()),
        ..Default::default()
    })
    .await;
    assert_fallback_allowlist(&server).await;
}

#[tokio::test]
async fn unset_allowlist_variable_falls_back_to_the_seed_default() {
    let server = TestServer::start_with(Options {
        allowed_envs_var: None,
        ..Default::default()
    })
    .await;
    assert_fallback_allowlist(&server).await;
}
