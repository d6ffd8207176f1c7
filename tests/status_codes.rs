//! Every row of the status-code table (design §5), through the real server: the code,
//! a meaningful message, the `call.refused` audit row, and that nothing changed.
mod common;
use common::*;

use db_lifecycle::{
    error::code_name,
    proto::{self, ApproveRequest, CreateDatabaseRequest, DescribeDatabaseRequest},
};
use tonic::{Code, Status};

/// Assert the code (and x-correlation-id) of a refused call and that it was audited
/// as `call.refused` with the same code and message. Returns the status and row.
async fn refused<T: std::fmt::Debug>(
    server: &TestServer,
    r: Result<T, Status>,
    code: Code,
) -> (Status, RefusalRow) {
    let status = expect_code(r, code);
    let row = assert_refusal_recorded(server, &status, code_name(code)).await;
    (status, row)
}

/// Create `name` in `env` for alpha and have it approved and applied.
async fn managed(server: &TestServer, env: &str, name: &str) -> proto::LifecycleResult {
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let created = agent.create(env, name).await.unwrap();
    assert_eq!(created.status, "approval_required", "{}", created.message);
    let applied = owner.approve(&created.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(db_exists(name).await);
    applied
}

// ---------- UNAUTHENTICATED ----------

#[tokio::test]
async fn unauthenticated_without_token_with_garbage_token_or_wrong_scheme() {
    let server = TestServer::start().await;
    let name = unique("unauth");
    let cases: [(Option<&str>, &str); 5] = [
        (None, "authorization: Bearer"),
        (Some("Bearer not-a-known-token-42"), "invalid"),
        (Some("Basic dXNlcjpwYXNzd29yZA=="), "invalid"),
        (Some("tok-agent-a-0123456789"), "invalid"),
        // A real token under the wrong scheme is still refused.
        (Some("Basic tok-agent-a-0123456789"), "invalid"),
    ];
    for (header, hint) in cases {
        let caller = server.with_auth(header).await;
        let (status, row) = refused(
            &server,
            caller.create("dev", &name).await,
            Code::Unauthenticated,
        )
        .await;
        assert!(
            status.message().contains(hint),
            "{header:?}: {}",
            status.message()
        );
        assert!(
            !status.message().contains("tok-agent-a"),
            "token echoed: {}",
            status.message()
        );
        assert_eq!(row.actor_id, "", "no principal for an unauthenticated call");
        assert_eq!(row.outcome, "refused");
        assert!(
            !row.payload.contains("tok-agent-a"),
            "token in audit payload: {}",
            row.payload
        );
        // Query RPCs are guarded too.
        let caller = server.with_auth(header).await;
        refused(
            &server,
            caller.get_request(&uuid::Uuid::now_v7().to_string()).await,
            Code::Unauthenticated,
        )
        .await;
    }
    // An unauthenticated caller's correlation id is not adopted (it could name another
    // call's trail): the refusal gets the service's own id, which the response
    // carries, and the claimed one is noted in the row.
    let caller = server.with_auth(Some("Bearer nope")).await;
    let cid = format!("unauth-{}", unique("c"));
    let mut c = caller.client.clone();
    let r = c
        .create(caller.request_with_correlation(
            CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                ..Default::default()
            },
            &cid,
        ))
        .await;
    let (s, row) = refused(&server, r, Code::Unauthenticated).await;
    assert_ne!(status_correlation_id(&s), cid);
    assert!(row.payload.contains(&cid), "{}", row.payload);
    assert!(refusal_rows(&server, &cid).await.is_empty());

    // Two authorization headers, even a valid token first: neither is used.
    let agent = server.as_(&AGENT_A).await;
    let mut request = agent.request(CreateDatabaseRequest {
        environment: "dev".into(),
        database_name: name.clone(),
        ..Default::default()
    });
    request.metadata_mut().append(
        "authorization",
        "Bearer tok-owner-a-0123456789".parse().unwrap(),
    );
    let mut c = agent.client.clone();
    let (s, row) = refused(&server, c.create(request).await, Code::Unauthenticated).await;
    assert!(
        s.message().contains("more than one authorization header"),
        "{}",
        s.message()
    );
    assert_eq!(row.actor_id, "");

    assert_eq!(request_count(&server).await, 0);
    assert!(!db_exists(&name).await);
}

/// Anyone can send calls without credentials: their refusals are recorded within a
/// budget (here 5 rows and no refill), every call is still refused, and calls with
/// credentials are recorded as always.
/// WhoAmI answers who a valid token is, and only that: a bad token is
/// UNAUTHENTICATED (and audited like any refusal), a good one needs no role.
#[tokio::test]
async fn who_am_i_names_the_principal_of_a_valid_token_only() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let mut c = agent.client.clone();
    let me = c
        .who_am_i(agent.request(proto::WhoAmIRequest {}))
        .await
        .unwrap();
    let cid = me
        .metadata()
        .get("x-correlation-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let me = me.into_inner();
    assert_eq!(me.principal_id, AGENT_A.id);
    assert_eq!(me.kind, "agent");
    assert_eq!(me.projects, vec!["alpha".to_string()]);
    assert_eq!(me.roles, vec!["requester".to_string()]);
    assert_eq!(me.run_id, "");
    assert_eq!(me.correlation_id, cid);

    let before = request_count(&server).await;
    for header in [None, Some("Bearer not-a-known-token-42")] {
        let caller = server.with_auth(header).await;
        let mut c = caller.client.clone();
        let (status, row) = refused(
            &server,
            c.who_am_i(caller.request(proto::WhoAmIRequest {})).await,
            Code::Unauthenticated,
        )
        .await;
        assert!(
            !status.message().contains("not-a-known-token"),
            "{}",
            status.message()
        );
        assert_eq!(row.actor_id, "");
    }
    assert_eq!(
        request_count(&server).await,
        before,
        "WhoAmI stores no request"
    );
}

#[tokio::test]
async fn refusals_of_unauthenticated_calls_are_recorded_within_a_budget() {
    let server = TestServer::start_with(Options {
        extra_toml:
            "[audit]\nunauthenticated_refusals_per_second = 0\nunauthenticated_refusal_burst = 5\n"
                .into(),
        ..Default::default()
    })
    .await;
    let before = refusal_count(&server).await;
    let stranger = server.with_auth(Some("Bearer nope")).await;
    for _ in 0..12 {
        expect_code(
            stranger.describe("dev", &unique("flood")).await,
            Code::Unauthenticated,
        );
    }
    assert_eq!(refusal_count(&server).await - before, 5);
    let agent = server.as_(&AGENT_A).await;
    let (s, _) = refused(
        &server,
        agent.create("nowhere", &unique("flood")).await,
        Code::PermissionDenied,
    )
    .await;
    assert!(s.message().contains("environment"), "{}", s.message());
}

// ---------- INVALID_ARGUMENT ----------

#[tokio::test]
async fn invalid_argument_for_malformed_name_environment_project_request_id_and_decision() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("badarg");

    let (s, _) = refused(
        &server,
        agent.create("dev", "1abc").await,
        Code::InvalidArgument,
    )
    .await;
    assert!(s.message().contains("database_name"), "{}", s.message());

    let too_long = "d".repeat(33);
    for env in [
        "",
        "   ",
        "de v",
        "dev;prod",
        "dév",
        "-dev",
        too_long.as_str(),
    ] {
        let (s, _) = refused(
            &server,
            agent.create(env, &name).await,
            Code::InvalidArgument,
        )
        .await;
        assert!(
            s.message().contains("environment"),
            "{env:?}: {}",
            s.message()
        );
    }

    let (s, _) = refused(
        &server,
        agent
            .create_req(CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                project_id: "al pha!".into(),
                dry_run: false,
            })
            .await,
        Code::InvalidArgument,
    )
    .await;
    assert!(s.message().contains("project_id"), "{}", s.message());
    assert_eq!(
        request_count(&server).await,
        0,
        "malformed calls store nothing"
    );
    assert!(!db_exists(&name).await);

    for bad_id in [
        "not-a-uuid",
        "",
        "123",
        "'; DROP TABLE approval_requests; --",
    ] {
        let (s, _) = refused(&server, owner.approve(bad_id).await, Code::InvalidArgument).await;
        assert!(
            s.message().contains("request_id"),
            "{bad_id:?}: {}",
            s.message()
        );
        let (s, _) = refused(
            &server,
            owner.get_request(bad_id).await,
            Code::InvalidArgument,
        )
        .await;
        assert!(
            s.message().contains("request_id"),
            "{bad_id:?}: {}",
            s.message()
        );
    }

    // A malformed decision on a real request changes nothing.
    let created = agent.create("dev", &name).await.unwrap();
    for decision in [proto::Decision::Unspecified as i32, 7, -1] {
        let mut c = owner.client.clone();
        let r = c
            .approve(owner.request(ApproveRequest {
                request_id: created.request_id.clone(),
                decision,
                reason: "x".into(),
            }))
            .await;
        let (s, _) = refused(&server, r, Code::InvalidArgument).await;
        assert!(
            s.message().contains("decision"),
            "{decision}: {}",
            s.message()
        );
    }
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
    assert!(!db_exists(&name).await);
    assert_eq!(request_count(&server).await, 1);
}

// ---------- PERMISSION_DENIED ----------

#[tokio::test]
async fn permission_denied_for_environment_not_allowed() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("envdeny");
    for env in ["qa", "production", "PROD-EU"] {
        let (s, row) = refused(
            &server,
            agent.create(env, &name).await,
            Code::PermissionDenied,
        )
        .await;
        let folded = env.to_lowercase();
        assert!(
            s.message().contains(&format!("`{folded}`")),
            "{}",
            s.message()
        );
        assert!(
            s.message().contains("dev, staging, ai-staging, prod"),
            "{}",
            s.message()
        );
        assert_eq!(row.actor_id, "agent-a");
        refused(
            &server,
            agent.describe(env, &name).await,
            Code::PermissionDenied,
        )
        .await;
        refused(
            &server,
            agent.delete(env, &name, true).await,
            Code::PermissionDenied,
        )
        .await;
    }
    assert_eq!(request_count(&server).await, 0);
    assert!(!db_exists(&name).await);
}

#[tokio::test]
async fn permission_denied_for_protected_databases() {
    let configured = unique("payroll");
    let server = TestServer::start_with(Options {
        extra_toml: format!("protected_databases = [\"{configured}\"]\n"),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let admin = server.as_(&ADMIN).await;
    let meta = server.metadata_db.clone();
    // Staging names are the service's own (a create renames one into place).
    let staging = db_lifecycle::domain::DatabaseName::staging_for(uuid::Uuid::now_v7());
    for name in [
        "postgres",
        "template0",
        "template1",
        meta.as_str(),
        configured.as_str(),
        staging.as_str(),
    ] {
        let (s, _) = refused(
            &server,
            agent.create("dev", name).await,
            Code::PermissionDenied,
        )
        .await;
        assert!(s.message().contains("protected"), "{name}: {}", s.message());
        assert!(
            s.message().contains(&format!("`{name}`")),
            "{name}: {}",
            s.message()
        );
        let (s, _) = refused(
            &server,
            agent.delete("dev", name, true).await,
            Code::PermissionDenied,
        )
        .await;
        assert!(s.message().contains("protected"), "{name}: {}", s.message());
        // Not even an admin, not even as a dry run.
        refused(
            &server,
            admin
                .create_req(CreateDatabaseRequest {
                    environment: "dev".into(),
                    database_name: name.into(),
                    project_id: "alpha".into(),
                    dry_run: true,
                })
                .await,
            Code::PermissionDenied,
        )
        .await;
        // Describe is read-only and allowed.
        let d = agent.describe("dev", name).await.unwrap();
        assert!(!d.owned_by_project, "{name}");
    }
    assert_eq!(request_count(&server).await, 0);
    assert!(db_exists("postgres").await && db_exists("template1").await && db_exists(&meta).await);
    assert!(
        !db_exists(&configured).await,
        "a protected name must not be created"
    );
}

#[tokio::test]
async fn permission_denied_for_missing_role_and_for_an_agent_approving() {
    let server = TestServer::start().await;
    let reader = server.as_(&READER_A).await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("norole");

    let (s, row) = refused(
        &server,
        reader.create("dev", &name).await,
        Code::PermissionDenied,
    )
    .await;
    assert!(
        s.message().contains("rita") && s.message().contains("requester"),
        "{}",
        s.message()
    );
    assert_eq!(row.actor_id, "rita");
    refused(
        &server,
        reader.delete("dev", &name, true).await,
        Code::PermissionDenied,
    )
    .await;
    refused(
        &server,
        reader.describe("dev", &name).await,
        Code::PermissionDenied,
    )
    .await;
    assert_eq!(request_count(&server).await, 0);

    let created = agent.create("dev", &name).await.unwrap();
    let (s, _) = refused(
        &server,
        agent.approve(&created.request_id).await,
        Code::PermissionDenied,
    )
    .await;
    assert!(
        s.message().contains("only people approve"),
        "{}",
        s.message()
    );
    let (s, _) = refused(
        &server,
        reader.approve(&created.request_id).await,
        Code::PermissionDenied,
    )
    .await;
    assert!(s.message().contains("owner"), "{}", s.message());
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
    assert_eq!(
        request_event_count(&server, &created.request_id, "request.approved").await,
        0
    );
    assert!(!db_exists(&name).await);
}

#[tokio::test]
async fn permission_denied_for_project_outside_scope() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("scope");
    let (s, row) = refused(
        &server,
        agent
            .create_req(CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                project_id: "beta".into(),
                dry_run: false,
            })
            .await,
        Code::PermissionDenied,
    )
    .await;
    assert!(
        s.message().contains("`beta`") && s.message().contains("scope"),
        "{}",
        s.message()
    );
    assert_eq!(row.actor_id, "agent-a");
    let mut c = agent.client.clone();
    let r = c
        .describe(agent.request(DescribeDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            project_id: "beta".into(),
        }))
        .await;
    refused(&server, r, Code::PermissionDenied).await;
    assert_eq!(request_count(&server).await, 0);
    assert!(!db_exists(&name).await);
}

/// Design §4 ownership isolation: project B can neither see nor touch A's database,
/// and never learns A's id.
#[tokio::test]
async fn permission_denied_for_database_of_another_project_without_revealing_owner() {
    let server = TestServer::start().await;
    let name = unique("iso");
    let applied = managed(&server, "dev", &name).await;
    let requests_before = request_count(&server).await;

    for p in [&AGENT_B, &OWNER_B] {
        let b = server.as_(p).await;
        let attempts = [
            b.describe("dev", &name).await,
            b.create("dev", &name).await,
            b.delete("dev", &name, true).await,
        ];
        for r in attempts {
            if let Ok(ok) = &r {
                assert!(
                    !format!("{ok:?}").contains("alpha"),
                    "owner revealed in a response: {ok:?}"
                );
                assert_eq!(ok.owner_project_id, "");
            }
            let (s, row) = refused(&server, r, Code::PermissionDenied).await;
            assert!(s.message().contains("another project"), "{}", s.message());
            assert!(
                !s.message().contains("alpha"),
                "owner revealed: {}",
                s.message()
            );
            assert!(
                !row.message.contains("alpha") && !row.payload.contains("alpha"),
                "{row:?}"
            );
            assert_eq!(
                row.project_id, "beta",
                "a refusal row carries the caller's project, never the owner"
            );
        }
        // Nor through the audit trail of A's request, nor through ListRequests.
        let seen = b
            .events_by_correlation(&applied.correlation_id)
            .await
            .unwrap();
        assert!(
            seen.is_empty(),
            "project B sees A's events: {:?}",
            event_types(&seen)
        );
        refused(
            &server,
            b.events_by_request(&applied.request_id).await,
            Code::PermissionDenied,
        )
        .await;
        let mut c = b.client.clone();
        let listed = c
            .list_requests(b.request(proto::ListRequestsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(listed.requests.is_empty(), "{:?}", listed.requests);
    }
    assert_eq!(
        request_count(&server).await,
        requests_before,
        "B's calls stored nothing"
    );
    assert!(db_exists(&name).await, "A's database must survive");
    assert_eq!(
        ownership_rows(&server, &name).await,
        vec![("alpha".to_string(), "dev".to_string(), "active".to_string())]
    );
}

// ---------- FAILED_PRECONDITION ----------

#[tokio::test]
async fn failed_precondition_for_same_name_in_another_environment_naming_dev() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("otherenv");
    managed(&server, "dev", &name).await;
    let before = request_count(&server).await;
    let (s, _) = refused(
        &server,
        agent.create("staging", &name).await,
        Code::FailedPrecondition,
    )
    .await;
    assert!(s.message().contains("`dev`"), "{}", s.message());
    let (s, _) = refused(
        &server,
        agent.delete("staging", &name, true).await,
        Code::FailedPrecondition,
    )
    .await;
    assert!(s.message().contains("`dev`"), "{}", s.message());
    // Describe in the other environment tells where it is registered.
    let d = agent.describe("staging", &name).await.unwrap();
    assert_eq!(d.registered_environment, "dev");
    assert_eq!(request_count(&server).await, before);
    assert!(db_exists(&name).await);
    assert_eq!(ownership_rows(&server, &name).await[0].1, "dev");
}

#[tokio::test]
async fn failed_precondition_for_delete_without_confirm() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("noconfirm");
    managed(&server, "dev", &name).await;
    let before = request_count(&server).await;
    let (s, row) = refused(
        &server,
        agent.delete("dev", &name, false).await,
        Code::FailedPrecondition,
    )
    .await;
    assert!(
        s.message().contains("confirm_delete=true"),
        "{}",
        s.message()
    );
    let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(
        payload["input"]["confirm_delete"],
        serde_json::Value::Bool(false),
        "{payload}"
    );
    // Also as a dry run.
    let mut c = agent.client.clone();
    let r = c
        .delete(agent.request(proto::DeleteDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            dry_run: true,
            ..Default::default()
        }))
        .await;
    refused(&server, r, Code::FailedPrecondition).await;
    assert_eq!(
        request_count(&server).await,
        before,
        "no delete request stored"
    );
    assert!(db_exists(&name).await);
}

#[tokio::test]
async fn failed_precondition_for_another_open_request_names_it() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("openreq");
    let open = agent.create("dev", &name).await.unwrap();
    assert_eq!(open.status, "approval_required");
    // Same database (same cluster), different environment: not identical, so a conflict.
    let (s, _) = refused(
        &server,
        agent.create("staging", &name).await,
        Code::FailedPrecondition,
    )
    .await;
    assert!(
        s.message().contains(&open.request_id),
        "message must name the open request: {}",
        s.message()
    );
    // Another project asking for the same name conflicts too.
    let b = server.as_(&AGENT_B).await;
    let (s, _) = refused(
        &server,
        b.create("dev", &name).await,
        Code::FailedPrecondition,
    )
    .await;
    assert!(s.message().contains(&open.request_id), "{}", s.message());
    assert!(!s.message().contains("alpha"), "{}", s.message());
    assert_eq!(request_count(&server).await, 1);
    assert_eq!(
        stored_state(&server, &open.request_id).await.as_deref(),
        Some("requested")
    );
    assert!(!db_exists(&name).await);
}

#[tokio::test]
async fn failed_precondition_for_decisions_contradicting_a_final_state() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;

    let denied_name = unique("contra_denied");
    let r = agent.create("dev", &denied_name).await.unwrap();
    assert_eq!(
        owner.deny(&r.request_id, "not now").await.unwrap().status,
        "denied"
    );
    let (s, _) = refused(
        &server,
        owner.approve(&r.request_id).await,
        Code::FailedPrecondition,
    )
    .await;
    assert!(
        s.message().contains("denied") && s.message().contains(&r.request_id),
        "{}",
        s.message()
    );
    assert_eq!(
        stored_state(&server, &r.request_id).await.as_deref(),
        Some("denied")
    );
    assert!(!db_exists(&denied_name).await);

    let applied_name = unique("contra_applied");
    let applied = managed(&server, "dev", &applied_name).await;
    let (s, _) = refused(
        &server,
        owner.deny(&applied.request_id, "too late").await,
        Code::FailedPrecondition,
    )
    .await;
    assert!(
        s.message().contains("applied") && s.message().contains(&applied.request_id),
        "{}",
        s.message()
    );
    assert_eq!(
        stored_state(&server, &applied.request_id).await.as_deref(),
        Some("applied")
    );
    assert_eq!(
        request_event_count(&server, &applied.request_id, "request.denied").await,
        0
    );
    assert!(db_exists(&applied_name).await);
    // Approving an applied request again is not a contradiction: it reports.
    let again = owner.approve(&applied.request_id).await.unwrap();
    assert_eq!(again.status, "applied");
    assert_eq!(
        request_event_count(&server, &applied.request_id, "request.applied").await,
        1
    );
}

// ---------- ALREADY_EXISTS ----------

#[tokio::test]
async fn already_exists_for_an_unmanaged_database() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("byhand");
    create_by_hand(&name).await;
    let (s, _) = refused(
        &server,
        agent.create("dev", &name).await,
        Code::AlreadyExists,
    )
    .await;
    assert!(
        s.message().contains("not managed") && s.message().contains(&name),
        "{}",
        s.message()
    );
    assert_eq!(
        request_count(&server).await,
        0,
        "no request for an unmanaged database"
    );
    assert!(
        ownership_rows(&server, &name).await.is_empty(),
        "never adopted"
    );
    let d = agent.describe("dev", &name).await.unwrap();
    assert!(d.exists && !d.owned_by_project);
    assert!(db_exists(&name).await);
    drop_by_hand(&name).await;
}

// ---------- NOT_FOUND ----------

#[tokio::test]
async fn not_found_for_unknown_request_and_unmanaged_or_missing_database() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let (s, _) = refused(&server, owner.approve(&unknown).await, Code::NotFound).await;
    assert!(s.message().contains(&unknown), "{}", s.message());
    refused(&server, owner.deny(&unknown, "no").await, Code::NotFound).await;
    refused(&server, agent.get_request(&unknown).await, Code::NotFound).await;
    refused(
        &server,
        agent.events_by_request(&unknown).await,
        Code::NotFound,
    )
    .await;

    let unmanaged = unique("unmanaged");
    create_by_hand(&unmanaged).await;
    let (s, _) = refused(
        &server,
        agent.delete("dev", &unmanaged, true).await,
        Code::NotFound,
    )
    .await;
    assert!(s.message().contains("not managed"), "{}", s.message());
    assert!(
        db_exists(&unmanaged).await,
        "an unmanaged database is never dropped"
    );

    let missing = unique("missing");
    let (s, _) = refused(
        &server,
        agent.delete("dev", &missing, true).await,
        Code::NotFound,
    )
    .await;
    assert!(
        s.message().contains(&missing) && s.message().contains("`dev`"),
        "{}",
        s.message()
    );
    assert_eq!(request_count(&server).await, 0);
    drop_by_hand(&unmanaged).await;
}

// ---------- UNAVAILABLE ----------

#[tokio::test]
async fn unavailable_when_the_target_cluster_is_unreachable() {
    const SECRET: &str = "hunter2-dead-secret";
    let server = TestServer::start_with(Options {
        extra_toml: format!(
            "[targets.dead]\nadmin_url = \"postgres://postgres:{SECRET}@127.0.0.1:1/postgres\"\n\n[environments.dead]\ntarget = \"dead\"\n"
        ),
        allowed_envs_var: Some("dev,dead".into()),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("dead");
    let attempts = [
        agent.describe("dead", &name).await,
        agent.create("dead", &name).await,
        agent.delete("dead", &name, true).await,
    ];
    for r in attempts {
        let (s, row) = refused(&server, r, Code::Unavailable).await;
        let m = s.message();
        assert!(m.contains("`dead`") && m.contains("unavailable"), "{m}");
        assert!(m.contains("retry"), "{m}");
        assert!(
            !m.contains(SECRET) && !m.contains("postgres://"),
            "secret in message: {m}"
        );
        assert_eq!(row.outcome, "error");
        assert!(!row.payload.contains(SECRET), "{}", row.payload);
    }
    assert_eq!(request_count(&server).await, 0);
    // The healthy environment on the same server is unaffected.
    let d = agent.describe("dev", &name).await.unwrap();
    assert_eq!(d.status, "described");
    assert!(!server.log().contains(SECRET), "secret in the server log");
}

// ---------- correlation ids ----------

#[tokio::test]
async fn success_responses_carry_the_generated_correlation_id_in_body_and_metadata() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("corr");
    let mut c = agent.client.clone();
    let resp = c
        .create(agent.request(CreateDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let meta_cid = resp
        .metadata()
        .get("x-correlation-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.into_inner();
    assert_eq!(body.correlation_id, meta_cid);
    assert!(
        uuid::Uuid::parse_str(&meta_cid).is_ok(),
        "generated id {meta_cid}"
    );
    let stored = agent.get_request(&body.request_id).await.unwrap();
    assert_eq!(stored.correlation_id, meta_cid);

    let resp = c
        .describe(agent.request(DescribeDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let described_cid = resp
        .metadata()
        .get("x-correlation-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(resp.get_ref().correlation_id, described_cid);
    assert_ne!(described_cid, meta_cid, "each call gets its own id");

    // Query RPCs without a body field still carry it in metadata.
    let resp = c
        .get_request(agent.request(proto::GetRequestRequest {
            request_id: body.request_id.clone(),
        }))
        .await
        .unwrap();
    assert!(resp.metadata().get("x-correlation-id").is_some());
}

#[tokio::test]
async fn a_caller_correlation_id_is_echoed_and_used_in_the_audit_trail() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("callercorr");
    let cid = format!("trace:{}/step-1.a_b", unique("c"));
    let mut c = agent.client.clone();
    let resp = c
        .create(agent.request_with_correlation(
            CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                ..Default::default()
            },
            &cid,
        ))
        .await
        .unwrap();
    assert_eq!(
        resp.metadata()
            .get("x-correlation-id")
            .unwrap()
            .to_str()
            .unwrap(),
        cid
    );
    let body = resp.into_inner();
    assert_eq!(body.correlation_id, cid);
    assert_eq!(
        agent
            .get_request(&body.request_id)
            .await
            .unwrap()
            .correlation_id,
        cid
    );
    assert!(
        event_types_for_correlation(&server, &cid)
            .await
            .contains(&"request.created".to_string())
    );
    let trail = event_types(&agent.events_by_correlation(&cid).await.unwrap());
    assert!(trail.contains(&"request.created".to_string()), "{trail:?}");

    // A refused call echoes the caller's id too, and is audited under it.
    let refused_cid = format!("refused-{}", unique("c"));
    let mut o = owner.client.clone();
    let r = o
        .approve(owner.request_with_correlation(
            ApproveRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                decision: proto::Decision::Approve as i32,
                reason: String::new(),
            },
            &refused_cid,
        ))
        .await;
    let s = expect_code(r, Code::NotFound);
    assert_eq!(status_correlation_id(&s), refused_cid);
    assert_refusal_recorded(&server, &s, "NOT_FOUND").await;

    // A 128-character id is the longest accepted.
    let long = "a".repeat(128);
    let resp = c
        .describe(agent.request_with_correlation(
            DescribeDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                ..Default::default()
            },
            &long,
        ))
        .await
        .unwrap();
    assert_eq!(resp.get_ref().correlation_id, long);
}

#[tokio::test]
async fn an_invalid_caller_correlation_id_is_invalid_argument() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("badcorr");
    for bad in [
        "a".repeat(129),
        "b".repeat(200),
        "has spaces".into(),
        "semi;colon".into(),
        "quote\"d".into(),
    ] {
        let mut c = agent.client.clone();
        let r = c
            .create(agent.request_with_correlation(
                CreateDatabaseRequest {
                    environment: "dev".into(),
                    database_name: name.clone(),
                    ..Default::default()
                },
                &bad,
            ))
            .await;
        let s = expect_code(r, Code::InvalidArgument);
        assert!(s.message().contains("x-correlation-id"), "{}", s.message());
        let echoed = status_correlation_id(&s);
        assert_ne!(echoed, bad, "an invalid id must not be echoed");
        assert!(
            uuid::Uuid::parse_str(&echoed).is_ok(),
            "a generated id replaces it: {echoed}"
        );
        let row = assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;
        assert!(!row.payload.contains(&bad), "{}", row.payload);
    }
    assert_eq!(request_count(&server).await, 0);
    assert!(!db_exists(&name).await);
}

/// Two `x-correlation-id` values, each valid on its own, are refused like a
/// malformed one: which one a reader picks would decide whose trail the call joins.
#[tokio::test]
async fn two_caller_correlation_ids_are_invalid_argument() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("twocorr");
    let mut req = agent.request_with_correlation(
        CreateDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            ..Default::default()
        },
        "first-id",
    );
    req.metadata_mut()
        .append("x-correlation-id", "second-id".parse().unwrap());
    let mut c = agent.client.clone();
    let s = expect_code(c.create(req).await, Code::InvalidArgument);
    assert!(s.message().contains("x-correlation-id"), "{}", s.message());
    let echoed = status_correlation_id(&s);
    assert!(
        uuid::Uuid::parse_str(&echoed).is_ok(),
        "a generated id replaces both: {echoed}"
    );
    assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;
    assert_eq!(request_count(&server).await, 0);
    assert!(!db_exists(&name).await);
}

/// A target cluster that refuses the service's own credentials is UNAVAILABLE for
/// the caller, and the message names neither the password nor the service's role.
#[tokio::test]
async fn target_refusing_the_service_credentials_is_unavailable_without_details() {
    let url = cluster()
        .url("postgres")
        .replace(cluster().password(), "wrong-password-xyz");
    let server = TestServer::start_with(Options {
        extra_toml: format!(
            "[targets.badpw]\nadmin_url = \"{url}\"\n[environments.badpw]\ntarget = \"badpw\"\n"
        ),
        allowed_envs_var: Some("dev,badpw".into()),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let s = expect_code(
        agent.describe("badpw", &unique("x")).await,
        Code::Unavailable,
    );
    assert!(s.message().contains("credentials"), "{}", s.message());
    assert!(
        !s.message().contains("wrong-password-xyz"),
        "{}",
        s.message()
    );
    assert!(
        !s.message().contains("user \"postgres\""),
        "{}",
        s.message()
    );
}
