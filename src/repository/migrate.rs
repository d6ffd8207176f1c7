//! Schema migrations (refinery, files in `migrations/`), serialized across replicas
//! with an advisory lock so several starting replicas do not race.

use crate::config::SecretUrl;

refinery::embed_migrations!("migrations");

const MIGRATION_LOCK_KEY: i64 = 0x6462_6c69_6665; // "dblife"

/// Apply pending migrations. Returns the names of the ones applied now.
pub async fn migrate(url: &SecretUrl) -> anyhow::Result<Vec<String>> {
    let mut cfg = url.pg_config().map_err(anyhow::Error::msg)?;
    cfg.connect_timeout(std::time::Duration::from_secs(10));
    let connector = url
        .tls()
        .and_then(|t| t.connector())
        .map_err(anyhow::Error::msg)?;
    let (mut client, conn) = cfg.connect(connector).await.map_err(|e| {
        anyhow::anyhow!(
            "connecting to the metadata database: {}",
            crate::error::error_chain(&e)
        )
    })?;
    let conn_task = tokio::spawn(conn);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let report = migrations::runner().run_async(&mut client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    drop(client);
    let _ = conn_task.await;
    let report = report.map_err(|e| anyhow::anyhow!("migration failed: {e}"))?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}
