//! Assembles and runs the gRPC server: DatabaseLifecycle behind its middleware,
//! gRPC health (SERVING only while the metadata database answers), reflection,
//! background recovery/expiry, and graceful shutdown; TLS or mutual TLS on the
//! listener when `[tls]` is configured.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{
    admin::AdminClient,
    approvals::Approvals,
    audit::Audit,
    config::Config,
    ownership::Ownerships,
    pg::BoundedPool,
    policy::Policy,
    proto::database_lifecycle_server::DatabaseLifecycleServer,
    repository::{Repository, migrate::migrate},
    transport::{
        grpc::LifecycleService,
        incoming::{HANDSHAKE_TIMEOUT, Limits, guarded_incoming},
        middleware::{Authenticator, Guarded},
        tls,
        wire_errors::WireErrors,
    },
};

const SERVICE_NAME: &str = "dblifecycle.v1.DatabaseLifecycle";
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Largest request message accepted (names are 63 bytes; nothing needs more).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Run the server until `shutdown` resolves. `on_listening` gets the bound address
/// (useful with port 0).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: Option<oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    // Read the certificate files first: a bad file stops the start before anything else.
    let tls_config = config
        .tls
        .as_ref()
        .map(tls::server_tls_config)
        .transpose()?;
    let connections = std::iter::once(("metadata_url".to_string(), &config.metadata_url)).chain(
        config
            .targets
            .iter()
            .map(|(name, url)| (format!("target `{name}`"), url)),
    );
    for (what, url) in connections {
        if let Ok(tls) = url.tls()
            && tls.mode == crate::admin::tls::SslMode::Require
            && !tls.verifies_server()
        {
            warn!(
                connection = %what,
                "sslmode=require without sslrootcert: traffic is encrypted but the server's certificate is not checked; use sslmode=verify-full with sslrootcert"
            );
        }
    }
    if config.migrate_on_start {
        let applied = migrate(&config.metadata_url).await?;
        if !applied.is_empty() {
            info!(?applied, "migrations applied");
        }
    }
    // Everything awaited from PostgreSQL is bounded (`crate::pg`): a database that
    // stops answering makes calls UNAVAILABLE within the bound instead of hanging.
    let meta_pool = BoundedPool::new(
        &config.metadata_url,
        config.metadata_pool_size,
        config.database_timeout,
    )
    .map_err(anyhow::Error::msg)?;
    let lock_pool = BoundedPool::new(
        &config.metadata_url,
        config.metadata_pool_size,
        config.database_timeout,
    )
    .map_err(anyhow::Error::msg)?;
    let repo = Repository::new(meta_pool.clone(), lock_pool.clone());
    let admin = AdminClient::new(
        &config.targets,
        config.admin_pool_size,
        config.database_timeout,
        config.ddl_timeout,
    )
    .map_err(anyhow::Error::msg)?;
    let policy = Arc::new(Policy::new(config.clone()).map_err(anyhow::Error::msg)?);
    let audit = Audit::new(repo.clone(), config.unauthenticated_audit);
    let ownership = Ownerships::new(repo.clone(), admin.clone());
    let approvals = Approvals::new(
        repo.clone(),
        admin.clone(),
        policy.clone(),
        audit.clone(),
        config.request_ttl,
        config.fault_points.clone(),
    );
    if !config.fault_points.is_empty() {
        warn!(points = ?config.fault_points, "TEST-ONLY fault points are enabled: applies park at them until the process is killed");
    }
    let service = LifecycleService {
        policy: policy.clone(),
        ownership,
        approvals: approvals.clone(),
        repo: repo.clone(),
        audit: audit.clone(),
    };
    let auth = Arc::new(
        Authenticator::new(&config.principals)
            .with_run_tokens(config.run_tokens.as_ref())
            .map_err(anyhow::Error::msg)?,
    );
    if let Some(rt) = &config.run_tokens {
        info!(issuer = %rt.issuer, audience = %rt.audience, max_ttl = ?rt.max_ttl, "run tokens accepted");
    }
    // gzip is accepted (clients such as grpcio turn it on) and used for answers to
    // clients that accept it; the size limit applies after decompression.
    let grpc = DatabaseLifecycleServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    // Refusals of the gRPC library (message too large, undecodable, unknown method)
    // are audited like every refusal; malformed messages become INVALID_ARGUMENT.
    let guarded = Guarded::new(WireErrors::new(grpc, audit.clone()), auth, audit);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Health follows the metadata database.
    let health_task = {
        let repo = repo.clone();
        let health = health.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let ok = tokio::time::timeout(HEALTH_INTERVAL, repo.ping())
                    .await
                    .map(|r| r.is_ok())
                    .unwrap_or(false);
                if *stop.borrow() {
                    break;
                }
                if last != Some(ok) {
                    let status = if ok {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    health.set_service_status(SERVICE_NAME, status).await;
                    health.set_service_status("", status).await;
                    if ok {
                        info!("metadata database reachable: SERVING");
                    } else {
                        warn!("metadata database unreachable: NOT_SERVING");
                    }
                    last = Some(ok);
                }
                tokio::select! {
                    _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    };

    // Crash recovery at start, then expiry and retries of deferred applies.
    let recovery_task = {
        let approvals = approvals.clone();
        let interval = config.recovery_interval;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut grace = Duration::ZERO;
            loop {
                match approvals.recover_once(grace).await {
                    Ok(0) => {}
                    Ok(n) => info!(
                        driven = n,
                        "recovery drove approved requests to a final state"
                    ),
                    Err(e) => warn!(error = %e, "recovery pass failed; will retry"),
                }
                grace = interval;
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    };

    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let tls_mode = tls::mode(config.tls.as_ref());
    info!(%addr, tls = %tls_mode, max_connections = config.max_connections, max_connections_per_peer = config.max_connections_per_peer, metadata = ?config.metadata_url, targets = ?config.targets, environments = ?config.allowed_environments, "db-lifecycle listening");
    if tls_config.is_none() && !addr.ip().is_loopback() {
        warn!(%addr, "serving plaintext on a non-loopback address: bearer tokens cross the network in clear; configure [tls]");
    }
    if let Some(tx) = on_listening {
        let _ = tx.send(addr);
    }

    let health_for_shutdown = health.clone();
    let (draining_tx, draining_rx) = oneshot::channel::<()>();
    let stop_signal = async move {
        shutdown.await;
        let _ = draining_tx.send(());
        info!("shutdown requested: NOT_SERVING, finishing in-flight calls");
        health_for_shutdown
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
        health_for_shutdown
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let _ = stop_tx.send(true);
    };

    // TLS is not configured on the builder: `guarded_incoming` does the handshake,
    // so that its deadline also covers the HTTP/2 preface sent inside TLS.
    let limits = Limits {
        max_connections: config.max_connections,
        max_connections_per_peer: config.max_connections_per_peer,
        handshake_timeout: HANDSHAKE_TIMEOUT,
    };
    let incoming = guarded_incoming(
        listener,
        limits,
        tls_config.map(tokio_rustls::TlsAcceptor::from),
    );
    // Keepalive pings find peers that went away without closing (a node lost, a
    // NAT entry dropped), so their connections do not hold slots forever.
    let serve = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(guarded)
        .serve_with_incoming_shutdown(incoming, stop_signal);
    // In-flight calls get `shutdown_grace` to finish; a client that keeps an idle
    // connection open must not hold the process forever.
    let grace = config.shutdown_grace;
    tokio::select! {
        served = serve => served?,
        _ = async {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => warn!(?grace, "shutdown grace elapsed; closing remaining connections"),
    }

    let _ = health_task.await;
    let _ = recovery_task.await;
    admin.close();
    meta_pool.close();
    lock_pool.close();
    info!("db-lifecycle stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
