//! The TLS configuration a service uses now, reloaded from its files without a restart.
//!
//! A [`LiveTls`] holds the rustls server and client configurations built from a party's
//! [`TlsFiles`]. The server accepts each new connection with the server configuration of
//! the moment, and channels built over it ([`super::channel`]) open each new connection with
//! the client configuration of the moment. Served connections already open keep the
//! configuration they were made with, so a swap fails no call; but every call on them is
//! checked against the revocation lists loaded now ([`super::peer`]). Each successful load
//! advances a generation ([`LiveTls::generation`]), by which long-lived clients
//! ([`super::ReloadingChannel`]) send their next calls over a new connection made with the
//! configuration loaded last, as a peer that refuses the old certificate on an open
//! connection would otherwise go on refusing every call made over it.
//!
//! [`LiveTls::watcher`] reloads when one of the files' modification time or size changes
//! (looked at every [`TlsFiles::reload_interval_ms`]) and on SIGHUP. A reload that fails (an
//! unreadable file, a key that does not match the certificate, an expired revocation list)
//! keeps the configuration in use and logs why; the next change of a file tries again.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::TlsFiles;
use crate::host::Stop;

/// A file's modification time and size, or `None` when it cannot be read.
type Stamp = Option<(SystemTime, u64)>;

/// The TLS configurations a service uses now; clones share them.
#[derive(Clone)]
pub struct LiveTls {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsFiles,
    /// Swapped whole on a reload; readers clone the `Arc` and let go of the lock at once.
    current: RwLock<Arc<Configs>>,
    /// The files' stamps when they were last read, successfully or not, so that a failed
    /// reload is not repeated until something changes again.
    seen: Mutex<Vec<Stamp>>,
    /// How many times `current` was replaced since the first load; advanced after the swap,
    /// so whoever sees a new value also sees the configurations it counts.
    generation: AtomicU64,
}

struct Configs {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// What every call's client certificate is checked against ([`super::peer`]).
    revocations: Arc<super::peer::Revocations>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls")
            .field("cert", &self.inner.files.cert)
            .finish_non_exhaustive()
    }
}

impl LiveTls {
    /// Loads `files`; fails when they do not make a working configuration.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let seen = stamps(files);
        let configs = build(files)?;
        Ok(Self {
            inner: Arc::new(Inner {
                files: files.clone(),
                current: RwLock::new(Arc::new(configs)),
                seen: Mutex::new(seen),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// The files it loads from.
    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    fn current(&self) -> Arc<Configs> {
        // A panic while holding the lock cannot leave a half-written Arc behind.
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The server configuration for the next accepted connection.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current().server.clone()
    }

    /// The client configuration for the next outgoing connection.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.current().client.clone()
    }

    /// The revocation lists loaded now, for the check of each call.
    pub fn revocations(&self) -> Arc<super::peer::Revocations> {
        self.current().revocations.clone()
    }

    /// Reads the files again and swaps in what they hold; on failure the configuration in
    /// use stays and the error says why.
    pub fn reload(&self) -> Result<()> {
        let files = &self.inner.files;
        *self.inner.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamps(files);
        let configs = build(files)?;
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(configs);
        self.inner.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// How many successful reloads there have been since the first load (0 before any):
    /// changes whenever the configurations do, and only then.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Whether a file's modification time or size differs from when it was last read.
    fn changed(&self) -> bool {
        let now = stamps(&self.inner.files);
        *self.inner.seen.lock().unwrap_or_else(|e| e.into_inner()) != now
    }

    /// Reloads and logs the outcome (`why`: what asked for it).
    fn reload_logged(&self, why: &'static str) {
        if let Err(e) = self.reload() {
            tracing::error!(
                trigger = why,
                error = format!("{e:#}"),
                "reloading the tls files failed; serving with the previous ones"
            );
        }
    }

    /// The worker that reloads the files when they change or on SIGHUP. The SIGHUP handler
    /// is installed here, before the worker runs, so that a SIGHUP sent once the service
    /// answers never meets the default action (which ends the process).
    pub fn watcher(&self) -> Result<Watcher> {
        Ok(Watcher {
            live: self.clone(),
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("listening for SIGHUP")?,
        })
    }
}

/// Reloads a [`LiveTls`] when its files change or on SIGHUP ([`Watcher::run`]).
pub struct Watcher {
    live: LiveTls,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl Watcher {
    /// Watches until `stop` turns true.
    pub async fn run(mut self, mut stop: Stop) {
        let interval = self.live.inner.files.reload_interval_ms;
        let mut ticks = (interval > 0).then(|| {
            let mut t = tokio::time::interval(Duration::from_millis(interval));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            #[cfg(unix)]
            let hup = self.hangup.recv();
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            let tick = async {
                match &mut ticks {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = hup => self.live.reload_logged("sighup"),
                () = tick => {
                    if self.live.changed() {
                        self.live.reload_logged("file change");
                    }
                }
            }
        }
    }
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn stamps(files: &TlsFiles) -> Vec<Stamp> {
    files.paths().into_iter().map(|(_, p)| stamp(p)).collect()
}

/// Builds both configurations from the files and logs what was loaded.
fn build(files: &TlsFiles) -> Result<Configs> {
    let material = files.material()?;
    let server = material.server_config()?;
    let client = material.client_config()?;
    let revocations = material.revocations()?;
    let leaf = material.chain.first().context("no certificate")?;
    let (serial, not_after) = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, c)) => (c.raw_serial_as_string(), c.validity().not_after.to_string()),
        Err(_) => (String::new(), String::new()),
    };
    tracing::info!(
        cert = %files.cert.display(),
        identity = super::identity_of(leaf.as_ref()).as_deref().unwrap_or("(none)"),
        serial,
        not_after,
        ca = %files.ca.display(),
        cas = material.roots.len(),
        crls = ?files.crls,
        "tls files loaded"
    );
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
        revocations: Arc::new(revocations),
    })
}
