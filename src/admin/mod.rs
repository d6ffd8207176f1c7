//! The pooled admin connection to each target cluster: CREATE/DROP DATABASE and
//! catalog facts. Names arrive as `DatabaseName` (validated) and are always quoted.

use std::{collections::BTreeMap, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;

pub mod tls;

use crate::{
    config::SecretUrl,
    domain::{DatabaseFacts, DatabaseName},
    error::ServiceError,
};

/// Connect timeouts are short so that an unreachable cluster fails fast (UNAVAILABLE).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Build a deadpool-postgres pool from a URL. Nothing connects until first use.
pub fn build_pool(url: &SecretUrl, max_size: usize) -> Result<Pool, String> {
    let mut cfg = url.pg_config()?;
    cfg.connect_timeout(CONNECT_TIMEOUT);
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(30));
    if cfg.get_application_name().is_none() {
        cfg.application_name("db-lifecycle");
    }
    let connector = url.tls()?.connector()?;
    let manager = Manager::from_config(
        cfg,
        connector,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| e.to_string())
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
}

#[derive(Clone)]
pub struct AdminClient {
    pools: BTreeMap<String, Pool>,
}

impl AdminClient {
    pub fn new(targets: &BTreeMap<String, SecretUrl>, pool_size: usize) -> Result<Self, String> {
        let mut pools = BTreeMap::new();
        for (name, url) in targets {
            pools.insert(
                name.clone(),
                build_pool(url, pool_size).map_err(|e| format!("target `{name}`: {e}"))?,
            );
        }
        Ok(Self { pools })
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

    async fn client(&self, target: &str) -> Result<deadpool_postgres::Client, ServiceError> {
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
        match c.batch_execute(&sql).await {
            Ok(()) => Ok(EnsureOutcome::Created),
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {
                Ok(EnsureOutcome::AlreadyExisted)
            }
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
        match c.batch_execute(&sql).await {
            Ok(()) => Ok(RenameOutcome::Renamed),
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {
                Ok(RenameOutcome::NameTaken)
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
        c.batch_execute(&sql)
            .await
            .map_err(|e| ServiceError::target(target, e))?;
        Ok(existed)
    }
}
