//! A PostgreSQL server of the chaos run's own, in a folder of its own, so that the run can
//! SIGKILL it and start it again (never a server someone else uses). Found and started the
//! way `scripts/test.sh` does: the newest `/usr/lib/postgresql/*/bin`, `initdb` with trust
//! authentication on 127.0.0.1 and a free port, and as the `postgres` user when run as root,
//! because PostgreSQL refuses to run as root. A kill is a SIGKILL of the postmaster and of
//! every backend at once.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dsrelay_runtime::store::Db;

use crate::service::free_port;

/// The newest PostgreSQL server binaries' folder, if any is installed.
pub(crate) fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let bin = e.path().join("bin");
            let version = e
                .file_name()
                .to_string_lossy()
                .split('.')
                .map(|p| p.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// The `postgres` user's uid and gid when this process runs as root (PostgreSQL refuses to
/// run as root), else None: the server runs as the current user.
fn server_user() -> Result<Option<(u32, u32)>> {
    let id = |args: &[&str]| -> Result<u32> {
        let out = std::process::Command::new("id")
            .args(args)
            .output()
            .context("running id")?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("reading `id {}`", args.join(" ")))
    };
    if id(&["-u"])? != 0 {
        return Ok(None);
    }
    let user = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
    match user {
        (Ok(uid), Ok(gid)) => Ok(Some((uid, gid))),
        _ => bail!("running as root needs a `postgres` user to run the server as"),
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| crate::load::parent_pid(*child) == Some(pid))
        .collect()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// The running server (or, between a kill and its restart, the stopped one).
pub(crate) struct PgServer {
    bin: PathBuf,
    /// The cluster, its socket and its log; a folder of its own under the system's temporary
    /// folder, because the `postgres` user must be able to reach it.
    folder: tempfile::TempDir,
    port: u16,
    /// The uid and gid the server runs as, when not as this process's user.
    user: Option<(u32, u32)>,
    /// Where its output goes (in the run's folder, kept when the run fails).
    log: PathBuf,
    /// The postmaster, started directly (not through `runuser`) so that killing it kills the
    /// server and reaping it frees its lock file at once.
    child: Option<tokio::process::Child>,
    /// Server settings given as `-c name=value` at every start, besides the run's own.
    settings: Vec<String>,
}

impl PgServer {
    /// Creates a cluster in a new temporary folder (owned by `postgres` when run as root) and
    /// starts it, its output appended to `log`.
    pub(crate) async fn start(log: PathBuf) -> Result<Self> {
        Self::start_with(log, &[]).await
    }

    /// [`PgServer::start`] with more server settings (`name=value`, each passed as `-c`).
    pub(crate) async fn start_with(log: PathBuf, settings: &[&str]) -> Result<Self> {
        let bin = find_bin().ok_or_else(|| {
            anyhow!(
                "--postgres needs the PostgreSQL server binaries under \
                 /usr/lib/postgresql/*/bin (the run starts a server of its own)"
            )
        })?;
        let user = server_user()?;
        let folder = tempfile::Builder::new()
            .prefix("dsrelay-chaos-pg.")
            .tempdir()
            .context("creating the server's folder")?;
        let dir = folder.path().to_path_buf();
        if user.is_some() {
            run(std::process::Command::new("chown")
                .arg("postgres:")
                .arg(&dir))
            .context("giving the server's folder to the postgres user")?;
        }
        let mut initdb = command(&bin.join("initdb"), user);
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .current_dir(&dir);
        run(&mut initdb).context("initdb")?;
        let mut server = Self {
            bin,
            folder,
            log,
            port: free_port()?,
            user,
            child: None,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        server.restart().await?;
        Ok(server)
    }

    /// A URL of database `name` on this server.
    pub(crate) fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name`.
    pub(crate) async fn create_database(&self, name: &str) -> Result<String> {
        let db = Db::connect(&self.url("postgres")).await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&db.pool)
            .await
            .with_context(|| format!("creating database {name}"))?;
        db.pool.close().await;
        Ok(self.url(name))
    }

    /// SIGKILLs the postmaster and every backend at once, as a crash of the machine would,
    /// and waits until none of them is left.
    pub(crate) async fn sigkill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut pids: Vec<u32> = Vec::new();
        if let Some(pid) = child.id() {
            pids.extend(children_of(pid));
            pids.push(pid);
            kill_all(&pids);
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
        // A backend that was being forked when the list was taken is caught on a second look.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the server has exited (or was killed and not started again).
    pub(crate) fn has_exited(&mut self) -> bool {
        match &mut self.child {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Kills the server if it runs, starts it (crash recovery included) and waits until it
    /// accepts connections (up to 60 s).
    pub(crate) async fn restart(&mut self) -> Result<()> {
        self.sigkill().await;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("opening the server's log")?;
        let mut postgres = command(&self.bin.join("postgres"), self.user);
        postgres
            .arg("-D")
            .arg(self.folder.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.folder.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .current_dir(self.folder.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = tokio::process::Command::from(postgres)
            .kill_on_drop(true)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.has_exited() {
                bail!(
                    "postgres exited at start; its log ends with:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(db) = Db::connect(&self.url("postgres")).await {
                let ok = sqlx::query("SELECT 1").execute(&db.pool).await.is_ok();
                db.pool.close().await;
                if ok {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not accept connections in 60 s; its log ends with:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of the server's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // The postmaster dies with its handle (kill_on_drop), its backends would not.
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            let mut pids = children_of(pid);
            pids.push(pid);
            kill_all(&pids);
        }
    }
}

/// SIGKILLs `pids`.
fn kill_all(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// `tool`, run as `user` when given.
fn command(tool: &Path, user: Option<(u32, u32)>) -> std::process::Command {
    let mut c = std::process::Command::new(tool);
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c
}

fn run(command: &mut std::process::Command) -> Result<()> {
    let out = command.output().context("running a PostgreSQL tool")?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            command.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
