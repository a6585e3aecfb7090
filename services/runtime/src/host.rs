//! One host for every dsrelay service: the gRPC server with health and reflection, the admin
//! port, and the background workers, started together and stopped together.
//!
//! A service hands its parts to a [`Host`] and calls [`Host::run`]:
//!
//! ```text
//! Host::new("registry", &config.service)
//!     .service(RequestServiceServer::new(api))
//!     .metrics(move || render(shared.clone()))
//!     .worker("dispatcher", move |stop| dispatcher::run(shared, stop))
//!     .run(listener, shutdown)
//!     .await
//! ```
//!
//! Workers are spawned only inside `run`, after the server could be configured, so a service
//! that fails to start leaves nothing running. The host serves with a [`LiveTls`] (the
//! service's own when it has outbound channels over the same files, [`Host::tls`]) and runs
//! its watcher as one more worker, so a changed certificate, key, CA bundle or revocation
//! list (or a SIGHUP) takes effect for the next connection in and out. When shutdown begins
//! the server stops accepting and finishes the calls in flight, and at the same moment every
//! worker (and the admin port) is told to stop through its [`Stop`] receiver. A worker
//! finishes its work in flight within the grace (`shutdown_grace_ms`, [`Host::grace`]),
//! abandons and releases what is still running then, and returns; workers still running
//! [`SHUTDOWN_MARGIN`] after the grace are aborted, so nothing of a host outlives its `run`.
//!
//! [`main`] is what the service binaries share: load the configuration (exit 64 when it is
//! bad), set up telemetry, bind, run, shut telemetry down.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::config::{ConfigErrors, EXIT_USAGE};
use crate::metrics::Render;
use crate::settings::ServiceSettings;
use crate::tls::{LiveTls, TlsFiles};

/// How long after the grace a worker may take to release what it abandoned and return
/// before it is aborted.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(2);

/// Largest health check request decoded (tonic's default would be 4 MiB).
pub const MAX_HEALTH_CHECK_BYTES: usize = 1024;

/// Turns true when a worker should stop: it finishes what it is doing and returns.
pub type Stop = watch::Receiver<bool>;

/// The shutdown future [`main`] hands a service: it resolves on SIGINT or SIGTERM.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

type Worker = Box<dyn FnOnce(Stop) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A service's gRPC services, admin scrape and workers, served and stopped as one.
pub struct Host {
    /// The service's name in logs (`registry`).
    name: &'static str,
    /// Read when `run` starts (unless `live` is given), so a bad file fails the start rather
    /// than the build.
    tls: TlsFiles,
    /// The service's own live TLS, shared with its outbound channels, so one watcher
    /// reloads both directions.
    live: Option<LiveTls>,
    /// Bound by [`Host::run`]; callers that bind their own use [`Host::run_with_admin`].
    admin_listen: Option<String>,
    /// What `/metrics` on the admin port requires, if anything.
    admin_token: Option<String>,
    routes: Routes,
    /// Reported SERVING by the health service while the host runs.
    health_names: Vec<&'static str>,
    scrape: Render,
    workers: Vec<(&'static str, Worker)>,
    /// How long work in flight gets to finish once shutdown begins.
    grace: Duration,
    /// Who may use server reflection; `None`: anyone the CA certified.
    reflection_callers: Option<Arc<BTreeSet<String>>>,
}

impl Host {
    /// A host with no services or workers yet, serving with `settings`' TLS files and admin
    /// port.
    pub fn new(name: &'static str, settings: &ServiceSettings) -> Self {
        Self {
            name,
            tls: settings.tls.clone(),
            live: None,
            admin_listen: settings.admin_listen.clone(),
            admin_token: settings.admin_token.clone(),
            routes: Routes::default(),
            health_names: Vec::new(),
            // A service without metrics of its own still answers scrapes, with no families.
            scrape: Arc::new(|| Box::pin(async { Ok(String::new()) })),
            workers: Vec::new(),
            grace: Duration::from_millis(settings.shutdown_grace_ms),
            reflection_callers: None,
        }
    }

    /// Answers server reflection only to callers with one of `identities` (the service's
    /// configured parties): the API's shape is no business of a certificate the CA issued to
    /// someone this service does not know. Others get PERMISSION_DENIED.
    pub fn reflection_for(mut self, identities: impl IntoIterator<Item = String>) -> Self {
        self.reflection_callers = Some(Arc::new(identities.into_iter().collect()));
        self
    }

    /// Serves with `live` (loaded from the settings' TLS files by the service, which opens
    /// its outbound channels over it too) instead of loading the files again in `run`.
    pub fn tls(mut self, live: LiveTls) -> Self {
        self.live = Some(live);
        self
    }

    /// Serves `service` (a generated tonic server, with its message limits set) and reports
    /// it in the health service under its gRPC name.
    pub fn service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.health_names.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// What `GET /metrics` on the admin port answers: the whole exposition, collected when
    /// scraped.
    pub fn metrics<F, Fut>(mut self, scrape: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String>> + Send + 'static,
    {
        self.scrape = Arc::new(move || Box::pin(scrape()));
        self
    }

    /// A background worker, spawned when the host runs; it must return soon after its
    /// [`Stop`] turns true.
    pub fn worker<F, Fut>(mut self, name: &'static str, worker: F) -> Self
    where
        F: FnOnce(Stop) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.workers
            .push((name, Box::new(move |stop| Box::pin(worker(stop)))));
        self
    }

    /// How long the workers' work in flight gets to finish once shutdown begins
    /// (`shutdown_grace_ms` of the settings unless set); workers get [`SHUTDOWN_MARGIN`] more
    /// to return.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Binds the admin port the settings name (if any), then [`Host::run_with_admin`].
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let admin = crate::metrics::bind(self.admin_listen.as_deref()).await?;
        self.run_with_admin(listener, admin, shutdown).await
    }

    /// Serves on `listener`, the admin port on `admin` (none: no admin port, whatever the
    /// settings say) and runs the workers until `shutdown` resolves; then stops the workers
    /// and returns how serving ended.
    pub async fn run_with_admin(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let name = self.name;
        let (health, health_service) = tonic_health::server::health_reporter();
        // Any certified peer may check health, and a check names one service: anything
        // longer than a service name is refused from its length prefix, not buffered.
        let health_service = health_service.max_decoding_message_size(MAX_HEALTH_CHECK_BYTES);
        for service in &self.health_names {
            health
                .set_service_status(*service, ServingStatus::Serving)
                .await;
        }
        let live = match self.live {
            Some(live) => live,
            None => LiveTls::load(&self.tls)
                .with_context(|| format!("loading the {name}'s TLS files"))?,
        };
        let watcher = live.watcher()?;
        let router = crate::server::plain_builder()
            .add_routes(self.routes)
            .add_service(health_service)
            .add_service(InterceptedService::new(
                crate::server::reflection()?,
                reflection_gate(self.reflection_callers.clone()),
            ))
            .add_service(InterceptedService::new(
                crate::server::reflection_v1alpha()?,
                reflection_gate(self.reflection_callers.clone()),
            ));

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut running: Vec<(&'static str, JoinHandle<()>)> = self
            .workers
            .into_iter()
            .map(|(worker, start)| (worker, tokio::spawn(start(stop_rx.clone()))))
            .collect();
        running.push(("tls reload", tokio::spawn(watcher.run(stop_rx.clone()))));
        if let Some(admin) = crate::metrics::spawn(admin, self.scrape, self.admin_token, stop_rx) {
            running.push(("admin port", admin));
        }
        let addr = listener.local_addr().ok();
        tracing::info!(service = name, ?addr, "serving");
        // The workers stop while the server drains, not after it: the grace counts from the
        // signal, whatever the calls in flight do.
        let stop_tx = Arc::new(stop_tx);
        let began = Arc::new(std::sync::OnceLock::new());
        let (signal, began_at) = (stop_tx.clone(), began.clone());
        let grace = self.grace;
        let shutdown = async move {
            shutdown.await;
            let _ = began_at.set(tokio::time::Instant::now());
            tracing::info!(service = name, ?grace, "shutting down");
            let _ = signal.send(true);
        };
        let served = crate::server::serve_tls(router, listener, live, shutdown).await;
        // Nobody listening any more is fine: every worker has already returned.
        let _ = stop_tx.send(true);
        let began = began
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now);
        stop_within(running, began + grace + SHUTDOWN_MARGIN).await;
        tracing::info!(service = name, "stopped");
        served
    }
}

/// Waits for the workers until `deadline` and aborts those still running then.
async fn stop_within(running: Vec<(&'static str, JoinHandle<()>)>, deadline: tokio::time::Instant) {
    for (worker, mut handle) in running {
        match tokio::time::timeout_at(deadline, &mut handle).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(worker, error = %e, "worker failed"),
            Err(_) => {
                tracing::warn!(worker, "worker did not stop in time; aborting it");
                handle.abort();
            }
        }
    }
}

/// The body of every service binary's `main`: loads the configuration from `config_file`
/// and the environment with `load` (a bad one is printed and exits 64, EX_USAGE), sets up
/// telemetry as `name`, binds the configured address, and calls `run` with the listener and
/// a future that resolves on SIGINT or SIGTERM. Exits 1 when the service fails.
pub async fn main<C, L, R, Fut>(
    name: &'static str,
    config_file: Option<&Path>,
    load: L,
    run: R,
) -> ExitCode
where
    C: AsRef<ServiceSettings>,
    L: FnOnce(Option<&Path>) -> Result<C, ConfigErrors>,
    R: FnOnce(C, TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let config = match load(config_file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let telemetry = crate::telemetry::init(config.as_ref().log_json, name);
    let result = async {
        let listen = config.as_ref().listen.clone();
        // A socket handed down by whoever started us (tests, systemd) keeps its address
        // across restarts; otherwise bind it here.
        let listener = crate::listen::bind(&listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        run(config, listener, Box::pin(crate::shutdown_signal())).await
    }
    .await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            ExitCode::FAILURE
        }
    }
}

/// The check in front of server reflection: the caller must be one of `callers` (when set).
fn reflection_gate(
    callers: Option<Arc<BTreeSet<String>>>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        let Some(callers) = &callers else {
            return Ok(req);
        };
        match crate::tls::peer_identity(&req) {
            Ok(identity) if callers.contains(&identity) => Ok(req),
            Ok(identity) => Err(tonic::Status::permission_denied(format!(
                "server reflection answers this service's configured callers; {identity} is \
                 not one"
            ))),
            Err(why) => Err(tonic::Status::permission_denied(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::pki::DevPki;

    async fn stopped(mut stop: Stop) {
        let _ = stop.wait_for(|s| *s).await;
    }

    #[tokio::test]
    async fn workers_start_in_run_and_stop_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki")).unwrap();
        let settings =
            ServiceSettings::new("127.0.0.1:0", "sqlite::memory:", pki.files("registry"));
        let started = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let (s, f) = (started.clone(), finished.clone());
        let host = Host::new("test", &settings).worker("polite", move |stop| async move {
            s.store(true, Ordering::SeqCst);
            stopped(stop).await;
            f.store(true, Ordering::SeqCst);
        });
        tokio::task::yield_now().await;
        assert!(!started.load(Ordering::SeqCst), "spawned before run");

        let stubborn_dropped = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(stubborn_dropped.clone());
        let host = host
            .worker("stubborn", move |_stop| async move {
                let _flag = flag;
                std::future::pending::<()>().await;
            })
            .grace(Duration::from_millis(200));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(host.run_with_admin(listener, None, async move {
            let _ = shutdown_rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(started.load(Ordering::SeqCst));
        assert!(!finished.load(Ordering::SeqCst));
        shutdown_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run returns within the grace")
            .unwrap()
            .unwrap();
        assert!(
            finished.load(Ordering::SeqCst),
            "the polite worker saw stop"
        );
        // Abort takes effect at the task's next poll.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            stubborn_dropped.load(Ordering::SeqCst),
            "the stubborn worker was aborted"
        );
    }

    #[tokio::test]
    async fn a_bad_tls_file_fails_run_before_any_worker_starts() {
        let settings = ServiceSettings::new(
            "127.0.0.1:0",
            "sqlite::memory:",
            TlsFiles::new(
                "/nonexistent/ca.pem",
                "/nonexistent/c.pem",
                "/nonexistent/c.key",
            ),
        );
        let started = Arc::new(AtomicBool::new(false));
        let s = started.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = Host::new("test", &settings)
            .worker("w", move |stop| async move {
                s.store(true, Ordering::SeqCst);
                stopped(stop).await;
            })
            .run_with_admin(listener, None, std::future::pending())
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("loading the test's TLS files"),
            "{err:#}"
        );
        tokio::task::yield_now().await;
        assert!(!started.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_bad_configuration_exits_64_before_anything_starts() {
        struct Sample(ServiceSettings);
        impl AsRef<ServiceSettings> for Sample {
            fn as_ref(&self) -> &ServiceSettings {
                &self.0
            }
        }
        let code = main(
            "test",
            None,
            |_| Err::<Sample, _>(ConfigErrors(vec!["listen: \"x\" is not host:port".into()])),
            |_, _, _| async { panic!("ran with a bad configuration") },
        )
        .await;
        assert_eq!(format!("{code:?}"), format!("{:?}", ExitCode::from(64)));
    }
}
