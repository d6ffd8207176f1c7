//! PostgreSQL that stops answering without refusing: its postmaster and backends are
//! frozen with SIGSTOP, which is what a frozen host or a blackholed network looks
//! like to the service (connections stay open, the kernel still acknowledges, nothing
//! answers). Everything the service awaits is bounded (`database_timeout`,
//! `ddl_timeout`), so calls answer UNAVAILABLE instead of hanging, and after SIGCONT
//! the service recovers by itself.
//!
//! * The whole cluster (metadata and target) frozen: Describe, Create and WhoAmI
//!   answer UNAVAILABLE (`metadata database did not answer within …`), health turns
//!   NOT_SERVING; after SIGCONT health returns to SERVING and calls succeed, without
//!   a restart.
//! * Only a target cluster frozen (a second throwaway cluster), metadata up: Describe
//!   and Create in its environment answer UNAVAILABLE naming the target and are
//!   audited; an Approve of a create there answers OK `in_progress`/APPROVED with
//!   `apply.deferred` recorded; after SIGCONT the recovery loop applies it.
//! * A CREATE DATABASE held up on the server past `ddl_timeout`: the Approve answers
//!   `in_progress`/APPROVED, the request stays `approved` with `apply.deferred`, and
//!   once the statement can go through, the recovery loop finishes the request.
//!
//! This binary has its own cluster, which its first test freezes; the tests take
//! turns (`SERIAL`), and a frozen cluster is always resumed by a drop guard, also
//! when an assertion fails. The client-side timeouts are guards against a hang, far
//! above the configured bounds, not timing assertions.
mod common;
use common::*;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use db_lifecycle::{devcluster::TempCluster, domain::DatabaseName, proto};
use tonic::{Code, Status};

/// The tests of this binary freeze the shared cluster or depend on it: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the servers of these tests are configured with.
const DATABASE_TIMEOUT: &str = "2s";
/// A call that takes longer than this hung (the bound is seconds).
const HANG_GUARD: Duration = Duration::from_secs(60);
const LIMIT: Duration = Duration::from_secs(90);

/// A cluster's postmaster and all its children stopped with SIGSTOP; dropping this
/// resumes them (SIGCONT), so a failing assertion never leaves the cluster frozen.
struct Frozen {
    postmaster: String,
    children: Vec<String>,
}

fn signal(sig: &str, pids: &[String]) {
    if pids.is_empty() {
        return;
    }
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids)
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pids:?} failed");
}

fn children_of(pid: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-P", pid])
        .output()
        .expect("run pgrep");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl Frozen {
    fn cluster(data_dir: &Path) -> Frozen {
        let pidfile =
            std::fs::read_to_string(data_dir.join("postmaster.pid")).expect("read postmaster.pid");
        let postmaster = pidfile.lines().next().unwrap().trim().to_string();
        assert!(
            !postmaster.is_empty() && postmaster.bytes().all(|b| b.is_ascii_digit()),
            "postmaster.pid: {pidfile:?}"
        );
        // The postmaster first: stopped, it forks no new backends.
        signal("STOP", std::slice::from_ref(&postmaster));
        let mut frozen = Frozen {
            postmaster,
            children: Vec::new(),
        };
        frozen.children = children_of(&frozen.postmaster);
        signal("STOP", &frozen.children);
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Best effort in a drop (maybe during a panic): no assertion here.
        let mut pids = vec![self.postmaster.clone()];
        pids.extend(self.children.iter().cloned());
        pids.extend(children_of(&self.postmaster));
        let _ = Command::new("kill").arg("-CONT").args(&pids).status();
    }
}

/// Run a call with the hang guard: its result, or a panic naming what hung.
async fn answered<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = Instant::now();
    let r = tokio::time::timeout(HANG_GUARD, call)
        .await
        .unwrap_or_else(|_| panic!("{what} got no answer within {HANG_GUARD:?}"));
    eprintln!("{what}: answered after {:?}", started.elapsed());
    r
}

/// An UNAVAILABLE whose message says what did not answer, and to retry.
#[track_caller]
fn assert_unavailable<T: std::fmt::Debug>(r: Result<T, Status>, needle: &str) -> Status {
    let s = expect_code(r, Code::Unavailable);
    assert!(
        s.message().contains(needle) && s.message().contains("retry"),
        "wanted `{needle}` and `retry` in: {}",
        s.message()
    );
    // Status messages never carry connection strings (passwords).
    assert!(
        !s.message().contains(cluster().password()),
        "{}",
        s.message()
    );
    s
}

async fn who_am_i(c: &Caller) -> Result<proto::WhoAmIResponse, Status> {
    let mut client = c.client.clone();
    client
        .who_am_i(c.request(proto::WhoAmIRequest {}))
        .await
        .map(|r| r.into_inner())
}

/// Poll until `call` succeeds (the service recovering by itself); panics after LIMIT.
async fn eventually_ok<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + LIMIT;
    loop {
        match tokio::time::timeout(HANG_GUARD, call()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(s)) => assert!(
                Instant::now() < deadline,
                "{what} did not succeed again: {} {}",
                s.code(),
                s.message()
            ),
            Err(_) => panic!("{what} hung after the cluster was resumed"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_cluster_fails_fast_and_recovers_without_restart() {
    let _turn = SERIAL.lock().await;
    let mut server = TestServer::start_with(Options {
        extra_toml: format!("database_timeout = \"{DATABASE_TIMEOUT}\"\n"),
        ..Default::default()
    })
    .await;
    let pid = server.pid();
    let agent = server.as_(&AGENT_A).await;
    let before = unique("frz_before");
    let queued = agent.create("dev", &before).await.unwrap();
    assert_eq!(queued.status, "approval_required", "{}", queued.message);
    // Open pooled connections to both the metadata database and the target: the
    // statements on them are what used to hang.
    agent.describe("dev", &before).await.unwrap();

    {
        let _frozen = Frozen::cluster(cluster().data_dir());
        let s = answered("Describe", agent.describe("dev", &before)).await;
        assert_unavailable(s, "metadata database did not answer within 2s");
        let s = answered("Create", agent.create("dev", &unique("frz_during"))).await;
        assert_unavailable(s, "metadata database did not answer within 2s");
        let s = answered("WhoAmI", who_am_i(&agent)).await;
        assert_unavailable(s, "metadata database did not answer within 2s");
        assert!(
            server.wait_health(false, LIMIT).await,
            "health must turn NOT_SERVING while the metadata database does not answer"
        );
        // Again, now that the pooled connections that timed out were closed: the
        // new connections the pool tries to open do not answer either.
        let s = answered("Describe", agent.describe("dev", &before)).await;
        assert_unavailable(s, "metadata database did not answer within 2s");
    }

    // Resumed: the service recovers by itself.
    assert!(
        server.wait_health(true, LIMIT).await,
        "health must return to SERVING once the cluster answers again; log:\n{}",
        server.log()
    );
    let described = eventually_ok("Describe", || agent.describe("dev", &before)).await;
    assert!(!described.exists);
    let after = unique("frz_after");
    let created = eventually_ok("Create", || agent.create("dev", &after)).await;
    assert_eq!(created.status, "approval_required", "{}", created.message);
    eventually_ok("WhoAmI", || who_am_i(&agent)).await;
    // The request acknowledged before the freeze is still there and can be applied.
    let owner = server.as_(&OWNER_A).await;
    let applied = owner.approve(&queued.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(db_exists(&before).await);
    assert!(server.is_running(), "the server must survive the freeze");
    assert_eq!(server.pid(), pid, "the server was not restarted");
    let log = server.log();
    assert!(log.contains("NOT_SERVING"), "{log}");
    assert!(!log.contains(cluster().password()), "password in the log");
    drop_by_hand(&before).await;
}

/// A second throwaway cluster, the target of environment `staging` (`remote`).
async fn remote_server(remote: &TempCluster, extra: &str) -> TestServer {
    TestServer::start_with(Options {
        extra_toml: format!(
            "database_timeout = \"{DATABASE_TIMEOUT}\"\n{extra}\n[targets.remote]\nadmin_url = \"{}\"\n\n[environments.staging]\ntarget = \"remote\"\n",
            remote.url("postgres")
        ),
        ..Default::default()
    })
    .await
}

async fn exists_on(c: &TempCluster, name: &str) -> bool {
    c.connect("postgres")
        .await
        .unwrap()
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_target_defers_applies_until_it_answers_again() {
    let _turn = SERIAL.lock().await;
    let remote = TempCluster::start().await.expect("start a second cluster");
    let server = remote_server(&remote, "").await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("frz_remote");
    let queued = agent.create("staging", &name).await.unwrap();
    assert_eq!(queued.status, "approval_required", "{}", queued.message);
    let rid = queued.request_id.clone();
    agent.describe("staging", &name).await.unwrap();

    {
        let _frozen = Frozen::cluster(remote.data_dir());
        let needle = "target cluster `remote` did not answer within 2s";

        // Calls in the frozen target's environment answer UNAVAILABLE, and since
        // the metadata database answers, each is audited.
        let s = answered("Describe", agent.describe("staging", &name)).await;
        let s = assert_unavailable(s, needle);
        assert_refusal_recorded(&server, &s, "UNAVAILABLE").await;
        let s = answered("Create", agent.create("staging", &unique("frz_remote_x"))).await;
        let s = assert_unavailable(s, needle);
        assert_refusal_recorded(&server, &s, "UNAVAILABLE").await;

        // The approval is committed, the apply cannot run: OK, in_progress.
        let r = answered("Approve", owner.approve(&rid))
            .await
            .expect("a committed approval must not be answered as an error");
        assert_eq!(r.status, "in_progress", "{}", r.message);
        assert_eq!(r.approval_state, proto::ApprovalState::Approved as i32);
        assert!(
            r.message.contains("retried automatically") && r.message.contains(needle),
            "{}",
            r.message
        );
        assert_eq!(
            stored_state(&server, &rid).await.as_deref(),
            Some("approved")
        );
        assert!(request_event_count(&server, &rid, "apply.deferred").await >= 1);

        // Health follows the metadata database; other environments are served.
        assert_eq!(
            server.health().await,
            Some(true),
            "health must stay SERVING"
        );
        let dev = answered("Describe dev", agent.describe("dev", &name))
            .await
            .unwrap();
        assert!(!dev.exists);

        // Recovery passes while the target is frozen keep it approved.
        let deferred = request_event_count(&server, &rid, "apply.deferred").await;
        let deadline = Instant::now() + LIMIT;
        while request_event_count(&server, &rid, "apply.deferred").await <= deferred {
            assert!(
                Instant::now() < deadline,
                "the recovery loop never retried the deferred apply"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            stored_state(&server, &rid).await.as_deref(),
            Some("approved")
        );
    }

    // Resumed: the recovery loop applies the request, calls succeed again.
    assert_eq!(
        wait_final(&server, &rid, LIMIT).await.as_deref(),
        Some("applied"),
        "log:\n{}",
        server.log()
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.applied").await,
        1
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.failed").await,
        0
    );
    assert!(exists_on(&remote, &name).await);
    let described = eventually_ok("Describe", || agent.describe("staging", &name)).await;
    assert!(described.exists && described.owned_by_project);
    assert_eq!(server.health().await, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_cut_off_by_its_bound_is_deferred_and_finished_by_recovery() {
    let _turn = SERIAL.lock().await;
    let remote = TempCluster::start().await.expect("start a second cluster");
    let server = remote_server(&remote, "ddl_timeout = \"3s\"").await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("frz_ddl");
    let queued = agent.create("staging", &name).await.unwrap();
    let rid = queued.request_id.clone();
    let staging = DatabaseName::staging_for(uuid::Uuid::parse_str(&rid).unwrap());

    // Hold the apply's CREATE DATABASE up on the server: an open transaction that
    // renamed a database to the apply's staging name makes the CREATE wait on the
    // catalog's unique index until it ends.
    let blocker = remote.connect("postgres").await.unwrap();
    blocker
        .batch_execute("CREATE DATABASE frz_placeholder")
        .await
        .unwrap();
    blocker
        .batch_execute(&format!(
            "BEGIN; ALTER DATABASE frz_placeholder RENAME TO {}",
            staging.quoted()
        ))
        .await
        .unwrap();

    let r = answered("Approve", owner.approve(&rid))
        .await
        .expect("a committed approval must not be answered as an error");
    assert_eq!(r.status, "in_progress", "{}", r.message);
    assert_eq!(r.approval_state, proto::ApprovalState::Approved as i32);
    assert!(
        r.message
            .contains("target cluster `remote` did not answer within 3s")
            && r.message.contains("retried automatically"),
        "{}",
        r.message
    );
    assert_eq!(
        stored_state(&server, &rid).await.as_deref(),
        Some("approved")
    );
    assert!(request_event_count(&server, &rid, "apply.deferred").await >= 1);
    assert!(!exists_on(&remote, &name).await);

    // The statement can go through: the CREATE left running on the server by the
    // attempt that timed out (or a retry's) makes the staging database, and the
    // recovery loop takes it from there, once.
    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        wait_final(&server, &rid, LIMIT).await.as_deref(),
        Some("applied"),
        "log:\n{}",
        server.log()
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.applied").await,
        1
    );
    assert_eq!(
        request_event_count(&server, &rid, "request.failed").await,
        0
    );
    assert!(exists_on(&remote, &name).await);
    assert!(!exists_on(&remote, staging.as_str()).await);
    let described = agent.describe("staging", &name).await.unwrap();
    assert!(described.exists && described.owned_by_project);
}
