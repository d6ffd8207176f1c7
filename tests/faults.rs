//! Crash in the middle of an apply (issue 4, item 1), and the recovery loop's own
//! sweeps (item 4): a real server process is parked at a named fault point
//! (`fault_points`, test-only), killed with SIGKILL, and started again on the same
//! metadata database without the fault point. The recovery loop must drive the
//! request to its final state by itself, with exactly one `request.applied` event,
//! and leave ownership and the target cluster in agreement.
mod common;
use common::*;

use std::time::Duration;

use db_lifecycle::approvals::FAULT_POINTS;
use tonic::Code;

const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
const FAULT_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Create,
    Delete,
}

/// What the test observes while the apply is parked, before the kill.
fn expected_intermediate(act: Act, point: &str) -> (bool, Option<&'static str>) {
    // (database exists, ownership row state)
    match (act, point) {
        (Act::Create, "after_claim") => (false, None),
        // Until the rename, the database exists only under its staging name.
        (Act::Create, "after_intent" | "after_create") => (false, Some("creating")),
        (Act::Create, _) => (true, Some("creating")),
        (Act::Delete, "after_claim") => (true, Some("active")),
        (Act::Delete, "after_intent") => (true, Some("deleting")),
        (Act::Delete, _) => (false, Some("deleting")),
    }
}

/// Kill the server at `point` during an approved `act`, restart it without the
/// fault point, and check that recovery finishes the request.
async fn crash_and_recover(act: Act, point: &str, mode_none: bool) {
    assert!(FAULT_POINTS.contains(&point), "unknown fault point {point}");
    let name = unique(&format!("ft_{point}"));
    let approval = if mode_none {
        "[approval]\ncreate = \"none\"\ndelete = \"none\"\n"
    } else {
        ""
    };
    let mut server = TestServer::start_with(Options {
        extra_toml: approval.into(),
        ..Default::default()
    })
    .await;

    if act == Act::Delete {
        // A managed database to delete, created before any fault is enabled.
        let agent = server.as_(&AGENT_A).await;
        let r = agent.create("dev", &name).await.unwrap();
        let r = if mode_none {
            r
        } else {
            server
                .as_(&OWNER_A)
                .await
                .approve(&r.request_id)
                .await
                .unwrap()
        };
        assert_eq!(r.status, "applied", "{}", r.message);
        assert!(db_exists(&name).await);
    }

    server.prepend_config(&format!("fault_points = [\"{point}\"]"));
    server.restart(&Options::default()).await;
    assert!(
        server.log().contains("TEST-ONLY fault points are enabled"),
        "the server must warn loudly that fault points are on"
    );

    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    // The call that reaches the apply: Create/Delete itself in mode none, else Approve.
    let (request_id, hung_call) = if mode_none {
        // The request id is not returned (the call hangs in the apply): find it in
        // the metadata database once the fault point is reached.
        let name2 = name.clone();
        let call = tokio::spawn(async move {
            match act {
                Act::Create => agent.create("dev", &name2).await,
                Act::Delete => agent.delete("dev", &name2, true).await,
            }
        });
        (None, call)
    } else {
        let queued = match act {
            Act::Create => agent.create("dev", &name).await,
            Act::Delete => agent.delete("dev", &name, true).await,
        }
        .unwrap();
        assert_eq!(queued.status, "approval_required", "{}", queued.message);
        let rid = queued.request_id.clone();
        let call = tokio::spawn(async move { owner.approve(&rid).await });
        (Some(queued.request_id), call)
    };

    let line = format!("fault point {point} reached");
    assert!(
        server.wait_for_log(&line, FAULT_LIMIT).await,
        "fault point {point} was never reached; log:\n{}",
        server.log()
    );
    let request_id = match request_id {
        Some(id) => id,
        None => server
            .meta()
            .await
            .query_one(
                "SELECT id::text FROM approval_requests WHERE database_name = $1 \
                 AND action = $2",
                &[
                    &name,
                    &match act {
                        Act::Create => "create",
                        Act::Delete => "delete",
                    },
                ],
            )
            .await
            .unwrap()
            .get(0),
    };

    // Parked: the request is claimed, not final; the intermediate state is as the
    // step order says, and a database never exists without its ownership row.
    assert_eq!(
        stored_state(&server, &request_id).await.as_deref(),
        Some("approved")
    );
    let (exists, row_state) = expected_intermediate(act, point);
    assert_eq!(db_exists(&name).await, exists, "database at {point}");
    if act == Act::Create {
        assert_eq!(
            db_exists(&staging_name(&request_id)).await,
            point == "after_create",
            "staging database at {point}"
        );
    }
    let rows = ownership_rows(&server, &name).await;
    assert_eq!(
        rows.first().map(|r| r.2.as_str()),
        row_state,
        "ownership row at {point}: {rows:?}"
    );

    server.kill(); // SIGKILL
    let hung = tokio::time::timeout(Duration::from_secs(30), hung_call)
        .await
        .expect("the call parked at the fault point did not end when the server died")
        .unwrap();
    assert!(
        hung.is_err(),
        "the call parked at {point} cannot have succeeded: {hung:?}"
    );

    server.remove_config_key("fault_points");
    server.restart(&Options::default()).await;
    let state = wait_final(&server, &request_id, RECOVERY_LIMIT).await;
    assert_eq!(
        state.as_deref(),
        Some("applied"),
        "request {request_id} after the crash at {point}; log:\n{}",
        server.log()
    );
    assert_eq!(
        server.log().matches(&line).count(),
        1,
        "the fault point fired again after the restart"
    );
    assert_eq!(
        request_event_count(&server, &request_id, "request.applied").await,
        1
    );
    assert_eq!(
        request_event_count(&server, &request_id, "request.failed").await,
        0
    );
    match act {
        Act::Create => {
            assert!(db_exists(&name).await, "created after recovery");
            let rows = ownership_rows(&server, &name).await;
            assert_eq!(
                rows,
                vec![("alpha".into(), "dev".into(), "active".into())],
                "ownership after recovery"
            );
        }
        Act::Delete => {
            assert!(!db_exists(&name).await, "dropped after recovery");
            assert!(ownership_rows(&server, &name).await.is_empty());
        }
    }
    assert_ownership_consistent(&server, &[&name]).await;
    assert!(
        !db_exists(&staging_name(&request_id)).await,
        "no staging database is left behind"
    );

    // The caller sees the outcome; the service works on.
    let got = server
        .as_(&OWNER_A)
        .await
        .get_request(&request_id)
        .await
        .unwrap();
    assert_eq!(
        got.state,
        db_lifecycle::proto::ApprovalState::Applied as i32
    );
    let described = server
        .as_(&AGENT_A)
        .await
        .describe("dev", &name)
        .await
        .unwrap();
    assert_eq!(
        described.exists,
        act == Act::Create,
        "{}",
        described.message
    );
    assert_eq!(
        described.owned_by_project,
        act == Act::Create,
        "{}",
        described.message
    );
    if act == Act::Create {
        drop_by_hand(&name).await;
    }
}

// ---------- create ----------

#[tokio::test]
async fn create_crash_after_claim_is_recovered() {
    crash_and_recover(Act::Create, "after_claim", false).await;
}

#[tokio::test]
async fn create_crash_after_intent_is_recovered() {
    crash_and_recover(Act::Create, "after_intent", false).await;
}

#[tokio::test]
async fn create_crash_after_create_database_is_recovered() {
    crash_and_recover(Act::Create, "after_create", false).await;
}

#[tokio::test]
async fn create_crash_after_rename_is_recovered() {
    crash_and_recover(Act::Create, "after_rename", false).await;
}

#[tokio::test]
async fn create_crash_before_finalize_is_recovered() {
    crash_and_recover(Act::Create, "before_finalize", false).await;
}

/// Approval mode none: the Create call itself applies; it is the one that hangs.
#[tokio::test]
async fn create_crash_after_create_database_in_mode_none_is_recovered() {
    crash_and_recover(Act::Create, "after_create", true).await;
}

// ---------- delete ----------

#[tokio::test]
async fn delete_crash_after_claim_is_recovered() {
    crash_and_recover(Act::Delete, "after_claim", false).await;
}

#[tokio::test]
async fn delete_crash_after_intent_is_recovered() {
    crash_and_recover(Act::Delete, "after_intent", false).await;
}

#[tokio::test]
async fn delete_crash_after_drop_database_is_recovered() {
    crash_and_recover(Act::Delete, "after_drop", false).await;
}

#[tokio::test]
async fn delete_crash_before_finalize_is_recovered() {
    crash_and_recover(Act::Delete, "before_finalize", false).await;
}

/// The name an apply creates its database under before renaming it into place.
fn staging_name(request_id: &str) -> String {
    db_lifecycle::domain::DatabaseName::staging_for(request_id.parse().unwrap())
        .as_str()
        .to_string()
}

/// A create is interrupted (crash at `point`, before the database is under its
/// name) and meanwhile someone creates a database of that name by hand. Recovery
/// must not adopt it: the request fails with ALREADY_EXISTS's reason, the hand-made
/// database is untouched (same oid), no ownership row and no staging database stay.
async fn hand_made_database_during_interrupted_create(point: &str) {
    let name = unique(&format!("ft_adopt_{point}"));
    let mut server = TestServer::start().await;
    server.prepend_config(&format!("fault_points = [\"{point}\"]"));
    server.restart(&Options::default()).await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let rid = agent.create("dev", &name).await.unwrap().request_id;
    let rid2 = rid.clone();
    let _hung = tokio::spawn(async move { owner.approve(&rid2).await });
    assert!(
        server
            .wait_for_log(&format!("fault point {point} reached"), FAULT_LIMIT)
            .await
    );
    create_by_hand(&name).await;
    let oid_of = |name: String| async move {
        target()
            .await
            .query_one("SELECT oid FROM pg_database WHERE datname = $1", &[&name])
            .await
            .unwrap()
            .get::<_, u32>(0)
    };
    let hand_made_oid = oid_of(name.clone()).await;
    server.kill();
    server.remove_config_key("fault_points");
    server.restart(&Options::default()).await;

    assert_eq!(
        wait_final(&server, &rid, RECOVERY_LIMIT).await.as_deref(),
        Some("failed"),
        "log:\n{}",
        server.log()
    );
    let reason: String = server
        .meta()
        .await
        .query_one(
            "SELECT failure_reason FROM approval_requests WHERE id = $1::text::uuid",
            &[&rid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("will not be adopted"), "{reason}");
    assert_eq!(
        oid_of(name.clone()).await,
        hand_made_oid,
        "the hand-made database is untouched"
    );
    assert!(ownership_rows(&server, &name).await.is_empty());
    assert!(
        !db_exists(&staging_name(&rid)).await,
        "staging database cleaned up"
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.applied").await,
        0
    );
    assert_ownership_consistent(&server, &[]).await;

    let described = server
        .as_(&AGENT_A)
        .await
        .describe("dev", &name)
        .await
        .unwrap();
    assert!(
        described.exists && !described.owned_by_project,
        "{described:?}"
    );
    expect_code(
        server.as_(&AGENT_A).await.create("dev", &name).await,
        Code::AlreadyExists,
    );
    drop_by_hand(&name).await;
}

#[tokio::test]
async fn hand_made_database_after_intent_is_never_adopted() {
    hand_made_database_during_interrupted_create("after_intent").await;
}

#[tokio::test]
async fn hand_made_database_after_staging_create_is_never_adopted() {
    hand_made_database_during_interrupted_create("after_create").await;
}

/// The audit of a delete resumed after the database was already dropped says so.
#[tokio::test]
async fn resumed_delete_is_audited_as_resumed() {
    let name = unique("ft_resumed");
    let mut server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let r = agent.create("dev", &name).await.unwrap();
    owner.approve(&r.request_id).await.unwrap();
    server.prepend_config("fault_points = [\"after_drop\"]");
    server.restart(&Options::default()).await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let rid = agent.delete("dev", &name, true).await.unwrap().request_id;
    let rid2 = rid.clone();
    let _hung = tokio::spawn(async move { owner.approve(&rid2).await });
    assert!(
        server
            .wait_for_log("fault point after_drop reached", FAULT_LIMIT)
            .await
    );
    server.kill();
    server.remove_config_key("fault_points");
    server.restart(&Options::default()).await;
    assert_eq!(
        wait_final(&server, &rid, RECOVERY_LIMIT).await.as_deref(),
        Some("applied")
    );
    let payload: String = server
        .meta()
        .await
        .query_one(
            "SELECT payload::text FROM flow_events WHERE request_id = $1::text::uuid \
             AND event_type = 'request.applied'",
            &[&rid],
        )
        .await
        .unwrap()
        .get(0);
    let payload: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(payload["resumed"], true, "{payload}");
    assert_eq!(payload["already_gone"], true, "{payload}");
    // Two attempts were recorded, one per process.
    assert_eq!(request_event_count(&server, &rid, "apply.started").await, 2);
}

/// A delete is killed right after its DROP, and before the restart someone creates a
/// database of the same name by hand. The resumed delete did drop its own database
/// (identified by oid), so it ends `applied` and removes the ownership row; the
/// hand-made database is never touched and never becomes the project's; the audit
/// says what happened.
#[tokio::test]
async fn delete_killed_after_drop_leaves_a_hand_made_database_of_the_name_alone() {
    let name = unique("ft_drop_then_hand");
    let mut server = TestServer::start().await;
    let r = server
        .as_(&AGENT_A)
        .await
        .create("dev", &name)
        .await
        .unwrap();
    server
        .as_(&OWNER_A)
        .await
        .approve(&r.request_id)
        .await
        .unwrap();
    let managed_oid = oid_of(&name).await.expect("managed database");
    server.prepend_config("fault_points = [\"after_drop\"]");
    server.restart(&Options::default()).await;
    let rid = server
        .as_(&AGENT_A)
        .await
        .delete("dev", &name, true)
        .await
        .unwrap()
        .request_id;
    let owner = server.as_(&OWNER_A).await;
    let rid2 = rid.clone();
    let _hung = tokio::spawn(async move { owner.approve(&rid2).await });
    assert!(
        server
            .wait_for_log("fault point after_drop reached", FAULT_LIMIT)
            .await
    );
    assert!(!db_exists(&name).await, "dropped at after_drop");
    server.kill();
    create_by_hand(&name).await;
    let hand_made_oid = oid_of(&name).await.unwrap();
    assert_ne!(hand_made_oid, managed_oid);
    server.remove_config_key("fault_points");
    server.restart(&Options::default()).await;

    assert_eq!(
        wait_final(&server, &rid, RECOVERY_LIMIT).await.as_deref(),
        Some("applied"),
        "the delete did drop its database; log:\n{}",
        server.log()
    );
    assert_eq!(
        oid_of(&name).await,
        Some(hand_made_oid),
        "the hand-made database is untouched"
    );
    assert!(
        ownership_rows(&server, &name).await.is_empty(),
        "no ownership row is left for the dropped database"
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.applied").await,
        1
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.failed").await,
        0
    );
    let (message, payload): (String, String) = server
        .meta()
        .await
        .query_one(
            "SELECT message, payload::text FROM flow_events WHERE request_id = $1::text::uuid \
             AND event_type = 'request.applied'",
            &[&rid],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    let payload: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(payload["resumed"], true, "{payload}");
    assert_eq!(payload["already_gone"], true, "{payload}");
    assert_eq!(
        payload["unmanaged_database_oid_left_alone"], hand_made_oid,
        "{payload}"
    );
    assert!(
        message.contains("did not create") && message.contains("not dropped"),
        "{message}"
    );
    assert_ownership_consistent(&server, &[]).await;

    // The name is nobody's now: the hand-made database is described as unmanaged,
    // not listed, never adopted or dropped, and no project is told it is another's.
    let agent = server.as_(&AGENT_A).await;
    assert!(
        !agent.listed_databases().await.unwrap().contains(&name),
        "ListDatabases no longer lists it"
    );
    let described = agent.describe("dev", &name).await.unwrap();
    assert!(
        described.exists && !described.owned_by_project,
        "{described:?}"
    );
    assert!(
        described.message.contains("not managed"),
        "{}",
        described.message
    );
    expect_code(agent.create("dev", &name).await, Code::AlreadyExists);
    expect_code(agent.delete("dev", &name, true).await, Code::NotFound);
    expect_code(
        server.as_(&AGENT_B).await.create("dev", &name).await,
        Code::AlreadyExists,
    );
    assert_eq!(oid_of(&name).await, Some(hand_made_oid));
    drop_by_hand(&name).await;
}

// ---------- a resumed apply that the changed configuration refuses ----------

/// How the configuration changes while the apply is down.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// The name is added to `protected_databases`.
    Protect,
    /// The request's environment (`staging`) is no longer allowed.
    RemoveEnvironment,
}

/// Park an apply of `act` at `point`, SIGKILL the server, change the configuration
/// by `change` and restart without the fault point: the recovery loop resumes the
/// apply, and its re-check now refuses the request. Returns the server, the name,
/// the request id and the request's final state.
async fn refused_on_resume(
    act: Act,
    point: &str,
    change: Change,
) -> (TestServer, String, String, Option<String>) {
    let name = unique(&format!("ft_refused_{point}"));
    let env = match change {
        Change::Protect => "dev",
        Change::RemoveEnvironment => "staging",
    };
    let mut server = TestServer::start().await;
    if act == Act::Delete {
        let agent = server.as_(&AGENT_A).await;
        let r = agent.create(env, &name).await.unwrap();
        let r = server
            .as_(&OWNER_A)
            .await
            .approve(&r.request_id)
            .await
            .unwrap();
        assert_eq!(r.status, "applied", "{}", r.message);
    }
    server.prepend_config(&format!("fault_points = [\"{point}\"]"));
    server.restart(&Options::default()).await;
    let agent = server.as_(&AGENT_A).await;
    let queued = match act {
        Act::Create => agent.create(env, &name).await,
        Act::Delete => agent.delete(env, &name, true).await,
    }
    .unwrap();
    let rid = queued.request_id.clone();
    let owner = server.as_(&OWNER_A).await;
    let rid2 = rid.clone();
    let _parked = tokio::spawn(async move { owner.approve(&rid2).await });
    assert!(
        server
            .wait_for_log(&format!("fault point {point} reached"), FAULT_LIMIT)
            .await,
        "log:\n{}",
        server.log()
    );
    let (exists, row_state) = expected_intermediate(act, point);
    assert_eq!(db_exists(&name).await, exists, "database at {point}");
    assert_eq!(
        ownership_rows(&server, &name)
            .await
            .first()
            .map(|r| r.2.as_str()),
        row_state
    );
    server.kill();
    server.remove_config_key("fault_points");
    let opts = match change {
        Change::Protect => {
            server.prepend_config(&format!("protected_databases = [\"{name}\"]"));
            Options::default()
        }
        Change::RemoveEnvironment => Options {
            allowed_envs_var: Some("dev".into()),
            ..Default::default()
        },
    };
    server.restart(&opts).await;
    let state = wait_final(&server, &rid, RECOVERY_LIMIT).await;
    (server, name, rid, state)
}

async fn failure_reason(server: &TestServer, rid: &str) -> String {
    server
        .meta()
        .await
        .query_one(
            "SELECT coalesce(failure_reason, '') FROM approval_requests WHERE id = $1::text::uuid",
            &[&rid],
        )
        .await
        .unwrap()
        .get(0)
}

/// Crash after the staging database was made; the name is protected by the time the
/// apply resumes: the request fails, and the staging database and the `creating`
/// row are removed (nothing is left that no active row accounts for).
#[tokio::test]
async fn create_resumed_after_staging_create_is_undone_when_the_name_became_protected() {
    let (server, name, rid, state) =
        refused_on_resume(Act::Create, "after_create", Change::Protect).await;
    assert_eq!(state.as_deref(), Some("failed"), "log:\n{}", server.log());
    let reason = failure_reason(&server, &rid).await;
    assert!(reason.contains("protected"), "{reason}");
    assert!(
        !db_exists(&staging_name(&rid)).await,
        "staging database left"
    );
    assert!(!db_exists(&name).await);
    assert!(ownership_rows(&server, &name).await.is_empty());
    assert_eq!(
        request_event_count(&server, &rid, "apply.rolled_back").await,
        1
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.applied").await,
        0
    );
    assert_ownership_consistent(&server, &[&name]).await;
}

/// Crash after the rename (the database is under its name, its row `creating`); the
/// environment is no longer allowed when the apply resumes: the request fails, the
/// database this request made is dropped and its row removed, and Describe no
/// longer reports it as the project's.
#[tokio::test]
async fn create_resumed_after_rename_is_undone_when_the_environment_was_removed() {
    let (server, name, rid, state) =
        refused_on_resume(Act::Create, "after_rename", Change::RemoveEnvironment).await;
    assert_eq!(state.as_deref(), Some("failed"), "log:\n{}", server.log());
    let reason = failure_reason(&server, &rid).await;
    assert!(reason.contains("not allowed"), "{reason}");
    assert!(!db_exists(&name).await, "the renamed database is left");
    assert!(!db_exists(&staging_name(&rid)).await);
    assert!(ownership_rows(&server, &name).await.is_empty());
    assert_eq!(
        request_event_count(&server, &rid, "apply.rolled_back").await,
        1
    );
    assert_ownership_consistent(&server, &[&name]).await;
    let described = server
        .as_(&AGENT_A)
        .await
        .describe("dev", &name)
        .await
        .unwrap();
    assert!(
        !described.exists && !described.owned_by_project,
        "{}",
        described.message
    );
}

/// The same, when nothing was done yet (crash right after the claim): the request
/// fails, nothing is created, and there was nothing to undo.
#[tokio::test]
async fn create_resumed_after_claim_creates_nothing_when_the_environment_was_removed() {
    let (server, name, rid, state) =
        refused_on_resume(Act::Create, "after_claim", Change::RemoveEnvironment).await;
    assert_eq!(state.as_deref(), Some("failed"), "log:\n{}", server.log());
    assert!(!db_exists(&name).await);
    assert!(ownership_rows(&server, &name).await.is_empty());
    assert_eq!(
        request_event_count(&server, &rid, "apply.rolled_back").await,
        0
    );
    assert_ownership_consistent(&server, &[&name]).await;
}

/// A delete interrupted before its DROP, resumed after the name became protected:
/// nothing is dropped now; the row is `active` again and the request fails.
#[tokio::test]
async fn delete_resumed_before_drop_drops_nothing_when_the_name_became_protected() {
    let (server, name, rid, state) =
        refused_on_resume(Act::Delete, "after_intent", Change::Protect).await;
    assert_eq!(state.as_deref(), Some("failed"), "log:\n{}", server.log());
    let reason = failure_reason(&server, &rid).await;
    assert!(reason.contains("protected"), "{reason}");
    assert!(db_exists(&name).await, "dropped despite the protection");
    assert_eq!(
        ownership_rows(&server, &name).await,
        vec![("alpha".into(), "dev".into(), "active".into())]
    );
    assert_ownership_consistent(&server, &[&name]).await;
    drop_by_hand(&name).await;
}

/// A delete interrupted after its DROP, resumed after the name became protected: the
/// drop cannot be undone, so its row is removed (no row points at a missing
/// database) and the request ends `applied`, its event saying why nothing else was
/// done.
#[tokio::test]
async fn delete_resumed_after_drop_removes_the_row_when_the_name_became_protected() {
    let (server, name, rid, state) =
        refused_on_resume(Act::Delete, "after_drop", Change::Protect).await;
    assert_eq!(state.as_deref(), Some("applied"), "log:\n{}", server.log());
    assert!(!db_exists(&name).await);
    assert!(ownership_rows(&server, &name).await.is_empty());
    let payload: String = server
        .meta()
        .await
        .query_one(
            "SELECT payload::text FROM flow_events WHERE request_id = $1::text::uuid \
             AND event_type = 'request.applied'",
            &[&rid],
        )
        .await
        .unwrap()
        .get(0);
    let payload: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(payload["already_gone"], true, "{payload}");
    assert!(
        payload["refused_at_resume"]
            .as_str()
            .is_some_and(|r| r.contains("protected")),
        "{payload}"
    );
    assert_ownership_consistent(&server, &[&name]).await;
}

/// The environment and its target are both gone from the configuration when a
/// create interrupted after its staging database resumes: this replica cannot reach
/// what is left there, so the request stays `approved` (deferred, never failed with
/// its leftovers in place); once a replica has the target again (the environment
/// still not allowed), the leftovers are removed and the request fails.
#[tokio::test]
async fn refused_create_waits_for_a_replica_that_has_its_target() {
    let sections = format!(
        "[targets.other]\nadmin_url = \"{}\"\n\n[environments.staging]\ntarget = \"other\"\n",
        cluster().url("postgres")
    );
    let mut server = TestServer::start_with(Options {
        extra_toml: sections.clone(),
        ..Default::default()
    })
    .await;
    server.prepend_config("fault_points = [\"after_create\"]");
    server.restart(&Options::default()).await;
    let name = unique("ft_no_target");
    let rid = server
        .as_(&AGENT_A)
        .await
        .create("staging", &name)
        .await
        .unwrap()
        .request_id;
    let owner = server.as_(&OWNER_A).await;
    let rid2 = rid.clone();
    let _parked = tokio::spawn(async move { owner.approve(&rid2).await });
    assert!(
        server
            .wait_for_log("fault point after_create reached", FAULT_LIMIT)
            .await
    );
    server.kill();
    server.remove_config_key("fault_points");
    server.edit_config(|text| text.replace(&sections, ""));
    let without_staging = Options {
        allowed_envs_var: Some("dev".into()),
        ..Default::default()
    };
    server.restart(&without_staging).await;
    let deadline = std::time::Instant::now() + RECOVERY_LIMIT;
    while request_event_count(&server, &rid, "apply.deferred").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed apply was never deferred; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stored_state(&server, &rid).await.as_deref(),
        Some("approved")
    );
    assert!(db_exists(&staging_name(&rid)).await);

    server.kill();
    server.edit_config(|text| format!("{text}\n{sections}"));
    server.restart(&without_staging).await;
    assert_eq!(
        wait_final(&server, &rid, RECOVERY_LIMIT).await.as_deref(),
        Some("failed"),
        "log:\n{}",
        server.log()
    );
    assert!(!db_exists(&staging_name(&rid)).await);
    assert!(ownership_rows(&server, &name).await.is_empty());
    assert_ownership_consistent(&server, &[&name]).await;
}

// ---------- the recovery loop's sweeps (expiry, item 4) ----------

/// Nobody touches an expired request: the recovery loop moves it to `expired` by
/// itself, audits it once, it can no longer be approved, and a new request for the
/// same database is then possible (the approvals test covers the path where a
/// decision finds it expired first).
#[tokio::test]
async fn recovery_loop_expires_untouched_requests_by_itself() {
    let server = TestServer::start_with(Options {
        extra_toml: "request_ttl = \"1s\"\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let created = unique("ft_exp_c");
    let managed = unique("ft_exp_d");

    // A managed database, and a delete request for it that nobody decides.
    let r = agent.create("dev", &managed).await.unwrap();
    let r = owner.approve(&r.request_id).await;
    // The 1 s TTL may have run out before the approval: try again then.
    let r = match r {
        Ok(r) => r,
        Err(s) => {
            assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
            let again = agent.create("dev", &managed).await.unwrap();
            owner.approve(&again.request_id).await.unwrap()
        }
    };
    assert_eq!(r.status, "applied", "{}", r.message);
    let del = agent
        .delete("dev", &managed, true)
        .await
        .unwrap()
        .request_id;
    let cre = agent.create("dev", &created).await.unwrap().request_id;

    for rid in [&del, &cre] {
        assert_eq!(
            wait_final(&server, rid, RECOVERY_LIMIT).await.as_deref(),
            Some("expired"),
            "request {rid}"
        );
        assert_eq!(
            request_event_count(&server, rid, "request.expired").await,
            1
        );
        let s = expect_code(owner.approve(rid).await, Code::FailedPrecondition);
        assert!(s.message().contains("expired"), "{}", s.message());
        assert_eq!(
            request_event_count(&server, rid, "request.approved").await,
            0
        );
    }
    assert!(
        !db_exists(&created).await,
        "an expired create created nothing"
    );
    assert!(
        db_exists(&managed).await,
        "an expired delete dropped nothing"
    );
    assert_eq!(
        ownership_rows(&server, &managed).await,
        vec![("alpha".into(), "dev".into(), "active".into())]
    );
    assert!(ownership_rows(&server, &created).await.is_empty());
    let log = server.log();
    assert!(log.contains("request expired"), "{log}");

    // New requests for the same names are possible.
    let again = agent.create("dev", &created).await.unwrap();
    assert_eq!(again.status, "approval_required", "{}", again.message);
    assert_ne!(again.request_id, cre);
    let again = agent.delete("dev", &managed, true).await.unwrap();
    assert_eq!(again.status, "approval_required", "{}", again.message);
    assert_ne!(again.request_id, del);
    drop_by_hand(&managed).await;
}
