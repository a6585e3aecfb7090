//! Service processes: spawned from binaries next to this one, health-checked over mTLS,
//! killed at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dsrelay_runtime::pki::DevPki;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A binary in the folder of this one (`target/release` when run by `scripts/bench.sh`).
pub(crate) fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let path = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no folder", exe.display()))?
        .join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the service binaries first (`cargo build --release --bins`; \
             scripts/bench.sh does it)",
            path.display()
        );
    }
    Ok(path)
}

/// An mTLS channel to `127.0.0.1:port` (as `localhost`, the name the dev certificates carry)
/// authenticating as the dev PKI party `stem`, checking the server's identity when given.
pub(crate) fn channel(
    pki: &DevPki,
    stem: &str,
    port: u16,
    expected_identity: Option<String>,
) -> Result<Channel> {
    let tls = pki.files(stem).client_config()?;
    dsrelay_runtime::tls::channel(
        &format!("https://localhost:{port}"),
        expected_identity,
        &tls,
    )
}

/// A free port on 127.0.0.1 (bound and released; the service binds it again).
pub(crate) fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A running service process.
pub(crate) struct Service {
    /// Its name in the report.
    pub(crate) name: String,
    child: tokio::process::Child,
    log: PathBuf,
    /// How it was started, so that [`Service::restart`] starts it the same way.
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    rust_log: String,
}

impl Service {
    /// Starts `bin args...` with `RUST_LOG=rust_log`, its output going to `log`.
    pub(crate) fn spawn(
        name: &str,
        bin: &Path,
        args: &[&std::ffi::OsStr],
        log: PathBuf,
        rust_log: &str,
    ) -> Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let args: Vec<std::ffi::OsString> = args.iter().map(|a| a.to_os_string()).collect();
        let child = start(bin, &args, file, rust_log)?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
            bin: bin.to_path_buf(),
            args,
            rust_log: rust_log.to_string(),
        })
    }

    /// Kills it (SIGKILL) if it still runs, then starts it again the same way, its output
    /// appended to the same log so that every life of the process can be read there.
    pub(crate) async fn restart(&mut self) -> Result<()> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        self.child = start(&self.bin, &self.args, file, &self.rust_log)?;
        Ok(())
    }

    /// SIGKILLs it and reaps it, leaving it stopped until [`Service::restart`].
    pub(crate) async fn sigkill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Whether it has exited (killed or on its own).
    pub(crate) fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Its process id while it runs.
    pub(crate) fn pid(&self) -> Result<u32> {
        self.child
            .id()
            .ok_or_else(|| anyhow!("{} has exited", self.name))
    }

    /// The end of its log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// An error if it has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Waits (up to 30 s) until a health check over `channel` succeeds.
    pub(crate) async fn wait_serving(&mut self, channel: Channel) -> Result<()> {
        let mut client = HealthClient::new(channel);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_alive()?;
            let r = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!(
                    "{} did not become healthy: {e}; its log ends with:\n{}",
                    self.name,
                    self.log_tail()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Kills it (SIGKILL; its data is thrown away) and reaps it.
    pub(crate) async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn start(
    bin: &Path,
    args: &[std::ffi::OsString],
    log: std::fs::File,
    rust_log: &str,
) -> Result<tokio::process::Child> {
    tokio::process::Command::new(bin)
        .args(args)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}
