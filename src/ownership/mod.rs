//! Ownership: who owns a database name on a target cluster (`project_databases`),
//! checked after policy and before any request is queued (R2, R5), and again at
//! apply time. Another project's id is never revealed.

use crate::{
    admin::AdminClient,
    domain::{Action, ApprovalState, DatabaseFacts, Ownership},
    error::ServiceError,
    policy::CheckedCall,
    repository::{LockWait, Repository},
};

/// What ownership found for a call that passed it. Only this module constructs it.
#[derive(Debug, Clone)]
pub struct OwnedCall {
    pub call: CheckedCall,
    /// The caller's own ownership row, if any (never another project's).
    pub ownership: Option<Ownership>,
    pub exists: bool,
    /// The project's row names a database that was dropped and re-created outside
    /// the service (another oid); `ownership` is then None.
    pub replaced: bool,
    /// Replaced, and the database the row recorded exists nowhere on the cluster
    /// any more (by oid): the row is a stale registration. A delete of it removes
    /// the row and drops nothing (the database under the name is not the service's).
    pub stale: bool,
    pub plan: Plan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Queue (or apply) the create/delete.
    Queue,
    /// Create of a database the project already owns and that exists: nothing to do.
    AlreadyPresent,
    /// Describe: answer from ownership and catalog.
    Describe,
}

#[derive(Clone)]
pub struct Ownerships {
    repo: Repository,
    admin: AdminClient,
}

impl Ownerships {
    pub fn new(repo: Repository, admin: AdminClient) -> Self {
        Self { repo, admin }
    }

    /// Ownership row for the call's database, refusing another project's.
    async fn own_row(&self, call: &CheckedCall) -> Result<Option<Ownership>, ServiceError> {
        let row = self
            .repo
            .ownership(&call.database.target, call.database.name.as_str())
            .await?;
        match row {
            Some(row) if row.project_id != call.project_id => {
                Err(ServiceError::OwnedByAnotherProject {
                    name: call.database.name.to_string(),
                })
            }
            other => Ok(other),
        }
    }

    /// The ownership row and the database under the call's name, as seen now.
    async fn observe(&self, call: &CheckedCall) -> Result<Observed, ServiceError> {
        let ownership = self.own_row(call).await?;
        let current_oid = self
            .admin
            .oid(&call.database.target, &call.database.name)
            .await?;
        // A row that does not identify the database under the name: is the database
        // it recorded still anywhere (renamed), or gone (dropped)?
        let recorded_gone = match &ownership {
            Some(o) if !o.identifies(current_oid) => match o.database_oid {
                Some(oid) => self
                    .admin
                    .name_of_oid(&call.database.target, oid)
                    .await?
                    .is_none(),
                None => false,
            },
            _ => false,
        };
        Ok(Observed {
            ownership,
            current_oid,
            recorded_gone,
        })
    }

    pub async fn check(&self, call: CheckedCall) -> Result<OwnedCall, ServiceError> {
        let seen = self.observe(&call).await?;
        let exists = seen.current_oid.is_some();
        match plan(call.clone(), seen) {
            Err(e) if claims_unmanaged(&e) => self.check_settled(call, exists).await,
            other => other,
        }
    }

    /// The row and the database are read one after the other, and an apply of the
    /// same name (another call of this project, on any replica) may change both in
    /// between: a database renamed into place after its row was read looks
    /// unmanaged, a row removed before its database was dropped looks like a
    /// database nobody owns. So before a create or delete is told the database is
    /// not managed (or that there is no managed database), that is checked again
    /// when no apply can run: an approved request for the name is handed on to the
    /// request flow, which returns or names it like any open request; otherwise both
    /// are read again under the name's apply lock, when they agree.
    async fn check_settled(
        &self,
        call: CheckedCall,
        exists: bool,
    ) -> Result<OwnedCall, ServiceError> {
        let target = call.database.target.clone();
        let name = call.database.name.to_string();
        for _ in 0..SETTLE_ATTEMPTS {
            let applying = self
                .repo
                .open_request_for(&target, &name)
                .await?
                .filter(|r| r.state == ApprovalState::Approved);
            if applying.is_some() {
                return Ok(OwnedCall {
                    call,
                    ownership: None,
                    exists,
                    replaced: false,
                    stale: false,
                    plan: Plan::Queue,
                });
            }
            let mut conn = self.repo.lock_client().await?;
            let tx = conn.transaction().await.map_err(ServiceError::metadata)?;
            let locked = self
                .repo
                .take_apply_lock(&tx, &target, &name, LockWait::Wait(SETTLE_LOCK_TIMEOUT))
                .await?;
            if !locked {
                // An apply held it all along: its request is found on the next turn.
                continue;
            }
            let seen = self.observe(&call).await;
            // Releases the lock (nothing else was done in this transaction).
            let _ = tx.rollback().await;
            return plan(call, seen?);
        }
        Err(ServiceError::ApplyBusy { name })
    }
    /// Catalog facts for a describe (None when the database does not exist).
    pub async fn facts(&self, owned: &OwnedCall) -> Result<Option<DatabaseFacts>, ServiceError> {
        if !owned.exists {
            return Ok(None);
        }
        self.admin
            .facts(&owned.call.database.target, &owned.call.database.name)
            .await
    }
}

/// How many times a settled check looks for a running apply or waits for its lock.
const SETTLE_ATTEMPTS: usize = 3;
/// How long a settled check waits for an apply of the same name to finish.
const SETTLE_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What [`Ownerships::observe`] read.
struct Observed {
    /// The caller's project's row (another project's was refused).
    ownership: Option<Ownership>,
    current_oid: Option<u32>,
    /// The row does not identify the database under the name, and the database it
    /// recorded (by oid) no longer exists on the cluster.
    recorded_gone: bool,
}

/// Answers that say a database is not the service's (or not there): before one of
/// them is given, it is checked again when no apply runs ([`Ownerships::check`]).
fn claims_unmanaged(e: &ServiceError) -> bool {
    matches!(
        e,
        ServiceError::UnmanagedDatabaseExists { .. }
            | ServiceError::UnmanagedDatabase { .. }
            | ServiceError::DatabaseNotFound { .. }
    )
}

/// What to do with a call, given what was observed.
fn plan(call: CheckedCall, seen: Observed) -> Result<OwnedCall, ServiceError> {
    let Observed {
        mut ownership,
        current_oid,
        recorded_gone,
    } = seen;
    // Dropped and re-created outside the service: the database under this name is
    // not the one the project owns, so it is treated as unmanaged.
    let replaced = ownership
        .as_ref()
        .is_some_and(|o| !o.identifies(current_oid));
    // And the project's own database is gone for good: its row is all that is left.
    let stale = replaced && recorded_gone;
    let stale_row = if replaced {
        ownership.take().filter(|_| stale)
    } else {
        None
    };
    let name = call.database.name.to_string();
    let registered_elsewhere = ownership
        .as_ref()
        .filter(|o| o.environment != call.environment)
        .map(|o| o.environment.clone());
    let exists = current_oid.is_some();
    let plan = match call.action {
        Action::Describe => Plan::Describe,
        Action::Create => {
            if let Some(registered) = registered_elsewhere {
                return Err(ServiceError::RegisteredInOtherEnvironment { name, registered });
            }
            match (&ownership, exists) {
                (None, true) => return Err(ServiceError::UnmanagedDatabaseExists { name }),
                (Some(o), true) if o.state == "active" => Plan::AlreadyPresent,
                _ => Plan::Queue,
            }
        }
        Action::Delete => {
            if let Some(registered) = registered_elsewhere {
                return Err(ServiceError::RegisteredInOtherEnvironment { name, registered });
            }
            if let Some(row) = &stale_row {
                // The project's database was dropped outside the service and another
                // database took its name: the delete removes the stale row, and never
                // drops the other database (checked again by oid at apply).
                if row.environment != call.environment {
                    return Err(ServiceError::RegisteredInOtherEnvironment {
                        name,
                        registered: row.environment.clone(),
                    });
                }
                return Ok(OwnedCall {
                    call,
                    ownership: None,
                    exists,
                    replaced,
                    stale,
                    plan: Plan::Queue,
                });
            }
            match (&ownership, exists) {
                (None, true) => return Err(ServiceError::UnmanagedDatabase { name }),
                (None, false) => {
                    return Err(ServiceError::DatabaseNotFound {
                        name,
                        environment: call.environment.clone(),
                    });
                }
                // Owned, even if already dropped by hand: the delete cleans up the row.
                _ => Plan::Queue,
            }
        }
    };
    Ok(OwnedCall {
        call,
        ownership,
        exists,
        replaced,
        stale,
        plan,
    })
}

impl Ownerships {
    /// Describe (R4): read-only, no request, answers from the ownership row and the
    /// catalog. Audited by the caller.
    pub async fn describe(
        &self,
        owned: &OwnedCall,
    ) -> Result<crate::domain::LifecycleOutcome, ServiceError> {
        let call = &owned.call;
        let owned_by_project = owned.ownership.is_some();
        // Catalog facts (owner role, size, connections) only for the project's own
        // database: a database the service does not manage for this caller is
        // reported as existing, and nothing more.
        let facts = if owned_by_project {
            self.facts(owned).await?
        } else {
            None
        };
        let exists = if owned_by_project {
            facts.is_some()
        } else {
            owned.exists
        };
        let registered = owned
            .ownership
            .as_ref()
            .map(|o| o.environment.clone())
            .unwrap_or_default();
        let name = call.database.name.to_string();
        let message = match (owned_by_project, exists) {
            (true, true) => format!(
                "database `{name}` exists and is owned by project `{}`",
                call.project_id
            ),
            (true, false) => format!(
                "database `{name}` is registered to project `{}` but does not exist on the cluster (dropped outside the service?); create it again or delete to clean up",
                call.project_id
            ),
            (false, true) if owned.stale => format!(
                "database `{name}` exists but is not the database this service created for project `{}` (it was dropped and re-created outside the service); it is not managed. The project's registration of the name is stale: a confirmed delete removes it and drops nothing",
                call.project_id
            ),
            (false, true) if owned.replaced => format!(
                "database `{name}` exists but is not the database this service created for project `{}` (it was renamed, or dropped and re-created, outside the service); it is not managed",
                call.project_id
            ),
            (false, true) => format!("database `{name}` exists but is not managed by this service"),
            (false, false) => format!("database `{name}` does not exist"),
        };
        Ok(crate::domain::LifecycleOutcome {
            status: "described",
            request: None,
            action: Action::Describe,
            environment: call.environment.clone(),
            database_name: name,
            project_id: call.project_id.clone(),
            applied: false,
            exists,
            owned_by_project,
            owner_project_id: if owned_by_project {
                call.project_id.clone()
            } else {
                String::new()
            },
            registered_environment: registered,
            dry_run: false,
            message,
            facts,
        })
    }
}
