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
//! the server stops accepting and lets the calls in flight finish within the grace (then
//! their connections are closed), and at the same moment every
//! worker (and the admin port) is told to stop through its [`Stop`] receiver. A worker
//! finishes its work in flight within the grace (`shutdown_grace_ms`, [`Host::grace`]),
//! abandons and releases what is still running then, and returns; workers still running
//! [`SHUTDOWN_MARGIN`] after the grace are aborted, so nothing of a host outlives its `run`.
//!
//! [`main`] is what the service binaries share: load the configuration (exit 64 when it is
//! bad), start the runtime it asks for, set up telemetry, bind, run, shut telemetry down.

use std::collections::HashMap;
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
    /// How long a unary call may run ([`crate::server::UnaryLimitLayer`]).
    call_limit: Duration,
    /// Who may use server reflection and what each sees; `None`: anyone the CA certified
    /// sees every service.
    reflection_roles: Option<Vec<ReflectionRole>>,
}

/// One role's view of server reflection ([`Host::reflection_for`]).
#[derive(Debug, Clone)]
pub struct ReflectionRole {
    /// The certificate identities of the role's callers.
    pub callers: Vec<String>,
    /// The services (full names, `dsrelay.v1.RequestService`) the role may call: the only
    /// ones its callers see, besides health checking and reflection itself. An entry
    /// `dsrelay.v1.RequestService/Submit` names one method: a service named only by method
    /// entries is shown with those methods alone.
    pub services: Vec<&'static str>,
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
            call_limit: Duration::from_millis(settings.call_limit_ms),
            reflection_roles: None,
        }
    }

    /// Answers server reflection only to the callers of `roles` (the service's configured
    /// parties), each seeing only the services its role may call: the API's shape is no
    /// business of a certificate the CA issued to someone this service does not know, and a
    /// partner learns nothing of the operators' services. Others get PERMISSION_DENIED.
    pub fn reflection_for(mut self, roles: impl IntoIterator<Item = ReflectionRole>) -> Self {
        self.reflection_roles = Some(roles.into_iter().collect());
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
        let router = crate::server::plain_builder(self.call_limit)
            .add_routes(self.routes)
            .add_service(health_service);
        let router = match &self.reflection_roles {
            None => router
                .add_service(crate::server::reflection(None)?)
                .add_service(crate::server::reflection_v1alpha(None)?),
            Some(roles) => router
                .add_service(ByRole::build(roles, |only| {
                    crate::server::reflection(Some(only))
                })?)
                .add_service(ByRole::build(roles, |only| {
                    crate::server::reflection_v1alpha(Some(only))
                })?),
        };

        let (stop_tx, stop_rx) = watch::channel(false);
        // A worker that panics has stopped doing its work for good (a bug, not a condition it
        // waits out); the service then shuts down, so that it exits with an error and its
        // supervisor starts it again whole, instead of serving on without that work.
        let (panicked_tx, mut panicked_rx) = watch::channel::<Option<&'static str>>(None);
        let panicked_tx = Arc::new(panicked_tx);
        let mut running: Vec<(&'static str, JoinHandle<()>)> = self
            .workers
            .into_iter()
            .map(|(worker, start)| {
                let work = start(stop_rx.clone());
                let panicked = panicked_tx.clone();
                let watched = async move {
                    use futures::FutureExt;
                    if let Err(panic) = std::panic::AssertUnwindSafe(work).catch_unwind().await {
                        tracing::error!(
                            worker,
                            "a worker panicked; the service shuts down so that it is started \
                             again whole"
                        );
                        panicked.send_if_modified(|p| p.replace(worker).is_none());
                        std::panic::resume_unwind(panic);
                    }
                };
                (worker, tokio::spawn(watched))
            })
            .collect();
        running.push(("tls reload", tokio::spawn(watcher.run(stop_rx.clone()))));
        if let Some(admin) = crate::metrics::spawn(admin, self.scrape, self.admin_token, stop_rx) {
            running.push(("admin port", admin));
        }
        // The address itself (`127.0.0.1:50051`), not the Option's debug text.
        let addr = listener.local_addr().ok().map(tracing::field::display);
        let (runtime, worker_threads) = runtime_shape();
        tracing::info!(service = name, addr, runtime, worker_threads, "serving");
        // The workers stop while the server drains, not after it: the grace counts from the
        // signal, whatever the calls in flight do.
        let stop_tx = Arc::new(stop_tx);
        let began = Arc::new(std::sync::OnceLock::new());
        let (signal, began_at) = (stop_tx.clone(), began.clone());
        let grace = self.grace;
        let shutdown = async move {
            tokio::select! {
                () = shutdown => {}
                _ = panicked_rx.wait_for(Option::is_some) => {}
            }
            let _ = began_at.set(tokio::time::Instant::now());
            tracing::info!(service = name, ?grace, "shutting down");
            let _ = signal.send(true);
        };
        // Calls get the same grace as the workers, counted from the same signal.
        let served = crate::server::serve_tls(router, listener, live, shutdown, grace).await;
        // Nobody listening any more is fine: every worker has already returned.
        let _ = stop_tx.send(true);
        let began = began
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now);
        stop_within(running, began + grace + SHUTDOWN_MARGIN).await;
        tracing::info!(service = name, "stopped");
        if let Some(worker) = *panicked_tx.borrow() {
            return Err(anyhow::anyhow!(
                "the {name}'s worker {worker} panicked (see the log); the service stopped so \
                 that it is started again whole"
            ));
        }
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
/// and the environment with `load` (a bad one is printed and exits 64, EX_USAGE), starts the
/// async runtime its `worker_threads` asks for ([`runtime`]), sets up telemetry as `name`,
/// calls `build` (open the store, migrate, connect), and only then binds the configured
/// address and calls `run` with what `build` made, the listener and a future that resolves
/// on SIGINT or SIGTERM. Exits 1 when the service fails.
///
/// Binding after the build keeps the port closed while a replica migrates or waits for its
/// database: a load balancer's connection check, or a client, finds it refused and goes to
/// another replica, instead of a connection accepted by the kernel that nothing answers.
pub fn main<C, L, B, BFut, A, R, Fut>(
    name: &'static str,
    config_file: Option<&Path>,
    load: L,
    build: B,
    run: R,
) -> ExitCode
where
    C: AsRef<ServiceSettings>,
    L: FnOnce(Option<&Path>) -> Result<C, ConfigErrors>,
    B: FnOnce(C) -> BFut,
    BFut: Future<Output = Result<A>>,
    R: FnOnce(A, TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let config = match load(config_file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let runtime = match runtime(config.as_ref().worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = crate::telemetry::init(config.as_ref().log_json, name);
        let result = async {
            let listen = config.as_ref().listen.clone();
            let built = build(config).await?;
            // A socket handed down by whoever started us (tests, systemd) keeps its address
            // across restarts; otherwise bind it here.
            let listener = crate::listen::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            run(built, listener, Box::pin(crate::shutdown_signal())).await
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
    })
}

/// The async runtime of a service with `worker_threads` ([`ServiceSettings::worker_threads`]):
/// tokio's current-thread runtime for 1, which runs everything on the thread that blocks on
/// it, or a work-stealing pool of that many threads. Either has the blocking pool, I/O and
/// timers.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(worker_threads);
        builder
    };
    builder.enable_all().build()
}

/// How the runtime the caller runs on is made up, for the start-up log: its kind and how
/// many threads run its tasks.
fn runtime_shape() -> (&'static str, usize) {
    let handle = tokio::runtime::Handle::current();
    let kind = match handle.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
        _ => "multi_thread",
    };
    (kind, handle.metrics().num_workers())
}

/// Server reflection by the caller's role: one reflection service per role, describing
/// only that role's services, and the caller's certificate identity picks which answers.
#[derive(Clone)]
struct ByRole<S> {
    /// Certificate identity → index in `servers`.
    roles: Arc<HashMap<String, usize>>,
    servers: Vec<S>,
}

impl<S> ByRole<S> {
    fn build(roles: &[ReflectionRole], server: impl Fn(&[&str]) -> Result<S>) -> Result<Self> {
        let mut by_identity = HashMap::new();
        let mut servers = Vec::with_capacity(roles.len());
        for (i, role) in roles.iter().enumerate() {
            servers.push(server(&role.services)?);
            for caller in &role.callers {
                by_identity.insert(caller.clone(), i);
            }
        }
        Ok(Self {
            roles: Arc::new(by_identity),
            servers,
        })
    }

    /// The reflection service for the caller of `req`, or why it has none.
    fn server_for<B>(&self, req: &http::Request<B>) -> Result<&S, String> {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let leaf = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().cloned())
            .ok_or("no client certificate was presented")?;
        let identity = crate::tls::checked_identity(leaf.as_ref())?;
        self.roles
            .get(&identity)
            .map(|&i| &self.servers[i])
            .ok_or_else(|| {
                format!(
                    "server reflection answers this service's configured callers; {identity} \
                     is not one"
                )
            })
    }
}

impl<S: NamedService> NamedService for ByRole<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for ByRole<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        // Each call clones the server it goes to, which is ready then (tonic's always are).
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match self.server_for(&req) {
            Ok(server) => {
                let mut server = server.clone();
                Box::pin(async move { server.call(req).await })
            }
            Err(why) => {
                let denied = tonic::Status::permission_denied(why).into_http();
                Box::pin(async move { Ok(denied) })
            }
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

    /// A worker that panics shuts the service down: the others see stop, and `run` returns
    /// an error naming it, so the process exits for its supervisor to start it again.
    #[tokio::test]
    async fn a_worker_that_panics_stops_the_service_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki")).unwrap();
        let settings =
            ServiceSettings::new("127.0.0.1:0", "sqlite::memory:", pki.files("registry"));
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        let host = Host::new("test", &settings)
            .worker("polite", move |stop| async move {
                stopped(stop).await;
                f.store(true, Ordering::SeqCst);
            })
            .worker("buggy", |_stop| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                panic!("a bug in a worker");
            })
            .grace(Duration::from_millis(200));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let run = host.run_with_admin(listener, None, std::future::pending());
        let err = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run returns without being asked to shut down")
            .expect_err("run ends with an error");
        assert!(err.to_string().contains("worker buggy panicked"), "{err:#}");
        assert!(finished.load(Ordering::SeqCst), "the other worker saw stop");
    }

    /// A stream the client never closes holds the server only for the grace (not a fixed
    /// drain time): then its connection is closed and `run` returns.
    #[tokio::test]
    async fn calls_still_open_get_the_grace_then_their_connections_close() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki")).unwrap();
        let settings =
            ServiceSettings::new("127.0.0.1:0", "sqlite::memory:", pki.files("registry"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let grace = Duration::from_millis(300);
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(Host::new("test", &settings).grace(grace).run_with_admin(
            listener,
            None,
            async move {
                let _ = shutdown_rx.await;
            },
        ));
        let tls = pki.files("operator").client_config().unwrap();
        let channel =
            crate::tls::channel(&format!("https://localhost:{port}"), None, &tls).unwrap();
        // A health Watch stays open until the server goes.
        let mut stream = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(stream.message().await.unwrap().is_some());
        let began = std::time::Instant::now();
        shutdown_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(4), run)
            .await
            .expect("run returns once the grace is over, not after a fixed drain")
            .unwrap()
            .unwrap();
        let took = began.elapsed();
        assert!(took >= grace, "the open call got the grace: {took:?}");
        assert!(
            took < grace + SHUTDOWN_MARGIN,
            "returned within grace and margin: {took:?}"
        );
        let ended = tokio::time::timeout(Duration::from_secs(2), stream.message())
            .await
            .expect("the stream ended with its connection");
        assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    }

    /// A `dsrelay.v1.RequestService` whose handlers never answer; each call's handler sets
    /// its flag when it is dropped.
    #[derive(Clone)]
    struct Stuck(Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>);

    impl NamedService for Stuck {
        const NAME: &'static str = "dsrelay.v1.RequestService";
    }

    impl tower::Service<http::Request<Body>> for Stuck {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(
            &mut self,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: http::Request<Body>) -> Self::Future {
            struct Flag(Arc<AtomicBool>);
            impl Drop for Flag {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
            let dropped = Arc::new(AtomicBool::new(false));
            self.0.lock().unwrap().push(dropped.clone());
            let flag = Flag(dropped);
            Box::pin(async move {
                let _flag = flag;
                std::future::pending().await
            })
        }
    }

    /// A unary call whose handler is stuck ends after `call_limit_ms` with DEADLINE_EXCEEDED
    /// naming the limit, its handler dropped; a caller's shorter deadline ends it first; a
    /// streaming call is not cut by the limit.
    #[tokio::test]
    async fn a_stuck_unary_call_ends_at_the_call_limit() {
        use dsrelay_proto::v1::request_service_client::RequestServiceClient;
        use dsrelay_proto::v1::{GetRequest, WatchRequest};
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki")).unwrap();
        let mut settings =
            ServiceSettings::new("127.0.0.1:0", "sqlite::memory:", pki.files("registry"));
        settings.call_limit_ms = 300;
        let handlers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let host = Host::new("test", &settings).service(Stuck(handlers.clone()));
        tokio::spawn(host.run_with_admin(listener, None, async move {
            let _ = shutdown_rx.await;
        }));
        let tls = pki.files("operator").client_config().unwrap();
        let channel =
            crate::tls::channel(&format!("https://localhost:{port}"), None, &tls).unwrap();
        let mut client = RequestServiceClient::new(channel);

        let began = std::time::Instant::now();
        let status = client
            .get(GetRequest::default())
            .await
            .expect_err("a stuck handler never answers");
        let took = began.elapsed();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("300 ms (call_limit_ms)"),
            "{status:?}"
        );
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            handlers.lock().unwrap()[0].load(Ordering::SeqCst),
            "the stuck handler was dropped"
        );

        let mut shorter = tonic::Request::new(GetRequest::default());
        shorter.set_timeout(Duration::from_millis(100));
        let began = std::time::Instant::now();
        let status = client.get(shorter).await.expect_err("still stuck");
        // The client's own timer or the server's, whichever fires first.
        let deadline = [tonic::Code::Cancelled, tonic::Code::DeadlineExceeded];
        assert!(deadline.contains(&status.code()), "{status:?}");
        assert!(
            !status.message().contains("call_limit_ms"),
            "the caller's own deadline ended it: {status:?}"
        );
        assert!(began.elapsed() < Duration::from_millis(300));

        let mut watch = tonic::Request::new(WatchRequest::default());
        watch.set_timeout(Duration::from_millis(800));
        let began = std::time::Instant::now();
        let status = client.watch(watch).await.expect_err("stuck too");
        assert!(deadline.contains(&status.code()), "{status:?}");
        assert!(
            !status.message().contains("call_limit_ms"),
            "a stream is not cut by the unary limit: {status:?}"
        );
        assert!(began.elapsed() >= Duration::from_millis(800));
    }

    /// The start-up lines give each address as it is written (`127.0.0.1:5`), not as the
    /// debug text of an `Option` (`Some(127.0.0.1:5)`).
    #[tokio::test]
    async fn the_serving_lines_log_the_addresses_themselves() {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki")).unwrap();
        let settings =
            ServiceSettings::new("127.0.0.1:0", "sqlite::memory:", pki.files("registry"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (port, admin_port) = (
            listener.local_addr().unwrap().port(),
            admin.local_addr().unwrap().port(),
        );
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(Host::new("test", &settings).run_with_admin(
            listener,
            Some(admin),
            async move {
                let _ = shutdown_rx.await;
            },
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        for (about, port) in [("\"serving\"", port), ("admin port serving", admin_port)] {
            let line = text.lines().find(|l| l.contains(about));
            let line = line.unwrap_or_else(|| panic!("no line about {about}: {text}"));
            let wanted = format!("\"addr\":\"127.0.0.1:{port}\"");
            assert!(line.contains(&wanted), "{line}");
        }
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

    /// A configuration shaped like the services' own.
    struct Sample(ServiceSettings);

    impl AsRef<ServiceSettings> for Sample {
        fn as_ref(&self) -> &ServiceSettings {
            &self.0
        }
    }

    #[test]
    fn a_bad_configuration_exits_64_before_anything_starts() {
        let code = main(
            "test",
            None,
            |_| {
                Err::<Sample, _>(ConfigErrors(vec![
                    "listen: must be an IP address and port".into()
                ]))
            },
            |_| async { panic!("built with a bad configuration") },
            |(), _, _| async { panic!("ran with a bad configuration") },
        );
        assert_eq!(format!("{code:?}"), format!("{:?}", ExitCode::from(64)));
    }

    /// `main` runs the service on the runtime its `worker_threads` asks for: one thread, or
    /// a pool of that many.
    #[test]
    fn the_service_runs_on_the_runtime_its_configuration_asks_for() {
        for (threads, wanted) in [(1, ("current_thread", 1)), (3, ("multi_thread", 3))] {
            let mut settings = ServiceSettings::new(
                "127.0.0.1:0",
                "sqlite::memory:",
                TlsFiles::new("ca.pem", "c.pem", "c.key"),
            );
            settings.worker_threads = threads;
            let seen = Arc::new(std::sync::Mutex::new(None));
            let s = seen.clone();
            let code = main(
                "test",
                None,
                |_| Ok(Sample(settings)),
                |_| async { Ok(()) },
                |(), _, _| async move {
                    *s.lock().unwrap() = Some(runtime_shape());
                    Ok(())
                },
            );
            assert_eq!(format!("{code:?}"), format!("{:?}", ExitCode::SUCCESS));
            assert_eq!(*seen.lock().unwrap(), Some(wanted), "{threads} threads");
        }
    }

    /// The port is bound only after the build (a store opening, migrating, waiting for its
    /// database): here it is held by the test itself all along, so the build runs, and only
    /// the bind after it fails, naming the address. Bound before the build, the service
    /// would have failed before building anything.
    #[test]
    fn the_port_is_bound_only_after_the_build() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let settings = ServiceSettings::new(
            &addr,
            "sqlite::memory:",
            TlsFiles::new("ca.pem", "c.pem", "c.key"),
        );
        let built = Arc::new(AtomicBool::new(false));
        let b = built.clone();
        let code = main(
            "test",
            None,
            |_| Ok(Sample(settings)),
            |_| async move {
                b.store(true, Ordering::SeqCst);
                Ok(())
            },
            |(), _, _| async { panic!("ran without its port") },
        );
        assert!(
            built.load(Ordering::SeqCst),
            "the build ran before the bind"
        );
        assert_eq!(format!("{code:?}"), format!("{:?}", ExitCode::FAILURE));
        drop(held);
    }
}
