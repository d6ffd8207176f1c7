//! db-lifecycle: create, delete and describe PostgreSQL databases per environment,
//! behind policy checks, project ownership, a human approval flow and an audit trail.

pub mod admin;
pub mod approvals;
pub mod audit;
pub mod config;
pub mod devcluster;
pub mod domain;
pub mod error;
pub mod mcp;
pub mod ownership;
pub mod pg;
pub mod policy;
pub mod repository;
pub mod server;
pub mod transport;

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("dblifecycle.v1");
    /// Encoded descriptors, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("db_lifecycle_descriptor");
}
