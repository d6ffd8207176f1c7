//! All SQL on the service's own metadata tables. Every statement is parameterized,
//! and bounded in time (`crate::pg`): by `database_timeout`, or for a lock wait by
//! the wait plus `database_timeout`. A metadata database that does not answer within
//! the bound is UNAVAILABLE (`metadata database did not answer within …`).

pub mod migrate;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::{
    domain::{Action, ApprovalMode, ApprovalRequest, ApprovalState, Ownership},
    error::ServiceError,
    pg::{BoundedPool, PgConn, PgTx, Statements},
};

type Result<T> = std::result::Result<T, ServiceError>;

fn meta<E: Into<crate::error::DbError>>(e: E) -> ServiceError {
    ServiceError::metadata(e)
}

const REQUEST_COLUMNS: &str = "id, correlation_id, action, state, environment, target_cluster, \
    database_name, project_id, requested_by, requested_by_kind, approval_mode, payload, \
    decided_by, decision_reason, failure_reason, created_at, decided_at, finished_at, expires_at";

fn request_from_row(row: &Row) -> Result<ApprovalRequest> {
    let action: String = row.get("action");
    let state: String = row.get("state");
    let mode: String = row.get("approval_mode");
    Ok(ApprovalRequest {
        id: row.get("id"),
        correlation_id: row.get("correlation_id"),
        action: Action::parse(&action)
            .ok_or_else(|| ServiceError::Internal(format!("bad action `{action}` in row")))?,
        state: ApprovalState::parse(&state)
            .ok_or_else(|| ServiceError::Internal(format!("bad state `{state}` in row")))?,
        environment: row.get("environment"),
        target_cluster: row.get("target_cluster"),
        database_name: row.get("database_name"),
        project_id: row.get("project_id"),
        requested_by: row.get("requested_by"),
        requested_by_kind: row.get("requested_by_kind"),
        approval_mode: ApprovalMode::parse(&mode)
            .ok_or_else(|| ServiceError::Internal(format!("bad mode `{mode}` in row")))?,
        payload: row.get("payload"),
        decided_by: row.get("decided_by"),
        decision_reason: row.get("decision_reason"),
        failure_reason: row.get("failure_reason"),
        created_at: row.get("created_at"),
        decided_at: row.get("decided_at"),
        finished_at: row.get("finished_at"),
        expires_at: row.get("expires_at"),
    })
}

const OWNERSHIP_COLUMNS: &str = "target_cluster, database_name, project_id, environment, state, \
    created_by, request_id, created_at, database_oid";

fn ownership_from_row(row: &Row) -> Ownership {
    Ownership {
        target_cluster: row.get("target_cluster"),
        database_name: row.get("database_name"),
        project_id: row.get("project_id"),
        environment: row.get("environment"),
        state: row.get("state"),
        created_by: row.get("created_by"),
        request_id: row.get("request_id"),
        created_at: row.get("created_at"),
        database_oid: row.get("database_oid"),
    }
}

/// A request to store.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: Uuid,
    pub correlation_id: String,
    pub action: Action,
    /// `requested`, or `approved` when the approval mode is `none`.
    pub state: ApprovalState,
    pub environment: String,
    pub target_cluster: String,
    pub database_name: String,
    pub project_id: String,
    pub requested_by: String,
    pub requested_by_kind: String,
    pub approval_mode: ApprovalMode,
    pub payload: Value,
    pub decided_by: Option<String>,
    pub ttl_seconds: i64,
}

pub enum InsertOutcome {
    Inserted(ApprovalRequest),
    /// Another open request holds this database.
    OpenExists(ApprovalRequest),
}

/// An audit event to record.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub correlation_id: String,
    pub request_id: Option<Uuid>,
    pub event_type: &'static str,
    pub actor_id: String,
    pub actor_kind: String,
    pub project_id: String,
    pub environment: String,
    pub database_name: String,
    pub outcome: &'static str,
    pub status_code: String,
    pub message: String,
    pub payload: Value,
    /// The actor's agent run (run tokens); stored as `payload.run_id`.
    pub run_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FlowEventRow {
    pub id: i64,
    pub correlation_id: String,
    pub request_id: Option<Uuid>,
    pub event_type: String,
    pub actor_id: String,
    pub actor_kind: String,
    pub project_id: String,
    pub environment: String,
    pub database_name: String,
    pub outcome: String,
    pub status_code: String,
    pub message: String,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    pub state: Option<ApprovalState>,
    pub project_id: Option<String>,
    pub environment: Option<String>,
    /// None: every project; Some: only these (the caller's scope).
    pub projects_in_scope: Option<Vec<String>>,
    /// Keyset: only ids smaller than this (ids are UUIDv7, time-ordered).
    pub before_id: Option<Uuid>,
    pub limit: i64,
}

/// How [`Repository::take_apply_lock`] waits for a lock another apply holds.
#[derive(Debug, Clone, Copy)]
pub enum LockWait {
    /// Not at all.
    Try,
    /// Up to this long (the statement's bound is this plus `database_timeout`).
    Wait(Duration),
}

#[derive(Clone)]
pub struct Repository {
    pool: BoundedPool,
    /// Connections that hold an apply's advisory lock for the whole apply. A pool of
    /// their own, so applies holding locks can never starve the statements they wait
    /// for (no hold-and-wait on one pool).
    lock_pool: BoundedPool,
}

impl Repository {
    pub fn new(pool: BoundedPool, lock_pool: BoundedPool) -> Self {
        Self { pool, lock_pool }
    }

    /// A connection for holding an apply lock (see `lock_pool`).
    pub async fn lock_client(&self) -> Result<PgConn> {
        self.lock_pool.get().await.map_err(meta)
    }

    /// Take the apply lock of one database (target cluster and name), serializing
    /// every apply of it across replicas: a transaction-level advisory lock, held
    /// until `tx` (on a [`Self::lock_client`] connection) ends, so a crash or a dropped
    /// connection releases it and it never leaks into the pool. Returns false when
    /// the lock was not taken: at once for [`LockWait::Try`], or after `Wait`'s
    /// duration (the transaction's `lock_timeout`).
    pub async fn take_apply_lock(
        &self,
        tx: &PgTx<'_>,
        target: &str,
        name: &str,
        wait: LockWait,
    ) -> Result<bool> {
        let key = format!("db-lifecycle/{target}/{name}");
        match wait {
            LockWait::Wait(timeout) => {
                // set_config instead of SET LOCAL: the value is a bind parameter.
                let millis = format!("{}ms", timeout.as_millis());
                tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&millis])
                    .await
                    .map_err(meta)?;
                // The server gives up after `timeout`; the client waits that long
                // plus its usual bound for the answer.
                match tx
                    .stmts()
                    .waiting(timeout)
                    .execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        &[&key],
                    )
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e)
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(meta(e)),
                }
            }
            LockWait::Try => Ok(tx
                .query_one(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                    &[&key],
                )
                .await
                .map_err(meta)?
                .get(0)),
        }
    }

    pub async fn client(&self) -> Result<PgConn> {
        self.pool.get().await.map_err(meta)
    }

    pub async fn ping(&self) -> Result<()> {
        let c = self.client().await?;
        c.batch_execute("SELECT 1").await.map_err(meta)?;
        Ok(())
    }

    // ---------- approval requests ----------

    /// Insert a request with its first events and its link, in one transaction; if
    /// the one-open-request-per-database index refuses it, return the open request.
    pub async fn insert_request(
        &self,
        r: &NewRequest,
        events: &[NewEvent],
    ) -> Result<InsertOutcome> {
        let sql = format!(
            "INSERT INTO approval_requests (id, correlation_id, action, state, environment, \
             target_cluster, database_name, project_id, requested_by, requested_by_kind, \
             approval_mode, payload, decided_by, decided_at, expires_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13::text, \
                     CASE WHEN $13::text IS NULL THEN NULL ELSE now() END, \
                     now() + make_interval(secs => $14::bigint)) \
             RETURNING {REQUEST_COLUMNS}"
        );
        for _ in 0..3 {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(meta)?;
            // Expired-but-not-yet-swept requests must not block a new one.
            expire_due_for(&tx, &r.target_cluster, &r.database_name).await?;
            let inserted = tx
                .query_one(
                    &sql,
                    &[
                        &r.id,
                        &r.correlation_id,
                        &r.action.as_str(),
                        &r.state.as_str(),
                        &r.environment,
                        &r.target_cluster,
                        &r.database_name,
                        &r.project_id,
                        &r.requested_by,
                        &r.requested_by_kind,
                        &r.approval_mode.as_str(),
                        &r.payload,
                        &r.decided_by,
                        &r.ttl_seconds,
                    ],
                )
                .await;
            match inserted {
                Ok(row) => {
                    for ev in events {
                        insert_event(&tx, ev).await?;
                    }
                    insert_link(
                        &tx,
                        &r.correlation_id,
                        Some(r.id),
                        &r.project_id,
                        &r.environment,
                        &r.target_cluster,
                        &r.database_name,
                    )
                    .await?;
                    tx.commit().await.map_err(meta)?;
                    return Ok(InsertOutcome::Inserted(request_from_row(&row)?));
                }
                Err(e) if e.is_unique_violation("approval_requests_one_open_per_database") => {
                    drop(tx);
                    if let Some(open) = self
                        .open_request_for(&r.target_cluster, &r.database_name)
                        .await?
                    {
                        return Ok(InsertOutcome::OpenExists(open));
                    }
                    // The open request closed in between: try again.
                }
                Err(e) => return Err(meta(e)),
            }
        }
        Err(ServiceError::Internal(
            "could not store the request after 3 attempts".into(),
        ))
    }

    pub async fn open_request_for(
        &self,
        target: &str,
        name: &str,
    ) -> Result<Option<ApprovalRequest>> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT {REQUEST_COLUMNS} FROM approval_requests \
                     WHERE target_cluster = $1 AND database_name = $2 \
                       AND state IN ('requested','approved')"
                ),
                &[&target, &name],
            )
            .await
            .map_err(meta)?;
        row.as_ref().map(request_from_row).transpose()
    }

    pub async fn get_request(&self, id: Uuid) -> Result<Option<ApprovalRequest>> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!("SELECT {REQUEST_COLUMNS} FROM approval_requests WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(meta)?;
        row.as_ref().map(request_from_row).transpose()
    }

    /// requested -> approved, exactly once: a conditional UPDATE, not read-then-write.
    /// The decision event is written in the same transaction.
    pub async fn claim_for_apply(
        &self,
        id: Uuid,
        approver: &str,
        reason: &str,
        event: NewEvent,
    ) -> Result<Option<ApprovalRequest>> {
        self.decide(id, ApprovalState::Approved, approver, reason, event)
            .await
    }

    /// requested -> denied, exactly once.
    pub async fn deny(
        &self,
        id: Uuid,
        approver: &str,
        reason: &str,
        event: NewEvent,
    ) -> Result<Option<ApprovalRequest>> {
        self.decide(id, ApprovalState::Denied, approver, reason, event)
            .await
    }

    async fn decide(
        &self,
        id: Uuid,
        to: ApprovalState,
        approver: &str,
        reason: &str,
        event: NewEvent,
    ) -> Result<Option<ApprovalRequest>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(meta)?;
        let finished = if to == ApprovalState::Denied {
            "now()"
        } else {
            "NULL"
        };
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE approval_requests SET state = $2, decided_by = $3, \
                     decision_reason = NULLIF($4, ''), decided_at = now(), finished_at = {finished} \
                     WHERE id = $1 AND state = 'requested' AND expires_at > now() \
                     RETURNING {REQUEST_COLUMNS}"
                ),
                &[&id, &to.as_str(), &approver, &reason],
            )
            .await
            .map_err(meta)?;
        let Some(row) = row else {
            return Ok(None);
        };
        insert_event(&tx, &event).await?;
        tx.commit().await.map_err(meta)?;
        Ok(Some(request_from_row(&row)?))
    }

    /// approved -> applied|failed with its terminal event, exactly once. Returns
    /// false when the request was no longer approved (someone else finished it).
    pub async fn finish(
        &self,
        tx: &PgTx<'_>,
        id: Uuid,
        to: ApprovalState,
        failure_reason: Option<&str>,
        event: &NewEvent,
    ) -> Result<bool> {
        let n = tx
            .execute(
                "UPDATE approval_requests SET state = $2, failure_reason = $3, \
                 finished_at = now(), apply_attempts = apply_attempts + 1 \
                 WHERE id = $1 AND state = 'approved'",
                &[&id, &to.as_str(), &failure_reason],
            )
            .await
            .map_err(meta)?;
        if n == 0 {
            return Ok(false);
        }
        insert_event(tx, event).await?;
        Ok(true)
    }

    pub async fn note_apply_attempt(&self, id: Uuid) -> Result<()> {
        let c = self.client().await?;
        c.execute(
            "UPDATE approval_requests SET apply_attempts = apply_attempts + 1 WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(meta)?;
        Ok(())
    }

    /// Move due `requested` requests to `expired` (with their events). Returns them.
    pub async fn expire_due(&self) -> Result<Vec<ApprovalRequest>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(meta)?;
        let rows = tx
            .query(
                &format!(
                    "UPDATE approval_requests SET state = 'expired', finished_at = now() \
                     WHERE state = 'requested' AND expires_at <= now() \
                     RETURNING {REQUEST_COLUMNS}"
                ),
                &[],
            )
            .await
            .map_err(meta)?;
        let expired = rows
            .iter()
            .map(request_from_row)
            .collect::<Result<Vec<_>>>()?;
        for r in &expired {
            insert_event(&tx, &expired_event(r)).await?;
        }
        tx.commit().await.map_err(meta)?;
        Ok(expired)
    }

    /// Approved requests whose apply is not known to be running (crash recovery).
    pub async fn approved_requests(&self, older_than_secs: i64) -> Result<Vec<ApprovalRequest>> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {REQUEST_COLUMNS} FROM approval_requests WHERE state = 'approved' \
                     AND decided_at <= now() - make_interval(secs => $1::bigint) ORDER BY id"
                ),
                &[&older_than_secs],
            )
            .await
            .map_err(meta)?;
        rows.iter().map(request_from_row).collect()
    }

    pub async fn list_requests(&self, f: &RequestFilter) -> Result<Vec<ApprovalRequest>> {
        let c = self.client().await?;
        let state = f.state.map(|s| s.as_str());
        let rows = c
            .query(
                &format!(
                    "SELECT {REQUEST_COLUMNS} FROM approval_requests \
                     WHERE ($1::text IS NULL OR state = $1) \
                       AND ($2::text IS NULL OR project_id = $2) \
                       AND ($3::text IS NULL OR environment = $3) \
                       AND ($4::text[] IS NULL OR project_id = ANY($4)) \
                       AND ($5::uuid IS NULL OR id < $5) \
                     ORDER BY id DESC LIMIT $6"
                ),
                &[
                    &state,
                    &f.project_id,
                    &f.environment,
                    &f.projects_in_scope,
                    &f.before_id,
                    &f.limit,
                ],
            )
            .await
            .map_err(meta)?;
        rows.iter().map(request_from_row).collect()
    }

    // ---------- ownership ----------

    pub async fn ownership(&self, target: &str, name: &str) -> Result<Option<Ownership>> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!(
                    "SELECT {OWNERSHIP_COLUMNS} FROM project_databases \
                     WHERE target_cluster = $1 AND database_name = $2"
                ),
                &[&target, &name],
            )
            .await
            .map_err(meta)?;
        Ok(row.as_ref().map(ownership_from_row))
    }

    /// Write the apply intent before touching the target cluster: upsert the row in
    /// state `creating` (create) for this project and environment. Returns None when
    /// the name is owned by another project or registered in another environment.
    /// The recorded oid is kept: it is the identity a database under this name must
    /// have to count as the service's (a re-create after drift keeps the old one until
    /// [`Self::record_creating_oid`] replaces it).
    pub async fn mark_creating(&self, req: &ApprovalRequest) -> Result<Option<Ownership>> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!(
                    "INSERT INTO project_databases (target_cluster, database_name, project_id, \
                       environment, state, created_by, request_id) \
                     VALUES ($1, $2, $3, $4, 'creating', $5, $6) \
                     ON CONFLICT (target_cluster, database_name) DO UPDATE \
                       SET state = CASE WHEN project_databases.state = 'active' \
                                   THEN 'active' ELSE 'creating' END, \
                           request_id = EXCLUDED.request_id, updated_at = now() \
                       WHERE project_databases.project_id = EXCLUDED.project_id \
                         AND project_databases.environment = EXCLUDED.environment \
                     RETURNING {OWNERSHIP_COLUMNS}"
                ),
                &[
                    &req.target_cluster,
                    &req.database_name,
                    &req.project_id,
                    &req.environment,
                    &req.requested_by,
                    &req.id,
                ],
            )
            .await
            .map_err(meta)?;
        Ok(row.as_ref().map(ownership_from_row))
    }

    /// Record the oid of the database this request's apply created (under its staging
    /// name), before it is renamed into place: from then on that database, and only
    /// that one, is identified as the service's.
    pub async fn record_creating_oid(&self, req: &ApprovalRequest, oid: u32) -> Result<bool> {
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE project_databases SET database_oid = $4, updated_at = now() \
                 WHERE target_cluster = $1 AND database_name = $2 AND request_id = $3",
                &[
                    &req.target_cluster,
                    &req.database_name,
                    &req.id,
                    &i64::from(oid),
                ],
            )
            .await
            .map_err(meta)?;
        Ok(n == 1)
    }

    /// Mark the row `deleting` for this request (the delete intent). `current_oid` is
    /// the oid of the database about to be dropped, which the row was just found to
    /// identify: a row that has no oid yet (written before oids were recorded) gets
    /// it, so that a resumed delete can tell "my database is gone" from "another
    /// database holds the name" by identity.
    pub async fn mark_deleting(
        &self,
        req: &ApprovalRequest,
        current_oid: Option<u32>,
    ) -> Result<bool> {
        let c = self.client().await?;
        let oid = current_oid.map(i64::from);
        let n = c
            .execute(
                "UPDATE project_databases SET state = 'deleting', request_id = $5, \
                   database_oid = COALESCE(database_oid, $6), updated_at = now() \
                 WHERE target_cluster = $1 AND database_name = $2 AND project_id = $3 \
                   AND environment = $4",
                &[
                    &req.target_cluster,
                    &req.database_name,
                    &req.project_id,
                    &req.environment,
                    &req.id,
                    &oid,
                ],
            )
            .await
            .map_err(meta)?;
        Ok(n == 1)
    }

    pub async fn activate_ownership(
        &self,
        tx: &PgTx<'_>,
        req: &ApprovalRequest,
        database_oid: Option<i64>,
    ) -> Result<()> {
        tx.execute(
            "UPDATE project_databases SET state = 'active', database_oid = $4, updated_at = now() \
             WHERE target_cluster = $1 AND database_name = $2 AND project_id = $3",
            &[
                &req.target_cluster,
                &req.database_name,
                &req.project_id,
                &database_oid,
            ],
        )
        .await
        .map_err(meta)?;
        Ok(())
    }

    /// Undo a `deleting` intent written by this request (the delete failed for good).
    pub async fn revert_deleting(&self, tx: &PgTx<'_>, req: &ApprovalRequest) -> Result<()> {
        tx.execute(
            "UPDATE project_databases SET state = 'active', updated_at = now() \
             WHERE target_cluster = $1 AND database_name = $2 AND request_id = $3 \
               AND state = 'deleting'",
            &[&req.target_cluster, &req.database_name, &req.id],
        )
        .await
        .map_err(meta)?;
        Ok(())
    }

    pub async fn remove_ownership(&self, tx: &PgTx<'_>, req: &ApprovalRequest) -> Result<u64> {
        tx.execute(
            "DELETE FROM project_databases \
             WHERE target_cluster = $1 AND database_name = $2 AND project_id = $3",
            &[&req.target_cluster, &req.database_name, &req.project_id],
        )
        .await
        .map_err(meta)
    }

    /// Undo a `creating` intent written by this request (the create failed and the
    /// database does not exist).
    pub async fn drop_creating_intent(&self, req: &ApprovalRequest) -> Result<()> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM project_databases WHERE target_cluster = $1 AND database_name = $2 \
             AND request_id = $3 AND state = 'creating'",
            &[&req.target_cluster, &req.database_name, &req.id],
        )
        .await
        .map_err(meta)?;
        Ok(())
    }

    pub async fn list_databases(
        &self,
        project_id: &str,
        environment: Option<&str>,
        after_name: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Ownership>> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {OWNERSHIP_COLUMNS} FROM project_databases \
                     WHERE project_id = $1 AND ($2::text IS NULL OR environment = $2) \
                       AND ($3::text IS NULL OR (target_cluster || '/' || database_name) > $3) \
                     ORDER BY target_cluster || '/' || database_name LIMIT $4"
                ),
                &[&project_id, &environment, &after_name, &limit],
            )
            .await
            .map_err(meta)?;
        Ok(rows.iter().map(ownership_from_row).collect())
    }

    /// Every ownership row (consistency checks in tests and operations).
    pub async fn all_ownership(&self) -> Result<Vec<Ownership>> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {OWNERSHIP_COLUMNS} FROM project_databases ORDER BY id"),
                &[],
            )
            .await
            .map_err(meta)?;
        Ok(rows.iter().map(ownership_from_row).collect())
    }

    // ---------- audit ----------

    pub async fn insert_event(&self, ev: &NewEvent) -> Result<()> {
        let c = self.client().await?;
        insert_event(&c, ev).await
    }

    pub async fn insert_link(
        &self,
        correlation_id: &str,
        request_id: Option<Uuid>,
        project_id: &str,
        environment: &str,
        target: &str,
        database_name: &str,
    ) -> Result<()> {
        let c = self.client().await?;
        insert_link(
            &c,
            correlation_id,
            request_id,
            project_id,
            environment,
            target,
            database_name,
        )
        .await
    }

    /// Events with this correlation id, plus the events of every request linked to it.
    pub async fn events_by_correlation(
        &self,
        correlation_id: &str,
        after_id: i64,
        limit: i64,
        projects_in_scope: Option<&[String]>,
        actor_id: &str,
    ) -> Result<Vec<FlowEventRow>> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM flow_events \
                     WHERE (correlation_id = $1 OR request_id IN \
                            (SELECT request_id FROM links WHERE correlation_id = $1 \
                               AND request_id IS NOT NULL)) \
                       AND id > $2 AND ($4::text[] IS NULL OR project_id = ANY($4) OR actor_id = $5) \
                     ORDER BY id LIMIT $3"
                ),
                &[&correlation_id, &after_id, &limit, &projects_in_scope, &actor_id],
            )
            .await
            .map_err(meta)?;
        Ok(rows.iter().map(event_from_row).collect())
    }

    pub async fn events_by_request(
        &self,
        request_id: Uuid,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<FlowEventRow>> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM flow_events WHERE request_id = $1 AND id > $2 \
                     ORDER BY id LIMIT $3"
                ),
                &[&request_id, &after_id, &limit],
            )
            .await
            .map_err(meta)?;
        Ok(rows.iter().map(event_from_row).collect())
    }
}

const EVENT_COLUMNS: &str = "id, correlation_id, request_id, event_type, actor_id, actor_kind, \
    project_id, environment, database_name, outcome, status_code, message, payload, created_at";

const INSERT_EVENT_SQL: &str = "INSERT INTO flow_events (correlation_id, request_id, event_type, \
    actor_id, actor_kind, project_id, environment, database_name, outcome, status_code, message, \
    payload) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

fn event_params(ev: &NewEvent) -> [&(dyn tokio_postgres::types::ToSql + Sync); 12] {
    [
        &ev.correlation_id,
        &ev.request_id,
        &ev.event_type,
        &ev.actor_id,
        &ev.actor_kind,
        &ev.project_id,
        &ev.environment,
        &ev.database_name,
        &ev.outcome,
        &ev.status_code,
        &ev.message,
        &ev.payload,
    ]
}

pub async fn insert_event<C: Statements>(c: &C, ev: &NewEvent) -> Result<()> {
    match (&ev.run_id, &ev.payload) {
        (Some(run_id), Value::Object(map)) if !map.contains_key("run_id") => {
            let mut with_run = ev.clone();
            if let Value::Object(m) = &mut with_run.payload {
                m.insert("run_id".into(), Value::String(run_id.clone()));
            }
            c.execute(INSERT_EVENT_SQL, &event_params(&with_run))
                .await
                .map_err(meta)?;
        }
        _ => {
            c.execute(INSERT_EVENT_SQL, &event_params(ev))
                .await
                .map_err(meta)?;
        }
    }
    Ok(())
}

fn event_from_row(row: &Row) -> FlowEventRow {
    FlowEventRow {
        id: row.get("id"),
        correlation_id: row.get("correlation_id"),
        request_id: row.get("request_id"),
        event_type: row.get("event_type"),
        actor_id: row.get("actor_id"),
        actor_kind: row.get("actor_kind"),
        project_id: row.get("project_id"),
        environment: row.get("environment"),
        database_name: row.get("database_name"),
        outcome: row.get("outcome"),
        status_code: row.get("status_code"),
        message: row.get("message"),
        payload: row.get("payload"),
        created_at: row.get("created_at"),
    }
}

fn expired_event(r: &ApprovalRequest) -> NewEvent {
    NewEvent {
        correlation_id: r.correlation_id.clone(),
        request_id: Some(r.id),
        event_type: "request.expired",
        actor_id: crate::policy::SYSTEM_ACTOR_ID.into(),
        actor_kind: "system".into(),
        project_id: r.project_id.clone(),
        environment: r.environment.clone(),
        database_name: r.database_name.clone(),
        outcome: "ok",
        message: format!(
            "{} request expired without a decision (expired at {})",
            r.action, r.expires_at
        ),
        payload: serde_json::json!({ "expires_at": r.expires_at }),
        ..Default::default()
    }
}

async fn insert_link<C: Statements>(
    c: &C,
    correlation_id: &str,
    request_id: Option<Uuid>,
    project_id: &str,
    environment: &str,
    target: &str,
    database_name: &str,
) -> Result<()> {
    c.execute(
        "INSERT INTO links (correlation_id, request_id, project_id, environment, \
         target_cluster, database_name) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT ON CONSTRAINT links_unique DO NOTHING",
        &[
            &correlation_id,
            &request_id,
            &project_id,
            &environment,
            &target,
            &database_name,
        ],
    )
    .await
    .map_err(meta)?;
    Ok(())
}

async fn expire_due_for<C: Statements>(c: &C, target: &str, name: &str) -> Result<()> {
    let rows = c
        .query(
            &format!(
                "UPDATE approval_requests SET state = 'expired', finished_at = now() \
                 WHERE target_cluster = $1 AND database_name = $2 AND state = 'requested' \
                   AND expires_at <= now() RETURNING {REQUEST_COLUMNS}"
            ),
            &[&target, &name],
        )
        .await
        .map_err(meta)?;
    for row in &rows {
        insert_event(c, &expired_event(&request_from_row(row)?)).await?;
    }
    Ok(())
}
