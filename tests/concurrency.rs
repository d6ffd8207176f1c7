//! Concurrency through the real gRPC server: many callers, several connections and two
//! server processes (replicas) on one metadata database, against a real PostgreSQL.
mod common;
use common::*;

use std::sync::Arc;

use db_lifecycle::proto::{self, LifecycleResult};
use tokio::sync::Barrier;
use tonic::{Code, Status};

type Reply = Result<LifecycleResult, Status>;
type Call = std::pin::Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Box a call so that different calls can race in one `all_at_once`.
fn call(f: impl Future<Output = Reply> + Send + 'static) -> Call {
    Box::pin(f)
}

// ---------- helpers local to this file ----------

/// Two server processes on one metadata database.
async fn replicas(extra_toml: &str) -> (TestServer, TestServer) {
    let first = TestServer::start_with(Options {
        extra_toml: extra_toml.into(),
        ..Default::default()
    })
    .await;
    let second = TestServer::start_with(Options {
        extra_toml: extra_toml.into(),
        metadata_db: Some(first.metadata_db.clone()),
        ..Default::default()
    })
    .await;
    (first, second)
}

/// Run every future at the same moment (behind a barrier), each in its own task.
async fn all_at_once<F, T>(futures: Vec<F>) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(Barrier::new(futures.len()));
    let tasks: Vec<_> = futures
        .into_iter()
        .map(|f| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                f.await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task panicked"));
    }
    out
}

async fn count(server: &TestServer, sql: &str, name: &str) -> i64 {
    server
        .meta()
        .await
        .query_one(sql, &[&name])
        .await
        .unwrap()
        .get(0)
}

async fn event_count(server: &TestServer, request_id: &str, event_type: &str) -> i64 {
    server
        .meta()
        .await
        .query_one(
            "SELECT count(*) FROM flow_events WHERE request_id::text = $1 AND event_type = $2",
            &[&request_id, &event_type],
        )
        .await
        .unwrap()
        .get(0)
}

async fn open_requests(server: &TestServer, name: &str) -> i64 {
    count(
        server,
        "SELECT count(*) FROM approval_requests WHERE database_name = $1 \
         AND state IN ('requested','approved')",
        name,
    )
    .await
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

async fn pg_database_count(name: &str) -> i64 {
    target()
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

/// The invariant after every test: every ownership row's database exists (unless it
/// is being deleted), none of `names` exists without its row, and once no request is
/// open every row is `active`.
async fn assert_ownership_invariant(server: &TestServer, names: &[String]) {
    let meta = server.meta().await;
    let rows: Vec<(String, String)> = meta
        .query("SELECT database_name, state FROM project_databases", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, state) in &rows {
        if state != "deleting" {
            assert!(
                db_exists(name).await,
                "ownership row for `{name}` ({state}) but no database"
            );
        }
    }
    for name in names {
        if db_exists(name).await {
            assert!(
                rows.iter().any(|(n, _)| n == name),
                "database `{name}` exists without an ownership row"
            );
        }
    }
    let open: i64 = meta
        .query_one(
            "SELECT count(*) FROM approval_requests WHERE state IN ('requested','approved')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if open == 0 {
        for (name, state) in &rows {
            assert_eq!(
                state, "active",
                "`{name}`: no request is open, yet the row is {state}"
            );
        }
    }
}

fn state_of(r: &proto::ApprovalRequest) -> proto::ApprovalState {
    proto::ApprovalState::try_from(r.state).unwrap()
}

// ---------- the tests ----------

/// 24 concurrent Approve calls on one request, from two approvers over 24 separate
/// connections to two replicas: exactly one apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_approves_across_replicas_apply_exactly_once() {
    let (s1, s2) = replicas("").await;
    let name = unique("storm");
    let queued = s1.as_(&AGENT_A).await.create("dev", &name).await.unwrap();
    assert_eq!(queued.status, "approval_required", "{}", queued.message);
    let id = queued.request_id.clone();

    let mut calls = Vec::new();
    for i in 0..24 {
        let server = if i % 2 == 0 { &s1 } else { &s2 };
        let approver = if i % 3 == 0 { &ADMIN } else { &OWNER_A };
        // `as_` opens a new channel (its own HTTP/2 connection) per caller.
        let caller = server.as_(approver).await;
        let id = id.clone();
        calls.push(async move { caller.approve(&id).await });
    }
    let results: Vec<Reply> = all_at_once(calls).await;

    let mut applied = 0;
    for r in &results {
        match r {
            Ok(r) => {
                assert!(
                    r.status == "applied" || r.status == "in_progress",
                    "unexpected status {}: {}",
                    r.status,
                    r.message
                );
                assert_eq!(r.request_id, id);
                if r.status == "applied" {
                    applied += 1;
                }
            }
            Err(s) => assert_eq!(
                s.code(),
                Code::FailedPrecondition,
                "unexpected error: {}",
                s.message()
            ),
        }
    }
    assert!(
        applied >= 1,
        "the winning approval must report applied: {results:?}"
    );
    // Every call, winner or loser, answered OK or not, is one row carrying its
    // correlation id: the winner's `request.approved` (the id in its payload), the
    // losers' `decision.repeated`, a refusal's `call.refused`.
    for r in &results {
        let cid = match r {
            Ok(r) => r.correlation_id.clone(),
            Err(s) => status_correlation_id(s),
        };
        let rows = rows_carrying(&s1, &cid).await;
        assert_eq!(rows.len(), 1, "call {cid} ({r:?}) left {rows:?}");
    }

    assert_eq!(event_count(&s1, &id, "request.applied").await, 1);
    assert_eq!(event_count(&s1, &id, "request.approved").await, 1);
    assert!(event_count(&s1, &id, "apply.started").await >= 1);
    assert_eq!(event_count(&s1, &id, "request.failed").await, 0);
    assert_eq!(pg_database_count(&name).await, 1);
    let final_state = s2.as_(&OWNER_A).await.get_request(&id).await.unwrap();
    assert_eq!(state_of(&final_state), proto::ApprovalState::Applied);
    let (project, _, state) = ownership_row(&s1, &name).await.unwrap();
    assert_eq!((project.as_str(), state.as_str()), ("alpha", "active"));
    assert_ownership_invariant(&s1, &[name]).await;
}

/// Two projects create one name at the same moment through two replicas: one wins,
/// the other gets a clear error; never two open requests for one name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_name_by_two_projects_one_wins() {
    let (s1, s2) = replicas("").await;
    let mut names = Vec::new();
    for round in 0..5 {
        let name = unique("contested");
        names.push(name.clone());
        // Alternate which project goes through which replica.
        let (sa, sb) = if round % 2 == 0 {
            (&s1, &s2)
        } else {
            (&s2, &s1)
        };
        let agent_a = sa.as_(&AGENT_A).await;
        let agent_b = sb.as_(&AGENT_B).await;
        let (na, nb) = (name.clone(), name.clone());
        let results = all_at_once(vec![
            call(async move { agent_a.create("dev", &na).await }),
            call(async move { agent_b.create("dev", &nb).await }),
        ])
        .await;
        assert!(open_requests(&s1, &name).await <= 1);

        let oks: Vec<(usize, &LifecycleResult)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().ok().map(|r| (i, r)))
            .collect();
        assert_eq!(oks.len(), 1, "exactly one create may win: {results:?}");
        let (winner_idx, winner) = oks[0];
        assert_eq!(winner.status, "approval_required", "{}", winner.message);
        let loser_err = results[1 - winner_idx].as_ref().unwrap_err();
        match loser_err.code() {
            Code::FailedPrecondition => {
                assert!(
                    loser_err.message().contains(&name),
                    "{}",
                    loser_err.message()
                );
                assert!(
                    loser_err.message().contains(&winner.request_id),
                    "the error must name the open request: {}",
                    loser_err.message()
                );
                // ... but not whose it is, nor a way to follow it the loser lacks.
                let m = loser_err.message();
                assert!(m.contains("another project's request"), "{m}");
                assert!(
                    !m.contains("GetRequest") && !m.contains("alpha") && !m.contains("beta"),
                    "{m}"
                );
            }
            Code::PermissionDenied => {}
            other => panic!("unexpected {other:?}: {}", loser_err.message()),
        }

        // Both owners approve at once; only the winner's owner may.
        let (winner_project, winner_owner, loser_owner, loser_agent) = if winner_idx == 0 {
            ("alpha", &OWNER_A, &OWNER_B, &AGENT_B)
        } else {
            ("beta", &OWNER_B, &OWNER_A, &AGENT_A)
        };
        let wo = sb.as_(winner_owner).await;
        let lo = sa.as_(loser_owner).await;
        let (wid, lid) = (winner.request_id.clone(), winner.request_id.clone());
        let decisions = all_at_once(vec![
            call(async move { wo.approve(&wid).await }),
            call(async move { lo.approve(&lid).await }),
        ])
        .await;
        let mut decisions = decisions.into_iter();
        let applied = decisions.next().unwrap().unwrap();
        assert_eq!(applied.status, "applied", "{}", applied.message);
        expect_code(decisions.next().unwrap(), Code::PermissionDenied);

        assert_eq!(pg_database_count(&name).await, 1);
        assert_eq!(
            ownership_row(&s1, &name).await.map(|r| r.0).as_deref(),
            Some(winner_project)
        );
        // The loser tries again, through either replica: refused, and cannot drop it.
        let retry = s1.as_(loser_agent).await;
        expect_code(retry.create("dev", &name).await, Code::PermissionDenied);
        let retry = s2.as_(loser_agent).await;
        expect_code(
            retry.delete("dev", &name, true).await,
            Code::PermissionDenied,
        );
        assert!(db_exists(&name).await);
        assert!(open_requests(&s1, &name).await <= 1);
    }
    for name in &names {
        assert_eq!(open_requests(&s1, name).await, 0);
    }
    assert_ownership_invariant(&s1, &names).await;
}

/// Approve and deny of one request at the same moment by two approvers on two
/// replicas: exactly one decision wins, and the end state agrees with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_approve_and_deny_exactly_one_decision_wins() {
    let (s1, s2) = replicas("").await;
    let mut names = Vec::new();
    let (mut approvals_won, mut denials_won) = (0, 0);
    for round in 0..6 {
        let name = unique("decide");
        names.push(name.clone());
        let queued = s1.as_(&AGENT_A).await.create("dev", &name).await.unwrap();
        let id = queued.request_id.clone();
        let (approver, denier) = if round % 2 == 0 {
            (s1.as_(&OWNER_A).await, s2.as_(&ADMIN).await)
        } else {
            (s2.as_(&ADMIN).await, s1.as_(&OWNER_A).await)
        };
        let (aid, did) = (id.clone(), id.clone());
        let results = all_at_once(vec![
            call(async move { approver.approve(&aid).await }),
            call(async move { denier.deny(&did, "not now").await }),
        ])
        .await;
        let (approve, deny) = (&results[0], &results[1]);
        let approved = match (approve, deny) {
            (Ok(a), Err(d)) => {
                assert_eq!(a.status, "applied", "{}", a.message);
                assert_eq!(d.code(), Code::FailedPrecondition, "{}", d.message());
                assert!(d.message().contains(&id), "{}", d.message());
                true
            }
            (Err(a), Ok(d)) => {
                assert_eq!(d.status, "denied", "{}", d.message);
                assert_eq!(a.code(), Code::FailedPrecondition, "{}", a.message());
                assert!(a.message().contains(&id), "{}", a.message());
                false
            }
            other => panic!("exactly one decision must win: {other:?}"),
        };
        if approved {
            approvals_won += 1;
        } else {
            denials_won += 1;
        }

        let current = s2.as_(&OWNER_A).await.get_request(&id).await.unwrap();
        let expected = if approved {
            proto::ApprovalState::Applied
        } else {
            proto::ApprovalState::Denied
        };
        assert_eq!(state_of(&current), expected);
        assert_eq!(
            db_exists(&name).await,
            approved,
            "the database exists iff approved"
        );
        assert_eq!(ownership_row(&s1, &name).await.is_some(), approved);
        assert_eq!(
            event_count(&s1, &id, "request.approved").await,
            approved as i64
        );
        assert_eq!(
            event_count(&s1, &id, "request.denied").await,
            !approved as i64
        );
        assert_eq!(
            event_count(&s1, &id, "request.applied").await,
            approved as i64
        );
        if !approved {
            assert_eq!(event_count(&s1, &id, "apply.started").await, 0);
        }
    }
    assert_eq!(approvals_won + denials_won, 6);
    assert_ownership_invariant(&s1, &names).await;
}

/// Ten different databases created and approved at the same time across two
/// replicas and two projects: all applied, each exists with exactly one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_databases_created_and_approved_concurrently() {
    let (s1, s2) = replicas("").await;
    let names: Vec<String> = (0..10).map(|_| unique("many")).collect();
    let mut flows = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (requester, approver) = if i % 2 == 0 {
            (&AGENT_A, &OWNER_A)
        } else {
            (&AGENT_B, &OWNER_B)
        };
        // Request through one replica, approve through the other.
        let (sr, sa) = if i % 3 == 0 { (&s1, &s2) } else { (&s2, &s1) };
        let agent = sr.as_(requester).await;
        let owner = sa.as_(approver).await;
        let name = name.clone();
        flows.push(async move {
            let queued = agent.create("dev", &name).await?;
            assert_eq!(queued.status, "approval_required", "{}", queued.message);
            owner.approve(&queued.request_id).await
        });
    }
    let results = all_at_once(flows).await;
    for (name, r) in names.iter().zip(&results) {
        let r = r
            .as_ref()
            .unwrap_or_else(|s| panic!("{name}: {:?} {}", s.code(), s.message()));
        assert_eq!(r.status, "applied", "{name}: {}", r.message);
        assert_eq!(&r.database_name, name);
    }
    for (i, name) in names.iter().enumerate() {
        assert_eq!(pg_database_count(name).await, 1, "{name}");
        let rows = count(
            &s1,
            "SELECT count(*) FROM project_databases WHERE database_name = $1",
            name,
        )
        .await;
        assert_eq!(rows, 1, "{name}");
        let (project, _, state) = ownership_row(&s1, name).await.unwrap();
        assert_eq!(project, if i % 2 == 0 { "alpha" } else { "beta" });
        assert_eq!(state, "active");
    }
    assert_ownership_invariant(&s1, &names).await;
}

/// A create of a managed database while a delete request for it is open is a
/// conflicting call: it must be refused naming the open request, not reported as
/// "exists, nothing to do" while the database is about to be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_while_delete_request_open_is_refused_naming_it() {
    let (s1, s2) = replicas("").await;
    let name = unique("pending_delete");
    let agent = s1.as_(&AGENT_A).await;
    let queued = agent.create("dev", &name).await.unwrap();
    let applied = s2
        .as_(&OWNER_A)
        .await
        .approve(&queued.request_id)
        .await
        .unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);

    let delete = agent.delete("dev", &name, true).await.unwrap();
    assert_eq!(delete.status, "approval_required", "{}", delete.message);
    let err = expect_code(
        s2.as_(&AGENT_A).await.create("dev", &name).await,
        Code::FailedPrecondition,
    );
    assert!(err.message().contains(&name), "{}", err.message());
    assert!(
        err.message().contains(&delete.request_id),
        "the error must name the open delete request: {}",
        err.message()
    );
    assert!(open_requests(&s1, &name).await <= 1);
    let done = s1
        .as_(&OWNER_A)
        .await
        .approve(&delete.request_id)
        .await
        .unwrap();
    assert_eq!(done.status, "applied", "{}", done.message);
    assert!(!db_exists(&name).await);
    assert_ownership_invariant(&s1, &[name]).await;
}

/// Delete and create of one managed name raced, over several rounds through two
/// replicas, with approval mode `none` (each call applies at once): whatever the
/// interleaving, a database and its ownership row never disagree at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_and_create_raced_never_split_database_and_ownership() {
    let (s1, s2) = replicas("[approval]\ncreate = \"none\"\ndelete = \"none\"\n").await;
    let name = unique("flip");
    let first = s1.as_(&AGENT_A).await.create("dev", &name).await.unwrap();
    assert_eq!(first.status, "applied", "{}", first.message);
    assert!(db_exists(&name).await);

    for round in 0..8 {
        let (sd, sc) = if round % 2 == 0 {
            (&s1, &s2)
        } else {
            (&s2, &s1)
        };
        let deleter = sd.as_(&AGENT_A).await;
        let creator = sc.as_(&AGENT_A).await;
        let (nd, nc) = (name.clone(), name.clone());
        let results = all_at_once(vec![
            call(async move { deleter.delete("dev", &nd, true).await }),
            call(async move { creator.create("dev", &nc).await }),
        ])
        .await;
        match &results[0] {
            Ok(r) => assert_eq!(r.status, "applied", "round {round} delete: {}", r.message),
            Err(s) => assert!(
                matches!(s.code(), Code::FailedPrecondition | Code::NotFound),
                "round {round} delete: {:?} {}",
                s.code(),
                s.message()
            ),
        }
        match &results[1] {
            Ok(r) => assert!(
                r.status == "applied" || r.status == "unchanged",
                "round {round} create: {} {}",
                r.status,
                r.message
            ),
            Err(s) => assert_eq!(
                s.code(),
                Code::FailedPrecondition,
                "round {round} create: {}",
                s.message()
            ),
        }
        // After every round: database and row agree; no request is left open.
        assert_eq!(open_requests(&s1, &name).await, 0, "round {round}");
        let row = ownership_row(&s1, &name).await;
        assert_eq!(
            db_exists(&name).await,
            row.is_some(),
            "round {round}: database and ownership row disagree ({row:?})"
        );
        if let Some((project, _, state)) = row {
            assert_eq!((project.as_str(), state.as_str()), ("alpha", "active"));
        }
        assert_ownership_invariant(&s1, std::slice::from_ref(&name)).await;
    }
    assert_ownership_invariant(&s1, &[name]).await;
}

/// The same race under owner approval: the approval of a delete races a create of
/// the same name (and the create's approval, if it was queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approved_delete_raced_with_create_keeps_database_and_row_in_agreement() {
    let (s1, s2) = replicas("").await;
    let mut names = Vec::new();
    for round in 0..4 {
        let name = unique("swap");
        names.push(name.clone());
        let agent = s1.as_(&AGENT_A).await;
        let queued = agent.create("dev", &name).await.unwrap();
        let applied = s2
            .as_(&OWNER_A)
            .await
            .approve(&queued.request_id)
            .await
            .unwrap();
        assert_eq!(applied.status, "applied", "{}", applied.message);
        let delete = agent.delete("dev", &name, true).await.unwrap();
        assert_eq!(delete.status, "approval_required", "{}", delete.message);

        let (sa, sc) = if round % 2 == 0 {
            (&s1, &s2)
        } else {
            (&s2, &s1)
        };
        let approver = sa.as_(&OWNER_A).await;
        let creator = sc.as_(&AGENT_A).await;
        let (did, nc) = (delete.request_id.clone(), name.clone());
        let results = all_at_once(vec![
            call(async move { approver.approve(&did).await }),
            call(async move { creator.create("dev", &nc).await }),
        ])
        .await;
        let del = results[0].as_ref().unwrap();
        assert_eq!(del.status, "applied", "{}", del.message);
        match &results[1] {
            // Queued after the delete finished: approve it too.
            Ok(r) if r.status == "approval_required" => {
                let done = s2.as_(&OWNER_A).await.approve(&r.request_id).await.unwrap();
                assert_eq!(done.status, "applied", "{}", done.message);
                assert!(db_exists(&name).await);
            }
            Ok(r) => panic!(
                "round {round}: create while the delete was open returned {}: {}",
                r.status, r.message
            ),
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
                assert!(s.message().contains(&delete.request_id), "{}", s.message());
                assert!(!db_exists(&name).await);
            }
        }
        let row = ownership_row(&s1, &name).await;
        assert_eq!(
            db_exists(&name).await,
            row.is_some(),
            "round {round}: {row:?}"
        );
        assert_eq!(open_requests(&s1, &name).await, 0);
    }
    assert_ownership_invariant(&s1, &names).await;
}

/// Three replicas on one metadata database; several requests, each approved by many
/// concurrent calls spread over all three: every request is applied exactly once,
/// with no duplicate `request.applied` event and no deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_apply_every_request_exactly_once() {
    let (first, second) = replicas("").await;
    let third = TestServer::start_with(Options {
        metadata_db: Some(first.metadata_db.clone()),
        ..Default::default()
    })
    .await;
    let servers = [&first, &second, &third];
    let agent = first.as_(&AGENT_A).await;
    let mut names = Vec::new();
    let mut request_ids = Vec::new();
    for i in 0..5 {
        let name = unique(&format!("three_{i}"));
        let r = agent.create("dev", &name).await.unwrap();
        assert_eq!(r.status, "approval_required");
        names.push(name);
        request_ids.push(r.request_id);
    }
    // Six approvers' calls per request: alice and root, on each of the three replicas.
    let mut calls = Vec::new();
    for rid in &request_ids {
        for server in servers {
            for approver in [&OWNER_A, &ADMIN] {
                let caller = server.as_(approver).await;
                let rid = rid.clone();
                calls.push(call(async move { caller.approve(&rid).await }));
            }
        }
    }
    let replies = all_at_once(calls).await;
    for reply in &replies {
        match reply {
            Ok(r) => assert!(
                r.status == "applied" || r.status == "in_progress",
                "unexpected status {}: {}",
                r.status,
                r.message
            ),
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message()),
        }
    }
    for (rid, name) in request_ids.iter().zip(&names) {
        assert_eq!(
            event_count(&first, rid, "request.applied").await,
            1,
            "{name}"
        );
        assert_eq!(
            event_count(&first, rid, "request.approved").await,
            1,
            "{name}"
        );
        assert_eq!(
            event_count(&first, rid, "request.failed").await,
            0,
            "{name}"
        );
        assert_eq!(pg_database_count(name).await, 1, "{name}");
        let stored = agent.get_request(rid).await.unwrap();
        assert_eq!(state_of(&stored), proto::ApprovalState::Applied, "{name}");
    }
    assert_ownership_invariant(&first, &names).await;
}

/// Describes racing creates and deletes of the same name (approval mode `none`): every
/// describe gets an answer — OK, or a code of design §5 — and each OK describe is
/// audited; none is cut off (a database dropped between the catalog reads used to
/// abort the call).
#[tokio::test]
async fn describes_racing_creates_and_deletes_always_answer_and_are_audited() {
    let server = TestServer::start_with(Options {
        extra_toml: "[approval]\ncreate = \"none\"\ndelete = \"none\"\n".into(),
        ..Default::default()
    })
    .await;
    let name = unique("churn");
    let agent = server.as_(&AGENT_A).await;
    let churn = {
        let agent = agent.clone();
        let name = name.clone();
        tokio::spawn(async move {
            for _ in 0..25 {
                let _ = agent.create("dev", &name).await;
                let _ = agent.delete("dev", &name, true).await;
            }
        })
    };
    let mut describers = Vec::new();
    for _ in 0..3 {
        let agent = agent.clone();
        let name = name.clone();
        describers.push(tokio::spawn(async move {
            let mut ok = 0i64;
            for _ in 0..80 {
                match agent.describe("dev", &name).await {
                    Ok(_) => ok += 1,
                    Err(s) => assert!(
                        matches!(s.code(), Code::Unavailable | Code::FailedPrecondition),
                        "describe cut off or failed: {:?} {}",
                        s.code(),
                        s.message()
                    ),
                }
            }
            ok
        }));
    }
    churn.await.unwrap();
    let mut answered = 0;
    for d in describers {
        answered += d.await.unwrap();
    }
    let audited: i64 = server
        .meta()
        .await
        .query_one(
            "SELECT count(*) FROM flow_events WHERE event_type = 'database.described' \
             AND database_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, answered, "every OK describe is audited once");
    assert!(
        !server.log().contains("panicked"),
        "a handler panicked:\n{}",
        server.log()
    );
}

/// 16 callers of one project create and delete the same few names at once, through
/// two replicas, with approval mode `none` (each call applies at once). Only the
/// service ever creates these databases, so no answer may claim that one of them is
/// "not managed by this service": while another request of the project is being
/// applied for a name, the answer names that request (FAILED_PRECONDITION) instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_creates_and_deletes_never_call_own_databases_unmanaged() {
    let (s1, s2) = replicas("[approval]\ncreate = \"none\"\ndelete = \"none\"\n").await;
    let names: Vec<String> = (0..3).map(|i| unique(&format!("own_race_{i}"))).collect();
    let mut calls = Vec::new();
    for worker in 0..16usize {
        let server = if worker % 2 == 0 { &s1 } else { &s2 };
        let caller = server.as_(&AGENT_A).await;
        let names = names.clone();
        calls.push(async move {
            let mut answers = Vec::new();
            for step in 0..20usize {
                let name = &names[(worker + step) % names.len()];
                let creating = (worker + step / 3) % 2 == 0;
                let reply = if creating {
                    caller.create("dev", name).await
                } else {
                    caller.delete("dev", name, true).await
                };
                answers.push((creating, name.clone(), reply));
            }
            answers
        });
    }
    let answers: Vec<_> = all_at_once(calls).await.into_iter().flatten().collect();
    let mut wrong = Vec::new();
    for (creating, name, reply) in &answers {
        let what = if *creating { "create" } else { "delete" };
        match reply {
            Ok(r) => {
                assert!(
                    matches!(
                        r.status.as_str(),
                        "applied" | "unchanged" | "failed" | "in_progress"
                    ),
                    "{what} {name}: {} {}",
                    r.status,
                    r.message
                );
                if r.message.contains("not managed by this service") {
                    wrong.push(format!("{what} {name}: {} {}", r.status, r.message));
                }
            }
            Err(s) => {
                assert!(
                    matches!(
                        s.code(),
                        Code::FailedPrecondition | Code::NotFound | Code::AlreadyExists
                    ),
                    "{what} {name}: {:?} {}",
                    s.code(),
                    s.message()
                );
                if s.message().contains("not managed by this service") {
                    wrong.push(format!("{what} {name}: {:?} {}", s.code(), s.message()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} answers called the project's own database unmanaged:\n{}",
        wrong.len(),
        answers.len(),
        wrong.join("\n")
    );
    for name in &names {
        assert_eq!(open_requests(&s1, name).await, 0, "{name}");
        let row = ownership_row(&s1, name).await;
        assert_eq!(db_exists(name).await, row.is_some(), "{name}: {row:?}");
    }
    assert_ownership_invariant(&s1, &names).await;
    for name in &names {
        drop_by_hand(name).await;
    }
}

/// The same answer, made deterministic: a create of the project's is being applied
/// (parked at a test-only fault point, its intent written) and a database appears
/// under the name meanwhile. A create or delete of that name by the project names
/// the running request instead of calling the database unmanaged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_during_an_apply_of_the_name_get_its_request() {
    let mut server = TestServer::start().await;
    server.prepend_config("fault_points = [\"after_intent\"]");
    server.restart(&Options::default()).await;
    let name = unique("own_parked");
    let agent = server.as_(&AGENT_A).await;
    let rid = agent.create("dev", &name).await.unwrap().request_id;
    let owner = server.as_(&OWNER_A).await;
    let rid2 = rid.clone();
    let _parked = tokio::spawn(async move { owner.approve(&rid2).await });
    assert!(
        server
            .wait_for_log(
                "fault point after_intent reached",
                std::time::Duration::from_secs(30)
            )
            .await
    );
    create_by_hand(&name).await;

    let again = agent.create("dev", &name).await.unwrap();
    assert_eq!(
        (again.status.as_str(), again.request_id.as_str()),
        ("in_progress", rid.as_str()),
        "{}",
        again.message
    );
    let s = expect_code(
        agent.delete("dev", &name, true).await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains(&rid), "{}", s.message());
    assert!(!s.message().contains("not managed"), "{}", s.message());
    server.kill();
    drop_by_hand(&name).await;
}
