//! Test harness: one throwaway PostgreSQL cluster per test binary, and per test a
//! fresh metadata database plus a real `db-lifecycle serve` process, reached through
//! the generated gRPC client. Nothing is mocked.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{LazyLock, Mutex},
    time::Duration,
};

use db_lifecycle::{
    config::token_sha256_hex,
    devcluster::TempCluster,
    proto::{
        self, ApproveRequest, CreateDatabaseRequest, DeleteDatabaseRequest,
        DescribeDatabaseRequest, LifecycleResult,
        database_lifecycle_client::DatabaseLifecycleClient,
    },
};
use tonic::{Code, Request, Status, transport::Channel};

/// The cluster outlives every test of the binary; it runs on its own runtime so
/// that no test's runtime owns it.
static CLUSTER: LazyLock<TempCluster> = LazyLock::new(|| {
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(TempCluster::start())
            .expect("start throwaway PostgreSQL")
    })
    .join()
    .unwrap()
});

static COUNTER: Mutex<u32> = Mutex::new(0);

pub fn cluster() -> &'static TempCluster {
    &CLUSTER
}

/// A name unique to this test process, for databases on the shared target cluster.
pub fn unique(prefix: &str) -> String {
    let mut n = COUNTER.lock().unwrap();
    *n += 1;
    format!("{prefix}_{}_{}", std::process::id(), *n)
}

/// Principals every test server knows. Tokens are fixed so tests read clearly.
pub struct P {
    pub id: &'static str,
    pub kind: &'static str,
    pub projects: &'static [&'static str],
    pub roles: &'static [&'static str],
    pub token: &'static str,
}

pub const AGENT_A: P = P {
    id: "agent-a",
    kind: "agent",
    projects: &["alpha"],
    roles: &["requester"],
    token: "tok-agent-a-0123456789",
};
pub const OWNER_A: P = P {
    id: "alice",
    kind: "human",
    projects: &["alpha"],
    roles: &["owner"],
    token: "tok-owner-a-0123456789",
};
pub const OWNER_A2: P = P {
    id: "anna",
    kind: "human",
    projects: &["alpha"],
    roles: &["owner", "requester"],
    token: "tok-owner-a2-0123456789",
};
pub const DELEGATE_A: P = P {
    id: "dana",
    kind: "human",
    projects: &["alpha"],
    roles: &["delegate"],
    token: "tok-delegate-a-0123456789",
};
pub const SERVICE_A: P = P {
    id: "svc-a",
    kind: "service",
    projects: &["alpha"],
    roles: &["requester", "owner"],
    token: "tok-service-a-0123456789",
};
pub const AGENT_B: P = P {
    id: "agent-b",
    kind: "agent",
    projects: &["beta"],
    roles: &["requester"],
    token: "tok-agent-b-0123456789",
};
pub const OWNER_B: P = P {
    id: "bob",
    kind: "human",
    projects: &["beta"],
    roles: &["owner"],
    token: "tok-owner-b-0123456789",
};
pub const ADMIN: P = P {
    id: "root",
    kind: "human",
    projects: &["*"],
    roles: &["admin"],
    token: "tok-admin-0123456789",
};
pub const READER_A: P = P {
    id: "rita",
    kind: "human",
    projects: &["alpha"],
    roles: &[],
    token: "tok-noroles-a-0123456789",
};
pub const MULTI: P = P {
    id: "max",
    kind: "human",
    projects: &["alpha", "beta"],
    roles: &["requester", "owner"],
    token: "tok-multi-0123456789",
};

pub const ALL: [&P; 10] = [
    &AGENT_A,
    &OWNER_A,
    &OWNER_A2,
    &DELEGATE_A,
    &SERVICE_A,
    &AGENT_B,
    &OWNER_B,
    &ADMIN,
    &READER_A,
    &MULTI,
];

#[derive(Default, Clone)]
pub struct Options {
    /// Extra TOML appended to the generated config (approval modes, names, ...).
    pub extra_toml: String,
    /// Value of CODEXK8S_PROJECT_DB_LIFECYCLE_ALLOWED_ENVS (None = unset).
    pub allowed_envs_var: Option<String>,
    /// Reuse an existing metadata database (restart scenarios).
    pub metadata_db: Option<String>,
    /// Extra environment variables for the server process (set last, so they win).
    pub env: Vec<(String, String)>,
    /// Reach the server over TLS with this client configuration (its config must
    /// have a `[tls]` section, e.g. through `extra_toml`).
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
}

pub struct TestServer {
    child: Option<Child>,
    pub addr: String,
    pub metadata_db: String,
    pub log_path: PathBuf,
    config_path: PathBuf,
    client_tls: Option<tonic::transport::ClientTlsConfig>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> TestServer {
        let cluster = cluster();
        let metadata_db = match &opts.metadata_db {
            Some(db) => db.clone(),
            None => {
                let db = unique("meta");
                cluster
                    .create_database(&db)
                    .await
                    .expect("create metadata db");
                db
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\nmetadata_url = \"{}\"\nadmin_url = \"{}\"\nrecovery_interval = \"1s\"\n",
            cluster.url(&metadata_db),
            cluster.url("postgres"),
        );
        toml.push_str(&opts.extra_toml);
        toml.push('\n');
        for p in ALL {
            toml.push_str(&format!(
                "\n[[principals]]\nid = \"{}\"\nkind = \"{}\"\nprojects = {:?}\nroles = {:?}\ntoken_sha256 = \"{}\"\n",
                p.id,
                p.kind,
                p.projects,
                p.roles,
                token_sha256_hex(p.token)
            ));
        }
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, toml).unwrap();
        let log_path = dir.path().join("server.log");
        let mut server = TestServer {
            child: None,
            addr: String::new(),
            metadata_db,
            log_path,
            config_path,
            client_tls: opts.client_tls.clone(),
            _dir: dir,
        };
        server.spawn(&opts).await;
        server
    }

    async fn spawn(&mut self, opts: &Options) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_db-lifecycle"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("DB_LIFECYCLE_LOG", "info")
            .env_remove("DB_LIFECYCLE_METADATA_URL")
            .env_remove("DB_LIFECYCLE_ADMIN_URL")
            .env_remove("DB_LIFECYCLE_LISTEN")
            .env_remove("DB_LIFECYCLE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        match &opts.allowed_envs_var {
            Some(v) => cmd.env("CODEXK8S_PROJECT_DB_LIFECYCLE_ALLOWED_ENVS", v),
            None => cmd.env_remove("CODEXK8S_PROJECT_DB_LIFECYCLE_ALLOWED_ENVS"),
        };
        cmd.env_remove("DB_LIFECYCLE_RUN_TOKEN_SECRET");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn db-lifecycle");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("db-lifecycle listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap();
        let addr = match addr {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                );
            }
        };
        self.addr = addr;
        self.child = Some(child);
        // Wait for SERVING (the metadata database answered).
        let channel = self.channel().await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for _ in 0..100 {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "dblifecycle.v1.DatabaseLifecycle".into(),
                })
                .await;
            if r.map(|r| r.into_inner().status == 1).unwrap_or(false) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("server never became SERVING");
    }

    pub fn config_path(&self) -> &PathBuf {
        &self.config_path
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn channel(&self) -> Channel {
        match &self.client_tls {
            None => Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .expect("connect to server"),
            Some(tls) => Channel::from_shared(format!("https://{}", self.addr))
                .unwrap()
                .tls_config(tls.clone())
                .expect("client TLS config")
                .connect()
                .await
                .expect("connect to server over TLS"),
        }
    }

    pub async fn as_(&self, p: &P) -> Caller {
        Caller {
            client: DatabaseLifecycleClient::new(self.channel().await),
            token: p.token.to_string(),
        }
    }

    /// A caller with an arbitrary authorization header value (None = no header).
    pub async fn with_auth(&self, header: Option<&str>) -> Caller {
        Caller {
            client: DatabaseLifecycleClient::new(self.channel().await),
            token: header.map(|h| format!("\u{0}{h}")).unwrap_or_default(),
        }
    }

    /// Stop the process with SIGKILL (crash) and wait for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the process again on the same config (after `kill`).
    pub async fn restart(&mut self, opts: &Options) {
        self.kill();
        self.spawn(opts).await;
    }

    /// A direct connection to the metadata database, for assertions.
    pub async fn meta(&self) -> tokio_postgres::Client {
        cluster().connect(&self.metadata_db).await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Direct connection to the target cluster (the `postgres` database).
pub async fn target() -> tokio_postgres::Client {
    cluster().connect("postgres").await.unwrap()
}

pub async fn db_exists(name: &str) -> bool {
    target()
        .await
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

pub async fn database_count_like(prefix: &str) -> i64 {
    target()
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE $1 || '%'",
            &[&prefix],
        )
        .await
        .unwrap()
        .get(0)
}

/// Create a database by hand, outside the service.
pub async fn create_by_hand(name: &str) {
    target()
        .await
        .batch_execute(&format!(
            "CREATE DATABASE {}",
            db_lifecycle::domain::quote_identifier(name)
        ))
        .await
        .unwrap();
}

pub async fn drop_by_hand(name: &str) {
    target()
        .await
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            db_lifecycle::domain::quote_identifier(name)
        ))
        .await
        .unwrap();
}

#[derive(Clone)]
pub struct Caller {
    pub client: DatabaseLifecycleClient<Channel>,
    token: String,
}

impl Caller {
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(raw) = self.token.strip_prefix('\u{0}') {
            r.metadata_mut()
                .insert("authorization", raw.parse().unwrap());
        } else if !self.token.is_empty() {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", self.token).parse().unwrap(),
            );
        }
        r
    }

    pub fn request_with_correlation<T>(&self, msg: T, correlation_id: &str) -> Request<T> {
        let mut r = self.request(msg);
        r.metadata_mut()
            .insert("x-correlation-id", correlation_id.parse().unwrap());
        r
    }

    pub async fn create(&self, env: &str, name: &str) -> Result<LifecycleResult, Status> {
        self.create_req(CreateDatabaseRequest {
            environment: env.into(),
            database_name: name.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn create_req(&self, m: CreateDatabaseRequest) -> Result<LifecycleResult, Status> {
        let mut c = self.client.clone();
        c.create(self.request(m)).await.map(|r| r.into_inner())
    }

    pub async fn delete(
        &self,
        env: &str,
        name: &str,
        confirm: bool,
    ) -> Result<LifecycleResult, Status> {
        self.delete_req(DeleteDatabaseRequest {
            environment: env.into(),
            database_name: name.into(),
            confirm_delete: confirm,
            ..Default::default()
        })
        .await
    }

    pub async fn delete_req(&self, m: DeleteDatabaseRequest) -> Result<LifecycleResult, Status> {
        let mut c = self.client.clone();
        c.delete(self.request(m)).await.map(|r| r.into_inner())
    }

    pub async fn describe(&self, env: &str, name: &str) -> Result<LifecycleResult, Status> {
        let mut c = self.client.clone();
        c.describe(self.request(DescribeDatabaseRequest {
            environment: env.into(),
            database_name: name.into(),
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner())
    }

    pub async fn decide(
        &self,
        request_id: &str,
        approve: bool,
        reason: &str,
    ) -> Result<LifecycleResult, Status> {
        let mut c = self.client.clone();
        c.approve(self.request(ApproveRequest {
            request_id: request_id.into(),
            decision: if approve {
                proto::Decision::Approve
            } else {
                proto::Decision::Deny
            } as i32,
            reason: reason.into(),
        }))
        .await
        .map(|r| r.into_inner())
    }

    pub async fn approve(&self, request_id: &str) -> Result<LifecycleResult, Status> {
        self.decide(request_id, true, "looks good").await
    }

    pub async fn deny(&self, request_id: &str, reason: &str) -> Result<LifecycleResult, Status> {
        self.decide(request_id, false, reason).await
    }

    pub async fn get_request(&self, request_id: &str) -> Result<proto::ApprovalRequest, Status> {
        let mut c = self.client.clone();
        c.get_request(self.request(proto::GetRequestRequest {
            request_id: request_id.into(),
        }))
        .await
        .map(|r| r.into_inner())
    }

    pub async fn events_by_correlation(&self, cid: &str) -> Result<Vec<proto::FlowEvent>, Status> {
        let mut c = self.client.clone();
        c.list_flow_events(self.request(proto::ListFlowEventsRequest {
            correlation_id: cid.into(),
            page_size: 500,
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner().events)
    }

    /// Names of the databases ListDatabases lists for the caller's project.
    pub async fn listed_databases(&self) -> Result<Vec<String>, Status> {
        let mut c = self.client.clone();
        c.list_databases(self.request(proto::ListDatabasesRequest {
            page_size: 500,
            ..Default::default()
        }))
        .await
        .map(|r| {
            r.into_inner()
                .databases
                .into_iter()
                .map(|d| d.database_name)
                .collect()
        })
    }

    pub async fn events_by_request(&self, rid: &str) -> Result<Vec<proto::FlowEvent>, Status> {
        let mut c = self.client.clone();
        c.list_flow_events(self.request(proto::ListFlowEventsRequest {
            request_id: rid.into(),
            page_size: 500,
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner().events)
    }
}

/// Assert an error status with a code, returning its message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code) -> Status {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            assert!(
                s.metadata().get("x-correlation-id").is_some(),
                "error without x-correlation-id: {s:?}"
            );
            s
        }
    }
}

/// Event types of a trail, in order.
pub fn event_types(events: &[proto::FlowEvent]) -> Vec<String> {
    events.iter().map(|e| e.event_type.clone()).collect()
}

/// Rows in flow_events with outcome refused/error for this metadata db.
pub async fn refusal_count(server: &TestServer) -> i64 {
    server
        .meta()
        .await
        .query_one(
            "SELECT count(*) FROM flow_events WHERE event_type = 'call.refused'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn request_count(server: &TestServer) -> i64 {
    server
        .meta()
        .await
        .query_one("SELECT count(*) FROM approval_requests", &[])
        .await
        .unwrap()
        .get(0)
}

impl TestServer {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Wait for the process to exit on its own; its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        child.wait().ok()?.code()
    }
}

// ---- helpers for status_codes.rs, validation.rs and approvals.rs ----

/// The `x-correlation-id` an error status carries in its metadata.
pub fn status_correlation_id(s: &Status) -> String {
    s.metadata()
        .get("x-correlation-id")
        .expect("status without x-correlation-id")
        .to_str()
        .unwrap()
        .to_string()
}

/// A `call.refused` row of flow_events.
#[derive(Debug, Clone)]
pub struct RefusalRow {
    pub correlation_id: String,
    pub status_code: String,
    pub outcome: String,
    pub message: String,
    pub actor_id: String,
    pub project_id: String,
    pub payload: String,
}

/// Every `call.refused` row recorded under a correlation id.
pub async fn refusal_rows(server: &TestServer, correlation_id: &str) -> Vec<RefusalRow> {
    server
        .meta()
        .await
        .query(
            "SELECT correlation_id, status_code, outcome, message, actor_id, project_id, \
                    payload::text AS payload \
             FROM flow_events WHERE event_type = 'call.refused' AND correlation_id = $1 ORDER BY id",
            &[&correlation_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| RefusalRow {
            correlation_id: r.get("correlation_id"),
            status_code: r.get("status_code"),
            outcome: r.get("outcome"),
            message: r.get("message"),
            actor_id: r.get("actor_id"),
            project_id: r.get("project_id"),
            payload: r.get("payload"),
        })
        .collect()
}

/// Assert that the refused call behind `status` left exactly one `call.refused` row,
/// under the status's correlation id, with this status code name; return the row.
pub async fn assert_refusal_recorded(
    server: &TestServer,
    status: &Status,
    code: &str,
) -> RefusalRow {
    let cid = status_correlation_id(status);
    let rows = refusal_rows(server, &cid).await;
    assert_eq!(
        rows.len(),
        1,
        "expected one call.refused row for {cid}, got {rows:?}"
    );
    let row = rows.into_iter().next().unwrap();
    assert_eq!(row.status_code, code, "refusal row {row:?}");
    assert_eq!(
        row.message,
        status.message(),
        "refusal row message differs from the status"
    );
    row
}

/// Ownership rows (project_databases) for a database name.
pub async fn ownership_rows(server: &TestServer, name: &str) -> Vec<(String, String, String)> {
    server
        .meta()
        .await
        .query(
            "SELECT project_id, environment, state FROM project_databases WHERE database_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The stored state of a request, read directly from approval_requests.
pub async fn stored_state(server: &TestServer, request_id: &str) -> Option<String> {
    let id = uuid::Uuid::parse_str(request_id).unwrap();
    server
        .meta()
        .await
        .query_opt("SELECT state FROM approval_requests WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// How many events of a type a request has in flow_events.
pub async fn request_event_count(server: &TestServer, request_id: &str, event_type: &str) -> i64 {
    let id = uuid::Uuid::parse_str(request_id).unwrap();
    server
        .meta()
        .await
        .query_one(
            "SELECT count(*) FROM flow_events WHERE request_id = $1 AND event_type = $2",
            &[&id, &event_type],
        )
        .await
        .unwrap()
        .get(0)
}

/// Event types recorded under a correlation id (directly, not through links), in order.
pub async fn event_types_for_correlation(server: &TestServer, correlation_id: &str) -> Vec<String> {
    server
        .meta()
        .await
        .query(
            "SELECT event_type FROM flow_events WHERE correlation_id = $1 ORDER BY id",
            &[&correlation_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A flow_events row that carries a call's correlation id.
#[derive(Debug, Clone)]
pub struct CarryingRow {
    pub event_type: String,
    pub correlation_id: String,
    pub request_id: Option<String>,
    pub actor_id: String,
    pub outcome: String,
    pub project_id: String,
    pub payload: serde_json::Value,
}

/// Every row of flow_events that carries `correlation_id`: recorded under it, or
/// naming it in its payload (`decision_correlation_id` of a decision recorded under
/// the request's id, `call_correlation_id` of `request.repeated`).
pub async fn rows_carrying(server: &TestServer, correlation_id: &str) -> Vec<CarryingRow> {
    server
        .meta()
        .await
        .query(
            "SELECT event_type, correlation_id, request_id::text AS request_id, actor_id, \
                    outcome, project_id, payload::text AS payload \
             FROM flow_events WHERE correlation_id = $1 \
                OR payload->>'decision_correlation_id' = $1 \
                OR payload->>'call_correlation_id' = $1 \
             ORDER BY id",
            &[&correlation_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| CarryingRow {
            event_type: r.get("event_type"),
            correlation_id: r.get("correlation_id"),
            request_id: r.get("request_id"),
            actor_id: r.get("actor_id"),
            outcome: r.get("outcome"),
            project_id: r.get("project_id"),
            payload: serde_json::from_str(r.get::<_, &str>("payload")).unwrap(),
        })
        .collect()
}

/// The pg_database oid of a database on the target cluster, None when it does not exist.
pub async fn oid_of(name: &str) -> Option<u32> {
    target()
        .await
        .query_opt("SELECT oid FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

// ---- helpers for faults.rs, outage.rs, shutdown.rs and hostile.rs ----

impl TestServer {
    /// Rewrite this server's config file; it takes effect at the next `restart`.
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        std::fs::write(&self.config_path, edit(text)).unwrap();
    }

    /// Add top-level keys (e.g. `fault_points = [...]`) at the start of the config,
    /// before any table, so they stay top-level.
    pub fn prepend_config(&self, lines: &str) {
        let lines = lines.to_string();
        self.edit_config(move |text| format!("{}\n{text}", lines.trim_end()));
    }

    /// Remove every top-level line that sets `key`.
    pub fn remove_config_key(&self, key: &str) {
        let prefix = format!("{key} =");
        self.edit_config(|text| {
            text.lines()
                .filter(|l| !l.trim_start().starts_with(&prefix))
                .map(|l| format!("{l}\n"))
                .collect()
        });
    }

    /// Poll the log until it contains `needle`; false if it did not within `limit`.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Send a signal (`TERM`, `KILL`, ...) to the running process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Whether the process is still running (not exited, not reaped).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// gRPC health of the lifecycle service: Some(true) SERVING, Some(false) any
    /// other status, None when the call itself failed (guarded by a 5 s timeout).
    pub async fn health(&self) -> Option<bool> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5));
        let call = async {
            let channel = channel.connect().await.ok()?;
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let r = client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "dblifecycle.v1.DatabaseLifecycle".into(),
                })
                .await
                .ok()?;
            Some(r.into_inner().status == 1)
        };
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .ok()
            .flatten()
    }

    /// Poll health until it reports `serving` (true = SERVING); false on timeout.
    pub async fn wait_health(&self, serving: bool, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if self.health().await == Some(serving) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The states a request never leaves.
pub const FINAL_STATES: [&str; 4] = ["applied", "failed", "denied", "expired"];

/// Poll the stored state of a request until it is final; None if it was not within
/// `limit` (the last state seen is in the panic message of callers that need it).
pub async fn wait_final(server: &TestServer, request_id: &str, limit: Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let state = stored_state(server, request_id).await;
        if let Some(s) = &state
            && FINAL_STATES.contains(&s.as_str())
        {
            return state;
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The consistency invariant between the target cluster and ownership, for a
/// quiescent server (no request open): every ownership row is `active` and its
/// database exists; every one of `names` that exists has its row.
pub async fn assert_ownership_consistent(server: &TestServer, names: &[&str]) {
    let meta = server.meta().await;
    let open: i64 = meta
        .query_one(
            "SELECT count(*) FROM approval_requests WHERE state IN ('requested','approved')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "a request is still open");
    let rows: Vec<(String, String)> = meta
        .query("SELECT database_name, state FROM project_databases", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, state) in &rows {
        assert_eq!(state, "active", "ownership row of `{name}` left in {state}");
        assert!(
            db_exists(name).await,
            "ownership row for `{name}` points to a missing database"
        );
    }
    for name in names {
        if db_exists(name).await {
            assert!(
                rows.iter().any(|(n, _)| n == name),
                "managed database `{name}` exists without its ownership row"
            );
        }
    }
}

// ---- helpers for run_tokens.rs, tls.rs, secrets.rs and authz_matrix.rs ----

/// The run-token signing secret test servers get from `run_token_options`.
pub const RUN_TOKEN_SECRET: &str = "test-run-token-secret-0123456789abcdef";
pub const RUN_TOKEN_ISSUER: &str = "test-control-plane";
pub const RUN_TOKEN_AUDIENCE: &str = "db-lifecycle-tests";

/// Options for a server that accepts run tokens signed with `RUN_TOKEN_SECRET`
/// (given through `DB_LIFECYCLE_RUN_TOKEN_SECRET`), plus `extra_toml`.
pub fn run_token_options(extra_toml: &str) -> Options {
    Options {
        extra_toml: format!(
            "{extra_toml}\n[run_tokens]\nissuer = \"{RUN_TOKEN_ISSUER}\"\naudience = \"{RUN_TOKEN_AUDIENCE}\"\nmax_ttl = \"1h\"\nleeway = \"5s\"\n"
        ),
        env: vec![(
            "DB_LIFECYCLE_RUN_TOKEN_SECRET".into(),
            RUN_TOKEN_SECRET.into(),
        )],
        ..Default::default()
    }
}

/// The run-token configuration matching `run_token_options`, for minting.
pub fn run_token_config() -> db_lifecycle::config::RunTokenConfig {
    use db_lifecycle::{config::RunTokenSecret, domain::PrincipalKind};
    db_lifecycle::config::RunTokenConfig {
        secret: RunTokenSecret::new(RUN_TOKEN_SECRET.as_bytes().to_vec()),
        issuer: RUN_TOKEN_ISSUER.into(),
        audience: RUN_TOKEN_AUDIENCE.into(),
        leeway: Duration::from_secs(5),
        max_ttl: Duration::from_secs(3600),
        allowed_kinds: vec![
            PrincipalKind::Agent,
            PrincipalKind::Service,
            PrincipalKind::Human,
        ],
    }
}

/// Mint a run token the `run_token_options` server accepts (10 minutes).
pub fn run_token(
    subject: &str,
    kind: &str,
    projects: &[&str],
    roles: &[&str],
    run_id: Option<&str>,
) -> String {
    let kind: db_lifecycle::domain::PrincipalKind =
        serde_json::from_value(serde_json::Value::String(kind.into())).expect("kind");
    let roles = roles
        .iter()
        .map(|r| serde_json::from_value(serde_json::Value::String((*r).into())).expect("role"))
        .collect();
    db_lifecycle::transport::run_tokens::mint(
        &run_token_config(),
        &db_lifecycle::transport::run_tokens::MintRequest {
            subject: subject.into(),
            kind,
            projects: projects.iter().map(|p| p.to_string()).collect(),
            roles,
            run_id: run_id.map(str::to_string),
            ttl: Duration::from_secs(600),
        },
    )
    .expect("mint run token")
}

impl TestServer {
    /// A caller presenting this bearer token.
    pub async fn with_token(&self, token: &str) -> Caller {
        Caller {
            client: DatabaseLifecycleClient::new(self.channel().await),
            token: token.to_string(),
        }
    }
}

/// Every row of flow_events (all text columns and the payload) and of links, as
/// text, for greps over the whole audit trail.
pub async fn audit_dump(server: &TestServer) -> Vec<String> {
    let meta = server.meta().await;
    let mut out = Vec::new();
    for sql in [
        "SELECT row_to_json(f)::text FROM flow_events f ORDER BY id",
        "SELECT row_to_json(l)::text FROM links l",
        "SELECT row_to_json(r)::text FROM approval_requests r",
        "SELECT row_to_json(d)::text FROM project_databases d",
    ] {
        for row in meta.query(sql, &[]).await.unwrap() {
            out.push(row.get(0));
        }
    }
    out
}

/// A codec that sends and receives raw bytes, to put on the wire what a generated
/// client never would (for `tonic::client::Grpc`).
pub struct RawCodec;

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use prost::bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}
