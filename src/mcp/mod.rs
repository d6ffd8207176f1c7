//! The MCP bridge: a sidecar that speaks MCP to agents and gRPC to the
//! `DatabaseLifecycle` service (design §6).
//!
//! The bridge decides nothing about policy, ownership or approval: every tool call is
//! forwarded to the service with the agent's own bearer token, and the service's answer
//! (or refusal) is turned into a tool result. What the bridge does on its own is only
//! what an MCP server must do anyway or what narrows it further:
//!
//! - tool definitions (names, schemas, annotations) and argument *shape* checks;
//! - server-side narrowing: a read-only mode and an environment subset, both of which
//!   only ever refuse more than the service would;
//! - asking a person to confirm a `delete` (elicitation) before forwarding it;
//! - following a request by polling `GetRequest`, with progress notifications.
//!
//! It never offers `Approve`: an agent must not be able to approve its own request.

pub mod confirm;
pub mod forward;
pub mod http;
pub mod outcome;
pub mod server;
pub mod settings;
pub mod tools;

pub use server::LifecycleBridge;
pub use settings::{BridgeSettings, Credentials, SecretToken, TokenShapeError, ToolNaming};
