//! Tool definitions (names, schemas, annotations) and argument shape checks.
//!
//! Shape only: types, required fields, the action and environment enums this bridge
//! offers. Whether a name is valid, an environment allowed or a caller permitted is
//! for the service to say.

use std::{borrow::Cow, sync::Arc};

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Code;

use crate::mcp::{
    outcome::{ToolFailure, lifecycle_output_schema, request_output_schema},
    settings::{BridgeSettings, MAX_WAIT_SECONDS},
};

pub const LIFECYCLE_DOTTED: &str = "database.lifecycle";
pub const LIFECYCLE_UNDERSCORE: &str = "database_lifecycle";
pub const REQUEST_STATUS_DOTTED: &str = "database.request_status";
pub const REQUEST_STATUS_UNDERSCORE: &str = "database_request_status";

/// What a listed tool does, whatever name it is listed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    Lifecycle,
    RequestStatus,
}

/// The tools one bridge offers, as listed and as looked up by name.
#[derive(Debug, Clone)]
pub struct ToolSet {
    tools: Vec<(ToolKind, Tool)>,
    /// The name agents are told to use for following a request.
    request_status_name: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleAction {
    Create,
    Delete,
    Describe,
}

impl LifecycleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleAction::Create => "create",
            LifecycleAction::Delete => "delete",
            LifecycleAction::Describe => "describe",
        }
    }
}

/// Arguments of `database.lifecycle`, after shape checks.
#[derive(Debug, Clone)]
pub struct LifecycleArgs {
    pub action: LifecycleAction,
    pub environment: String,
    pub database_name: String,
    pub confirm_delete: bool,
    pub dry_run: bool,
    /// Empty: the token's own project (the service's rule).
    pub project_id: String,
}

/// Arguments of `database.request_status`, after shape checks.
#[derive(Debug, Clone)]
pub struct RequestStatusArgs {
    pub request_id: String,
    pub wait_seconds: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLifecycleArgs {
    action: String,
    environment: String,
    database_name: String,
    #[serde(default)]
    confirm_delete: bool,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    project_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequestStatusArgs {
    request_id: String,
    #[serde(default, deserialize_with = "whole_seconds")]
    wait_seconds: u64,
}

/// A JSON Schema `integer` may be written `2.0`; accept it, refuse `2.5` and negatives.
fn whole_seconds<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(n) = number.as_u64() {
        return Ok(n);
    }
    match number.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= u32::MAX as f64 => Ok(f as u64),
        _ => Err(serde::de::Error::custom(format!(
            "wait_seconds must be a whole number of seconds from 0, not {number}"
        ))),
    }
}

fn object(value: Value) -> Arc<JsonObject> {
    Arc::new(value.as_object().cloned().unwrap_or_default())
}

fn parse<T: for<'de> Deserialize<'de>>(
    arguments: Option<&JsonObject>,
    correlation_id: &str,
) -> Result<T, ToolFailure> {
    let value = Value::Object(arguments.cloned().unwrap_or_default());
    serde_json::from_value(value).map_err(|e| {
        ToolFailure::new(
            Code::InvalidArgument,
            format!("invalid arguments: {e}"),
            correlation_id,
        )
    })
}

impl ToolSet {
    pub fn new(settings: &BridgeSettings) -> Self {
        let naming = settings.tool_naming;
        let mut tools = Vec::new();
        let request_status_name = if naming.offers_dotted() {
            REQUEST_STATUS_DOTTED
        } else {
            REQUEST_STATUS_UNDERSCORE
        };
        if naming.offers_dotted() {
            tools.push((
                ToolKind::Lifecycle,
                lifecycle_tool(settings, LIFECYCLE_DOTTED, request_status_name, None),
            ));
            tools.push((
                ToolKind::RequestStatus,
                request_status_tool(settings, REQUEST_STATUS_DOTTED, None),
            ));
        }
        if naming.offers_underscore() {
            let alias = |dotted: &'static str| naming.offers_dotted().then_some(dotted);
            tools.push((
                ToolKind::Lifecycle,
                lifecycle_tool(
                    settings,
                    LIFECYCLE_UNDERSCORE,
                    request_status_name,
                    alias(LIFECYCLE_DOTTED),
                ),
            ));
            tools.push((
                ToolKind::RequestStatus,
                request_status_tool(
                    settings,
                    REQUEST_STATUS_UNDERSCORE,
                    alias(REQUEST_STATUS_DOTTED),
                ),
            ));
        }
        Self {
            tools,
            request_status_name,
        }
    }

    pub fn list(&self) -> Vec<Tool> {
        self.tools.iter().map(|(_, tool)| tool.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<(ToolKind, &Tool)> {
        self.tools
            .iter()
            .find(|(_, tool)| tool.name == name)
            .map(|(kind, tool)| (*kind, tool))
    }

    pub fn request_status_name(&self) -> &'static str {
        self.request_status_name
    }
}

fn lifecycle_tool(
    settings: &BridgeSettings,
    name: &'static str,
    request_status_name: &str,
    alias_of: Option<&str>,
) -> Tool {
    let actions: Vec<&str> = if settings.read_only {
        vec!["describe"]
    } else {
        vec!["create", "delete", "describe"]
    };
    let mut environment = json!({
        "type": "string",
        "description": "Environment the database lives in, e.g. dev or staging. The service \
                        allows only its configured environments."
    });
    if let Some(list) = &settings.environments {
        environment["enum"] = json!(list);
        environment["description"] = json!(format!(
            "Environment the database lives in; this bridge offers: {}.",
            list.join(", ")
        ));
    }
    let input_schema = json!({
        "type": "object",
        "properties": {
            "action": {
                "type": "string",
                "enum": actions,
                "description": if settings.read_only {
                    "describe: does the database exist, and does your project own it? (This \
                     bridge is read-only: create and delete are not offered.)"
                } else {
                    "create: queue creating the database for your project (idempotent; needs a \
                     person's approval). delete: queue dropping a database your project owns \
                     (needs confirm_delete and a person's approval). describe: read-only, does it \
                     exist and does your project own it."
                }
            },
            "environment": environment,
            "database_name": {
                "type": "string",
                "description": "PostgreSQL database name, e.g. orders. The service checks it \
                                (by default lowercase letters, digits, _ and -, starting with a \
                                letter or _, at most 63 bytes)."
            },
            "confirm_delete": {
                "type": "boolean",
                "default": false,
                "description": "Required as true to delete. Without it, a client that can ask \
                                its user is asked to type the database name; any other client \
                                is refused. Ignored by create and describe."
            },
            "dry_run": {
                "type": "boolean",
                "default": false,
                "description": "Run every check and report what would happen; store and change \
                                nothing. A delete dry run also needs confirm_delete=true. \
                                Ignored by describe."
            },
            "project_id": {
                "type": "string",
                "description": "Leave it out: your token's project is used. Needed only when \
                                your token covers several projects; the service refuses a \
                                project outside your token's scope."
            }
        },
        "required": ["action", "environment", "database_name"],
        "additionalProperties": false
    });
    let mut description = if settings.read_only {
        "Describe a PostgreSQL database in an environment: whether it exists and whether your \
         project owns it. Read-only."
            .to_string()
    } else {
        format!(
            "Create, delete or describe a PostgreSQL database in an environment, for the \
             project of your token. create and delete do not act at once: they queue a request \
             that a person (a project owner) must approve, and return its request_id with \
             status approval_required. Follow it with {request_status_name} (wait_seconds lets \
             you wait for the decision). describe is read-only. You cannot approve requests."
        )
    };
    if let Some(dotted) = alias_of {
        description.push_str(&format!(" Same tool as {dotted}."));
    }
    let annotations = if settings.read_only {
        ToolAnnotations::with_title("Describe PostgreSQL database")
            .read_only(true)
            .destructive(false)
            .idempotent(true)
            .open_world(false)
    } else {
        // delete can drop a database (destructive); repeating a call with the same
        // arguments has no further effect (create ensures, delete of a dropped or
        // already-requested database is refused), so idempotent; the service only
        // touches its own clusters, so not open-world.
        ToolAnnotations::with_title("PostgreSQL database lifecycle")
            .read_only(false)
            .destructive(true)
            .idempotent(true)
            .open_world(false)
    };
    Tool::new(name, description, object(input_schema))
        .with_title(if settings.read_only {
            "Describe PostgreSQL database"
        } else {
            "PostgreSQL database lifecycle"
        })
        .with_raw_output_schema(object(lifecycle_output_schema()))
        .with_annotations(annotations)
}

fn request_status_tool(
    settings: &BridgeSettings,
    name: &'static str,
    alias_of: Option<&str>,
) -> Tool {
    let _ = settings;
    let input_schema = json!({
        "type": "object",
        "properties": {
            "request_id": {
                "type": "string",
                "description": "The request_id returned by create or delete."
            },
            "wait_seconds": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_WAIT_SECONDS,
                "default": 0,
                "description": format!(
                    "Wait up to this many seconds (at most {MAX_WAIT_SECONDS}) for the request \
                     to leave requested/approved, with progress notifications while waiting. \
                     0 answers at once."
                )
            }
        },
        "required": ["request_id"],
        "additionalProperties": false
    });
    let mut description = "Report the state of a create/delete request (requested, approved, \
                           applied, failed, denied, expired), optionally waiting for a person's \
                           decision and for it to be applied. Read-only."
        .to_string();
    if let Some(dotted) = alias_of {
        description.push_str(&format!(" Same tool as {dotted}."));
    }
    Tool::new(name, description, object(input_schema))
        .with_title("Follow a database request")
        .with_raw_output_schema(object(request_output_schema()))
        .with_annotations(
            ToolAnnotations::with_title("Follow a database request")
                .read_only(true)
                .destructive(false)
                .idempotent(true)
                .open_world(false),
        )
}

impl LifecycleArgs {
    pub fn parse(
        arguments: Option<&JsonObject>,
        correlation_id: &str,
    ) -> Result<Self, ToolFailure> {
        let raw: RawLifecycleArgs = parse(arguments, correlation_id)?;
        let action = match raw.action.as_str() {
            "create" => LifecycleAction::Create,
            "delete" => LifecycleAction::Delete,
            "describe" => LifecycleAction::Describe,
            other => {
                return Err(ToolFailure::new(
                    Code::InvalidArgument,
                    format!(
                        "invalid action `{}`: must be create, delete or describe",
                        crate::policy::printable(other)
                    ),
                    correlation_id,
                ));
            }
        };
        Ok(Self {
            action,
            environment: raw.environment,
            database_name: raw.database_name,
            confirm_delete: raw.confirm_delete,
            dry_run: raw.dry_run,
            project_id: raw.project_id,
        })
    }
}

impl RequestStatusArgs {
    pub fn parse(
        arguments: Option<&JsonObject>,
        correlation_id: &str,
    ) -> Result<Self, ToolFailure> {
        let raw: RawRequestStatusArgs = parse(arguments, correlation_id)?;
        if raw.wait_seconds > MAX_WAIT_SECONDS {
            return Err(ToolFailure::new(
                Code::InvalidArgument,
                format!(
                    "invalid wait_seconds {}: at most {MAX_WAIT_SECONDS}; call again to keep waiting",
                    raw.wait_seconds
                ),
                correlation_id,
            ));
        }
        if raw.request_id.trim().is_empty() {
            return Err(ToolFailure::new(
                Code::InvalidArgument,
                "invalid request_id: required (the request_id returned by create or delete)",
                correlation_id,
            ));
        }
        Ok(Self {
            request_id: raw.request_id.trim().to_string(),
            wait_seconds: raw.wait_seconds,
        })
    }
}

/// Names under which approval could be reached: none exist, in any mode. Kept as a
/// check for tests and reviewers.
pub fn offers_approval(tools: &[Tool]) -> bool {
    tools.iter().any(|t| {
        let name: &Cow<'static, str> = &t.name;
        name.contains("approve") || name.contains("approval")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::settings::ToolNaming;

    fn names(settings: &BridgeSettings) -> Vec<String> {
        ToolSet::new(settings)
            .list()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect()
    }

    #[test]
    fn tool_names_follow_the_setting() {
        let mut s = BridgeSettings::default();
        assert_eq!(names(&s), [LIFECYCLE_DOTTED, REQUEST_STATUS_DOTTED]);
        s.tool_naming = ToolNaming::Underscore;
        assert_eq!(names(&s), [LIFECYCLE_UNDERSCORE, REQUEST_STATUS_UNDERSCORE]);
        s.tool_naming = ToolNaming::Both;
        assert_eq!(names(&s).len(), 4);
    }

    #[test]
    fn no_mode_offers_approval() {
        for read_only in [false, true] {
            for naming in [ToolNaming::Dotted, ToolNaming::Underscore, ToolNaming::Both] {
                let s = BridgeSettings {
                    read_only,
                    tool_naming: naming,
                    ..BridgeSettings::default()
                };
                assert!(!offers_approval(&ToolSet::new(&s).list()));
            }
        }
    }

    #[test]
    fn read_only_narrows_the_schema_and_annotations() {
        let s = BridgeSettings {
            read_only: true,
            environments: Some(vec!["dev".into()]),
            ..BridgeSettings::default()
        };
        let set = ToolSet::new(&s);
        let (_, tool) = set.get(LIFECYCLE_DOTTED).unwrap();
        let schema = Value::Object((*tool.input_schema).clone());
        assert_eq!(schema["properties"]["action"]["enum"], json!(["describe"]));
        assert_eq!(schema["properties"]["environment"]["enum"], json!(["dev"]));
        let a = tool.annotations.as_ref().unwrap();
        assert_eq!(a.read_only_hint, Some(true));
        assert_eq!(a.destructive_hint, Some(false));
    }

    #[test]
    fn argument_shapes() {
        let args = |v: Value| v.as_object().cloned();
        let ok = LifecycleArgs::parse(
            args(json!({"action": "create", "environment": "dev", "database_name": "x"})).as_ref(),
            "c",
        )
        .unwrap();
        assert_eq!(ok.action, LifecycleAction::Create);
        assert!(!ok.confirm_delete && !ok.dry_run);
        for bad in [
            json!({"action": "drop", "environment": "dev", "database_name": "x"}),
            json!({"action": "create", "environment": "dev"}),
            json!({"action": "create", "environment": "dev", "database_name": "x", "typo": 1}),
            json!({"action": "create", "environment": "dev", "database_name": 5}),
        ] {
            let e = LifecycleArgs::parse(args(bad).as_ref(), "c").unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument);
        }
        let e = RequestStatusArgs::parse(
            args(json!({"request_id": "r", "wait_seconds": 301})).as_ref(),
            "c",
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        let whole = RequestStatusArgs::parse(
            args(json!({"request_id": "r", "wait_seconds": 2.0})).as_ref(),
            "c",
        )
        .unwrap();
        assert_eq!(whole.wait_seconds, 2);
        for bad in [json!(2.5), json!(-1), json!("2"), json!(1e30)] {
            let e = RequestStatusArgs::parse(
                args(json!({"request_id": "r", "wait_seconds": bad})).as_ref(),
                "c",
            )
            .unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument, "{bad}");
        }
    }
}
