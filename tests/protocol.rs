//! What arrives below or beside the handlers: calls the gRPC library refuses (no
//! message, an unknown method), compressed requests, the bearer header's edge cases,
//! decision reasons that would show a reader something else than what is stored, and
//! the audit rows of successful queries. Real server, real PostgreSQL.
mod common;
use common::*;

use db_lifecycle::proto::{self, database_lifecycle_client::DatabaseLifecycleClient};
use tonic::{Code, codec::CompressionEncoding};

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test]
async fn calls_the_library_refuses_are_answered_clearly_and_audited() {
    let server = TestServer::start().await;

    // A unary call with no message at all.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let none = grpc
        .client_streaming(
            authed(futures::stream::empty::<Vec<u8>>(), AGENT_A.token),
            http::uri::PathAndQuery::from_static("/dblifecycle.v1.DatabaseLifecycle/Describe"),
            RawCodec,
        )
        .await;
    let s = expect_code(none, Code::InvalidArgument);
    assert!(
        s.message().contains("no request message"),
        "{}",
        s.message()
    );
    let row = assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;
    assert_eq!(row.actor_id, AGENT_A.id, "{row:?}");

    // A method the service does not have: UNIMPLEMENTED (as gRPC says), named, audited.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let unknown = grpc
        .unary(
            authed(Vec::new(), AGENT_A.token),
            http::uri::PathAndQuery::from_static(
                "/dblifecycle.v1.DatabaseLifecycle/DropEverything",
            ),
            RawCodec,
        )
        .await;
    let s = expect_code(unknown, Code::Unimplemented);
    assert!(s.message().contains("`DropEverything`"), "{}", s.message());
    let row = assert_refusal_recorded(&server, &s, "UNIMPLEMENTED").await;
    assert_eq!(row.actor_id, AGENT_A.id, "{row:?}");

    // Without a valid token the unknown method is refused as unauthenticated first.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let anonymous = grpc
        .unary(
            tonic::Request::new(Vec::new()),
            http::uri::PathAndQuery::from_static(
                "/dblifecycle.v1.DatabaseLifecycle/DropEverything",
            ),
            RawCodec,
        )
        .await;
    expect_code(anonymous, Code::Unauthenticated);
    assert_eq!(request_count(&server).await, 0);
}

#[tokio::test]
async fn gzip_compressed_requests_are_served() {
    let server = TestServer::start().await;
    let name = unique("gzip");
    let mut client = DatabaseLifecycleClient::new(server.channel().await)
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let created = client
        .create(authed(
            proto::CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                ..Default::default()
            },
            AGENT_A.token,
        ))
        .await
        .expect("a gzip-compressed Create is served")
        .into_inner();
    assert_eq!(created.status, "approval_required", "{}", created.message);
    assert_eq!(created.database_name, name);
}

#[tokio::test]
async fn an_empty_bearer_is_missing_credentials() {
    let server = TestServer::start().await;
    for header in ["Bearer", "Bearer ", "bearer   "] {
        let caller = server.with_auth(Some(header)).await;
        let s = expect_code(caller.describe("dev", "x").await, Code::Unauthenticated);
        assert!(
            s.message().contains("missing credentials"),
            "{header:?}: {}",
            s.message()
        );
    }
}

/// A logged-in call refused for its correlation id is the caller's refusal: recorded
/// with its actor, and not dropped by the budget for anonymous refusals.
#[tokio::test]
async fn a_bad_correlation_id_of_a_known_caller_is_recorded_as_theirs() {
    let server = TestServer::start_with(Options {
        extra_toml:
            "[audit]\nunauthenticated_refusals_per_second = 1\nunauthenticated_refusal_burst = 1\n"
                .into(),
        ..Default::default()
    })
    .await;
    let agent = server.as_(&AGENT_A).await;
    for _ in 0..3 {
        let mut c = agent.client.clone();
        let r = c
            .describe(agent.request_with_correlation(
                proto::DescribeDatabaseRequest {
                    environment: "dev".into(),
                    database_name: "x".into(),
                    ..Default::default()
                },
                "bad id with spaces",
            ))
            .await;
        let s = expect_code(r, Code::InvalidArgument);
        let row = assert_refusal_recorded(&server, &s, "INVALID_ARGUMENT").await;
        assert_eq!(row.actor_id, AGENT_A.id, "{row:?}");
    }
}

#[tokio::test]
async fn decision_reasons_cannot_hide_or_reorder_text() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("reason");
    let created = agent.create("dev", &name).await.unwrap();
    for (decision, reason) in [
        ("approve", "fine \u{202E}deifirev\u{202C}"),
        ("deny", "\u{200B}"),
        ("deny", "no \u{2066}isolate\u{2069}"),
    ] {
        let r = owner
            .decide(&created.request_id, decision == "approve", reason)
            .await;
        let s = expect_code(r, Code::InvalidArgument);
        assert!(s.message().contains("reason"), "{}", s.message());
    }
    assert_eq!(
        stored_state(&server, &created.request_id).await.as_deref(),
        Some("requested")
    );
    // A multi-line reason is fine.
    let denied = owner
        .deny(&created.request_id, "not now:\nthe quota is spent")
        .await
        .unwrap();
    assert_eq!(denied.status, "denied");
}

/// Successful queries are in the audit trail too (`query.answered`, under the call's
/// own correlation id), but never inside a request's trail, however often it is read.
#[tokio::test]
async fn successful_queries_are_recorded_outside_the_requests_trail() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let name = unique("queries");
    let created = agent.create("dev", &name).await.unwrap();
    let trail_before = agent.events_by_request(&created.request_id).await.unwrap();
    for _ in 0..3 {
        agent.get_request(&created.request_id).await.unwrap();
    }
    let trail_after = agent.events_by_request(&created.request_id).await.unwrap();
    assert_eq!(event_types(&trail_before), event_types(&trail_after));

    let mut c = agent.client.clone();
    let who = c
        .who_am_i(agent.request_with_correlation(proto::WhoAmIRequest {}, "whoami-audit-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(who.principal_id, AGENT_A.id);
    let types = event_types_for_correlation(&server, "whoami-audit-1").await;
    assert_eq!(types, ["query.answered"], "{types:?}");
    let rows = server
        .meta()
        .await
        .query(
            "SELECT actor_id, payload->>'rpc', request_id IS NULL FROM flow_events \
             WHERE event_type = 'query.answered' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, String, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        seen.iter()
            .filter(|(_, rpc, _)| rpc == "GetRequest")
            .count(),
        3,
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(actor, _, no_request)| actor == AGENT_A.id && *no_request),
        "{seen:?}"
    );
}
