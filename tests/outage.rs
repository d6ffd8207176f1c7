//! PostgreSQL goes away and comes back (issue 4, item 2), through a real server under
//! a light load. This binary has its own throwaway cluster, because stopping it
//! affects every test that shares it; its tests take turns (`SERIAL`).
//!
//! * The whole cluster (metadata and target) stops: calls fail fast with UNAVAILABLE
//!   and a clear message, health turns NOT_SERVING, and once the cluster is back
//!   health returns to SERVING and calls succeed, without restarting the server; no
//!   request that was acknowledged is lost.
//! * Only a target cluster is unreachable (metadata up): calls for its environment
//!   fail with UNAVAILABLE naming the target, other environments and health are
//!   unaffected; an approved request whose apply hit UNAVAILABLE stays approved (the
//!   Approve is answered OK, `in_progress`) and the recovery loop applies it once the
//!   target is back. The target is the same
//!   cluster reached through a TCP proxy that the test switches off and on.
//!
//! The client-side timeouts are guards against a hang, not timing assertions.
mod common;
use common::*;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};
use tonic::Code;

/// The tests of this binary stop the shared cluster or depend on it: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A call that takes longer than this is a hang (the service must fail fast).
const HANG_GUARD: Duration = Duration::from_secs(20);
const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
enum Outcome {
    /// Create returned OK with a request id: the request was acknowledged.
    Acked {
        request_id: String,
    },
    Refused {
        code: Code,
        message: String,
    },
    Hung,
}

/// A light load: one Create (new name) and one Describe at a time, in a loop.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    task: JoinHandle<()>,
}

impl Load {
    async fn start(server: &TestServer, env: &'static str) -> Load {
        let agent = server.as_(&AGENT_A).await;
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let stop = stop.clone();
            let outcomes = outcomes.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let name = unique("out_load");
                    let created = tokio::time::timeout(HANG_GUARD, agent.create(env, &name)).await;
                    let described =
                        tokio::time::timeout(HANG_GUARD, agent.describe(env, &name)).await;
                    {
                        let mut out = outcomes.lock().unwrap();
                        out.push(match created {
                            Err(_) => Outcome::Hung,
                            Ok(Ok(r)) => {
                                assert!(!r.request_id.is_empty(), "OK without a request id: {r:?}");
                                Outcome::Acked {
                                    request_id: r.request_id,
                                }
                            }
                            Ok(Err(s)) => Outcome::Refused {
                                code: s.code(),
                                message: s.message().to_string(),
                            },
                        });
                        out.push(match described {
                            Err(_) => Outcome::Hung,
                            Ok(Ok(_)) => Outcome::Acked {
                                request_id: String::new(),
                            },
                            Ok(Err(s)) => Outcome::Refused {
                                code: s.code(),
                                message: s.message().to_string(),
                            },
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Load {
            stop,
            outcomes,
            task,
        }
    }

    fn len(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Wait until, from index `from` on, `pred` held for `n` outcomes.
    async fn wait_for(&self, from: usize, n: usize, what: &str, pred: impl Fn(&Outcome) -> bool) {
        let deadline = std::time::Instant::now() + LIMIT;
        loop {
            let seen = self.outcomes.lock().unwrap()[from..]
                .iter()
                .filter(|o| pred(o))
                .count();
            if seen >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waited in vain for {n} {what}; outcomes: {:?}",
                &self.outcomes.lock().unwrap()[from..]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("load task panicked");
        Arc::try_unwrap(self.outcomes)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

fn is_acked_create(o: &Outcome) -> bool {
    matches!(o, Outcome::Acked { request_id } if !request_id.is_empty())
}

fn is_ok(o: &Outcome) -> bool {
    matches!(o, Outcome::Acked { .. })
}

fn is_refused(o: &Outcome) -> bool {
    matches!(o, Outcome::Refused { .. })
}

/// Every outcome is OK or UNAVAILABLE with a message that says so; none hung.
fn assert_fail_fast_unavailable(outcomes: &[Outcome], needle: &str) {
    for o in outcomes {
        match o {
            Outcome::Acked { .. } => {}
            Outcome::Hung => panic!("a call hung during the outage: {outcomes:?}"),
            Outcome::Refused { code, message } => {
                assert_eq!(
                    *code,
                    Code::Unavailable,
                    "during the outage every failure must be UNAVAILABLE: {message}"
                );
                assert!(
                    message.contains(needle) && message.contains("retry"),
                    "unclear UNAVAILABLE message (wanted `{needle}` and `retry`): {message}"
                );
            }
        }
    }
}

/// Request ids of the acknowledged creates that are in approval_requests.
async fn stored_ids(server: &TestServer, ids: &[String]) -> Vec<String> {
    server
        .meta()
        .await
        .query(
            "SELECT id::text FROM approval_requests WHERE id::text = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_outage_fails_fast_and_recovers_without_restart() {
    let _turn = SERIAL.lock().await;
    let mut server = TestServer::start().await;
    let pid = server.pid();
    let owner = server.as_(&OWNER_A).await;
    let load = Load::start(&server, "dev").await;
    load.wait_for(
        0,
        3,
        "acknowledged creates before the outage",
        is_acked_create,
    )
    .await;

    cluster().stop().await.expect("stop the cluster");
    let stopped_at = load.len();
    load.wait_for(stopped_at, 4, "refusals during the outage", is_refused)
        .await;
    assert!(
        server.wait_health(false, LIMIT).await,
        "health must turn NOT_SERVING while the metadata database is down"
    );
    // A decision on an acknowledged request cannot be taken now; it fails fast too.
    let acked_before: Vec<String> = load.outcomes.lock().unwrap()[..stopped_at]
        .iter()
        .filter_map(|o| match o {
            Outcome::Acked { request_id } if !request_id.is_empty() => Some(request_id.clone()),
            _ => None,
        })
        .collect();
    let s = tokio::time::timeout(HANG_GUARD, owner.approve(&acked_before[0]))
        .await
        .expect("Approve hung during the outage");
    let s = expect_code(s, Code::Unavailable);
    assert!(
        s.message().contains("unavailable"),
        "unclear message: {}",
        s.message()
    );
    let during = load.outcomes.lock().unwrap()[stopped_at..].to_vec();

    cluster().restart().await.expect("restart the cluster");
    let restarted_at = load.len();
    assert!(
        server.wait_health(true, LIMIT).await,
        "health must return to SERVING once the metadata database is back"
    );
    load.wait_for(
        restarted_at,
        3,
        "acknowledged creates after the outage",
        is_acked_create,
    )
    .await;
    let outcomes = load.finish().await;

    assert_fail_fast_unavailable(&during, "unavailable");
    assert_fail_fast_unavailable(&outcomes, "unavailable");
    assert!(
        outcomes[restarted_at..].iter().any(is_ok),
        "no call succeeded after the outage"
    );
    assert!(server.is_running(), "the server must survive the outage");
    assert_eq!(server.pid(), pid, "the server was not restarted");

    // No acknowledged request is lost.
    let acked: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Acked { request_id } if !request_id.is_empty() => Some(request_id.clone()),
            _ => None,
        })
        .collect();
    let stored = stored_ids(&server, &acked).await;
    for id in &acked {
        assert!(stored.contains(id), "acknowledged request {id} was lost");
    }
    for id in &acked {
        assert_eq!(
            stored_state(&server, id).await.as_deref(),
            Some("requested"),
            "request {id}"
        );
    }

    // A request acknowledged before the outage can be approved and applied after it.
    let applied = owner.approve(&acked_before[0]).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(db_exists(&applied.database_name).await);
    assert_eq!(
        request_event_count(&server, &acked_before[0], "request.applied").await,
        1
    );
    let log = server.log();
    assert!(log.contains("NOT_SERVING"), "{log}");
    drop_by_hand(&applied.database_name).await;
}

// ---------- target down, metadata up ----------

/// A TCP proxy in front of the cluster's port that can be switched off (port closed,
/// open connections cut) and on again (same port).
struct Proxy {
    port: u16,
    upstream: u16,
    accept: Mutex<Option<AbortHandle>>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Arc<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Proxy {
            port: listener.local_addr().unwrap().port(),
            upstream,
            accept: Mutex::new(None),
            conns: Arc::new(Mutex::new(Vec::new())),
        });
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream;
        let conns = self.conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(conn.abort_handle());
            }
        });
        *self.accept.lock().unwrap() = Some(task.abort_handle());
    }

    /// Close the port and cut every open connection.
    fn down(&self) {
        if let Some(accept) = self.accept.lock().unwrap().take() {
            accept.abort();
        }
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    async fn up(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 100, "cannot rebind proxy port {}: {e}", self.port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        self.serve(listener);
    }

    fn admin_url(&self) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres",
            cluster().password(),
            self.port
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_outage_defers_applies_until_the_target_returns() {
    let _turn = SERIAL.lock().await;
    let proxy = Proxy::start(cluster().port()).await;
    let server = TestServer::start_with(Options {
        extra_toml: format!(
            "[targets.remote]\nadmin_url = \"{}\"\n\n[environments.staging]\ntarget = \"remote\"\n",
            proxy.admin_url()
        ),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("out_remote");
    let later = unique("out_remote_later");

    // Queued while the target is up: the create through the proxy is acknowledged.
    let queued = agent.create("staging", &name).await.unwrap();
    assert_eq!(queued.status, "approval_required", "{}", queued.message);
    let rid = queued.request_id.clone();

    proxy.down();
    let load = Load::start(&server, "staging").await;
    load.wait_for(0, 4, "refusals while the target is down", is_refused)
        .await;

    // Calls for the target's environment fail fast, naming the target.
    let s = tokio::time::timeout(HANG_GUARD, agent.describe("staging", &name))
        .await
        .expect("Describe hung while the target was down");
    let s = expect_code(s, Code::Unavailable);
    assert!(
        s.message().contains("target cluster `remote` unavailable"),
        "{}",
        s.message()
    );
    let s = tokio::time::timeout(HANG_GUARD, agent.create("staging", &later))
        .await
        .expect("Create hung while the target was down");
    expect_code(s, Code::Unavailable);

    // The approval is recorded, the apply cannot run: the request stays approved,
    // and the caller is told so (OK, in_progress), not that the decision failed.
    let r = tokio::time::timeout(HANG_GUARD, owner.approve(&rid))
        .await
        .expect("Approve hung while the target was down")
        .expect("a committed approval must not be answered as an error");
    assert_eq!(r.status, "in_progress", "{}", r.message);
    assert_eq!(
        r.approval_state,
        db_lifecycle::proto::ApprovalState::Approved as i32
    );
    assert!(
        r.message.contains("approved")
            && r.message.contains("retried automatically")
            && r.message.contains("target cluster `remote` unavailable"),
        "{}",
        r.message
    );
    assert_eq!(
        stored_state(&server, &rid).await.as_deref(),
        Some("approved")
    );
    assert!(request_event_count(&server, &rid, "apply.deferred").await >= 1);

    // Other environments (another target) and health are unaffected: health follows
    // the metadata database, which is up.
    let dev = agent.describe("dev", &name).await.unwrap();
    assert!(!dev.exists);
    assert_eq!(
        server.health().await,
        Some(true),
        "health must stay SERVING"
    );

    // Recovery passes come and go while the target is down: still approved, never
    // failed.
    let deferred = request_event_count(&server, &rid, "apply.deferred").await;
    let deadline = std::time::Instant::now() + LIMIT;
    while request_event_count(&server, &rid, "apply.deferred").await <= deferred {
        assert!(
            std::time::Instant::now() < deadline,
            "the recovery loop never retried the deferred apply"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stored_state(&server, &rid).await.as_deref(),
        Some("approved")
    );
    assert!(!db_exists(&name).await);

    proxy.up().await;
    let state = wait_final(&server, &rid, LIMIT).await;
    assert_eq!(
        state.as_deref(),
        Some("applied"),
        "the recovery loop must apply the request once the target is back; log:\n{}",
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
    assert!(db_exists(&name).await);
    let target: String = server
        .meta()
        .await
        .query_one(
            "SELECT target_cluster FROM project_databases WHERE database_name = $1 \
             AND state = 'active'",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(target, "remote");

    // Calls for the environment succeed again, without a restart.
    load.wait_for(
        load.len(),
        2,
        "successful calls after the target returned",
        is_ok,
    )
    .await;
    let outcomes = load.finish().await;
    assert_fail_fast_unavailable(&outcomes, "target cluster `remote` unavailable");
    let described = agent.describe("staging", &name).await.unwrap();
    assert!(described.exists && described.owned_by_project);
    // Acknowledged creates of the load are all stored.
    let acked: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Acked { request_id } if !request_id.is_empty() => Some(request_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(stored_ids(&server, &acked).await.len(), acked.len());
    drop_by_hand(&name).await;
}
