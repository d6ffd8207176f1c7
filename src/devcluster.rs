//! A throwaway PostgreSQL cluster for `db-lifecycle dev` and the integration tests.
//!
//! [`TempCluster::start`] runs `initdb` into a fresh temporary directory and starts
//! `postgres` on `127.0.0.1` with a free port, a random superuser password
//! (scram-sha-256 for TCP connections) and unix sockets only inside the temp dir.
//!
//! # Lifetime guarantees
//!
//! `postgres` is not daemonized: it runs under a tiny `sh` watchdog whose stdin is a
//! pipe held by this process. Commands on that pipe drive shutdown (`stop` = fast
//! shutdown, data kept; `drop` = immediate shutdown). If the pipe closes without a
//! command — the owning process was SIGKILLed, or exited without running `Drop`
//! (e.g. the cluster lived in a `static`) — the watchdog shuts postgres down
//! immediately and removes the temporary directory. The watchdog runs in its own
//! process group so a terminal Ctrl-C reaches only the owning process, which then
//! shuts the cluster down through `Drop`.
//!
//! # Running as root
//!
//! `initdb` and `postgres` refuse to run as root. When the effective uid is 0 they are
//! run via `runuser -u postgres --`, and the temporary directory is owned by the
//! `postgres` user.
//!
//! # Binaries
//!
//! The PostgreSQL bin dir is `$DB_LIFECYCLE_PG_BIN` if set, else `pg_config --bindir`
//! if it contains `initdb`, else the highest version under `/usr/lib/postgresql/*/bin`,
//! else the directory of `initdb` on `PATH` (see [`pg_bin_dir`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rand::Rng;
use tempfile::TempDir;

/// Environment variable overriding the PostgreSQL bin directory.
pub const PG_BIN_ENV: &str = "DB_LIFECYCLE_PG_BIN";

/// OS user that runs `initdb`/`postgres` when we are root.
const PG_OS_USER: &str = "postgres";
/// Database superuser created by `initdb`.
const SUPERUSER: &str = "postgres";
const PASSWORD_LEN: usize = 24;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const DROP_TIMEOUT: Duration = Duration::from_secs(10);
/// `start()` picks a fresh port this many times if the chosen one is taken.
const START_ATTEMPTS: usize = 5;
/// `restart()` keeps its port; it retries this many times (the port may be briefly taken).
const RESTART_ATTEMPTS: usize = 3;
const LOG_TAIL_LINES: usize = 40;

/// Watchdog run as `sh -c WATCHDOG sh <tempdir> <postgres> <args...>`, stdin = our pipe.
///
/// * postgres runs in the background with stdin from /dev/null; the shell waits for it
///   and exits with its status (so the owner notices a postgres that died by itself).
/// * a background subshell reads commands from the pipe: `stop` -> SIGINT (fast
///   shutdown), `drop` -> SIGQUIT (immediate shutdown). EOF without any command means
///   the owning process is gone: immediate shutdown (SIGKILL after 10 s), then remove
///   the temporary directory.
const WATCHDOG: &str = r#"
dir=$1; shift
exec 3<&0 0</dev/null
"$@" 3<&- &
pg=$!
(
  mode=orphan
  while read -r cmd <&3; do
    case $cmd in
      stop) mode=stop; kill -INT "$pg" 2>/dev/null ;;
      drop) mode=drop; kill -QUIT "$pg" 2>/dev/null ;;
    esac
  done
  if [ "$mode" = orphan ]; then
    kill -QUIT "$pg" 2>/dev/null
    i=0
    while kill -0 "$pg" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$pg" 2>/dev/null
    rm -rf -- "$dir"
  fi
) &
exec 3<&-
wait "$pg"
"#;

/// A throwaway PostgreSQL cluster in a temporary directory (see the module docs).
///
/// Dropping it shuts the server down (immediate shutdown) and removes the directory.
pub struct TempCluster {
    dir: TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    bin_dir: PathBuf,
    /// `Some` when running as root: initdb/postgres run as this user via `runuser`.
    run_as: Option<OsUser>,
    port: u16,
    password: String,
    server: Mutex<Option<Server>>,
}

#[derive(Debug, Clone)]
struct OsUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// The running watchdog (`runuser`/`sh`) and the write end of its command pipe.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Server {
    /// Sends a watchdog command (if any) and closes the pipe.
    fn close(&mut self, cmd: Option<&str>) {
        // Dropping the handle closes the pipe.
        if let Some(mut stdin) = self.stdin.take()
            && let Some(cmd) = cmd
        {
            // The watchdog may already be gone (EPIPE); that's fine.
            let _ = writeln!(stdin, "{cmd}");
            let _ = stdin.flush();
        }
    }
}

enum LaunchError {
    PortInUse(anyhow::Error),
    Other(anyhow::Error),
}

impl TempCluster {
    /// initdb + start on 127.0.0.1 with a free port; superuser `postgres` with a random
    /// password (scram-sha-256 auth for host connections), unix sockets inside the temp
    /// dir only. Returns once a password-authenticated connection succeeds.
    pub async fn start() -> anyhow::Result<TempCluster> {
        let bin_dir = pg_bin_dir()?;
        let run_as = if effective_uid_is_root() {
            Some(lookup_os_user(PG_OS_USER).context(
                "running as root, so PostgreSQL must run as the `postgres` OS user, \
                 but that user could not be looked up",
            )?)
        } else {
            None
        };

        let base = temp_base(run_as.is_some());
        let dir = tempfile::Builder::new()
            .prefix("db-lifecycle-pg.")
            .tempdir_in(&base)
            .with_context(|| format!("creating a temporary directory in {}", base.display()))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        if let Some(user) = &run_as {
            chown(dir.path(), user)?;
        }
        let log_path = dir.path().join("postgres.log");
        File::create(&log_path)
            .with_context(|| format!("creating log file {}", log_path.display()))?;

        let mut cluster = TempCluster {
            data_dir: dir.path().join("data"),
            log_path,
            dir,
            bin_dir,
            run_as,
            port: 0,
            password: random_password(),
            server: Mutex::new(None),
        };
        cluster.initdb().await?;

        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = free_port()?;
            match cluster.launch().await {
                Ok(()) => {
                    tracing::debug!(
                        port = cluster.port,
                        dir = %cluster.dir.path().display(),
                        "temporary PostgreSQL cluster is ready"
                    );
                    return Ok(cluster);
                }
                Err(LaunchError::PortInUse(e)) => {
                    tracing::debug!(attempt, port = cluster.port, "port collision: {e:#}");
                    last_err = Some(e);
                }
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!("no free port after {START_ATTEMPTS} attempts")))
    }

    /// TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Password of the `postgres` superuser.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `postgres://postgres:<pw>@127.0.0.1:<port>/<dbname>`
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{dbname}",
            self.password, self.port
        )
    }

    /// The server log (stdout/stderr of initdb and postgres).
    pub fn logfile(&self) -> &Path {
        &self.log_path
    }

    /// The PostgreSQL data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temporary directory holding the data dir, the log and the unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the server process (watchdog) is currently running.
    pub fn is_running(&self) -> bool {
        let mut guard = self.lock_server();
        match guard.as_mut() {
            Some(server) => matches!(server.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stop the server (fast shutdown) but keep the data dir, so it can be started
    /// again (tests simulate outages). A no-op if it is not running.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let server = self.lock_server().take();
        let Some(mut server) = server else {
            return Ok(());
        };
        server.close(Some("stop"));
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            match server.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(None) => {
                    self.kill_hard(&mut server);
                    bail!(
                        "PostgreSQL did not shut down within {SHUTDOWN_TIMEOUT:?}; killed it\n{}",
                        self.log_tail()
                    );
                }
                Err(e) => {
                    self.kill_hard(&mut server);
                    return Err(e).context("waiting for PostgreSQL to shut down");
                }
            }
        }
    }

    /// Start it again on the same port with the same data (stops it first if running).
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await?;
        let mut last_err = None;
        for attempt in 1..=RESTART_ATTEMPTS {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(LaunchError::PortInUse(e)) => {
                    tracing::debug!(attempt, port = self.port, "port in use on restart: {e:#}");
                    last_err = Some(e);
                    if attempt < RESTART_ATTEMPTS {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!("restarting PostgreSQL on port {}", self.port)))
    }

    /// Connects as the superuser to `dbname` (the connection task is spawned).
    pub async fn connect(&self, dbname: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = self
            .pg_config(dbname)
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {}", self.redacted_url(dbname)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("temporary cluster connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// Create a database (plain, via SQL through tokio-postgres) — used to set up the
    /// metadata db.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        let client = self.connect("postgres").await?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .with_context(|| format!("creating database {name:?}"))?;
        Ok(())
    }

    /// Turn TLS on (tests of TLS to PostgreSQL): the server certificate and key, and
    /// optionally the CA that client certificates must chain to, are written into the
    /// data directory (owned by the server's OS user, mode 0600) and the configuration
    /// reloaded. Plain connections keep working unless `pg_hba.conf` says otherwise.
    pub async fn enable_tls(
        &self,
        cert_pem: &str,
        key_pem: &str,
        client_ca_pem: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut files = vec![("server.crt", cert_pem), ("server.key", key_pem)];
        if let Some(ca) = client_ca_pem {
            files.push(("client-ca.crt", ca));
        }
        for (name, pem) in &files {
            self.write_data_file(name, pem)?;
        }
        let client = self.connect("postgres").await?;
        let mut settings = vec![
            ("ssl_cert_file", "server.crt"),
            ("ssl_key_file", "server.key"),
        ];
        if client_ca_pem.is_some() {
            settings.push(("ssl_ca_file", "client-ca.crt"));
        }
        settings.push(("ssl", "on"));
        // One statement each: ALTER SYSTEM cannot run in a (multi-statement) transaction.
        for (name, value) in settings {
            client
                .batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
                .await
                .with_context(|| format!("setting {name}"))?;
        }
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .context("reloading the configuration")?;
        self.wait_for_setting(&client, "ssl", "on").await
    }

    /// Put `lines` at the top of `pg_hba.conf` (first match wins) and reload.
    pub async fn prepend_hba(&self, lines: &str) -> anyhow::Result<()> {
        let path = self.data_dir.join("pg_hba.conf");
        let current = std::fs::read_to_string(&path).context("reading pg_hba.conf")?;
        self.write_data_file("pg_hba.conf", &format!("{lines}\n{current}"))?;
        let client = self.connect("postgres").await?;
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .context("reloading pg_hba.conf")?;
        // The postmaster rereads pg_hba.conf on the signal pg_reload_conf() sent; give
        // it a moment (the callers then check the rules' effect themselves).
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    fn write_data_file(&self, name: &str, contents: &str) -> anyhow::Result<()> {
        let path = self.data_dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if let Some(user) = &self.run_as {
            chown(&path, user)?;
        }
        Ok(())
    }

    async fn wait_for_setting(
        &self,
        client: &tokio_postgres::Client,
        name: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        for _ in 0..100 {
            let row = client
                .query_one("SELECT current_setting($1)", &[&name])
                .await?;
            if row.get::<_, String>(0) == value {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{name} is not {value} after reload:\n{}", self.log_tail())
    }

    fn pg_config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .password(&self.password)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5));
        cfg
    }

    fn redacted_url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:***@127.0.0.1:{}/{dbname}",
            self.port
        )
    }

    fn lock_server(&self) -> MutexGuard<'_, Option<Server>> {
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A command for a PostgreSQL program (or `sh` for the watchdog), via `runuser` when
    /// we are root. Runs in the temp dir (root's cwd may not be readable by postgres).
    fn command(&self, program: &Path) -> Command {
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", &user.name, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn log_handle(&self) -> anyhow::Result<File> {
        OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))
    }

    async fn initdb(&self) -> anyhow::Result<()> {
        let pwfile = self.dir.path().join("pwfile");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pwfile)
                .with_context(|| format!("creating {}", pwfile.display()))?;
            writeln!(f, "{}", self.password)?;
        }
        if let Some(user) = &self.run_as {
            chown(&pwfile, user)?;
        }

        let mut cmd = self.command(&self.bin_dir.join("initdb"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                &format!("--username={SUPERUSER}"),
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .stdout(self.log_handle()?)
            .stderr(self.log_handle()?);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let result = tokio::time::timeout(INITDB_TIMEOUT, cmd.status()).await;
        let _ = std::fs::remove_file(&pwfile);
        match result {
            Err(_) => bail!(
                "initdb did not finish within {INITDB_TIMEOUT:?}\n{}",
                self.log_tail()
            ),
            Ok(Err(e)) => Err(e).with_context(|| {
                format!(
                    "running {} (as root: via runuser)",
                    self.bin_dir.join("initdb").display()
                )
            }),
            Ok(Ok(status)) if !status.success() => {
                bail!("initdb failed ({status})\n{}", self.log_tail())
            }
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Spawns postgres under the watchdog on `self.port` and waits until it accepts a
    /// password-authenticated connection.
    async fn launch(&self) -> Result<(), LaunchError> {
        let log_offset = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        self.spawn_server().map_err(LaunchError::Other)?;

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_connect_err: Option<String>;
        loop {
            let exited = {
                let mut guard = self.lock_server();
                match guard.as_mut().map(|s| s.child.try_wait()) {
                    Some(Ok(None)) => None,
                    Some(Ok(Some(status))) => {
                        let mut server = guard.take().expect("checked above");
                        // Tell the watchdog's reader this was not an orphaning.
                        server.close(Some("stop"));
                        Some(status.to_string())
                    }
                    Some(Err(e)) => Some(format!("unknown status ({e})")),
                    None => Some("stopped concurrently".to_string()),
                }
            };
            if let Some(status) = exited {
                let log = read_from(&self.log_path, log_offset);
                let err = anyhow!(
                    "PostgreSQL exited during startup on port {} ({status}); log:\n{}",
                    self.port,
                    tail(&log, LOG_TAIL_LINES)
                );
                return Err(
                    if log.contains("Address already in use") || log.contains("could not bind") {
                        LaunchError::PortInUse(err)
                    } else {
                        LaunchError::Other(err)
                    },
                );
            }

            // Race the attempt against the server exiting: if someone else holds the
            // port, the attempt may hang talking to them while postgres already gave up.
            let cfg = self.pg_config("postgres");
            let attempt =
                tokio::time::timeout(Duration::from_secs(5), cfg.connect(tokio_postgres::NoTls));
            tokio::select! {
                result = attempt => match result {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => last_connect_err = Some(e.to_string()),
                    Err(_) => last_connect_err = Some("connect timed out".to_string()),
                },
                () = self.until_exited() => continue,
            }

            if Instant::now() >= deadline {
                let _ = self.stop().await;
                return Err(LaunchError::Other(anyhow!(
                    "PostgreSQL on port {} did not become ready within {READY_TIMEOUT:?} \
                     (last error: {}); log:\n{}",
                    self.port,
                    last_connect_err.as_deref().unwrap_or("none"),
                    tail(&read_from(&self.log_path, log_offset), LOG_TAIL_LINES)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resolves once the watchdog (hence postgres) has exited or is gone.
    async fn until_exited(&self) {
        loop {
            let running = matches!(
                self.lock_server().as_mut().map(|s| s.child.try_wait()),
                Some(Ok(None))
            );
            if !running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn spawn_server(&self) -> anyhow::Result<()> {
        let mut guard = self.lock_server();
        if guard.is_some() {
            bail!("the temporary PostgreSQL server is already running");
        }
        let mut cmd = self.command(Path::new("sh"));
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(self.dir.path())
            .arg(self.bin_dir.join("postgres"))
            .arg("-D")
            .arg(&self.data_dir);
        let settings = [
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={}", self.port),
            format!("unix_socket_directories={}", self.dir.path().display()),
            "fsync=off".to_string(),
            "synchronous_commit=off".to_string(),
            "full_page_writes=off".to_string(),
            "max_connections=200".to_string(),
            "shared_buffers=32MB".to_string(),
        ];
        for s in settings {
            cmd.arg("-c").arg(s);
        }
        cmd.stdin(Stdio::piped())
            .stdout(self.log_handle()?)
            .stderr(self.log_handle()?)
            // Own process group: a terminal's Ctrl-C goes to our process only, which
            // then shuts the cluster down in order.
            .process_group(0);
        let mut child = cmd.spawn().context("spawning the PostgreSQL watchdog")?;
        let stdin = child.stdin.take();
        *guard = Some(Server { child, stdin });
        Ok(())
    }

    /// Last resort: SIGKILL the postmaster (pid from postmaster.pid) and the watchdog.
    fn kill_hard(&self, server: &mut Server) {
        if let Ok(pidfile) = std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            && let Some(pid) = pidfile.lines().next().map(str::trim)
            && !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
        {
            let _ = Command::new("sh")
                .args(["-c", "kill -KILL \"$1\"", "sh", pid])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = server.child.kill();
        let _ = server.child.wait();
    }

    fn log_tail(&self) -> String {
        tail(&read_from(&self.log_path, 0), LOG_TAIL_LINES)
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let server = self.lock_server().take();
        if let Some(mut server) = server {
            server.close(Some("drop"));
            let deadline = Instant::now() + DROP_TIMEOUT;
            loop {
                match server.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        tracing::warn!("temporary PostgreSQL did not stop in time; killing it");
                        self.kill_hard(&mut server);
                        break;
                    }
                }
            }
        }
        // `self.dir` (TempDir) removes the directory when dropped after this.
    }
}

impl std::fmt::Debug for TempCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempCluster")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .field("bin_dir", &self.bin_dir)
            .field("run_as", &self.run_as.as_ref().map(|u| &u.name))
            .finish_non_exhaustive()
    }
}

/// Finds the PostgreSQL bin directory: `$DB_LIFECYCLE_PG_BIN` if set, else
/// `pg_config --bindir` if it contains `initdb`, else the highest version under
/// `/usr/lib/postgresql/*/bin`, else the directory of `initdb` on `PATH`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").is_file() {
            bail!("{PG_BIN_ENV}={} does not contain initdb", dir.display());
        }
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = name
                .split('.')
                .map(|p| p.parse::<u64>().ok())
                .collect::<Option<Vec<u64>>>()
            else {
                continue;
            };
            let bin = entry.path().join("bin");
            if bin.join("initdb").is_file() && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return Ok(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() {
                return Ok(dir);
            }
        }
    }
    bail!(
        "PostgreSQL binaries not found: set {PG_BIN_ENV}, or install PostgreSQL \
         (tried pg_config --bindir, /usr/lib/postgresql/*/bin and PATH)"
    )
}

fn effective_uid_is_root() -> bool {
    // Uid: real effective saved fs
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("Uid:"))
        && let Some(euid) = line.split_whitespace().nth(2)
    {
        return euid == "0";
    }
    Command::new("id")
        .arg("-u")
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn lookup_os_user(name: &str) -> anyhow::Result<OsUser> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            return Ok(OsUser {
                name: name.to_string(),
                uid: fields[2].parse().context("bad uid in /etc/passwd")?,
                gid: fields[3].parse().context("bad gid in /etc/passwd")?,
            });
        }
    }
    bail!("user {name:?} not found in /etc/passwd")
}

fn chown(path: &Path, user: &OsUser) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {} to {}", path.display(), user.name))
}

/// Where to create the temp dir: the usual temp dir, unless (as root) the `postgres`
/// user could not traverse it, or the unix socket path would get too long; then /tmp.
fn temp_base(as_root: bool) -> PathBuf {
    let base = std::env::temp_dir();
    // sun_path is 108 bytes; leave room for "/db-lifecycle-pg.XXXXXX/.s.PGSQL.65535".
    let short_enough = base.as_os_str().len() <= 60;
    let traversable = !as_root
        || base.ancestors().all(|p| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o001 != 0)
                .unwrap_or(false)
        });
    if short_enough && traversable {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free TCP port")?;
    Ok(listener.local_addr()?.port())
}

fn random_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(PASSWORD_LEN)
        .map(char::from)
        .collect()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_and_url_shape() {
        let pw = random_password();
        assert_eq!(pw.len(), PASSWORD_LEN);
        assert!(pw.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(pw, random_password());
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
    }

    #[test]
    fn finds_pg_binaries() {
        let dir = pg_bin_dir().unwrap();
        assert!(dir.join("initdb").is_file());
        assert!(dir.join("postgres").is_file());
    }

    async fn db_exists(client: &tokio_postgres::Client, name: &str) -> bool {
        client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .unwrap()
            .is_some()
    }

    #[tokio::test]
    async fn start_create_stop_restart() {
        let cluster = TempCluster::start().await.unwrap();
        let port = cluster.port();
        let dir = cluster.dir().to_path_buf();
        assert!(cluster.is_running());
        assert_eq!(
            cluster.url("meta"),
            format!(
                "postgres://postgres:{}@127.0.0.1:{port}/meta",
                cluster.password()
            )
        );
        assert!(cluster.logfile().is_file());
        assert!(!dir.join("pwfile").exists(), "pwfile must be deleted");

        // Connect through the URL with the password.
        let (client, conn) =
            tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one("SHOW password_encryption", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "scram-sha-256");
        let row = client.query_one("SHOW fsync", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "off");
        let row = client
            .query_one("SHOW unix_socket_directories", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), dir.display().to_string());

        // Wrong password is rejected (scram-sha-256 for host connections).
        let bad = format!("postgres://postgres:wrong@127.0.0.1:{port}/postgres");
        assert!(
            tokio_postgres::connect(&bad, tokio_postgres::NoTls)
                .await
                .is_err()
        );

        cluster.create_database("meta").await.unwrap();
        cluster.create_database(r#"we"ird"#).await.unwrap();
        assert!(cluster.create_database("meta").await.is_err());
        let meta = cluster.connect("meta").await.unwrap();
        meta.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42);")
            .await
            .unwrap();

        // Outage.
        cluster.stop().await.unwrap();
        assert!(!cluster.is_running());
        assert!(client.query_one("SELECT 1", &[]).await.is_err());
        assert!(cluster.connect("postgres").await.is_err());
        assert!(dir.join("data").is_dir(), "data dir kept across stop");
        cluster.stop().await.unwrap(); // idempotent

        cluster.restart().await.unwrap();
        assert_eq!(cluster.port(), port);
        let client = cluster.connect("postgres").await.unwrap();
        assert!(db_exists(&client, "meta").await);
        assert!(db_exists(&client, r#"we"ird"#).await);
        let meta = cluster.connect("meta").await.unwrap();
        let row = meta.query_one("SELECT x FROM t", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);

        // restart while running = stop + start.
        cluster.restart().await.unwrap();
        cluster.connect("meta").await.unwrap();

        drop(cluster);
        assert!(!dir.exists(), "temp dir removed on drop");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "server gone after drop"
        );
    }

    #[tokio::test]
    async fn restart_reports_port_in_use() {
        let cluster = TempCluster::start().await.unwrap();
        cluster.stop().await.unwrap();
        let squatter = std::net::TcpListener::bind(("127.0.0.1", cluster.port())).unwrap();
        let err = cluster.restart().await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("Address already in use"), "{msg}");
        assert!(!cluster.is_running());
        drop(squatter);
        cluster.restart().await.unwrap();
        cluster.connect("postgres").await.unwrap();
    }

    #[tokio::test]
    async fn clusters_are_independent() {
        let (a, b) = tokio::join!(TempCluster::start(), TempCluster::start());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.port(), b.port());
        assert_ne!(a.password(), b.password());
        a.create_database("only_a").await.unwrap();
        let cb = b.connect("postgres").await.unwrap();
        assert!(!db_exists(&cb, "only_a").await);
    }

    // --- Orphan handling: the owning process dies without running Drop. ---

    const HELPER_ENV: &str = "DEVCLUSTER_ORPHAN_HELPER";

    /// Not a real test: the body of the child process used by the orphan tests. Starts
    /// a cluster, prints its dir and port, then either blocks forever (to be SIGKILLed)
    /// or exits without running Drop.
    #[tokio::test]
    #[ignore = "helper process for the orphan tests"]
    async fn orphan_helper() {
        let Ok(mode) = std::env::var(HELPER_ENV) else {
            return;
        };
        let cluster = TempCluster::start().await.unwrap();
        println!(
            "DEVCLUSTER_READY {} {}",
            cluster.port(),
            cluster.dir().display()
        );
        match mode.as_str() {
            "exit" => {
                std::mem::forget(cluster);
                std::process::exit(0);
            }
            _ => loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            },
        }
    }

    /// Processes whose command line mentions `needle`.
    fn processes_mentioning(needle: &str) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        found
    }

    fn orphan_check(mode: &str) {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "devcluster::tests::orphan_helper",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Never hang the test run if the helper misbehaves. The lock makes sure we never
        // signal the pid after it has been reaped (and possibly reused).
        let reaped = std::sync::Arc::new(Mutex::new(false));
        {
            let reaped = reaped.clone();
            let pid = child.id().to_string();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(120));
                let reaped = reaped.lock().unwrap();
                if !*reaped {
                    let _ = Command::new("kill").args(["-KILL", &pid]).status();
                }
            });
        }
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut ready = None;
        for line in stdout.lines() {
            let line = line.unwrap();
            // libtest prints "test ... " on the same line before our output.
            if let Some((_, rest)) = line.split_once("DEVCLUSTER_READY ") {
                let (port, dir) = rest.split_once(' ').unwrap();
                ready = Some((port.parse::<u16>().unwrap(), PathBuf::from(dir)));
                break;
            }
        }
        let (port, dir) = ready.expect("helper did not report a ready cluster");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        let needle = dir.display().to_string();
        assert!(!processes_mentioning(&needle).is_empty());

        if mode == "kill" {
            child.kill().unwrap(); // SIGKILL
        }
        {
            let mut reaped = reaped.lock().unwrap();
            child.wait().unwrap();
            *reaped = true;
        }

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = processes_mentioning(&needle);
            let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if procs.is_empty() && !listening && !dir.exists() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "leftovers after the owner died: processes={procs:?} listening={listening} \
                     dir_exists={}",
                    dir.exists()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn orphaned_cluster_dies_with_sigkilled_owner() {
        orphan_check("kill");
    }

    #[test]
    fn orphaned_cluster_dies_when_owner_exits_without_drop() {
        orphan_check("exit");
    }
}
