//! Graceful shutdown under load (issue 4, item 6), through a real server process:
//! with an Approve in flight (held on its apply lock by the test, so it is certainly
//! running when the signal arrives) and a stream of Describe calls, SIGTERM makes
//! health NOT_SERVING first, refuses new calls, lets the in-flight Approve finish
//! OK, then closes the pools and exits 0.
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

use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const GUARD: Duration = Duration::from_secs(30);
const SERVICE: &str = "dblifecycle.v1.DatabaseLifecycle";
const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// One Describe of the stream: OK, or the code and message it was refused with.
type Answer = Result<(), (Code, String)>;

/// The key the service's apply lock uses for a database on the default target.
fn apply_lock_key(name: &str) -> String {
    format!("db-lifecycle/default/{name}")
}

async fn waiting_advisory_locks(meta: &tokio_postgres::Client) -> i64 {
    meta.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_in_flight_calls_and_refuses_new_ones() {
    let server = TestServer::start_with(Options {
        // Long enough that the drain, not the grace timer, ends the process here.
        extra_toml: "shutdown_grace = \"120s\"\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("sd_inflight");
    let rid = agent.create("dev", &name).await.unwrap().request_id;

    // Hold the apply lock of this database from outside, so the Approve is
    // certainly in flight (waiting for the lock) when SIGTERM arrives.
    let meta = server.meta().await;
    let key = apply_lock_key(&name);
    meta.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key])
        .await
        .unwrap();
    let approve = {
        let rid = rid.clone();
        tokio::spawn(async move { owner.approve(&rid).await })
    };
    let deadline = std::time::Instant::now() + GUARD;
    while waiting_advisory_locks(&meta).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the Approve never waited for the apply lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A health watch on its own connection: an open stream sees every change.
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, SERVING);

    // A stream of Describe calls on one connection, recorded in order.
    let describer = server.as_(&AGENT_A).await;
    let stop = Arc::new(AtomicBool::new(false));
    let described: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let stream = {
        let stop = stop.clone();
        let described = described.clone();
        let name = name.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let r = tokio::time::timeout(GUARD, describer.describe("dev", &name))
                    .await
                    .expect("a Describe hung during shutdown");
                let failed = r.is_err();
                described.lock().unwrap().push(
                    r.map(|_| ())
                        .map_err(|s| (s.code(), s.message().to_string())),
                );
                if failed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let deadline = std::time::Instant::now() + GUARD;
    while described.lock().unwrap().len() < 5 {
        assert!(std::time::Instant::now() < deadline, "no Describe answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_signal = described.lock().unwrap().len();

    server.signal("TERM");

    // Health goes NOT_SERVING first: the open watch still gets the change.
    let next = tokio::time::timeout(GUARD, watch.message())
        .await
        .expect("health watch got nothing after SIGTERM")
        .expect("health watch failed instead of reporting NOT_SERVING")
        .expect("health watch ended instead of reporting NOT_SERVING");
    assert_eq!(next.status, NOT_SERVING);
    drop(watch);
    drop(health);

    // New calls are refused: new connections are refused once the listener closes,
    // and a connection that gets through before that is answered, never left hanging.
    let deadline = std::time::Instant::now() + GUARD;
    loop {
        let connect = tokio::time::timeout(
            GUARD,
            Channel::from_shared(format!("http://{}", server.addr))
                .unwrap()
                .connect(),
        )
        .await
        .expect("connecting hung during shutdown");
        match connect {
            Err(_) => break,
            Ok(channel) => {
                let mut client = HealthClient::new(channel);
                let r = tokio::time::timeout(
                    GUARD,
                    client.check(HealthCheckRequest {
                        service: SERVICE.into(),
                    }),
                )
                .await
                .expect("a call on a new connection hung during shutdown");
                if let Ok(r) = r {
                    assert_eq!(r.into_inner().status, NOT_SERVING);
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new connections were still accepted after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new call on a connection opened before the signal is refused as well.
    let r = tokio::time::timeout(GUARD, agent.describe("dev", &name))
        .await
        .expect("a new call on an old connection hung during shutdown");
    let s = r.expect_err("a new call was served after SIGTERM");
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());

    // The Describe stream: everything before the signal OK; afterwards only OK (in
    // flight) or UNAVAILABLE (refused), and it did end up refused.
    let deadline = std::time::Instant::now() + GUARD;
    while !stream.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the Describe stream was never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    stream.await.unwrap();
    let described = described.lock().unwrap().clone();
    assert!(
        described[..before_signal].iter().all(|r| r.is_ok()),
        "{described:?}"
    );
    for r in &described[before_signal..] {
        if let Err((code, message)) = r {
            assert_eq!(*code, Code::Unavailable, "{message}");
        }
    }
    assert!(described.last().unwrap().is_err());

    // The in-flight Approve is still running; once the lock is free it finishes OK.
    assert!(!approve.is_finished(), "the in-flight Approve ended early");
    meta.execute(
        "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
        &[&key],
    )
    .await
    .unwrap();
    let applied = tokio::time::timeout(GUARD, approve)
        .await
        .expect("the in-flight Approve never finished")
        .unwrap()
        .expect("the in-flight Approve failed during shutdown");
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(db_exists(&name).await);
    assert_eq!(
        stored_state(&server, &rid).await.as_deref(),
        Some("applied")
    );
    drop(meta);

    // Then the process closes its pools and exits 0, within the grace.
    let mut server = server;
    let (code, server) = tokio::time::timeout(
        GUARD,
        tokio::task::spawn_blocking(move || {
            let code = server.wait_exit();
            (code, server)
        }),
    )
    .await
    .expect("the server did not exit after its in-flight calls finished")
    .unwrap();
    let log = server.log();
    assert_eq!(code, Some(0), "log:\n{log}");
    let requested = log
        .find("shutdown requested: NOT_SERVING")
        .expect("no shutdown line");
    let stopped = log.find("db-lifecycle stopped").expect("no stopped line");
    assert!(requested < stopped, "{log}");
    assert!(
        !log.contains("shutdown grace elapsed"),
        "the drain, not the grace timer, must end the process:\n{log}"
    );
    // The apply finished before the pools closed.
    let applied_at = log.find("apply finished").expect("no apply line");
    assert!(applied_at < stopped, "{log}");
    drop_by_hand(&name).await;
}

/// An idle client connection does not keep a stopping server alive: without calls
/// in flight, SIGTERM ends the process with 0 by draining, not by the grace timer.
#[tokio::test]
async fn sigterm_with_idle_connections_exits_promptly() {
    let server = TestServer::start_with(Options {
        extra_toml: "shutdown_grace = \"120s\"\n".into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    agent.describe("dev", &unique("sd_idle")).await.unwrap();
    server.signal("TERM");
    let mut server = server;
    let (code, server) = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::task::spawn_blocking(move || {
            let code = server.wait_exit();
            (code, server)
        }),
    )
    .await
    .expect("the server did not exit")
    .unwrap();
    let log = server.log();
    assert_eq!(code, Some(0), "log:\n{log}");
    assert!(log.contains("db-lifecycle stopped"), "{log}");
    assert!(
        !log.contains("shutdown grace elapsed"),
        "an idle connection kept the server waiting for its grace:\n{log}"
    );
    drop(agent);
}
