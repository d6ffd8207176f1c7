//! The full flow through the real server against a real PostgreSQL.
mod common;

use common::*;
use tonic::Code;

#[tokio::test]
async fn full_flow_create_approve_describe_delete_with_one_correlation_trail() {
    let server = TestServer::start().await;
    let agent = server.as_(&AGENT_A).await;
    let owner = server.as_(&OWNER_A).await;
    let name = unique("flow");

    let created = agent.create("dev", &name).await.unwrap();
    assert_eq!(created.status, "approval_required");
    assert!(!created.request_id.is_empty());
    assert!(
        !db_exists(&name).await,
        "nothing may be created before approval"
    );

    let applied = owner.approve(&created.request_id).await.unwrap();
    assert_eq!(applied.status, "applied", "{}", applied.message);
    assert!(applied.applied);
    assert!(db_exists(&name).await);

    let described = agent.describe("dev", &name).await.unwrap();
    assert!(described.exists && described.owned_by_project);
    assert_eq!(described.owner_project_id, "alpha");

    expect_code(
        agent.delete("dev", &name, false).await,
        Code::FailedPrecondition,
    );
    let del = agent.delete("dev", &name, true).await.unwrap();
    assert_eq!(del.status, "approval_required");
    let done = owner.approve(&del.request_id).await.unwrap();
    assert_eq!(done.status, "applied", "{}", done.message);
    assert!(!db_exists(&name).await);
    let rows = server
        .meta()
        .await
        .query(
            "SELECT 1 FROM project_databases WHERE database_name = $1",
            &[&name],
        )
        .await
        .unwrap();
    assert!(rows.is_empty(), "ownership row must be gone");

    let trail = event_types(
        &agent
            .events_by_correlation(&created.correlation_id)
            .await
            .unwrap(),
    );
    for t in [
        "request.created",
        "request.approved",
        "apply.started",
        "request.applied",
    ] {
        assert!(trail.contains(&t.to_string()), "{t} missing from {trail:?}");
    }
}
