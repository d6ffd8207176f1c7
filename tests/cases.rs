//! Cases C01–C15 from real bug reports (see shared/cases/README.md), each through the
//! real gRPC server against a real PostgreSQL.
mod common;
use common::*;

use db_lifecycle::proto::{CreateDatabaseRequest, DeleteDatabaseRequest, LifecycleResult};
use tonic::{Code, Status};

// ---------- helpers local to this file ----------

/// Create `name` in `env` as AGENT_A and have OWNER_A approve it; the database exists.
async fn create_managed(server: &TestServer, env: &str, name: &str) -> LifecycleResult {
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let queued = agent.create(env, name).await.unwrap();
    assert_eq!(queued.status, "approval_required", "{}", queued.message);
    let applied = owner.approve(&queued.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(applied.applied);
    assert!(
        db_exists(name).await,
        "`{name}` must exist after the approved create"
    );
    applied
}

/// Delete `name` in `env` as AGENT_A (confirmed) and have OWNER_A approve it.
async fn delete_managed(server: &TestServer, env: &str, name: &str) -> LifecycleResult {
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let queued = agent.delete(env, name, true).await.unwrap();
    assert_eq!(queued.status, "approval_required", "{}", queued.message);
    let applied = owner.approve(&queued.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    applied
}

/// (project_id, environment, state) of the ownership row for `name`, if any.
async fn ownership_row(server: &TestServer, name: &str) -> Option<(String, String, String)> {
    server
        .meta()
        .await
        .query_opt(
            "SELECT project_id, environment, state FROM project_databases WHERE database_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

async fn create_with_correlation(
    caller: &Caller,
    env: &str,
    name: &str,
    correlation_id: &str,
) -> Result<LifecycleResult, Status> {
    let mut client = caller.client.clone();
    client
        .create(caller.request_with_correlation(
            CreateDatabaseRequest {
                environment: env.into(),
                database_name: name.into(),
                ..Default::default()
            },
            correlation_id,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn delete_with_correlation(
    caller: &Caller,
    msg: DeleteDatabaseRequest,
    correlation_id: &str,
) -> Result<LifecycleResult, Status> {
    let mut client = caller.client.clone();
    client
        .delete(caller.request_with_correlation(msg, correlation_id))
        .await
        .map(|r| r.into_inner())
}

/// (event_type, outcome, status_code) of every event recorded under a correlation id.
async fn events_for_correlation(
    server: &TestServer,
    correlation_id: &str,
) -> Vec<(String, String, String)> {
    server
        .meta()
        .await
        .query(
            "SELECT event_type, outcome, status_code FROM flow_events \
             WHERE correlation_id = $1 ORDER BY id",
            &[&correlation_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn pg_database_oid(name: &str) -> Option<u32> {
    target()
        .await
        .query_opt("SELECT oid FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

// ---------- the cases ----------

/// C01: a name with hyphens is created under exactly that name (quoted identifier).
#[tokio::test]
async fn c01_hyphenated_name_is_created_exactly_and_described() {
    let server = TestServer::start().await;
    let name = unique("my-service-db");
    assert!(name.contains('-'));

    let applied = create_managed(&server, "dev", &name).await;
    assert_eq!(applied.database_name, name);
    assert!(
        db_exists(&name).await,
        "the exact hyphenated name must exist"
    );
    // Nothing was created under a mangled form of the name.
    assert!(!db_exists("my").await);
    assert!(!db_exists(&name.replace('-', "_")).await);
    assert_eq!(database_count_like("my-service-db_").await, 1);

    let described = server
        .as_(&AGENT_A)
        .await
        .describe("dev", &name)
        .await
        .unwrap();
    assert_eq!(described.status, "described");
    assert_eq!(described.database_name, name);
    assert!(described.exists, "{}", described.message);
    assert!(described.owned_by_project);
    assert_eq!(described.owner_project_id, "alpha");
}

/// C02: uppercase is refused by the default rule with an explanation; a deployment with
/// a case-sensitive pattern handles the exact name end to end.
#[tokio::test]
async fn c02_uppercase_refused_by_default_and_exact_with_case_sensitive_pattern() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("pTest12");

    let err = expect_code(agent.create("dev", &name).await, Code::InvalidArgument);
    let msg = err.message();
    assert!(msg.contains(&name), "message must name the database: {msg}");
    assert!(
        msg.contains("lowercase"),
        "message must explain lowercase: {msg}"
    );
    assert!(msg.contains("fold"), "message must explain folding: {msg}");
    assert!(
        msg.contains(&name.to_lowercase()),
        "message should suggest the lowercase name: {msg}"
    );
    assert!(!db_exists(&name).await);
    assert!(!db_exists(&name.to_lowercase()).await);
    assert_eq!(request_count(&server).await, 0);

    // A deployment that configures a case-sensitive pattern.
    let cs = TestServer::start_with(Options {
        extra_toml: "[names]\npattern = \"^[A-Za-z_][A-Za-z0-9_-]*$\"\n".into(),
        ..Default::default()
    })
    .await;
    let name = unique("pTest12");
    let applied = create_managed(&cs, "dev", &name).await;
    assert_eq!(applied.database_name, name);
    assert!(db_exists(&name).await, "exact mixed-case name must exist");
    assert!(
        !db_exists(&name.to_lowercase()).await,
        "the name must not have been folded to lowercase"
    );
    let described = cs.as_(&AGENT_A).await.describe("dev", &name).await.unwrap();
    assert!(
        described.exists && described.owned_by_project,
        "{}",
        described.message
    );
    assert_eq!(described.database_name, name);
    let deleted = delete_managed(&cs, "dev", &name).await;
    assert_eq!(deleted.database_name, name);
    assert!(
        !db_exists(&name).await,
        "delete must find and drop the exact name"
    );
    assert!(ownership_row(&cs, &name).await.is_none());
}

/// C03: 64 bytes is refused before any SQL (no silent truncation); 63 bytes works.
#[tokio::test]
async fn c03_64_byte_name_refused_63_byte_name_created_and_found() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let base = unique("c03");
    let mut name63 = format!("{base}_");
    while name63.len() < 63 {
        name63.push('a');
    }
    let name64 = format!("{name63}a");
    assert_eq!(name63.len(), 63);
    assert_eq!(name64.len(), 64);

    let err = expect_code(agent.create("dev", &name64).await, Code::InvalidArgument);
    assert!(err.message().contains("64"), "{}", err.message());
    assert!(err.message().contains("63"), "{}", err.message());
    assert!(err.message().contains("truncate"), "{}", err.message());
    assert_eq!(
        request_count(&server).await,
        0,
        "nothing stored for the 64-byte name"
    );
    assert!(
        !db_exists(&name63).await,
        "the 64-byte name must not be silently truncated to 63"
    );
    assert_eq!(database_count_like(&base).await, 0);

    let applied = create_managed(&server, "dev", &name63).await;
    assert_eq!(applied.database_name, name63);
    let described = agent.describe("dev", &name63).await.unwrap();
    assert_eq!(described.database_name, name63);
    assert!(
        described.exists && described.owned_by_project,
        "{}",
        described.message
    );
    assert_eq!(database_count_like(&base).await, 1);
}

/// C04: quotes, semicolons, spaces, NUL, newline and non-ASCII letters are refused
/// with INVALID_ARGUMENT; nothing reaches SQL; every refusal is audited.
#[tokio::test]
async fn c04_hostile_names_refused_audited_and_never_reach_sql() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let base = unique("c04");
    // A database the injection would drop if it ever reached SQL unquoted.
    let victim = unique("c04victim");
    create_by_hand(&victim).await;

    let names = [
        format!("{base}\";DROP DATABASE {victim};--"),
        format!("{base}\"quoted\""),
        format!("{base}'single"),
        format!("{base};semicolon"),
        format!("{base} space"),
        format!("{base}\0nul"),
        format!("{base}\nnewline"),
        format!("{base}_caf\u{e9}"),
        format!("{base}_\u{0431}\u{0430}\u{0437}\u{0430}"),
    ];
    for (i, name) in names.iter().enumerate() {
        let cid = format!("c04-{base}-{i}");
        let err = expect_code(
            create_with_correlation(&agent, "dev", name, &cid).await,
            Code::InvalidArgument,
        );
        assert!(
            err.message().contains("database_name"),
            "{name:?}: {}",
            err.message()
        );
        assert_eq!(
            err.metadata()
                .get("x-correlation-id")
                .unwrap()
                .to_str()
                .unwrap(),
            cid
        );
        let events = events_for_correlation(&server, &cid).await;
        assert_eq!(
            events,
            vec![(
                "call.refused".to_string(),
                "refused".to_string(),
                "INVALID_ARGUMENT".to_string()
            )],
            "{name:?}: the refusal must be audited, and nothing else recorded"
        );
    }

    assert_eq!(request_count(&server).await, 0, "no request stored");
    assert_eq!(
        database_count_like(&base).await,
        0,
        "no similar database appeared"
    );
    assert!(
        db_exists(&victim).await,
        "the injection target must be untouched"
    );
    drop_by_hand(&victim).await;
}

/// C05: two projects request the same name at once and both approvals race: exactly
/// one database, owned by the winner; the loser gets a clear error and can never drop it.
#[tokio::test]
async fn c05_two_projects_race_for_one_name_exactly_one_owner() {
    let server = TestServer::start().await;
    let agent_a = server.as_(&AGENT_A).await;
    let agent_b = server.as_(&AGENT_B).await;
    let owner_a = server.as_(&OWNER_A).await;
    let owner_b = server.as_(&OWNER_B).await;
    let name = unique("shared_db");

    let (ra, rb) = tokio::join!(agent_a.create("dev", &name), agent_b.create("dev", &name));

    // Both approvals race: each owner approves every request that exists.
    let ids: Vec<String> = [&ra, &rb]
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|r| r.request_id.clone()))
        .collect();
    assert!(
        !ids.is_empty(),
        "one of the creates must be accepted: {ra:?} / {rb:?}"
    );
    let mut approvals = Vec::new();
    for id in &ids {
        for approver in [&owner_a, &owner_b] {
            let approver = approver.clone();
            let id = id.clone();
            approvals.push(tokio::spawn(async move { approver.approve(&id).await }));
        }
    }
    let mut decision_results = Vec::new();
    for a in approvals {
        decision_results.push(a.await.unwrap());
    }
    for r in &decision_results {
        if let Err(s) = r {
            // The other project's owner may not approve; nothing else may fail.
            assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
        }
    }

    // Exactly one database, exactly one ownership row.
    assert_eq!(database_count_like(&name).await, 1);
    let (owner_project, _, state) = ownership_row(&server, &name)
        .await
        .expect("the created database must have its ownership row");
    assert_eq!(state, "active");
    let (winner_project, loser_agent, loser_result) = match owner_project.as_str() {
        "alpha" => ("alpha", &agent_b, &rb),
        "beta" => ("beta", &agent_a, &ra),
        other => panic!("unexpected owner {other}"),
    };

    // The winner's request applied; the loser's was refused up front with a clear
    // error naming the open request, or ended failed with a reason.
    let meta = server.meta().await;
    let states: Vec<(String, String, Option<String>)> = meta
        .query(
            "SELECT project_id, state, failure_reason FROM approval_requests \
             WHERE database_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let applied: Vec<_> = states.iter().filter(|s| s.1 == "applied").collect();
    assert_eq!(applied.len(), 1, "{states:?}");
    assert_eq!(applied[0].0, winner_project);
    match loser_result {
        Err(s) => {
            assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
            let winner_id = &ids[0];
            assert_eq!(ids.len(), 1);
            assert!(s.message().contains(&name), "{}", s.message());
            assert!(
                s.message().contains(winner_id.as_str()),
                "the error must name the open request: {}",
                s.message()
            );
        }
        Ok(r) => {
            let loser = states
                .iter()
                .find(|s| s.0 != winner_project)
                .unwrap_or_else(|| panic!("loser request {} missing", r.request_id));
            assert_eq!(loser.1, "failed", "{states:?}");
            let reason = loser.2.clone().unwrap_or_default();
            assert!(
                reason.contains(&name),
                "failure reason must be clear: {reason}"
            );
        }
    }

    // The loser can never drop (or take over) the winner's database.
    let err = expect_code(
        loser_agent.delete("dev", &name, true).await,
        Code::PermissionDenied,
    );
    assert!(err.message().contains(&name), "{}", err.message());
    assert!(
        !err.message().contains(winner_project),
        "the owner must not be revealed: {}",
        err.message()
    );
    expect_code(
        loser_agent.create("dev", &name).await,
        Code::PermissionDenied,
    );
    assert!(db_exists(&name).await);
    assert_eq!(
        ownership_row(&server, &name).await.map(|r| r.0).as_deref(),
        Some(winner_project)
    );
}

/// C06: a hand-made database is never adopted; nothing about it changes.
#[tokio::test]
async fn c06_create_of_unmanaged_database_refused_and_not_adopted() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let legacy = unique("legacy");
    create_by_hand(&legacy).await;
    let oid_before = pg_database_oid(&legacy).await;

    let err = expect_code(agent.create("dev", &legacy).await, Code::AlreadyExists);
    let msg = err.message();
    assert!(
        msg.contains(&legacy),
        "message must name the database: {msg}"
    );
    assert!(msg.contains("not managed"), "{msg}");
    assert!(
        msg.contains("another name"),
        "message must say what to do: {msg}"
    );

    // Dry runs and describes do not adopt it either.
    let dry = agent
        .create_req(CreateDatabaseRequest {
            environment: "dev".into(),
            database_name: legacy.clone(),
            dry_run: true,
            ..Default::default()
        })
        .await;
    expect_code(dry, Code::AlreadyExists);
    let described = agent.describe("dev", &legacy).await.unwrap();
    assert!(described.exists);
    assert!(!described.owned_by_project);
    assert!(described.owner_project_id.is_empty());
    assert!(
        described.facts.is_none(),
        "catalog facts (owner role, size, connections) of a database the caller does \
         not own are not disclosed: {:?}",
        described.facts
    );

    assert!(db_exists(&legacy).await);
    assert_eq!(
        pg_database_oid(&legacy).await,
        oid_before,
        "`legacy` must be untouched"
    );
    assert!(
        ownership_row(&server, &legacy).await.is_none(),
        "not adopted"
    );
    assert_eq!(request_count(&server).await, 0, "no request stored");
    drop_by_hand(&legacy).await;
}

/// C07: a managed database dropped by hand: describe tells so; create brings it back.
#[tokio::test]
async fn c07_managed_database_dropped_by_hand_described_then_recreated() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("c07");
    create_managed(&server, "dev", &name).await;
    drop_by_hand(&name).await;

    let described = agent.describe("dev", &name).await.unwrap();
    assert!(!described.exists, "{}", described.message);
    assert!(described.owned_by_project, "{}", described.message);
    assert_eq!(described.owner_project_id, "alpha");
    assert!(described.message.contains(&name), "{}", described.message);

    let applied = create_managed(&server, "dev", &name).await;
    assert!(applied.exists);
    assert!(db_exists(&name).await);
    let (project, env, state) = ownership_row(&server, &name).await.unwrap();
    assert_eq!(
        (project.as_str(), env.as_str(), state.as_str()),
        ("alpha", "dev", "active")
    );
    let described = agent.describe("dev", &name).await.unwrap();
    assert!(described.exists && described.owned_by_project);
}

/// C08: deleting a managed database that was dropped by hand succeeds, removes the
/// ownership row, and the audit says it was already gone.
#[tokio::test]
async fn c08_delete_of_database_dropped_by_hand_cleans_up_and_audits_already_gone() {
    let server = TestServer::start().await;
    let name = unique("c08");
    create_managed(&server, "dev", &name).await;
    drop_by_hand(&name).await;

    let applied = delete_managed(&server, "dev", &name).await;
    assert!(applied.applied);
    assert!(!db_exists(&name).await);
    assert!(
        ownership_row(&server, &name).await.is_none(),
        "ownership row removed"
    );

    let events = server
        .as_(&OWNER_A)
        .await
        .events_by_request(&applied.request_id)
        .await
        .unwrap();
    let applied_ev = events
        .iter()
        .find(|e| e.event_type == "request.applied")
        .unwrap_or_else(|| panic!("no request.applied in {:?}", event_types(&events)));
    let payload: serde_json::Value = serde_json::from_str(&applied_ev.payload_json).unwrap();
    assert_eq!(
        payload["already_gone"],
        serde_json::Value::Bool(true),
        "{payload}"
    );
    assert!(
        applied_ev.message.contains("already gone"),
        "{}",
        applied_ev.message
    );
    assert!(applied_ev.message.contains(&name), "{}", applied_ev.message);
}

/// C09: protected databases are refused with PERMISSION_DENIED before anything is queued.
#[tokio::test]
async fn c09_protected_databases_refused_before_any_request() {
    let configured = unique("c09keep");
    let server = TestServer::start_with(Options {
        extra_toml: format!("protected_databases = [\"{configured}\"]\n"),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let metadata_db = server.metadata_db.clone();
    for name in [
        "postgres",
        "template0",
        "template1",
        &metadata_db,
        &configured,
    ] {
        let err = expect_code(agent.create("dev", name).await, Code::PermissionDenied);
        assert!(err.message().contains(name), "{}", err.message());
        assert!(err.message().contains("protected"), "{}", err.message());
        let err = expect_code(
            agent.delete("dev", name, true).await,
            Code::PermissionDenied,
        );
        assert!(err.message().contains(name), "{}", err.message());
        assert!(err.message().contains("protected"), "{}", err.message());
    }
    assert_eq!(request_count(&server).await, 0, "no approval may be queued");
    for name in ["postgres", "template0", "template1", &metadata_db] {
        assert!(db_exists(name).await);
    }
    assert!(!db_exists(&configured).await);
}

/// C10: delete while a client holds a connection: applied, the connection is ended,
/// ownership removed.
#[tokio::test]
async fn c10_delete_ends_open_connections_and_applies() {
    let server = TestServer::start().await;
    let name = unique("c10");
    create_managed(&server, "dev", &name).await;

    let held = cluster().connect(&name).await.unwrap();
    held.simple_query("SELECT 1")
        .await
        .expect("the held connection works");

    let applied = delete_managed(&server, "dev", &name).await;
    assert!(applied.applied);
    assert!(!db_exists(&name).await);
    assert!(
        held.simple_query("SELECT 1").await.is_err(),
        "the held connection must have been ended"
    );
    assert!(
        ownership_row(&server, &name).await.is_none(),
        "ownership row removed"
    );
}

/// C11: describe of a database that refuses connections answers from the catalog.
#[tokio::test]
async fn c11_describe_of_database_not_accepting_connections_answers_from_catalog() {
    let server = TestServer::start().await;
    let name = unique("c11");
    create_managed(&server, "dev", &name).await;
    target()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            db_lifecycle::domain::quote_identifier(&name)
        ))
        .await
        .unwrap();

    let described = server
        .as_(&AGENT_A)
        .await
        .describe("dev", &name)
        .await
        .unwrap();
    assert_eq!(described.status, "described");
    assert!(described.exists, "{}", described.message);
    assert!(described.owned_by_project);
    let facts = described
        .facts
        .expect("catalog facts for an existing database");
    assert!(!facts.allows_connections);
    assert!(!facts.owner_role.is_empty());
    assert!(!facts.encoding.is_empty());
    drop_by_hand(&name).await;
}

/// C12: the same name in another environment on the same cluster is refused, naming
/// the environment it is registered in.
#[tokio::test]
async fn c12_same_name_in_second_environment_refused_naming_the_first() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("app_db");
    create_managed(&server, "dev", &name).await;
    let requests_before = request_count(&server).await;

    let err = expect_code(
        agent.create("staging", &name).await,
        Code::FailedPrecondition,
    );
    let msg = err.message();
    assert!(msg.contains(&name), "message must name the database: {msg}");
    assert!(
        msg.contains("`dev`"),
        "message must name the registered environment: {msg}"
    );
    assert!(
        msg.contains("use environment"),
        "message must say what to do: {msg}"
    );
    assert_eq!(
        request_count(&server).await,
        requests_before,
        "nothing queued"
    );
    let (project, env, _) = ownership_row(&server, &name).await.unwrap();
    assert_eq!((project.as_str(), env.as_str()), ("alpha", "dev"));
}

/// C13: the allowlist variable and the requested environment are trimmed and
/// case-folded on both sides.
#[tokio::test]
async fn c13_environment_and_allowlist_are_trimmed_and_case_folded() {
    let server = TestServer::start_with(Options {
        allowed_envs_var: Some(" DEV , staging ".into()),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("c13");

    let queued = agent.create(" Dev ", &name).await.unwrap();
    assert_eq!(queued.status, "approval_required", "{}", queued.message);
    assert_eq!(queued.environment, "dev");
    let stored = owner.get_request(&queued.request_id).await.unwrap();
    assert_eq!(stored.environment, "dev");
    let applied = owner.approve(&queued.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(db_exists(&name).await);
    assert_eq!(ownership_row(&server, &name).await.unwrap().1, "dev");
    let described = agent.describe(" Dev ", &name).await.unwrap();
    assert!(described.exists && described.owned_by_project);

    // The variable is in effect: staging allowed, the fallback's `prod` not.
    let dry = agent
        .create_req(CreateDatabaseRequest {
            environment: "staging".into(),
            database_name: unique("c13"),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dry.status, "dry_run", "{}", dry.message);
    let err = expect_code(
        agent.create("prod", &unique("c13")).await,
        Code::PermissionDenied,
    );
    assert!(err.message().contains("prod"), "{}", err.message());
}

/// C14: an empty allowlist variable falls back to dev,staging,ai-staging,prod.
#[tokio::test]
async fn c14_empty_allowlist_variable_falls_back_to_default_list() {
    let server = TestServer::start_with(Options {
        allowed_envs_var: Some(String::new()),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    for env in ["dev", "staging", "ai-staging", "prod"] {
        let dry = agent
            .create_req(CreateDatabaseRequest {
                environment: env.into(),
                database_name: unique("c14"),
                dry_run: true,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("{env} must be allowed: {}", s.message()));
        assert_eq!(dry.status, "dry_run", "{env}: {}", dry.message);
        assert_eq!(dry.environment, env);
    }
    let err = expect_code(
        agent.create("qa", &unique("c14")).await,
        Code::PermissionDenied,
    );
    assert!(
        err.message().contains("dev, staging, ai-staging, prod"),
        "{}",
        err.message()
    );
    assert_eq!(request_count(&server).await, 0);
}

/// C15: delete without confirm_delete, or with it false, is refused with
/// FAILED_PRECONDITION; nothing is queued; the refusal is audited.
#[tokio::test]
async fn c15_delete_without_confirmation_refused_nothing_queued_audited() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("c15");
    create_managed(&server, "dev", &name).await;
    let requests_before = request_count(&server).await;

    // Field omitted, and set to false explicitly.
    let omitted = DeleteDatabaseRequest {
        environment: "dev".into(),
        database_name: name.clone(),
        ..Default::default()
    };
    let explicit = DeleteDatabaseRequest {
        environment: "dev".into(),
        database_name: name.clone(),
        confirm_delete: false,
        ..Default::default()
    };
    for (i, msg) in [omitted, explicit].into_iter().enumerate() {
        let cid = format!("c15-{name}-{i}");
        let err = expect_code(
            delete_with_correlation(&agent, msg, &cid).await,
            Code::FailedPrecondition,
        );
        assert!(err.message().contains(&name), "{}", err.message());
        assert!(
            err.message().contains("confirm_delete=true"),
            "{}",
            err.message()
        );
        assert_eq!(
            events_for_correlation(&server, &cid).await,
            vec![(
                "call.refused".to_string(),
                "refused".to_string(),
                "FAILED_PRECONDITION".to_string()
            )],
            "the refusal must be audited"
        );
    }
    assert_eq!(
        request_count(&server).await,
        requests_before,
        "nothing queued"
    );
    let open: i64 = server
        .meta()
        .await
        .query_one(
            "SELECT count(*) FROM approval_requests WHERE action = 'delete'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0);
    assert!(db_exists(&name).await);
    assert_eq!(ownership_row(&server, &name).await.unwrap().2, "active");
}

/// Drift, the other way: a managed database dropped by hand and re-created by hand
/// under the same name is a different database. The service does not adopt it:
/// describe says it is not managed (and that the project's registration is stale),
/// create refuses. The owning project's confirmed, approved delete removes the stale
/// ownership row, drops nothing (the hand-made database keeps its oid), ends
/// `applied` and says so; afterwards the name is nobody's.
#[tokio::test]
async fn drift_database_recreated_by_hand_is_never_dropped_and_delete_removes_the_stale_row() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("recreated");
    let r = agent.create("dev", &name).await.unwrap();
    assert_eq!(
        owner.approve(&r.request_id).await.unwrap().status,
        "applied"
    );

    drop_by_hand(&name).await;
    create_by_hand(&name).await;
    let hand_made = pg_database_oid(&name).await.unwrap();

    let d = agent.describe("dev", &name).await.unwrap();
    assert!(d.exists);
    assert!(
        !d.owned_by_project,
        "a re-created database must not count as owned"
    );
    assert!(d.message.contains("re-created"), "{}", d.message);
    assert!(
        d.message.contains("stale") && d.message.contains("drops nothing"),
        "{}",
        d.message
    );
    let create = expect_code(agent.create("dev", &name).await, Code::AlreadyExists);
    assert!(
        create.message().contains("not be adopted"),
        "{}",
        create.message()
    );

    let queued = agent.delete("dev", &name, true).await.unwrap();
    assert_eq!(queued.status, "approval_required", "{}", queued.message);
    assert!(queued.exists && !queued.owned_by_project, "{queued:?}");
    assert!(
        queued.message.contains("drops nothing"),
        "the caller is told before anyone approves: {}",
        queued.message
    );
    let applied = owner.approve(&queued.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(
        applied.exists && !applied.owned_by_project,
        "a database (not the project's) is still under the name: {applied:?}"
    );
    assert!(
        applied.message.contains("did not create") && applied.message.contains("not dropped"),
        "{}",
        applied.message
    );
    assert_eq!(
        pg_database_oid(&name).await,
        Some(hand_made),
        "the hand-made database must survive, untouched"
    );
    assert!(
        ownership_row(&server, &name).await.is_none(),
        "stale row removed"
    );
    let events = owner.events_by_request(&queued.request_id).await.unwrap();
    let applied_ev = events
        .iter()
        .find(|e| e.event_type == "request.applied")
        .unwrap_or_else(|| panic!("no request.applied in {:?}", event_types(&events)));
    let payload: serde_json::Value = serde_json::from_str(&applied_ev.payload_json).unwrap();
    assert_eq!(payload["already_gone"], true, "{payload}");
    assert_eq!(payload["resumed"], false, "{payload}");
    assert_eq!(
        payload["unmanaged_database_oid_left_alone"], hand_made,
        "{payload}"
    );

    // Databases and ownership rows agree again: the name is nobody's.
    assert!(!agent.listed_databases().await.unwrap().contains(&name));
    let d = agent.describe("dev", &name).await.unwrap();
    assert!(d.exists && !d.owned_by_project, "{}", d.message);
    assert!(!d.message.contains("stale"), "{}", d.message);
    let del = expect_code(agent.delete("dev", &name, true).await, Code::NotFound);
    assert!(
        del.message().contains("not be dropped"),
        "{}",
        del.message()
    );
    expect_code(
        server.as_(&AGENT_B).await.create("dev", &name).await,
        Code::AlreadyExists,
    );
    assert_eq!(pg_database_oid(&name).await, Some(hand_made));
    drop_by_hand(&name).await;
}

/// A delete queued before the database was swapped by hand never drops the
/// stranger: the project's database is gone, so the approved delete removes only its
/// ownership row and ends `applied`, saying the other database was left alone.
#[tokio::test]
async fn drift_swap_between_request_and_approval_is_not_dropped() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("swapped");
    let r = agent.create("dev", &name).await.unwrap();
    assert_eq!(
        owner.approve(&r.request_id).await.unwrap().status,
        "applied"
    );
    let del = agent.delete("dev", &name, true).await.unwrap();
    assert_eq!(del.status, "approval_required");

    drop_by_hand(&name).await;
    create_by_hand(&name).await;
    let hand_made = pg_database_oid(&name).await.unwrap();

    let applied = owner.approve(&del.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(
        applied.message.contains("not dropped"),
        "{}",
        applied.message
    );
    assert_eq!(
        pg_database_oid(&name).await,
        Some(hand_made),
        "the hand-made database must survive"
    );
    assert!(ownership_row(&server, &name).await.is_none());
    drop_by_hand(&name).await;
}

/// The service's database renamed away by hand (it still exists, under another
/// name) and another one made under its name: the project's database is not gone,
/// so nothing is treated as stale. Delete refuses (NOT_FOUND: the database under the
/// name is not managed), the row stays, and nothing is dropped.
#[tokio::test]
async fn drift_managed_database_renamed_away_is_not_taken_for_gone() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("renamed");
    let moved = format!("{name}_moved");
    create_managed(&server, "dev", &name).await;
    let managed = pg_database_oid(&name).await.unwrap();
    target()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} RENAME TO {}",
            db_lifecycle::domain::quote_identifier(&name),
            db_lifecycle::domain::quote_identifier(&moved)
        ))
        .await
        .unwrap();
    create_by_hand(&name).await;
    let hand_made = pg_database_oid(&name).await.unwrap();

    let d = agent.describe("dev", &name).await.unwrap();
    assert!(d.exists && !d.owned_by_project, "{}", d.message);
    assert!(!d.message.contains("stale"), "{}", d.message);
    expect_code(agent.delete("dev", &name, true).await, Code::NotFound);
    assert_eq!(
        ownership_row(&server, &name).await.map(|r| r.2).as_deref(),
        Some("active")
    );
    assert_eq!(pg_database_oid(&name).await, Some(hand_made));
    assert_eq!(pg_database_oid(&moved).await, Some(managed));
    drop_by_hand(&name).await;
    drop_by_hand(&moved).await;
}

/// A delete that fails for good (here: PostgreSQL refuses to drop a template
/// database) leaves the ownership row `active`, not stuck in `deleting`.
#[tokio::test]
async fn failed_delete_leaves_the_ownership_row_active() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("templ");
    let r = agent.create("dev", &name).await.unwrap();
    assert_eq!(
        owner.approve(&r.request_id).await.unwrap().status,
        "applied"
    );
    target()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} IS_TEMPLATE true",
            db_lifecycle::domain::quote_identifier(&name)
        ))
        .await
        .unwrap();
    let del = agent.delete("dev", &name, true).await.unwrap();
    let applied = owner.approve(&del.request_id).await.unwrap();
    assert_eq!(applied.status, "failed", "{}", applied.message);
    assert!(db_exists(&name).await);
    let state: String = server
        .meta()
        .await
        .query_one(
            "SELECT state FROM project_databases WHERE database_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "active");
    let again = agent.create("dev", &name).await.unwrap();
    assert_eq!(again.status, "unchanged", "{}", again.message);
    target()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} IS_TEMPLATE false",
            db_lifecycle::domain::quote_identifier(&name)
        ))
        .await
        .unwrap();
}
