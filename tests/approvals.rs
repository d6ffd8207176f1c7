//! The approval flow (R5, R6, design §3/§4): deny, four-eyes, approval modes, dry run,
//! idempotent requests, query RPCs, and expiry — through the real server.
mod common;
use common::*;

use std::collections::BTreeSet;

use db_lifecycle::proto::{
    self, ApprovalState, CreateDatabaseRequest, DeleteDatabaseRequest, ListDatabasesRequest,
    ListFlowEventsRequest, ListRequestsRequest,
};
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

async fn list_requests(
    c: &Caller,
    m: ListRequestsRequest,
) -> Result<proto::ListRequestsResponse, Status> {
    let mut client = c.client.clone();
    client
        .list_requests(c.request(m))
        .await
        .map(|r| r.into_inner())
}

async fn list_databases(
    c: &Caller,
    m: ListDatabasesRequest,
) -> Result<proto::ListDatabasesResponse, Status> {
    let mut client = c.client.clone();
    client
        .list_databases(c.request(m))
        .await
        .map(|r| r.into_inner())
}

async fn list_events(
    c: &Caller,
    m: ListFlowEventsRequest,
) -> Result<proto::ListFlowEventsResponse, Status> {
    let mut client = c.client.clone();
    client
        .list_flow_events(c.request(m))
        .await
        .map(|r| r.into_inner())
}

fn ids(reqs: &[proto::ApprovalRequest]) -> BTreeSet<String> {
    reqs.iter().map(|r| r.request_id.clone()).collect()
}

/// `wanted` appears in `all` in this order (other items may sit between).
fn in_order(all: &[String], wanted: &[&str]) -> bool {
    let mut it = all.iter();
    wanted.iter().all(|w| it.any(|a| a == w))
}

// ---------- deny ----------

#[tokio::test]
async fn deny_changes_nothing_is_idempotent_and_cannot_be_approved_afterwards() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("deny");
    let created = agent.create("dev", &name).await.unwrap();
    let rid = created.request_id.clone();

    let denied = owner.deny(&rid, "not needed").await.unwrap();
    assert_eq!(denied.status, "denied", "{}", denied.message);
    assert_eq!(denied.approval_state, ApprovalState::Denied as i32);
    assert!(!denied.applied);
    assert!(
        !db_exists(&name).await,
        "a denied create must create nothing"
    );
    assert!(ownership_rows(&server, &name).await.is_empty());
    let stored = agent.get_request(&rid).await.unwrap();
    assert_eq!(stored.state, ApprovalState::Denied as i32);
    assert_eq!(stored.decided_by, "alice");
    assert_eq!(stored.decision_reason, "not needed");
    assert!(stored.decided_at.is_some() && stored.finished_at.is_some());

    let again = owner.deny(&rid, "still not needed").await.unwrap();
    assert_eq!(again.status, "denied");
    assert_eq!(
        request_event_count(&server, &rid, "request.denied").await,
        1,
        "denied once"
    );
    assert_eq!(
        agent.get_request(&rid).await.unwrap().decision_reason,
        "not needed"
    );

    let s = refused(&server, owner.approve(&rid).await, Code::FailedPrecondition).await;
    assert!(s.message().contains("denied"), "{}", s.message());
    assert_eq!(stored_state(&server, &rid).await.as_deref(), Some("denied"));
    assert!(!db_exists(&name).await);

    let trail = event_types(&agent.events_by_request(&rid).await.unwrap());
    // The repeated deny (answered OK, nothing changed) and the refused late approve
    // are on the request's trail too.
    assert_eq!(
        trail,
        vec![
            "request.created",
            "request.denied",
            "decision.repeated",
            "call.refused"
        ]
    );

    // A denied request does not block a new one for the same name.
    let next = agent.create("dev", &name).await.unwrap();
    assert_eq!(next.status, "approval_required");
    assert_ne!(next.request_id, rid);
}

#[tokio::test]
async fn deny_without_a_reason_is_invalid_argument() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let created = agent.create("dev", &unique("noreason")).await.unwrap();
    for reason in ["", "   "] {
        let s = refused(
            &server,
            owner.deny(&created.request_id, reason).await,
            Code::InvalidArgument,
        )
        .await;
        assert!(s.message().contains("reason"), "{}", s.message());
    }
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
    // Approving needs no reason.
    let applied = owner.decide(&created.request_id, true, "").await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
}

// ---------- who may decide ----------

#[tokio::test]
async fn four_eyes_the_requester_cannot_decide_its_own_request() {
    let server = TestServer::start().await;
    let anna = server.as_(&OWNER_A2).await;
    let alice = server.as_(&OWNER_A).await;
    let name = unique("foureyes");
    let created = anna.create("dev", &name).await.unwrap();
    assert_eq!(
        anna.get_request(&created.request_id)
            .await
            .unwrap()
            .requested_by,
        "anna"
    );

    let s = refused(
        &server,
        anna.approve(&created.request_id).await,
        Code::PermissionDenied,
    )
    .await;
    assert!(
        s.message().contains("four-eyes") && s.message().contains("anna"),
        "{}",
        s.message()
    );
    refused(
        &server,
        anna.deny(&created.request_id, "changed my mind").await,
        Code::PermissionDenied,
    )
    .await;
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
    assert!(!db_exists(&name).await);
    // The refused attempts are part of the request's trail: an owner reviewing it sees
    // who tried to decide it and why that was refused.
    let trail = alice.events_by_request(&created.request_id).await.unwrap();
    let refusals: Vec<_> = trail
        .iter()
        .filter(|e| e.event_type == "call.refused")
        .collect();
    assert_eq!(refusals.len(), 2, "{:?}", event_types(&trail));
    for e in refusals {
        assert_eq!(e.actor_id, "anna");
        assert_eq!(e.status_code, "PERMISSION_DENIED");
        assert_eq!(e.project_id, "alpha");
        assert_eq!(e.database_name, name);
        assert!(e.message.contains("four-eyes"), "{}", e.message);
    }

    let applied = alice.approve(&created.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(db_exists(&name).await);
    assert_eq!(
        alice
            .get_request(&created.request_id)
            .await
            .unwrap()
            .decided_by,
        "alice"
    );
}

#[tokio::test]
async fn delegated_mode_lets_a_delegate_approve_only_where_configured() {
    let server = TestServer::start_with(Options {
        extra_toml: "[environments.staging]\ndelete_approval = \"delegated\"\ncreate_approval = \"delegated\"\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let dana = server.as_(&DELEGATE_A).await;
    let alice = server.as_(&OWNER_A).await;

    // staging: delegated.
    let name = unique("deleg");
    let created = agent.create("staging", &name).await.unwrap();
    assert!(
        created.message.contains("owner or delegate"),
        "{}",
        created.message
    );
    assert_eq!(
        agent
            .get_request(&created.request_id)
            .await
            .unwrap()
            .approval_mode,
        "delegated"
    );
    let applied = dana.approve(&created.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(db_exists(&name).await);
    assert_eq!(
        agent
            .get_request(&created.request_id)
            .await
            .unwrap()
            .decided_by,
        "dana"
    );
    let del = agent.delete("staging", &name, true).await.unwrap();
    let dropped = dana.approve(&del.request_id).await.unwrap();
    assert_eq!(dropped.status, "applied", "{}", dropped.message);
    assert!(!db_exists(&name).await);

    // A delegate decides, but does not request.
    refused(
        &server,
        dana.create("staging", &unique("deleg")).await,
        Code::PermissionDenied,
    )
    .await;

    // dev: owner mode; the delegate is refused, an owner approves.
    let dev_name = unique("deleg_dev");
    let dev = agent.create("dev", &dev_name).await.unwrap();
    assert_eq!(
        agent
            .get_request(&dev.request_id)
            .await
            .unwrap()
            .approval_mode,
        "owner"
    );
    let s = refused(
        &server,
        dana.approve(&dev.request_id).await,
        Code::PermissionDenied,
    )
    .await;
    assert!(
        s.message().contains("`owner`") && s.message().contains("dana"),
        "{}",
        s.message()
    );
    refused(
        &server,
        dana.deny(&dev.request_id, "no").await,
        Code::PermissionDenied,
    )
    .await;
    assert_eq!(
        stored_state(&server, &dev.request_id).await.as_deref(),
        Some("requested")
    );
    assert!(!db_exists(&dev_name).await);
    assert_eq!(
        alice.approve(&dev.request_id).await.unwrap().status,
        "applied"
    );
    assert!(db_exists(&dev_name).await);
}

#[tokio::test]
async fn an_owner_of_another_project_cannot_decide() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let bob = server.as_(&OWNER_B).await;
    let name = unique("otherowner");
    let created = agent.create("dev", &name).await.unwrap();
    for r in [
        bob.approve(&created.request_id).await,
        bob.deny(&created.request_id, "mine now").await,
    ] {
        let s = refused(&server, r, Code::PermissionDenied).await;
        assert!(s.message().contains("outside the scope"), "{}", s.message());
        assert!(!s.message().contains("alpha"), "{}", s.message());
        // Bob's own trail of the call names the request he gave, not its project.
        let own = bob
            .events_by_correlation(&status_correlation_id(&s))
            .await
            .unwrap();
        assert_eq!(event_types(&own), ["call.refused"]);
        assert_eq!(own[0].request_id, created.request_id);
        assert_eq!(own[0].project_id, "", "the other project is not revealed");
        assert_eq!(own[0].database_name, "");
    }
    // Project alpha's owners see the attempts on their request.
    let alice = server.as_(&OWNER_A).await;
    let trail = alice.events_by_request(&created.request_id).await.unwrap();
    let attempts: Vec<_> = trail
        .iter()
        .filter(|e| e.event_type == "call.refused")
        .map(|e| e.actor_id.as_str())
        .collect();
    assert_eq!(attempts, ["bob", "bob"], "{:?}", event_types(&trail));
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
    assert_eq!(
        request_event_count(&server, &created.request_id, "request.approved").await,
        0
    );
    assert_eq!(
        request_event_count(&server, &created.request_id, "request.denied").await,
        0
    );
    assert!(!db_exists(&name).await);
}

#[tokio::test]
async fn a_service_principal_cannot_approve_only_people_do() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let svc = server.as_(&SERVICE_A).await;
    let name = unique("svc");
    let created = agent.create("dev", &name).await.unwrap();
    let s = refused(
        &server,
        svc.approve(&created.request_id).await,
        Code::PermissionDenied,
    )
    .await;
    assert!(
        s.message().contains("only people approve") && s.message().contains("service"),
        "{}",
        s.message()
    );
    refused(
        &server,
        svc.deny(&created.request_id, "no").await,
        Code::PermissionDenied,
    )
    .await;
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
    assert!(!db_exists(&name).await);

    // The service may request; a person approves.
    let own = svc.create("dev", &unique("svc")).await.unwrap();
    assert_eq!(own.status, "approval_required");
    let alice = server.as_(&OWNER_A).await;
    assert_eq!(
        alice.approve(&own.request_id).await.unwrap().status,
        "applied"
    );
}

// ---------- approval mode none ----------

#[tokio::test]
async fn mode_none_applies_at_once_and_records_an_applied_request() {
    let server = TestServer::start_with(Options {
        extra_toml: "[approval]\ncreate = \"none\"\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("none");

    let done = agent.create("dev", &name).await.unwrap();
    assert_eq!(done.status, "applied", "{}", done.message);
    assert!(done.applied);
    assert_eq!(done.approval_state, ApprovalState::Applied as i32);
    assert!(db_exists(&name).await);
    assert_eq!(request_count(&server).await, 1);
    assert_eq!(
        stored_state(&server, &done.request_id).await.as_deref(),
        Some("applied")
    );
    let stored = agent.get_request(&done.request_id).await.unwrap();
    assert_eq!(stored.approval_mode, "none");
    assert_eq!(stored.decided_by, "policy:none");
    assert_eq!(stored.requested_by, "agent-a");
    let trail = event_types(&agent.events_by_request(&done.request_id).await.unwrap());
    assert!(
        in_order(
            &trail,
            &["request.created", "request.approved", "request.applied"]
        ),
        "{trail:?}"
    );
    assert_eq!(
        ownership_rows(&server, &name).await,
        vec![("alpha".into(), "dev".into(), "active".into())]
    );

    // A dry run in mode none reports what would happen and does nothing.
    let dry_name = unique("none_dry");
    let dry = agent
        .create_req(CreateDatabaseRequest {
            environment: "dev".into(),
            database_name: dry_name.clone(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dry.status, "dry_run", "{}", dry.message);
    assert!(dry.message.contains("applied at once"), "{}", dry.message);
    assert!(!dry.applied && dry.request_id.is_empty());
    assert!(!db_exists(&dry_name).await);
    assert_eq!(request_count(&server).await, 1);

    // Create again: nothing to do, nothing stored.
    let again = agent.create("dev", &name).await.unwrap();
    assert_eq!(again.status, "unchanged", "{}", again.message);
    assert_eq!(request_count(&server).await, 1);

    // Delete keeps the default (owner) mode.
    let del = agent.delete("dev", &name, true).await.unwrap();
    assert_eq!(del.status, "approval_required");
    assert!(db_exists(&name).await);
    assert_eq!(
        owner.approve(&del.request_id).await.unwrap().status,
        "applied"
    );
    assert!(!db_exists(&name).await);
}

// ---------- dry run ----------

#[tokio::test]
async fn dry_run_stores_and_changes_nothing_but_is_audited() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("dry");

    let dry = agent
        .create_req(CreateDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dry.status, "dry_run", "{}", dry.message);
    assert!(dry.dry_run && !dry.applied);
    assert!(dry.request_id.is_empty());
    assert!(dry.message.contains("would be queued"), "{}", dry.message);
    assert_eq!(request_count(&server).await, 0);
    assert!(!db_exists(&name).await);
    assert_eq!(
        event_types_for_correlation(&server, &dry.correlation_id).await,
        vec!["dry_run.checked"]
    );

    // Delete dry run of a managed database.
    let created = agent.create("dev", &name).await.unwrap();
    assert_eq!(
        owner.approve(&created.request_id).await.unwrap().status,
        "applied"
    );
    assert_eq!(request_count(&server).await, 1);
    let dry_del = agent
        .delete_req(DeleteDatabaseRequest {
            environment: "dev".into(),
            database_name: name.clone(),
            confirm_delete: true,
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dry_del.status, "dry_run", "{}", dry_del.message);
    assert!(dry_del.dry_run && dry_del.exists && dry_del.request_id.is_empty());
    assert_eq!(
        request_count(&server).await,
        1,
        "a dry run stores no request"
    );
    assert!(db_exists(&name).await, "a dry run drops nothing");
    assert_eq!(ownership_rows(&server, &name).await.len(), 1);
    assert_eq!(
        event_types_for_correlation(&server, &dry_del.correlation_id).await,
        vec!["dry_run.checked"]
    );

    // A dry run still runs every check.
    let unmanaged = unique("dry_unmanaged");
    create_by_hand(&unmanaged).await;
    let r = agent
        .create_req(CreateDatabaseRequest {
            environment: "dev".into(),
            database_name: unmanaged.clone(),
            dry_run: true,
            ..Default::default()
        })
        .await;
    refused(&server, r, Code::AlreadyExists).await;
    drop_by_hand(&unmanaged).await;
    assert_eq!(request_count(&server).await, 1);
}

// ---------- idempotent requests ----------

#[tokio::test]
async fn a_repeated_identical_create_returns_the_same_open_request() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("repeat");
    let first = agent.create("dev", &name).await.unwrap();
    let second = agent.create("dev", &name).await.unwrap();
    assert_eq!(second.status, "approval_required", "{}", second.message);
    assert_eq!(second.request_id, first.request_id);
    assert_ne!(second.correlation_id, first.correlation_id);
    assert_eq!(request_count(&server).await, 1, "no second request");
    assert_eq!(
        request_event_count(&server, &first.request_id, "request.repeated").await,
        1
    );
    // The second call's correlation id leads to the request's trail.
    let trail = event_types(
        &agent
            .events_by_correlation(&second.correlation_id)
            .await
            .unwrap(),
    );
    assert!(trail.contains(&"request.created".to_string()), "{trail:?}");
    // Same project, other requester, same environment: still the same request.
    let anna = server.as_(&OWNER_A2).await;
    assert_eq!(
        anna.create(" DEV ", &name).await.unwrap().request_id,
        first.request_id
    );
    assert_eq!(request_count(&server).await, 1);
    assert!(!db_exists(&name).await);
}

// ---------- query RPCs ----------

#[tokio::test]
async fn list_requests_filters_paginates_and_respects_project_scope() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let agent_b = server.as_(&AGENT_B).await;
    let admin = server.as_(&ADMIN).await;

    let mut dev_ids = BTreeSet::new();
    for _ in 0..5 {
        dev_ids.insert(
            agent
                .create("dev", &unique("list"))
                .await
                .unwrap()
                .request_id,
        );
    }
    let denied_id = dev_ids.iter().next().unwrap().clone();
    owner.deny(&denied_id, "no").await.unwrap();
    let staging_id = agent
        .create("staging", &unique("list"))
        .await
        .unwrap()
        .request_id;
    let beta_id = agent_b
        .create("dev", &unique("list"))
        .await
        .unwrap()
        .request_id;

    let all = list_requests(&agent, ListRequestsRequest::default())
        .await
        .unwrap();
    assert_eq!(all.requests.len(), 6);
    assert!(all.requests.iter().all(|r| r.project_id == "alpha"));
    assert!(all.next_page_token.is_empty());

    let denied = list_requests(
        &agent,
        ListRequestsRequest {
            state: ApprovalState::Denied as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&denied.requests), BTreeSet::from([denied_id.clone()]));
    let open = list_requests(
        &agent,
        ListRequestsRequest {
            state: ApprovalState::Requested as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(open.requests.len(), 5);
    assert!(!ids(&open.requests).contains(&denied_id));
    let staging = list_requests(
        &agent,
        ListRequestsRequest {
            environment: " Staging ".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&staging.requests), BTreeSet::from([staging_id.clone()]));
    let alpha = list_requests(
        &agent,
        ListRequestsRequest {
            project_id: "alpha".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(alpha.requests.len(), 6);

    // Admin sees everything and can filter by project.
    assert_eq!(
        list_requests(&admin, ListRequestsRequest::default())
            .await
            .unwrap()
            .requests
            .len(),
        7
    );
    let beta = list_requests(
        &admin,
        ListRequestsRequest {
            project_id: "beta".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&beta.requests), BTreeSet::from([beta_id.clone()]));

    // Pagination: page_size 2 over the 5 dev requests.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = list_requests(
            &agent,
            ListRequestsRequest {
                environment: "dev".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        pages.push(page.requests.len());
        seen.extend(page.requests.iter().map(|r| r.request_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        assert_ne!(page.next_page_token, token, "the token must move");
        token = page.next_page_token;
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(pages, vec![2, 2, 1]);
    assert_eq!(seen.len(), 5, "duplicates: {seen:?}");
    assert_eq!(
        seen.iter().cloned().collect::<BTreeSet<_>>(),
        dev_ids,
        "gaps or strangers"
    );
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");

    // Bad pagination input.
    for bad_token in [
        "garbage!",
        "zz",
        &hex::encode("e:5"),
        &hex::encode("r:not-a-uuid"),
    ] {
        let r = list_requests(
            &agent,
            ListRequestsRequest {
                page_token: bad_token.to_string(),
                ..Default::default()
            },
        )
        .await;
        let s = refused(&server, r, Code::InvalidArgument).await;
        assert!(s.message().contains("page_token"), "{}", s.message());
    }
    for bad_size in [501, -1] {
        let r = list_requests(
            &agent,
            ListRequestsRequest {
                page_size: bad_size,
                ..Default::default()
            },
        )
        .await;
        let s = refused(&server, r, Code::InvalidArgument).await;
        assert!(s.message().contains("page_size"), "{}", s.message());
    }
    let r = list_requests(
        &agent,
        ListRequestsRequest {
            state: 42,
            ..Default::default()
        },
    )
    .await;
    refused(&server, r, Code::InvalidArgument).await;
    assert_eq!(
        list_requests(
            &agent,
            ListRequestsRequest {
                page_size: 500,
                ..Default::default()
            }
        )
        .await
        .unwrap()
        .requests
        .len(),
        6
    );

    // Project beta never sees alpha's requests.
    let b_all = list_requests(&agent_b, ListRequestsRequest::default())
        .await
        .unwrap();
    assert_eq!(ids(&b_all.requests), BTreeSet::from([beta_id]));
    let b_denied = list_requests(
        &agent_b,
        ListRequestsRequest {
            state: ApprovalState::Denied as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(b_denied.requests.is_empty());
    let r = list_requests(
        &agent_b,
        ListRequestsRequest {
            project_id: "alpha".into(),
            ..Default::default()
        },
    )
    .await;
    refused(&server, r, Code::PermissionDenied).await;
}

#[tokio::test]
async fn get_request_of_another_project_is_permission_denied() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let created = agent.create("dev", &unique("getreq")).await.unwrap();
    for p in [&AGENT_B, &OWNER_B] {
        let b = server.as_(p).await;
        let s = refused(
            &server,
            b.get_request(&created.request_id).await,
            Code::PermissionDenied,
        )
        .await;
        assert!(!s.message().contains("alpha"), "{}", s.message());
        refused(
            &server,
            b.events_by_request(&created.request_id).await,
            Code::PermissionDenied,
        )
        .await;
    }
    let own = agent.get_request(&created.request_id).await.unwrap();
    assert_eq!(own.project_id, "alpha");
    assert_eq!(own.state, ApprovalState::Requested as i32);
    for p in [&ADMIN, &MULTI] {
        let got = server
            .as_(p)
            .await
            .get_request(&created.request_id)
            .await
            .unwrap();
        assert_eq!(got.request_id, created.request_id);
    }
}

#[tokio::test]
async fn list_databases_lists_only_the_projects_own_databases() {
    let server = TestServer::start_with(Options {
        extra_toml: "[approval]\ncreate = \"none\"\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let agent_b = server.as_(&AGENT_B).await;
    let (a1, a2, a3, b1) = (unique("lda"), unique("lda"), unique("lda"), unique("ldb"));
    for (c, env, n) in [
        (&agent, "dev", &a1),
        (&agent, "dev", &a2),
        (&agent, "staging", &a3),
        (&agent_b, "dev", &b1),
    ] {
        assert_eq!(c.create(env, n).await.unwrap().status, "applied");
    }
    let names = |r: &proto::ListDatabasesResponse| -> BTreeSet<String> {
        r.databases
            .iter()
            .map(|d| d.database_name.clone())
            .collect()
    };

    let mine = list_databases(&agent, ListDatabasesRequest::default())
        .await
        .unwrap();
    assert_eq!(
        names(&mine),
        BTreeSet::from([a1.clone(), a2.clone(), a3.clone()])
    );
    assert!(
        mine.databases
            .iter()
            .all(|d| d.project_id == "alpha" && d.created_by == "agent-a")
    );
    assert!(mine.databases.iter().all(|d| !d.request_id.is_empty()));
    let dev = list_databases(
        &agent,
        ListDatabasesRequest {
            environment: "dev".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(names(&dev), BTreeSet::from([a1.clone(), a2.clone()]));

    let theirs = list_databases(&agent_b, ListDatabasesRequest::default())
        .await
        .unwrap();
    assert_eq!(names(&theirs), BTreeSet::from([b1.clone()]));
    let r = list_databases(
        &agent,
        ListDatabasesRequest {
            project_id: "beta".into(),
            ..Default::default()
        },
    )
    .await;
    refused(&server, r, Code::PermissionDenied).await;
    let multi = server.as_(&MULTI).await;
    let r = list_databases(&multi, ListDatabasesRequest::default()).await;
    refused(&server, r, Code::InvalidArgument).await;
    let m_beta = list_databases(
        &multi,
        ListDatabasesRequest {
            project_id: "beta".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(names(&m_beta), BTreeSet::from([b1]));

    // Pagination over the three.
    let p1 = list_databases(
        &agent,
        ListDatabasesRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(p1.databases.len(), 2);
    assert!(!p1.next_page_token.is_empty());
    let p2 = list_databases(
        &agent,
        ListDatabasesRequest {
            page_size: 2,
            page_token: p1.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(p2.databases.len(), 1);
    assert!(p2.next_page_token.is_empty());
    let mut all = names(&p1);
    all.extend(names(&p2));
    assert_eq!(all, BTreeSet::from([a1, a2, a3]));

    // Forged tokens (hex of `d:` and something this RPC never wrote, a NUL byte
    // included) are INVALID_ARGUMENT, never an internal error.
    for forged in [
        "643a00",
        "643a",
        "643a6e6f736c617368",
        "643a2f78",
        "643a782f",
    ] {
        let s = expect_code(
            list_databases(
                &agent,
                ListDatabasesRequest {
                    page_token: forged.into(),
                    ..Default::default()
                },
            )
            .await,
            Code::InvalidArgument,
        );
        assert!(
            s.message().contains("page_token"),
            "{forged}: {}",
            s.message()
        );
    }
}

#[tokio::test]
async fn flow_events_by_request_and_by_correlation_include_the_approvers_call() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("trail");
    let created = agent.create("dev", &name).await.unwrap();
    let rid = created.request_id.clone();
    let approve_cid = format!("approver-{}", unique("c"));
    let mut c = owner.client.clone();
    let applied = c
        .approve(owner.request_with_correlation(
            proto::ApproveRequest {
                request_id: rid.clone(),
                decision: proto::Decision::Approve as i32,
                reason: "ship it".into(),
            },
            &approve_cid,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert_eq!(applied.correlation_id, approve_cid);

    let wanted = [
        "request.created",
        "request.approved",
        "apply.started",
        "request.applied",
    ];
    let by_request = agent.events_by_request(&rid).await.unwrap();
    assert!(
        in_order(&event_types(&by_request), &wanted),
        "{:?}",
        event_types(&by_request)
    );
    assert!(by_request.iter().all(|e| e.request_id == rid));
    let approved = by_request
        .iter()
        .find(|e| e.event_type == "request.approved")
        .unwrap();
    assert_eq!(
        (approved.actor_id.as_str(), approved.actor_kind.as_str()),
        ("alice", "human")
    );
    let payload: serde_json::Value = serde_json::from_str(&approved.payload_json).unwrap();
    assert_eq!(payload["decision_correlation_id"], approve_cid.as_str());
    assert_eq!(payload["reason"], "ship it");

    let by_first = event_types(
        &agent
            .events_by_correlation(&created.correlation_id)
            .await
            .unwrap(),
    );
    assert!(in_order(&by_first, &wanted), "{by_first:?}");
    // The approver's correlation id reaches the whole story through links.
    let by_approver = event_types(&owner.events_by_correlation(&approve_cid).await.unwrap());
    assert!(in_order(&by_approver, &wanted), "{by_approver:?}");
    let linked: i64 = server
        .meta()
        .await
        .query_one(
            "SELECT count(*) FROM links WHERE correlation_id = $1 AND request_id = $2",
            &[&approve_cid, &uuid::Uuid::parse_str(&rid).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(linked, 1);

    // Paging through the request's events: no duplicates, no gaps.
    let mut token = String::new();
    let mut paged = Vec::new();
    loop {
        let page = list_events(
            &agent,
            ListFlowEventsRequest {
                request_id: rid.clone(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        paged.extend(page.events.iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(paged.len() <= by_request.len(), "pagination does not end");
    }
    assert_eq!(paged, by_request.iter().map(|e| e.id).collect::<Vec<_>>());

    // Exactly one of correlation_id or request_id, well formed.
    for m in [
        ListFlowEventsRequest::default(),
        ListFlowEventsRequest {
            correlation_id: approve_cid.clone(),
            request_id: rid.clone(),
            ..Default::default()
        },
        ListFlowEventsRequest {
            correlation_id: "has spaces".into(),
            ..Default::default()
        },
    ] {
        refused(&server, list_events(&agent, m).await, Code::InvalidArgument).await;
    }
}

// ---------- expiry ----------

#[tokio::test]
async fn an_expired_request_cannot_be_decided_and_frees_the_name() {
    let server = TestServer::start_with(Options {
        extra_toml: "request_ttl = \"1s\"\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("expire");
    let created = agent.create("dev", &name).await.unwrap();
    let rid = created.request_id.clone();
    let stored = agent.get_request(&rid).await.unwrap();
    let ttl = stored.expires_at.unwrap().seconds - stored.created_at.unwrap().seconds;
    assert!((0..=2).contains(&ttl), "ttl {ttl}s");

    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let s = refused(&server, owner.approve(&rid).await, Code::FailedPrecondition).await;
    assert!(s.message().contains("expired"), "{}", s.message());
    refused(
        &server,
        owner.deny(&rid, "too late anyway").await,
        Code::FailedPrecondition,
    )
    .await;
    assert_eq!(
        stored_state(&server, &rid).await.as_deref(),
        Some("expired")
    );
    assert_eq!(
        agent.get_request(&rid).await.unwrap().state,
        ApprovalState::Expired as i32
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.expired").await,
        1
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.approved").await,
        0
    );
    assert!(!db_exists(&name).await);

    let again = agent.create("dev", &name).await.unwrap();
    assert_eq!(again.status, "approval_required", "{}", again.message);
    assert_ne!(again.request_id, rid);
}

/// Once the decision is committed, a transient failure of the apply does not make
/// the Approve look failed: the caller is told the request is approved and its
/// apply will be retried (OK, `in_progress`, APPROVED), `apply.deferred` is
/// recorded, and the recovery loop applies it. Made deterministic with a metadata
/// pool of one connection (so one lock connection) that an apply parked at a
/// test-only fault point holds: the second apply cannot get a lock connection.
#[tokio::test]
async fn approve_whose_apply_cannot_start_is_answered_approved_and_deferred() {
    let mut server = TestServer::start_with(Options {
        extra_toml: "metadata_pool_size = 1\nfault_points = [\"after_claim\"]\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let (held, deferred) = (unique("ap_held"), unique("ap_deferred"));
    let held_id = agent.create("dev", &held).await.unwrap().request_id;
    let deferred_id = agent.create("dev", &deferred).await.unwrap().request_id;
    let owner = server.as_(&OWNER_A).await;
    let parked = {
        let (owner, id) = (owner.clone(), held_id.clone());
        tokio::spawn(async move { owner.approve(&id).await })
    };
    assert!(
        server
            .wait_for_log(
                "fault point after_claim reached",
                std::time::Duration::from_secs(30)
            )
            .await
    );

    let r = owner
        .approve(&deferred_id)
        .await
        .expect("an approval that was committed must not be answered as failed");
    assert_eq!(r.status, "in_progress", "{}", r.message);
    assert_eq!(r.approval_state, ApprovalState::Approved as i32);
    assert_eq!(r.request_id, deferred_id);
    assert!(
        r.message.contains("approved") && r.message.contains("retried automatically"),
        "{}",
        r.message
    );
    assert_eq!(
        stored_state(&server, &deferred_id).await.as_deref(),
        Some("approved")
    );
    assert!(request_event_count(&server, &deferred_id, "apply.deferred").await >= 1);
    assert_eq!(
        request_event_count(&server, &deferred_id, "request.approved").await,
        1
    );
    // Asked again, the decision is reported as taken, not refused.
    let again = owner.approve(&deferred_id).await.unwrap();
    assert_eq!(again.approval_state, ApprovalState::Approved as i32);

    server.kill();
    let _ = parked.await;
    server.remove_config_key("fault_points");
    server.restart(&Options::default()).await;
    for id in [&held_id, &deferred_id] {
        assert_eq!(
            wait_final(&server, id, std::time::Duration::from_secs(30))
                .await
                .as_deref(),
            Some("applied"),
            "request {id}; log:\n{}",
            server.log()
        );
        assert_eq!(request_event_count(&server, id, "request.applied").await, 1);
    }
    assert!(db_exists(&held).await && db_exists(&deferred).await);
    assert_ownership_consistent(&server, &[&held, &deferred]).await;
    drop_by_hand(&held).await;
    drop_by_hand(&deferred).await;
}

// ---------- calls answered OK without changing anything are recorded ----------

/// Approve/deny through `caller` with its own correlation id.
async fn decide_with_correlation(
    caller: &Caller,
    request_id: &str,
    approve: bool,
    reason: &str,
    correlation_id: &str,
) -> Result<proto::LifecycleResult, Status> {
    let mut client = caller.client.clone();
    client
        .approve(caller.request_with_correlation(
            proto::ApproveRequest {
                request_id: request_id.into(),
                decision: if approve {
                    proto::Decision::Approve
                } else {
                    proto::Decision::Deny
                } as i32,
                reason: reason.into(),
            },
            correlation_id,
        ))
        .await
        .map(|r| r.into_inner())
}

/// The one row a call answered OK left under its correlation id; it names the
/// request (so the request's trail shows who tried to decide it) and the caller.
async fn the_decision_repeated_row(
    server: &TestServer,
    cid: &str,
    request_id: &str,
    actor: &P,
    found_state: &str,
) {
    let rows = rows_carrying(server, cid).await;
    assert_eq!(rows.len(), 1, "exactly one row carries {cid}: {rows:?}");
    let row = &rows[0];
    assert_eq!(row.event_type, "decision.repeated", "{row:?}");
    assert_eq!(row.correlation_id, cid, "under the call's own id: {row:?}");
    assert_eq!(row.request_id.as_deref(), Some(request_id), "{row:?}");
    assert_eq!(row.actor_id, actor.id, "{row:?}");
    assert_eq!(row.outcome, "ok", "{row:?}");
    assert_eq!(row.project_id, "alpha", "{row:?}");
    assert_eq!(row.payload["found_state"], found_state, "{row:?}");
    let trail = event_types(
        &server
            .as_(&OWNER_A)
            .await
            .events_by_request(request_id)
            .await
            .unwrap(),
    );
    assert!(
        trail.iter().any(|t| t == "decision.repeated"),
        "the request's trail shows the repeated decision: {trail:?}"
    );
}

/// A repeated Approve of an applied request (`applied`), a repeated Deny of a
/// denied one (`denied`) and a dry run identical to an open request each answer OK
/// and change nothing; each leaves exactly one row carrying its correlation id, and
/// no terminal event is added.
#[tokio::test]
async fn ok_answers_that_change_nothing_leave_one_row_under_their_correlation_id() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let admin = server.as_(&ADMIN).await;
    let tag = unique("ok_rows");

    // Approve of an applied request.
    let name = unique("ok_applied");
    let rid = agent.create("dev", &name).await.unwrap().request_id;
    assert_eq!(owner.approve(&rid).await.unwrap().status, "applied");
    let cid = format!("{tag}-approve-again");
    let again = decide_with_correlation(&admin, &rid, true, "me too", &cid)
        .await
        .unwrap();
    assert_eq!(again.status, "applied", "{}", again.message);
    assert_eq!(again.correlation_id, cid);
    the_decision_repeated_row(&server, &cid, &rid, &ADMIN, "applied").await;
    assert_eq!(
        request_event_count(&server, &rid, "request.applied").await,
        1
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.approved").await,
        1
    );

    // Deny of a denied request.
    let denied_name = unique("ok_denied");
    let denied = agent.create("dev", &denied_name).await.unwrap().request_id;
    assert_eq!(
        owner.deny(&denied, "not now").await.unwrap().status,
        "denied"
    );
    let cid = format!("{tag}-deny-again");
    let again = decide_with_correlation(&admin, &denied, false, "agreed", &cid)
        .await
        .unwrap();
    assert_eq!(again.status, "denied", "{}", again.message);
    the_decision_repeated_row(&server, &cid, &denied, &ADMIN, "denied").await;
    assert_eq!(
        request_event_count(&server, &denied, "request.denied").await,
        1
    );

    // A dry run identical to an open request.
    let open_name = unique("ok_dry_open");
    let open = agent.create("dev", &open_name).await.unwrap().request_id;
    let cid = format!("{tag}-dry-open");
    let mut client = agent.client.clone();
    let dry = client
        .create(agent.request_with_correlation(
            CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: open_name.clone(),
                dry_run: true,
                ..Default::default()
            },
            &cid,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run, "{dry:?}");
    assert_eq!(dry.request_id, open, "{}", dry.message);
    let rows = rows_carrying(&server, &cid).await;
    assert_eq!(rows.len(), 1, "exactly one row carries {cid}: {rows:?}");
    let row = &rows[0];
    assert_eq!(row.event_type, "dry_run.checked", "{row:?}");
    assert_eq!(row.actor_id, AGENT_A.id, "{row:?}");
    assert_eq!(row.project_id, "alpha", "{row:?}");
    assert_eq!(row.payload["open_request_id"], open.as_str(), "{row:?}");
    assert_eq!(row.payload["open_request_state"], "requested", "{row:?}");
    assert_eq!(
        row.request_id, None,
        "a dry run stays out of the request's trail, like a read"
    );
    assert_eq!(
        request_event_count(&server, &open, "request.repeated").await,
        0,
        "a dry run is not a repeated request"
    );
    assert_eq!(request_count(&server).await, 3, "nothing stored");
    assert!(!db_exists(&open_name).await);
    drop_by_hand(&name).await;
}

/// An Approve that loses to another one (the winner's apply is still running: here
/// parked at a test-only fault point, so the order is certain) is answered OK,
/// `in_progress`, and leaves exactly one row carrying its correlation id.
#[tokio::test]
async fn a_losing_approve_leaves_one_row_under_its_correlation_id() {
    let mut server = TestServer::start_with(Options {
        extra_toml: "fault_points = [\"after_claim\"]\n".into(),
        ..Default::default()
    })
    .await;
    let name = unique("ok_losing");
    let rid = server
        .as_(&AGENT_A)
        .await
        .create("dev", &name)
        .await
        .unwrap()
        .request_id;
    let owner = server.as_(&OWNER_A).await;
    let parked = {
        let rid = rid.clone();
        tokio::spawn(async move { owner.approve(&rid).await })
    };
    assert!(
        server
            .wait_for_log(
                "fault point after_claim reached",
                std::time::Duration::from_secs(30)
            )
            .await
    );
    let cid = unique("ok-losing-approve");
    let lost = decide_with_correlation(&server.as_(&ADMIN).await, &rid, true, "", &cid)
        .await
        .unwrap();
    assert_eq!(lost.status, "in_progress", "{}", lost.message);
    assert_eq!(lost.approval_state, ApprovalState::Approved as i32);
    the_decision_repeated_row(&server, &cid, &rid, &ADMIN, "approved").await;
    assert_eq!(
        request_event_count(&server, &rid, "request.approved").await,
        1
    );
    server.kill();
    let _ = parked.await;
}
