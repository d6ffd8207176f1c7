//! Benchmark: the service side by side with raw PostgreSQL doing the same
//! statements, in the same run, on the same throwaway cluster. Reports ratios.
//!
//!     cargo bench --bench lifecycle            # defaults
//!     BENCH_DESCRIBES=2000 BENCH_CYCLES=30 BENCH_CONCURRENCY=8 cargo bench --bench lifecycle
//!
//! - describe: the service's Describe RPC vs. the statements Describe runs (ownership
//!   lookup, existence, catalog facts, size, audit event, link) on one pooled connection.
//! - create+delete: a Create and a confirmed Delete in approval mode `none` (so one RPC
//!   applies each) vs. raw `CREATE DATABASE` / `DROP DATABASE ... WITH (FORCE)`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use db_lifecycle::{
    config::{Config, Overrides, token_sha256_hex},
    devcluster::TempCluster,
    proto::{
        CreateDatabaseRequest, DeleteDatabaseRequest, DescribeDatabaseRequest,
        database_lifecycle_client::DatabaseLifecycleClient,
    },
    server,
};
use tonic::{Request, transport::Channel};

const TOKEN: &str = "bench-token-0123456789";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

struct Stats {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Stats {
    fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l[((l.len() as f64 - 1.0) * p).round() as usize]
    }
}

async fn run_concurrent<F, Fut>(total: usize, concurrency: usize, f: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = worker;
            while i < total {
                let t = Instant::now();
                f(i).await;
                lat.push(t.elapsed());
                i += concurrency;
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    Stats {
        ops: total,
        elapsed: start.elapsed(),
        latencies,
    }
}

fn row(label: &str, service: &Stats, raw: &Stats) {
    println!(
        "{label:<28} service {:>9.1} op/s (p50 {:>7.2} ms, p99 {:>7.2} ms) | raw {:>9.1} op/s (p50 {:>7.2} ms) | service/raw throughput {:>5.2}x, p50 latency {:>5.2}x",
        service.per_sec(),
        service.pct(0.5).as_secs_f64() * 1e3,
        service.pct(0.99).as_secs_f64() * 1e3,
        raw.per_sec(),
        raw.pct(0.5).as_secs_f64() * 1e3,
        service.per_sec() / raw.per_sec(),
        service.pct(0.5).as_secs_f64() / raw.pct(0.5).as_secs_f64(),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs bench targets too (without `--bench`): a
    // benchmark there would only slow the test suite down.
    if !std::env::args().any(|a| a == "--bench") {
        println!("lifecycle benchmark: skipped (run it with `cargo bench --bench lifecycle`)");
        return Ok(());
    }
    let describes = env_usize("BENCH_DESCRIBES", 1000);
    let cycles = env_usize("BENCH_CYCLES", 20);
    let concurrency = env_usize("BENCH_CONCURRENCY", 8);

    let cluster = TempCluster::start().await?;
    cluster.create_database("bench_meta").await?;
    let text = format!(
        "listen = \"127.0.0.1:0\"\nmetadata_url = \"{}\"\nadmin_url = \"{}\"\n\
         [approval]\ncreate = \"none\"\ndelete = \"none\"\n\
         [[principals]]\nid = \"bench\"\nkind = \"service\"\nprojects = [\"bench\"]\n\
         roles = [\"requester\"]\ntoken_sha256 = \"{}\"\n",
        cluster.url("bench_meta"),
        cluster.url("postgres"),
        token_sha256_hex(TOKEN)
    );
    let config = Config::from_toml(&text, &Overrides::default())?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::run(
        config,
        async {
            let _ = stop_rx.await;
        },
        Some(tx),
    ));
    let addr = rx.await?;
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let client = DatabaseLifecycleClient::new(channel);

    // One managed database to describe.
    client
        .clone()
        .create(authed(CreateDatabaseRequest {
            environment: "dev".into(),
            database_name: "bench_described".into(),
            ..Default::default()
        }))
        .await?;

    let raw_pool = db_lifecycle::pg::build_pool(
        &db_lifecycle::config::SecretUrl::new(cluster.url("bench_meta")),
        concurrency,
        db_lifecycle::config::DEFAULT_DATABASE_TIMEOUT,
    )
    .map_err(anyhow::Error::msg)?;
    let raw_admin = db_lifecycle::pg::build_pool(
        &db_lifecycle::config::SecretUrl::new(cluster.url("postgres")),
        concurrency,
        db_lifecycle::config::DEFAULT_DATABASE_TIMEOUT,
    )
    .map_err(anyhow::Error::msg)?;

    println!(
        "db-lifecycle benchmark: {describes} describes at concurrency {concurrency}, {cycles} create+delete cycles (sequential), PostgreSQL on 127.0.0.1:{}",
        cluster.port()
    );

    // Warm up both sides.
    for _ in 0..20 {
        client
            .clone()
            .describe(authed(DescribeDatabaseRequest {
                environment: "dev".into(),
                database_name: "bench_described".into(),
                ..Default::default()
            }))
            .await?;
    }

    let c = client.clone();
    let service_describe = run_concurrent(describes, concurrency, move |_| {
        let mut c = c.clone();
        async move {
            c.describe(authed(DescribeDatabaseRequest {
                environment: "dev".into(),
                database_name: "bench_described".into(),
                ..Default::default()
            }))
            .await
            .expect("describe");
        }
    })
    .await;

    let (meta, admin) = (raw_pool.clone(), raw_admin.clone());
    let raw_describe = run_concurrent(describes, concurrency, move |i| {
        let (meta, admin) = (meta.clone(), admin.clone());
        async move {
            let m = meta.get().await.unwrap();
            let a = admin.get().await.unwrap();
            m.query_opt(
                "SELECT target_cluster, database_name, project_id, environment, state, created_by, request_id, created_at FROM project_databases WHERE target_cluster = $1 AND database_name = $2",
                &[&"default", &"bench_described"],
            )
            .await
            .unwrap();
            a.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&"bench_described"])
                .await
                .unwrap();
            let row = a
                .query_one(
                    "SELECT pg_get_userbyid(d.datdba)::text, pg_encoding_to_char(d.encoding)::text, d.datallowconn, (SELECT count(*)::int FROM pg_stat_activity s WHERE s.datid = d.oid), d.oid FROM pg_database d WHERE d.datname = $1",
                    &[&"bench_described"],
                )
                .await
                .unwrap();
            let oid: u32 = row.get(4);
            a.query_one("SELECT pg_database_size($1::oid)", &[&oid]).await.unwrap();
            let cid = format!("raw-{i}");
            m.execute(
                "INSERT INTO flow_events (correlation_id, event_type, actor_id, actor_kind, project_id, environment, database_name, outcome, payload) VALUES ($1, 'database.described', 'bench', 'service', 'bench', 'dev', 'bench_described', 'ok', '{}'::jsonb)",
                &[&cid],
            )
            .await
            .unwrap();
            m.execute(
                "INSERT INTO links (correlation_id, project_id, environment, target_cluster, database_name) VALUES ($1, 'bench', 'dev', 'default', 'bench_described') ON CONFLICT ON CONSTRAINT links_unique DO NOTHING",
                &[&cid],
            )
            .await
            .unwrap();
        }
    })
    .await;

    // Create + delete cycles, sequential (CREATE DATABASE is serialized by PostgreSQL anyway).
    let mut svc_create = Vec::new();
    let mut svc_delete = Vec::new();
    let mut raw_create = Vec::new();
    let mut raw_delete = Vec::new();
    let a = raw_admin.get().await?;
    for i in 0..cycles {
        let name = format!("bench_cycle_{i}");
        let t = Instant::now();
        let r = client
            .clone()
            .create(authed(CreateDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        assert_eq!(r.status, "applied", "{}", r.message);
        svc_create.push(t.elapsed());
        let t = Instant::now();
        let r = client
            .clone()
            .delete(authed(DeleteDatabaseRequest {
                environment: "dev".into(),
                database_name: name.clone(),
                confirm_delete: true,
                ..Default::default()
            }))
            .await?
            .into_inner();
        assert_eq!(r.status, "applied", "{}", r.message);
        svc_delete.push(t.elapsed());

        let raw_name = format!("bench_raw_{i}");
        let t = Instant::now();
        a.batch_execute(&format!("CREATE DATABASE \"{raw_name}\""))
            .await?;
        raw_create.push(t.elapsed());
        let t = Instant::now();
        a.batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{raw_name}\" WITH (FORCE)"
        ))
        .await?;
        raw_delete.push(t.elapsed());
    }
    let stats = |l: Vec<Duration>| Stats {
        ops: l.len(),
        elapsed: l.iter().sum(),
        latencies: l,
    };

    println!();
    row("describe", &service_describe, &raw_describe);
    row("create (mode none)", &stats(svc_create), &stats(raw_create));
    row("delete (mode none)", &stats(svc_delete), &stats(raw_delete));

    let _ = stop_tx.send(());
    let _ = srv.await;
    Ok(())
}
