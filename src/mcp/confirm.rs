//! A person confirms a `delete` by typing the database name (MCP elicitation).
//!
//! Two ways to ask, depending on the protocol the client negotiated:
//! - 2026-07-28 and later forbid server-to-client requests; the tool call answers
//!   with an `InputRequiredResult` holding the elicitation, and the client calls
//!   again with the person's answer (multi round-trip request, SEP-2322);
//! - older protocols: the bridge sends `elicitation/create` to the client and waits.
//!
//! A client that declared no form elicitation cannot ask anyone, so the delete is
//! forwarded unconfirmed and the service refuses it (fail closed).

use rmcp::{
    model::{
        ElicitRequest, ElicitRequestParams, ElicitResult, ElicitationAction, ElicitationSchema,
        InputRequest, InputRequests, InputRequiredResult, InputResponses, ProtocolVersion,
    },
    service::{RequestContext, RoleServer},
};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::mcp::outcome::ToolFailure;

/// Key of the elicitation inside `inputRequests` / `inputResponses`.
pub const CONFIRMATION_KEY: &str = "confirm_delete";
/// The form field the person types the database name into.
pub const TYPED_NAME_FIELD: &str = "database_name";
const STATE_PREFIX: &str = "confirm-delete.v1:";

/// How (if at all) this client can ask its person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmationChannel {
    /// Answer with `InputRequiredResult`; the answer comes with the retried call.
    InputRequired,
    /// Send `elicitation/create` and wait for the answer.
    ServerRequest,
    /// The client declared no form elicitation.
    Unavailable,
}

pub fn channel(context: &RequestContext<RoleServer>) -> ConfirmationChannel {
    let form_supported = context
        .client_capabilities()
        .and_then(|caps| caps.elicitation)
        // Clients of 2025-06-18 declared `elicitation: {}`, which means form.
        .is_some_and(|e| e.form.is_some() || e.url.is_none());
    if !form_supported {
        return ConfirmationChannel::Unavailable;
    }
    let modern = context
        .protocol_version()
        // Versions are ISO dates: lexical order is chronological (as in rmcp itself).
        .is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str());
    if modern {
        ConfirmationChannel::InputRequired
    } else {
        ConfirmationChannel::ServerRequest
    }
}

/// The form shown to the person.
pub fn elicitation(environment: &str, database_name: &str) -> ElicitRequestParams {
    let schema = ElicitationSchema::from_json_schema(
        serde_json::json!({
            "type": "object",
            "properties": {
                TYPED_NAME_FIELD: {
                    "type": "string",
                    "title": "Database name",
                    "description": format!("Type {database_name} to confirm")
                }
            },
            "required": [TYPED_NAME_FIELD]
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
    )
    // The literal above is a valid elicitation schema; an empty form would still
    // fail closed because the typed name could never match.
    .unwrap_or_else(|_| ElicitationSchema::new(Default::default()));
    ElicitRequestParams::FormElicitationParams {
        meta: None,
        message: format!(
            "An agent asks to DROP the PostgreSQL database `{database_name}` in environment \
             `{environment}`. All its data will be lost once a project owner approves. Type the \
             database name to confirm, or decline."
        ),
        requested_schema: schema,
    }
}

/// Binds a person's answer to the database it was asked about, so an answer cannot be
/// replayed for another delete. Not a secret: the person's typed name is the check.
pub fn request_state(environment: &str, database_name: &str) -> String {
    let digest = Sha256::digest(
        format!("{}\0{}", environment.trim().to_lowercase(), database_name).as_bytes(),
    );
    format!("{STATE_PREFIX}{}", hex::encode(digest))
}

/// First round of a multi round-trip delete: ask the client to elicit.
pub fn input_required(environment: &str, database_name: &str) -> InputRequiredResult {
    let mut requests = InputRequests::new();
    requests.insert(
        CONFIRMATION_KEY.to_string(),
        InputRequest::Elicitation(ElicitRequest::new(elicitation(environment, database_name))),
    );
    InputRequiredResult::new(
        Some(requests),
        Some(request_state(environment, database_name)),
    )
}

/// The person's answer carried by a retried call, checked against the call's own
/// arguments. `Ok(None)`: this call is not a retry with an answer.
pub fn answer_from_retry(
    request_state_echo: Option<&str>,
    responses: Option<&InputResponses>,
    environment: &str,
    database_name: &str,
    correlation_id: &str,
) -> Result<Option<ElicitResult>, ToolFailure> {
    let Some(echo) = request_state_echo else {
        return Ok(None);
    };
    let refuse = |message: &str| {
        Err(ToolFailure::new(
            Code::FailedPrecondition,
            format!("{message}; nothing was deleted; call delete again to be asked afresh"),
            correlation_id,
        ))
    };
    if echo != request_state(environment, database_name) {
        return refuse("the confirmation answer belongs to another delete");
    }
    let Some(raw) = responses.and_then(|r| r.get(CONFIRMATION_KEY)) else {
        return refuse("the retried call carries no confirmation answer");
    };
    match serde_json::from_value::<ElicitResult>(raw.clone()) {
        Ok(answer) => Ok(Some(answer)),
        Err(_) => refuse("the confirmation answer is not an elicitation result"),
    }
}

/// Does the person's answer confirm dropping `database_name`? Anything but an
/// accepted, exactly matching name stops the delete.
pub fn judge(
    answer: &ElicitResult,
    database_name: &str,
    correlation_id: &str,
) -> Result<(), ToolFailure> {
    let stop = |message: String| {
        Err(ToolFailure::new(
            Code::FailedPrecondition,
            message,
            correlation_id,
        ))
    };
    match answer.action {
        ElicitationAction::Accept => {
            let typed = answer
                .content
                .as_ref()
                .and_then(|c| c.get(TYPED_NAME_FIELD))
                .and_then(|v| v.as_str());
            match typed {
                Some(typed) if typed == database_name => Ok(()),
                Some(typed) => stop(format!(
                    "delete not confirmed: the person typed `{}`, not `{database_name}`; nothing \
                     was deleted",
                    crate::policy::printable(typed)
                )),
                None => stop(format!(
                    "delete not confirmed: no database name was typed; nothing was deleted \
                     (expected `{database_name}`)"
                )),
            }
        }
        ElicitationAction::Decline => stop(format!(
            "delete of `{database_name}` declined by the person; nothing was deleted"
        )),
        ElicitationAction::Cancel => stop(format!(
            "delete of `{database_name}` cancelled by the person; nothing was deleted"
        )),
        _ => stop("delete not confirmed: unknown answer; nothing was deleted".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(name: &str) -> ElicitResult {
        ElicitResult::new(ElicitationAction::Accept)
            .with_content(serde_json::json!({ TYPED_NAME_FIELD: name }))
    }

    #[test]
    fn only_an_exact_typed_name_confirms() {
        assert!(judge(&accept("orders"), "orders", "c").is_ok());
        assert!(judge(&accept(" orders "), "orders", "c").is_err());
        assert!(judge(&accept("orders "), "orders", "c").is_err());
        assert!(judge(&accept("Orders"), "orders", "c").is_err());
        assert!(judge(&accept("order"), "orders", "c").is_err());
        let declined = judge(
            &ElicitResult::new(ElicitationAction::Decline),
            "orders",
            "c",
        );
        assert_eq!(declined.unwrap_err().code, Code::FailedPrecondition);
        assert!(judge(&ElicitResult::new(ElicitationAction::Cancel), "orders", "c").is_err());
        assert!(judge(&ElicitResult::new(ElicitationAction::Accept), "orders", "c").is_err());
    }

    #[test]
    fn an_answer_cannot_be_replayed_for_another_database() {
        let state = request_state("dev", "orders");
        let mut responses = InputResponses::new();
        responses.insert(
            CONFIRMATION_KEY.into(),
            serde_json::to_value(accept("orders")).unwrap(),
        );
        let ok = answer_from_retry(Some(&state), Some(&responses), "DEV", "orders", "c");
        assert!(ok.unwrap().is_some());
        let other = answer_from_retry(Some(&state), Some(&responses), "dev", "billing", "c");
        assert!(other.is_err());
        assert!(
            answer_from_retry(None, None, "dev", "orders", "c")
                .unwrap()
                .is_none()
        );
    }
}
