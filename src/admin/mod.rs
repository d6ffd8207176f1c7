//! The pooled admin connection to each target cluster: CREATE/DROP DATABASE and
//! catalog facts. Names arrive as `DatabaseName` (validated) and are always quoted.
//!
//! Every statement is bounded (`crate::pg`): catalog reads by `database_timeout`,
//! CREATE/ALTER/DROP DATABASE by the more generous `ddl_timeout`. A target that does
//! not answer within the bound is UNAVAILABLE (`target cluster … did not answer
//! within …`).

use std::{collections::BTreeMap, time::Duration};

use tokio_postgres::error::SqlState;

pub mod tls;

use crate::{
    config::SecretUrl,
    domain::{DatabaseFacts, DatabaseName},
    error::ServiceError,
    pg::{BoundedPool, PgConn, PgError, Statements},
};

/// The unique index on `pg_database.datname`. A CREATE DATABASE or a rename racing
/// another of the same name (such as one left running on the server by an apply that
/// timed out) can fail on it instead of with `duplicate_database`.
const DATNAME_INDEX: &str = "pg_database_datname_index";

/// The database name is taken: `duplicate_database`, or the unique index said so.
fn name_taken(e: &PgError) -> bool {
    e.code() == Some(&SqlState::DUPLICATE_DATABASE) || e.is_unique_violation(DATNAME_INDEX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsureOutcome {
    Created,
    AlreadyExisted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameOutcome {
    Renamed,
    /// A database with the new name exists already.
    NameTaken,
    /// No database has the old name (any more): renamed or dropped meanwhile, for
    /// example by a rename of an earlier attempt that the server finished after that
    /// attempt had timed out.
    SourceMissing,
}

#[derive(Clone)]
pub struct AdminClient {
    pools: BTreeMap<String, BoundedPool>,
    /// Bound of CREATE/ALTER/DROP DATABASE (`ddl_timeout`).
    ddl_timeout: Duration,
}

impl AdminClient {
    /// One pool per target; `timeout` bounds connecting, waiting for a connection and
    /// each catalog statement (`database_timeout`), `ddl_timeout` each DDL statement.
    pub fn new(
        targets: &BTreeMap<String, SecretUrl>,
        pool_size: usize,
        timeout: Duration,
        ddl_timeout: Duration,
    ) -> Result<Self, String> {
        let mut pools = BTreeMap::new();
        for (name, url) in targets {
            pools.insert(
                name.clone(),
                BoundedPool::new(url, pool_size, timeout)
                    .map_err(|e| format!("target `{name}`: {e}"))?,
            );
        }
        Ok(Self { pools, ddl_timeout })
    }

    /// Whether this replica has a pool for (is configured with) the target.
    pub fn has_target(&self, target: &str) -> bool {
        self.pools.contains_key(target)
    }

    pub fn close(&self) {
        for pool in self.pools.values() {
            pool.close();
        }
    }

    async fn client(&self, target: &str) -> Result<PgConn, ServiceError> {
        let pool = self.pools.get(target).ok_or_else(|| {
            ServiceError::Internal(format!("no admin pool for target `{target}`"))
        })?;
        pool.get()
            .await
            .map_err(|e| ServiceError::target(target, e))
    }

    /// The database's pg_database oid, None when it does not exist.
    pub async fn oid(
        &self,
        target: &str,
        name: &DatabaseName,
    ) -> Result<Option<u32>, ServiceError> {
        let c = self.client(target).await?;
        let row = c
            .query_opt(
                "SELECT oid FROM pg_database WHERE datname = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(|e| ServiceError::target(target, e))?;
        Ok(row.map(|r| r.get::<_, u32>(0)))
    }

    /// The name of the database with this oid, None when no database has it (it was
    /// dropped). Tells a managed database that was dropped apart from one that was
    /// renamed: the identity an ownership row records is the oid, not the name.
    pub async fn name_of_oid(
        &self,
        target: &str,
        oid: i64,
    ) -> Result<Option<String>, ServiceError> {
        // pg_database oids are unsigned 32-bit: any other value names no database.
        let Ok(oid) = u32::try_from(oid) else {
            return Ok(None);
        };
        let c = self.client(target).await?;
        let row = c
            .query_opt(
                "SELECT datname::text FROM pg_database WHERE oid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| ServiceError::target(target, e))?;
        Ok(row.map(|r| r.get::<_, String>(0)))
    }

    pub async fn exists(&self, target: &str, name: &DatabaseName) -> Result<bool, ServiceError> {
        let c = self.client(target).await?;
        let row = c
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(|e| ServiceError::target(target, e))?;
        Ok(row.is_some())
    }

    /// Catalog facts, read from the cluster without connecting to the database itself
    /// (so it works for databases with `datallowconn = false`).
    pub async fn facts(
        &self,
        target: &str,
        name: &DatabaseName,
    ) -> Result<Option<DatabaseFacts>, ServiceError> {
        let c = self.client(target).await?;
        let row = c
            .query_opt(
                "SELECT pg_get_userbyid(d.datdba)::text AS owner_role, \
                        pg_encoding_to_char(d.encoding)::text AS encoding, \
                        d.datallowconn AS allows_connections, \
                        (SELECT count(*)::int FROM pg_stat_activity a WHERE a.datid = d.oid) \
                          AS connection_count, \
                        d.oid AS oid \
                 FROM pg_database d WHERE d.datname = $1",
                &[&name.as_str()],
            )
            .await
            .map_err(|e| ServiceError::target(target, e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let oid: u32 = row.get("oid");
        // Size is separate: it fails, or is NULL, if the database was dropped since the
        // query above (a concurrent delete); -1 then, as for any size not known.
        let size_bytes = c
            .query_opt("SELECT pg_database_size($1::oid)", &[&oid])
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .unwrap_or(-1);
        Ok(Some(DatabaseFacts {
            owner_role: row.get("owner_role"),
            size_bytes,
            encoding: row.get("encoding"),
            connection_count: row.get("connection_count"),
            allows_connections: row.get("allows_connections"),
        }))
    }

    /// CREATE DATABASE, treating "already exists" as success (the apply creates under
    /// a name of its own request, so an existing one is its own earlier attempt).
    pub async fn ensure_database(
        &self,
        target: &str,
        name: &DatabaseName,
    ) -> Result<EnsureOutcome, ServiceError> {
        let c = self.client(target).await?;
        // Identifier quoted; DDL cannot take bind parameters.
        let sql = format!("CREATE DATABASE {}", name.quoted());
        match c.stmts().within(self.ddl_timeout).batch_execute(&sql).await {
            Ok(()) => Ok(EnsureOutcome::Created),
            Err(e) if name_taken(&e) => Ok(EnsureOutcome::AlreadyExisted),
            Err(e) => Err(ServiceError::target(target, e)),
        }
    }

    /// ALTER DATABASE ... RENAME TO: atomic, and refused by PostgreSQL when `to` is
    /// taken, so the database keeps its identity (oid) and nothing is overwritten.
    pub async fn rename_database(
        &self,
        target: &str,
        from: &DatabaseName,
        to: &DatabaseName,
    ) -> Result<RenameOutcome, ServiceError> {
        let c = self.client(target).await?;
        let sql = format!("ALTER DATABASE {} RENAME TO {}", from.quoted(), to.quoted());
        match c.stmts().within(self.ddl_timeout).batch_execute(&sql).await {
            Ok(()) => Ok(RenameOutcome::Renamed),
            Err(e) if name_taken(&e) => Ok(RenameOutcome::NameTaken),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_DATABASE) => {
                Ok(RenameOutcome::SourceMissing)
            }
            Err(e) => Err(ServiceError::target(target, e)),
        }
    }

    /// DROP DATABASE ... WITH (FORCE): ends open sessions first. Returns whether it existed.
    pub async fn drop_database(
        &self,
        target: &str,
        name: &DatabaseName,
    ) -> Result<bool, ServiceError> {
        let existed = self.exists(target, name).await?;
        let c = self.client(target).await?;
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", name.quoted());
        c.stmts()
            .within(self.ddl_timeout)
            .batch_execute(&sql)
            .await
            .map_err(|e| ServiceError::target(target, e))?;
        Ok(existed)
    }
}
