//! Authorization matrix (issue 4, item 11): every RPC × principal kind × role × own or
//! other project, through the real server, with principals minted as run tokens.
//!
//! Expectations come from design §3–§5 and `policy`:
//! - Create/Delete need requester, owner or admin; Describe and the query RPCs
//!   (GetRequest, ListRequests, ListFlowEvents, ListDatabases) need any role;
//!   WhoAmI needs only a valid token;
//! - Approve needs a human with an approver role for the request's approval mode
//!   (owner mode here: owner or admin) who did not request it;
//! - everything outside the principal's project scope is PERMISSION_DENIED.
//!
//! On failure the whole matrix is printed, each cell `got` (and `!want` when wrong).
mod common;
use common::*;

use std::collections::BTreeMap;

use db_lifecycle::{error::code_name, proto};
use tonic::{Code, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rpc {
    Create,
    Delete,
    Describe,
    Approve,
    GetRequest,
    ListRequests,
    ListFlowEvents,
    ListDatabases,
    WhoAmI,
}

const RPCS: [Rpc; 9] = [
    Rpc::Create,
    Rpc::Delete,
    Rpc::Describe,
    Rpc::Approve,
    Rpc::GetRequest,
    Rpc::ListRequests,
    Rpc::ListFlowEvents,
    Rpc::ListDatabases,
    Rpc::WhoAmI,
];
const KINDS: [&str; 3] = ["agent", "service", "human"];
const ROLES: [&str; 5] = ["requester", "owner", "delegate", "admin", "none"];

/// The expected code of one cell, from design §3–§5 (see the module comment).
fn expected(rpc: Rpc, kind: &str, role: &str, own: bool) -> Code {
    // Names no project: any valid token may ask who it is.
    if rpc == Rpc::WhoAmI {
        return Code::Ok;
    }
    if !own {
        return Code::PermissionDenied;
    }
    let allowed = match rpc {
        Rpc::Create | Rpc::Delete => matches!(role, "requester" | "owner" | "admin"),
        Rpc::Describe
        | Rpc::GetRequest
        | Rpc::ListRequests
        | Rpc::ListFlowEvents
        | Rpc::ListDatabases => role != "none",
        Rpc::Approve => kind == "human" && matches!(role, "owner" | "admin"),
        Rpc::WhoAmI => true,
    };
    if allowed {
        Code::Ok
    } else {
        Code::PermissionDenied
    }
}

fn short(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::PermissionDenied => "DENIED",
        c => code_name(c),
    }
}

fn outcome<T>(r: Result<T, Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

/// The fixed world every cell runs against: project alpha (own) and beta (other).
struct World {
    /// A managed database of each project, for Delete and Describe.
    managed: BTreeMap<&'static str, String>,
    /// A request of each project, for GetRequest and ListFlowEvents.
    request: BTreeMap<&'static str, String>,
}

async fn managed(server: &TestServer, requester: &P, approver: &P, prefix: &str) -> String {
    let name = unique(prefix);
    let r = server
        .as_(requester)
        .await
        .create("dev", &name)
        .await
        .unwrap();
    let a = server
        .as_(approver)
        .await
        .approve(&r.request_id)
        .await
        .unwrap();
    assert_eq!(a.status, "applied", "{}", a.message);
    name
}

/// A fresh open create request of `project`, by that project's static agent.
async fn open_request(server: &TestServer, project: &str) -> String {
    let agent = if project == "alpha" {
        &AGENT_A
    } else {
        &AGENT_B
    };
    server
        .as_(agent)
        .await
        .create("dev", &unique("mx_req"))
        .await
        .unwrap()
        .request_id
}

async fn run_cell(
    server: &TestServer,
    world: &World,
    caller: &Caller,
    rpc: Rpc,
    own: bool,
) -> (Code, String) {
    let project = if own { "alpha" } else { "beta" };
    let mut c = caller.client.clone();
    match rpc {
        Rpc::Create => outcome(
            caller
                .create_req(proto::CreateDatabaseRequest {
                    environment: "dev".into(),
                    database_name: unique("mx_new"),
                    project_id: project.into(),
                    dry_run: false,
                })
                .await,
        ),
        Rpc::Delete => outcome(
            caller
                .delete_req(proto::DeleteDatabaseRequest {
                    environment: "dev".into(),
                    database_name: world.managed[project].clone(),
                    project_id: project.into(),
                    confirm_delete: true,
                    dry_run: false,
                })
                .await,
        ),
        Rpc::Describe => outcome(
            c.describe(caller.request(proto::DescribeDatabaseRequest {
                environment: "dev".into(),
                database_name: world.managed[project].clone(),
                project_id: project.into(),
            }))
            .await,
        ),
        Rpc::Approve => {
            // A fresh request per cell: an approval that succeeds finishes it.
            let id = open_request(server, project).await;
            outcome(caller.approve(&id).await)
        }
        Rpc::GetRequest => outcome(caller.get_request(&world.request[project]).await),
        Rpc::ListRequests => outcome(
            c.list_requests(caller.request(proto::ListRequestsRequest {
                project_id: project.into(),
                ..Default::default()
            }))
            .await,
        ),
        Rpc::ListFlowEvents => outcome(caller.events_by_request(&world.request[project]).await),
        Rpc::ListDatabases => outcome(
            c.list_databases(caller.request(proto::ListDatabasesRequest {
                project_id: project.into(),
                ..Default::default()
            }))
            .await,
        ),
        Rpc::WhoAmI => outcome(c.who_am_i(caller.request(proto::WhoAmIRequest {})).await),
    }
}

/// (rpc, own project?) -> (got, want, message)
type Row = BTreeMap<(Rpc, bool), (Code, Code, String)>;
/// (kind index, role index) -> row
type Grid = BTreeMap<(usize, usize), Row>;

#[tokio::test]
async fn every_rpc_by_kind_role_and_project_gets_the_expected_code() {
    let server = TestServer::start_with(run_token_options("")).await;
    let mut world = World {
        managed: BTreeMap::new(),
        request: BTreeMap::new(),
    };
    world.managed.insert(
        "alpha",
        managed(&server, &AGENT_A, &OWNER_A, "mx_own").await,
    );
    world.managed.insert(
        "beta",
        managed(&server, &AGENT_B, &OWNER_B, "mx_other").await,
    );
    world
        .request
        .insert("alpha", open_request(&server, "alpha").await);
    world
        .request
        .insert("beta", open_request(&server, "beta").await);

    let mut grid: Grid = BTreeMap::new();
    let mut wrong = 0;
    for (ki, kind) in KINDS.iter().enumerate() {
        for (ri, role) in ROLES.iter().enumerate() {
            let roles: &[&str] = if *role == "none" { &[] } else { &[*role] };
            let token = run_token(
                &format!("mx-{kind}-{role}"),
                kind,
                &["alpha"],
                roles,
                Some(&format!("mx-run-{kind}-{role}")),
            );
            let caller = server.with_token(&token).await;
            let row = grid.entry((ki, ri)).or_default();
            for rpc in RPCS {
                for own in [true, false] {
                    let (got, msg) = run_cell(&server, &world, &caller, rpc, own).await;
                    let want = expected(rpc, kind, role, own);
                    if got != want {
                        wrong += 1;
                    }
                    row.insert((rpc, own), (got, want, msg));
                }
            }
        }
    }

    if wrong > 0 {
        let mut out = format!("{wrong} cells differ (got !want):\n{:<18}", "kind/role");
        for rpc in RPCS {
            out.push_str(&format!("{:<26}", format!("{rpc:?} own|other")));
        }
        out.push('\n');
        let mut details = String::new();
        for ((ki, ri), row) in &grid {
            out.push_str(&format!("{:<18}", format!("{}/{}", KINDS[*ki], ROLES[*ri])));
            for rpc in RPCS {
                let cell = |own: bool| {
                    let (got, want, _) = &row[&(rpc, own)];
                    if got == want {
                        short(*got).to_string()
                    } else {
                        format!("{}!{}", short(*got), short(*want))
                    }
                };
                out.push_str(&format!(
                    "{:<26}",
                    format!("{} | {}", cell(true), cell(false))
                ));
                for own in [true, false] {
                    let (got, want, msg) = &row[&(rpc, own)];
                    if got != want {
                        details.push_str(&format!(
                            "  {}/{} {rpc:?} {}: got {} want {}: {msg}\n",
                            KINDS[*ki],
                            ROLES[*ri],
                            if own { "own" } else { "other" },
                            short(*got),
                            short(*want)
                        ));
                    }
                }
            }
            out.push('\n');
        }
        panic!("{out}\n{details}");
    }
    // Every RPC × 3 kinds × 5 roles × 2 projects.
    let cells: usize = grid.values().map(|r| r.len()).sum();
    assert_eq!(cells, RPCS.len() * KINDS.len() * ROLES.len() * 2);
}

fn alpha_create(name: &str) -> proto::CreateDatabaseRequest {
    proto::CreateDatabaseRequest {
        environment: "dev".into(),
        database_name: name.into(),
        project_id: "alpha".into(),
        dry_run: false,
    }
}

#[tokio::test]
async fn named_cases_four_eyes_scope_and_approval_modes() {
    let server = TestServer::start_with(run_token_options(
        "[environments.staging]\ncreate_approval = \"delegated\"\n",
    ))
    .await;

    // An agent cannot approve, even holding every role with a wildcard scope.
    let root_agent = server
        .with_token(&run_token(
            "agent-all-roles",
            "agent",
            &["*"],
            &["requester", "owner", "delegate", "admin"],
            Some("r1"),
        ))
        .await;
    let id = open_request(&server, "alpha").await;
    let s = expect_code(root_agent.approve(&id).await, Code::PermissionDenied);
    assert!(
        s.message().contains("only people approve"),
        "{}",
        s.message()
    );

    // A requester that also holds the owner role cannot approve its own request —
    // not from another run (another run id, same subject) and not as a static token.
    let max = run_token(
        "maxine",
        "human",
        &["alpha"],
        &["requester", "owner"],
        Some("run-a"),
    );
    let max_again = run_token(
        "maxine",
        "human",
        &["alpha"],
        &["requester", "owner"],
        Some("run-b"),
    );
    let own = server
        .with_token(&max)
        .await
        .create("dev", &unique("mx_four_eyes"))
        .await
        .unwrap();
    for token in [&max, &max_again] {
        let s = expect_code(
            server
                .with_token(token)
                .await
                .approve(&own.request_id)
                .await,
            Code::PermissionDenied,
        );
        assert!(s.message().contains("four-eyes"), "{}", s.message());
    }
    let multi = server.as_(&MULTI).await;
    let own_static = multi
        .create_req(alpha_create(&unique("mx_four_eyes")))
        .await
        .unwrap();
    let s = expect_code(
        multi.approve(&own_static.request_id).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains("four-eyes"), "{}", s.message());
    // ...nor deny it; another owner can.
    expect_code(
        multi.deny(&own_static.request_id, "changed my mind").await,
        Code::PermissionDenied,
    );
    assert_eq!(
        server
            .as_(&OWNER_A)
            .await
            .approve(&own.request_id)
            .await
            .unwrap()
            .status,
        "applied"
    );

    // An admin is bound by the four-eyes rule too.
    let admin = server
        .with_token(&run_token(
            "ada",
            "human",
            &["*"],
            &["requester", "admin"],
            None,
        ))
        .await;
    let by_admin = admin
        .create_req(alpha_create(&unique("mx_admin")))
        .await
        .unwrap();
    expect_code(
        admin.approve(&by_admin.request_id).await,
        Code::PermissionDenied,
    );

    // An owner of project A cannot approve project B's request (static and run
    // token); a wildcard admin can.
    let beta_req = open_request(&server, "beta").await;
    let s = expect_code(
        server.as_(&OWNER_A).await.approve(&beta_req).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains("scope"), "{}", s.message());
    let alpha_owner = run_token("olivia", "human", &["alpha"], &["owner"], None);
    expect_code(
        server
            .with_token(&alpha_owner)
            .await
            .approve(&beta_req)
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(
        stored_state(&server, &beta_req).await.as_deref(),
        Some("requested")
    );
    assert_eq!(
        server
            .as_(&ADMIN)
            .await
            .approve(&beta_req)
            .await
            .unwrap()
            .status,
        "applied"
    );

    // Delegates approve in delegated environments only.
    let delegate = server
        .with_token(&run_token("dora", "human", &["alpha"], &["delegate"], None))
        .await;
    let agent = server.as_(&AGENT_A).await;
    let owner_mode = agent.create("dev", &unique("mx_deleg")).await.unwrap();
    expect_code(
        delegate.approve(&owner_mode.request_id).await,
        Code::PermissionDenied,
    );
    let delegated = agent.create("staging", &unique("mx_deleg")).await.unwrap();
    assert_eq!(
        delegate
            .approve(&delegated.request_id)
            .await
            .unwrap()
            .status,
        "applied"
    );

    // A principal without roles reads nothing (policy fix: queries need a role, as
    // Describe does).
    let nobody = server
        .with_token(&run_token("nobody", "human", &["alpha"], &[], None))
        .await;
    let s = expect_code(
        nobody.get_request(&owner_mode.request_id).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains("roles"), "{}", s.message());
}
