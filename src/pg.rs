//! Bounded PostgreSQL connections: the one place where the service puts time bounds
//! on what it awaits from PostgreSQL, for the metadata database (`repository`) and
//! the target clusters (`admin`) alike.
//!
//! A PostgreSQL that stops answering without refusing (a frozen host or process, a
//! blackholed network) does not close the connections already open to it: its kernel
//! may still acknowledge packets and keepalive probes, so a statement sent on such a
//! connection would wait for ever. Therefore:
//!
//! * a pool ([`BoundedPool`]) bounds waiting for a free connection, opening one (TCP
//!   connect and startup) and recycling one, each by its `timeout`;
//! * every statement is bounded on the client side: by the same `timeout`, or by a
//!   bound given for that one statement (DDL that can legitimately take long, a lock
//!   wait), see [`Stmts::within`] and [`Stmts::waiting`]. When it hits, the statement
//!   fails with [`PgError::TimedOut`];
//! * a connection whose statement did not finish — it timed out, or the future that
//!   ran it was dropped (a caller hung up, an outer timeout) — is closed and taken out
//!   of its pool when it is dropped ([`PgConn`]), never handed to the next caller
//!   with a statement still pending on it;
//! * TCP keepalive and `TCP_USER_TIMEOUT` make the kernel close connections over a
//!   network that stopped delivering, so idle pooled connections to a blackholed
//!   peer are found closed instead of being handed out.
//!
//! Statements can only be run through [`Statements`]: a [`PgConn`] does not give out
//! the driver's client, so no statement escapes its bound.

use std::{
    future::Future,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use tokio_postgres::{Row, error::SqlState, types::ToSql};

use crate::config::SecretUrl;

/// Idle time before the first TCP keepalive probe, the interval between probes and
/// how many may go unanswered: a peer gone from the network is noticed on an idle
/// connection within about a minute.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data (or a keepalive probe) may stay unacknowledged before the kernel
/// closes the connection (Linux `TCP_USER_TIMEOUT`; ignored elsewhere). A live server
/// acknowledges at once, also while it runs a long statement.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// A statement or connection that failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The server answered with an error, or the connection broke.
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection from the pool (closed, none free in time, connecting failed).
    #[error("{0}")]
    Pool(PoolError),
    /// No answer within the bound (connecting, recycling, or a statement).
    #[error("no answer within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

impl PgError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            PgError::Db(e) => e.code(),
            _ => None,
        }
    }

    /// A server error: a unique constraint (or index) of this name said no.
    pub fn is_unique_violation(&self, constraint: &str) -> bool {
        match self {
            PgError::Db(e) => e.as_db_error().is_some_and(|db| {
                db.code() == &SqlState::UNIQUE_VIOLATION && db.constraint() == Some(constraint)
            }),
            _ => false,
        }
    }
}

/// A deadpool-postgres pool whose waits are bounded by `timeout`. Nothing connects
/// until first use.
#[derive(Clone)]
pub struct BoundedPool {
    pool: Pool,
    timeout: Duration,
}

impl BoundedPool {
    pub fn new(url: &SecretUrl, max_size: usize, timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            pool: build_pool(url, max_size, timeout)?,
            timeout,
        })
    }

    /// The bound of each wait and of each statement (unless one is given for it).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A connection; a timeout connecting or recycling is [`PgError::TimedOut`].
    pub async fn get(&self) -> Result<PgConn, PgError> {
        match self.pool.get().await {
            Ok(obj) => Ok(PgConn {
                obj: Some(obj),
                guard: Guard {
                    timeout: self.timeout,
                    pending: AtomicUsize::new(0),
                    broken: AtomicBool::new(false),
                },
            }),
            Err(PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle)) => {
                Err(PgError::TimedOut(self.timeout))
            }
            // The driver's own `connect_timeout` (TCP connect) fired.
            Err(PoolError::Backend(e)) if is_timed_out(&e) => Err(PgError::TimedOut(self.timeout)),
            Err(e) => Err(PgError::Pool(e)),
        }
    }

    pub fn close(&self) {
        self.pool.close();
    }
}

/// An I/O timeout inside a driver error (its `connect_timeout`).
fn is_timed_out(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
}

/// Build a deadpool-postgres pool from a URL, with `timeout` on connecting, waiting
/// for a free connection and recycling, and TCP keepalive. Nothing connects until
/// first use. (The raw pool is for comparisons outside the service, such as the
/// benchmark; the service uses [`BoundedPool`].)
pub fn build_pool(url: &SecretUrl, max_size: usize, timeout: Duration) -> Result<Pool, String> {
    let mut cfg = url.pg_config()?;
    cfg.connect_timeout(timeout);
    cfg.keepalives(true);
    cfg.keepalives_idle(KEEPALIVE_IDLE);
    cfg.keepalives_interval(KEEPALIVE_INTERVAL);
    cfg.keepalives_retries(KEEPALIVE_RETRIES);
    cfg.tcp_user_timeout(TCP_USER_TIMEOUT);
    if cfg.get_application_name().is_none() {
        cfg.application_name("db-lifecycle");
    }
    let connector = url.tls()?.connector()?;
    let manager = Manager::from_config(
        cfg,
        connector,
        ManagerConfig {
            // Only whether the connection is closed: a connection whose statement was
            // cut off never comes back to the pool (see `PgConn`).
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| e.to_string())
}

/// What a connection's statements left it in.
struct Guard {
    /// The bound of a statement unless one is given for it.
    timeout: Duration,
    /// Statements started and not finished (a dropped statement stays counted).
    pending: AtomicUsize,
    /// A statement timed out: the connection is not used again.
    broken: AtomicBool,
}

impl Guard {
    async fn run<T>(
        &self,
        limit: Duration,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, PgError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(PgError::TimedOut(limit));
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        match tokio::time::timeout(limit, statement).await {
            Ok(result) => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                result.map_err(PgError::Db)
            }
            Err(_) => {
                self.broken.store(true, Ordering::SeqCst);
                Err(PgError::TimedOut(limit))
            }
        }
    }

    /// Whether every statement finished, so the connection is fit for the pool.
    fn clean(&self) -> bool {
        !self.broken.load(Ordering::SeqCst) && self.pending.load(Ordering::SeqCst) == 0
    }
}

/// A pooled connection. Dropped after all its statements finished, it goes back to
/// the pool; dropped with a statement timed out or cut off, it is closed and taken
/// out of the pool (which may then open a new one).
pub struct PgConn {
    obj: Option<Object>,
    guard: Guard,
}

impl PgConn {
    /// BEGIN (bounded); the transaction's statements are bounded like the
    /// connection's. Dropped without commit, it is rolled back.
    pub async fn transaction(&mut self) -> Result<PgTx<'_>, PgError> {
        let guard = &self.guard;
        let obj = self.obj.as_mut().expect("present until dropped");
        let tx = guard.run(guard.timeout, obj.transaction()).await?;
        Ok(PgTx { tx, guard })
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        if let Some(obj) = self.obj.take()
            && !self.guard.clean()
        {
            // Dropping the client aborts its connection task, which closes the socket.
            drop(Object::take(obj));
        }
    }
}

/// A transaction on a [`PgConn`].
pub struct PgTx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    guard: &'a Guard,
}

impl PgTx<'_> {
    pub async fn commit(self) -> Result<(), PgError> {
        let PgTx { tx, guard } = self;
        guard.run(guard.timeout, tx.commit()).await
    }

    pub async fn rollback(self) -> Result<(), PgError> {
        let PgTx { tx, guard } = self;
        guard.run(guard.timeout, tx.rollback()).await
    }
}

#[derive(Clone, Copy)]
enum On<'a> {
    Client(&'a tokio_postgres::Client),
    Tx(&'a tokio_postgres::Transaction<'a>),
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Statements on a connection or transaction, each bounded by `limit`.
#[derive(Clone, Copy)]
pub struct Stmts<'a> {
    on: On<'a>,
    guard: &'a Guard,
    limit: Duration,
}

impl<'a> Stmts<'a> {
    /// This bound instead of the connection's (DDL that can legitimately take long).
    pub fn within(self, limit: Duration) -> Self {
        Self { limit, ..self }
    }

    /// For a statement that waits up to `wait` on the server (a `lock_timeout`): the
    /// connection's bound on top of that wait.
    pub fn waiting(self, wait: Duration) -> Self {
        Self {
            limit: self.limit.saturating_add(wait),
            ..self
        }
    }

    pub async fn query(self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, PgError> {
        match self.on {
            On::Client(c) => self.guard.run(self.limit, c.query(sql, params)).await,
            On::Tx(t) => self.guard.run(self.limit, t.query(sql, params)).await,
        }
    }

    pub async fn query_one(self, sql: &str, params: Params<'_>) -> Result<Row, PgError> {
        match self.on {
            On::Client(c) => self.guard.run(self.limit, c.query_one(sql, params)).await,
            On::Tx(t) => self.guard.run(self.limit, t.query_one(sql, params)).await,
        }
    }

    pub async fn query_opt(self, sql: &str, params: Params<'_>) -> Result<Option<Row>, PgError> {
        match self.on {
            On::Client(c) => self.guard.run(self.limit, c.query_opt(sql, params)).await,
            On::Tx(t) => self.guard.run(self.limit, t.query_opt(sql, params)).await,
        }
    }

    pub async fn execute(self, sql: &str, params: Params<'_>) -> Result<u64, PgError> {
        match self.on {
            On::Client(c) => self.guard.run(self.limit, c.execute(sql, params)).await,
            On::Tx(t) => self.guard.run(self.limit, t.execute(sql, params)).await,
        }
    }

    /// One or more statements without parameters (simple query protocol).
    pub async fn batch_execute(self, sql: &str) -> Result<(), PgError> {
        match self.on {
            On::Client(c) => self.guard.run(self.limit, c.batch_execute(sql)).await,
            On::Tx(t) => self.guard.run(self.limit, t.batch_execute(sql)).await,
        }
    }
}

/// Where statements run: a [`PgConn`] or a [`PgTx`]. The provided methods run one
/// statement with the connection's bound; [`Self::stmts`] gives one with another.
pub trait Statements: Sync {
    fn stmts(&self) -> Stmts<'_>;

    fn query<'a>(
        &'a self,
        sql: &'a str,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Vec<Row>, PgError>> + Send + 'a {
        self.stmts().query(sql, params)
    }

    fn query_one<'a>(
        &'a self,
        sql: &'a str,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Row, PgError>> + Send + 'a {
        self.stmts().query_one(sql, params)
    }

    fn query_opt<'a>(
        &'a self,
        sql: &'a str,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Option<Row>, PgError>> + Send + 'a {
        self.stmts().query_opt(sql, params)
    }

    fn execute<'a>(
        &'a self,
        sql: &'a str,
        params: Params<'a>,
    ) -> impl Future<Output = Result<u64, PgError>> + Send + 'a {
        self.stmts().execute(sql, params)
    }

    fn batch_execute<'a>(
        &'a self,
        sql: &'a str,
    ) -> impl Future<Output = Result<(), PgError>> + Send + 'a {
        self.stmts().batch_execute(sql)
    }
}

impl Statements for PgConn {
    fn stmts(&self) -> Stmts<'_> {
        let obj = self.obj.as_ref().expect("present until dropped");
        Stmts {
            on: On::Client(obj),
            guard: &self.guard,
            limit: self.guard.timeout,
        }
    }
}

impl Statements for PgTx<'_> {
    fn stmts(&self) -> Stmts<'_> {
        Stmts {
            on: On::Tx(&self.tx),
            guard: self.guard,
            limit: self.guard.timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcluster::TempCluster;

    async fn backend_pid(c: &PgConn) -> i32 {
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// A connection goes back to the pool only when its statements finished: one
    /// timed out, or cut off by its caller, is closed and a new one is opened.
    #[tokio::test]
    async fn connections_cut_off_mid_statement_are_not_reused() {
        let cluster = TempCluster::start().await.unwrap();
        let url = SecretUrl::new(cluster.url("postgres"));
        let pool = BoundedPool::new(&url, 2, Duration::from_millis(500)).unwrap();

        // Finished statements: the same connection comes back.
        let c = pool.get().await.unwrap();
        let first = backend_pid(&c).await;
        drop(c);
        let c = pool.get().await.unwrap();
        assert_eq!(backend_pid(&c).await, first, "a clean connection is reused");
        assert_eq!(pool.pool.status().size, 1);

        // A statement over the bound times out; the connection is not used again.
        let err = c.batch_execute("SELECT pg_sleep(3)").await.unwrap_err();
        assert!(matches!(err, PgError::TimedOut(d) if d == Duration::from_millis(500)));
        assert!(matches!(
            c.query_one("SELECT 1", &[]).await,
            Err(PgError::TimedOut(_))
        ));
        drop(c);
        assert_eq!(pool.pool.status().size, 0, "taken out of the pool");
        let c = pool.get().await.unwrap();
        let second = backend_pid(&c).await;
        assert_ne!(
            second, first,
            "a timed-out connection is never handed out again"
        );

        // A longer bound for one statement (DDL, a lock wait) lets it finish.
        c.stmts()
            .within(Duration::from_secs(5))
            .batch_execute("SELECT pg_sleep(1)")
            .await
            .unwrap();
        c.stmts()
            .waiting(Duration::from_secs(2))
            .batch_execute("SELECT pg_sleep(1)")
            .await
            .unwrap();
        drop(c);
        let c = pool.get().await.unwrap();
        assert_eq!(backend_pid(&c).await, second);

        // Cut off by its caller (an outer timeout drops the statement's future).
        let cut = tokio::time::timeout(
            Duration::from_millis(100),
            c.stmts()
                .within(Duration::from_secs(5))
                .batch_execute("SELECT pg_sleep(3)"),
        )
        .await;
        assert!(cut.is_err());
        drop(c);
        let c = pool.get().await.unwrap();
        assert_ne!(
            backend_pid(&c).await,
            second,
            "a cut-off connection is not reused"
        );

        // Same inside a transaction; a timed-out COMMIT or statement leaves nothing
        // pending for the next caller.
        let mut c = c;
        let tx = c.transaction().await.unwrap();
        let third: i32 = tx
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(matches!(
            tx.execute("SELECT pg_sleep(3)", &[]).await,
            Err(PgError::TimedOut(_))
        ));
        drop(tx);
        drop(c);
        let c = pool.get().await.unwrap();
        assert_ne!(backend_pid(&c).await, third);
    }
}
